"""Shared fixtures: signing keys, a real JWKS server on loopback, and a token maker."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import Algorithm, RSAAlgorithm
from pytest_aiohttp import AiohttpServer

# `browser`; Redis servers; server processes on Redis (`nodes`); the kit applications use
# (named here too, in case the entry point is not installed); pytester, which runs
# docs/testing.md's sample application's own suite.
pytest_plugins = [
    "tests.browser",
    "tests.redis_server",
    "tests.redis_nodes",
    "aiohttp_wsbus.testing",
    "pytester",
]

ISSUER = "https://idp.test/"
AUDIENCE = "wsbus"
KEY_ID = "test-key"


class MakeToken(Protocol):
    def __call__(
        self,
        sub: str = "alice",
        channels: object = ("chat:*",),
        publish: object = ("chat:lobby",),
        exp_in: float | None = 300,
        kid: str | None = KEY_ID,
        alg: str = "RS256",
        key: Any = None,
        **extra_claims: Any,
    ) -> str: ...


class JwksServer:
    """A JWKS endpoint whose keys and health the test controls."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.url = ""
        self.keys = keys
        self.fail = False
        self.requests = 0
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        async with self._arrived:
            self.requests += 1
            self._arrived.notify_all()
        if self.fail:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})

    # The timeout parameter is the agreed fixture interface; it feeds asyncio.timeout.
    async def wait_for_requests(self, count: int, timeout: float = 5) -> None:
        """Wait until at least `count` requests have arrived."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.requests >= count)


def public_jwk(private_key: Any, kid: str, algorithm: type[Algorithm]) -> dict[str, Any]:
    """The public JWK of a cryptography private key, with `kid`."""
    jwk: dict[str, Any] = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


@pytest.fixture(scope="session")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def jwks_server(
    aiohttp_server: AiohttpServer, rsa_private_key: rsa.RSAPrivateKey
) -> JwksServer:
    server = JwksServer([public_jwk(rsa_private_key, KEY_ID, RSAAlgorithm)])
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    test_server = await aiohttp_server(app)
    server.url = str(test_server.make_url("/jwks.json"))
    return server


@pytest.fixture
def make_token(rsa_private_key: rsa.RSAPrivateKey) -> MakeToken:
    """Sign a token; an extra claim set to None removes that claim, exp_in=None drops exp."""

    def make(
        sub: str = "alice",
        channels: object = ("chat:*",),
        publish: object = ("chat:lobby",),
        exp_in: float | None = 300,
        kid: str | None = KEY_ID,
        alg: str = "RS256",
        key: Any = None,
        **extra_claims: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": sub,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "channels": _listed(channels),
            "publish": _listed(publish),
        }
        if exp_in is not None:
            claims["exp"] = now + int(exp_in)
        claims.update(extra_claims)
        claims = {name: value for name, value in claims.items() if value is not None}
        headers = {"kid": kid} if kid is not None else None
        signing_key = rsa_private_key if key is None else key
        return jwt.encode(claims, signing_key, algorithm=alg, headers=headers)

    return make


def _listed(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
