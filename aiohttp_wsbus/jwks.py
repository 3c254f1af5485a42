"""The key set of one JWKS URL: fetched at start, refreshed, refetched for an unknown key.

This module only keeps keys; `tokens.JwksVerifier` checks tokens with them.

- A failed fetch keeps the last good keys ("stale"); a document with no usable
  key counts as a failure.
- Refetches on demand (a token names a key not in the set) happen at most once
  per `refetch_interval`, and concurrent ones share one request.
- The response is read up to `MAX_JWKS_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = [
    "KEY_TYPE_BY_ALGORITHM",
    "MAX_JWKS_BYTES",
    "PUBLIC_KEY_ALGORITHMS",
    "SECRET_ALGORITHMS",
    "JwksKey",
    "JwksKeySet",
    "parse_jwks",
]

logger = logging.getLogger(__name__)

MAX_JWKS_BYTES: Final = 1 << 20
"""A JWKS response larger than this is refused (a real one is a few KiB)."""

# Every JWS algorithm the bus accepts, and the JWK key type ("kty") it signs with.
KEY_TYPE_BY_ALGORITHM: Final[Mapping[str, str]] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
    "HS256": "oct",
    "HS384": "oct",
    "HS512": "oct",
}
# "oct" is a shared secret: never taken from a JWKS, only from jwt_secret.
SECRET_ALGORITHMS: Final = frozenset(a for a, kty in KEY_TYPE_BY_ALGORITHM.items() if kty == "oct")
PUBLIC_KEY_ALGORITHMS: Final = frozenset(KEY_TYPE_BY_ALGORITHM) - SECRET_ALGORITHMS

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


@dataclass(frozen=True, slots=True)
class JwksKey:
    """One usable signing key from a JWKS."""

    key_id: str | None
    key_type: str
    algorithm: str | None  # the JWK's own "alg", when it names one
    public_key: PublicKey
    jwk_json: str  # canonical JSON, to notice when the key set changes

    def fits(self, algorithm: str) -> bool:
        """Whether a token signed with `algorithm` may be checked with this key."""
        if self.algorithm is not None and self.algorithm != algorithm:
            return False
        return KEY_TYPE_BY_ALGORITHM.get(algorithm) == self.key_type


class JwksKeySet:
    """The signing keys served at one JWKS URL, kept fresh in the background."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: Sequence[str],
        on_change: Callable[[], None],
        refetch_interval: float = 30.0,
        refresh_interval: float = 300.0,
        fetch_timeout: float = 5.0,
        startup_retry: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.algorithms = tuple(algorithms)
        self.refetch_interval = refetch_interval
        self.refresh_interval = refresh_interval
        self.fetch_timeout = fetch_timeout
        self.startup_retry = startup_retry
        self.fetch_count = 0
        self.fetch_failures = 0
        self._on_change = on_change
        self._clock = clock
        self._keys: list[JwksKey] | None = None
        self._last_fetch_ok = False
        # Set so the first on-demand fetch is never held back by the rate limit.
        self._last_on_demand_fetch = float("-inf")
        self._fetch_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._owns_session = False
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def keys(self) -> list[JwksKey] | None:
        """The current keys; None until a fetch has succeeded."""
        return self._keys

    @property
    def status(self) -> str:
        """'fresh', 'stale' (keys kept after a failed fetch) or 'unavailable'."""
        if not self._keys:
            return "unavailable"
        return "fresh" if self._last_fetch_ok else "stale"

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Fetch the keys once (failure only logs) and start the periodic refresh.

        A failed first fetch is retried after `startup_retry` seconds and only
        logged as a warning if that fails too: the identity provider may be
        this very app, which does not listen until its startup is over.
        """
        if session is None:
            session = aiohttp.ClientSession()
            self._owns_session = True
        self._session = session
        async with self._fetch_lock:
            await self._fetch(is_startup=True)
        first_delay = None if self._last_fetch_ok else self.startup_retry
        self._refresh_task = asyncio.create_task(
            self._refresh_forever(first_delay), name="wsbus-jwks-refresh"
        )

    async def stop(self) -> None:
        """Stop the refresh; close the HTTP session if start() made it."""
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
            self._refresh_task = None
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def refetch_unless(self, is_satisfied: Callable[[], bool]) -> None:
        """Refetch for an unknown key, at most once per refetch_interval."""
        async with self._fetch_lock:
            if is_satisfied():
                return  # someone else's fetch brought the key while we waited
            now = self._clock()
            if now - self._last_on_demand_fetch < self.refetch_interval:
                return
            self._last_on_demand_fetch = now
            await self._fetch()

    async def _refresh_forever(self, first_delay: float | None) -> None:
        while True:
            # Retry sooner while keys are missing or stale.
            delay = self.refresh_interval
            if self.status != "fresh":
                delay = min(delay, self.refetch_interval)
            if first_delay is not None:
                delay, first_delay = first_delay, None
            await asyncio.sleep(delay)
            async with self._fetch_lock:
                await self._fetch()

    async def _fetch(self, *, is_startup: bool = False) -> None:
        """Fetch and install the key set; on any failure keep the last good keys."""
        if self._session is None:
            raise RuntimeError("JwksKeySet.start() must be awaited before fetching")
        self.fetch_count += 1
        try:
            document = await self._download(self._session)
            keys = parse_jwks(document, self.algorithms)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            self.fetch_failures += 1
            self._last_fetch_ok = False
            if is_startup:
                logger.info(
                    "JWKS not reachable at startup (%s); retrying in %g s",
                    type(error).__name__,
                    self.startup_retry,
                )
            else:
                logger.warning(
                    "JWKS fetch from %s failed: %s %s", self.url, type(error).__name__, error
                )
            return
        if self._keys is None or {k.jwk_json for k in keys} != {k.jwk_json for k in self._keys}:
            self._on_change()
        self._keys = keys
        self._last_fetch_ok = True

    async def _download(self, session: aiohttp.ClientSession) -> object:
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with session.get(self.url, timeout=timeout) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            if (response.content_length or 0) > MAX_JWKS_BYTES:
                raise ValueError("JWKS response too large")
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS response too large")
        return json.loads(body)


def parse_jwks(document: object, algorithms: Sequence[str]) -> list[JwksKey]:
    """The signing keys of a JWKS document usable with `algorithms`.

    Keys for another use, another algorithm, or that fail to parse are skipped;
    a document with no usable key at all is an error (so the last good set stays).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys = []
    for jwk_data in document["keys"]:
        key = _parse_jwk(jwk_data, algorithms)
        if key is not None:
            keys.append(key)
    if not keys:
        raise ValueError("JWKS has no usable signing key")
    return keys


def _parse_jwk(jwk_data: object, algorithms: Sequence[str]) -> JwksKey | None:
    if not isinstance(jwk_data, dict):
        return None
    key_id = jwk_data.get("kid")
    algorithm = jwk_data.get("alg")
    if jwk_data.get("use", "sig") != "sig":
        return None
    if algorithm is not None and algorithm not in algorithms:
        return None
    if key_id is not None and not isinstance(key_id, str):
        return None
    try:
        public_key = jwt.PyJWK(jwk_data).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        logger.warning("JWKS key %r skipped: it does not parse", key_id)
        return None
    key_type = _key_type(public_key)
    if key_type is None:
        return None  # symmetric or private key material: never used from a JWKS
    return JwksKey(
        key_id=key_id,
        key_type=key_type,
        algorithm=algorithm,
        public_key=public_key,
        jwk_json=json.dumps(jwk_data, sort_keys=True),
    )


def _key_type(key: object) -> str | None:
    if isinstance(key, RSAPublicKey):
        return "RSA"
    if isinstance(key, EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, Ed25519PublicKey | Ed448PublicKey):
        return "OKP"
    return None
