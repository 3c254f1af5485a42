"""A test identity provider: an RSA key, its JWKS served on loopback, tokens on demand."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import Algorithm, RSAAlgorithm

__all__ = ["IdentityProvider", "JwksServer", "public_jwk"]


def public_jwk(
    private_key: Any, kid: str, algorithm: type[Algorithm] = RSAAlgorithm
) -> dict[str, Any]:
    """The public JWK of a cryptography private key, with `kid`."""
    jwk: dict[str, Any] = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose keys and health the test controls.

    `keys` is the served list (change it to rotate keys); `fail = True` makes
    it answer 500; `requests` counts what arrived.
    """

    def __init__(self, keys: list[dict[str, Any]], path: str = "/.well-known/jwks.json") -> None:
        self.keys = keys
        self.path = path
        self.url = ""
        self.fail = False
        self.requests = 0
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        async with self._arrived:
            self.requests += 1
            self._arrived.notify_all()
        if self.fail:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` requests have arrived (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.requests >= count)

    async def start(self) -> None:
        """Serve on a free loopback port; `url` says where."""
        app = web.Application()
        app.router.add_get(self.path, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{self.path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class IdentityProvider:
    """Signs RS256 tokens the bus accepts once set up with `**idp.settings`.

    `await start()` serves the JWKS on loopback (the `wsbus_idp` fixture does
    it); `issue(sub, channels=..., publish=..., ttl=..., **claims)` signs a token.
    """

    def __init__(
        self,
        *,
        issuer: str = "https://idp.wsbus.test/",
        audience: str = "wsbus",
        key: rsa.RSAPrivateKey | None = None,
        key_id: str = "wsbus-test-key",
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = key_id
        self.jwks = JwksServer([public_jwk(self.key, key_id)])

    async def start(self) -> None:
        await self.jwks.start()

    async def stop(self) -> None:
        await self.jwks.stop()

    @property
    def jwks_url(self) -> str:
        if not self.jwks.url:
            raise RuntimeError("the identity provider is not started: await idp.start() first")
        return self.jwks.url

    @property
    def settings(self) -> dict[str, Any]:
        """What `aiohttp_wsbus.setup(app, **idp.settings)` needs to trust these tokens."""
        return {"jwks_url": self.jwks_url, "issuer": self.issuer, "audience": self.audience}

    def issue(
        self,
        sub: str,
        *,
        channels: str | list[str] | tuple[str, ...] = (),
        publish: str | list[str] | tuple[str, ...] = (),
        ttl: float = 300.0,
        **claims: Any,
    ) -> str:
        """A signed token for `sub`; an extra claim set to None removes that claim."""
        now = time.time()
        payload: dict[str, Any] = {
            "sub": sub,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "exp": now + ttl,
            "channels": channels if isinstance(channels, str) else list(channels),
            "publish": publish if isinstance(publish, str) else list(publish),
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.key_id})
