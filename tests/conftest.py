"""Shared fixtures: signing keys, a real JWKS server on loopback, and a token maker.

The key and the JWKS endpoint are aiohttp_wsbus.testing's, the kit applications use.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from aiohttp_wsbus.testing import JwksServer, public_jwk, shared_key

__all__ = ["AUDIENCE", "ISSUER", "KEY_ID", "JwksServer", "MakeToken", "public_jwk"]

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


@pytest.fixture(scope="session")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return shared_key()


@pytest.fixture
async def jwks_server(rsa_private_key: rsa.RSAPrivateKey) -> AsyncIterator[JwksServer]:
    """The kit's JWKS endpoint (what wsbus_idp serves), with the tests' own key id."""
    server = JwksServer([public_jwk(rsa_private_key, KEY_ID, RSAAlgorithm)], path="/jwks.json")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


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
