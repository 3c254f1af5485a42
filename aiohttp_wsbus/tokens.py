"""Token verification: a JWKS key cache (async fetch, kid rotation, refetch limits) -> Claims.

This module knows nothing of sockets. A verifier turns a raw JWT into `Claims` or
raises `InvalidToken(reason)` / `KeysUnavailable`; `web.py` maps those to close codes.

Rules worth knowing:

- The token's `alg` header must be on the allow-list *and* match the key's type
  (RSA: RS*/PS*, EC: ES*, OKP: EdDSA), and the JWK's own `alg`, when it has one.
- `jku`, `x5u` and `jwk` headers are never looked at: keys come only from the JWKS.
- A token without `kid` is tried against every key whose type fits its `alg`
  (first signature that verifies wins). Issuers that publish more than one key
  should set `kid`; each candidate costs one signature check.
- Time (`exp` required, `nbf`, `iat`) is checked here against the injectable
  `clock` with `leeway`, because PyJWT's own checks read the system clock.
- Grant claims are lenient: a list keeps its string entries (others dropped), a
  string is split on whitespace, anything else (or missing) grants nothing.
- Verified claims are cached by sha256(token) until exp + leeway; a cache hit
  still re-checks expiry. The cache is emptied whenever the key set changes, so
  removing a key from the JWKS revokes the tokens it signed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.types import Options

from .errors import InvalidSettings, InvalidToken, KeysUnavailable

__all__ = ["Claims", "JwksVerifier", "SecretVerifier", "TokenVerifier"]

logger = logging.getLogger(__name__)

MAX_JWKS_BYTES: Final = 1 << 20
"""A JWKS response larger than this is refused (a real one is a few KiB)."""

# Which key type each asymmetric algorithm may be used with.
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
}
SECRET_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
# Longer tokens are refused unread (a token is verified and cached per socket).
MAX_TOKEN_LENGTH: Final = 16384

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its holder."""

    subject: str
    expires_at: int
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    token_hash: bytes


class TokenVerifier(ABC):
    """Turns a raw JWT into Claims; subclasses only say where keys come from."""

    fetch_count: int
    fetch_failures: int

    def __init__(
        self,
        *,
        issuer: str | None,
        audience: str | None,
        leeway: float,
        channels_claim: str,
        publish_claim: str,
        cache_size: int,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.channels_claim = channels_claim
        self.publish_claim = publish_claim
        self.fetch_count = 0
        self.fetch_failures = 0
        self._clock = clock
        self._cache = ClaimsCache(cache_size)

    @abstractmethod
    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Get ready to verify (fetch keys); never raises because keys are unreachable."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop any background work."""

    @property
    @abstractmethod
    def key_status(self) -> str:
        """'fresh', 'stale' (keys kept after a failed fetch) or 'unavailable'."""

    @abstractmethod
    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        """Check the signature, iss and aud; return the payload or raise InvalidToken."""

    async def verify(self, token: str) -> Claims:
        """Return the token's Claims, or raise InvalidToken(reason) or KeysUnavailable."""
        if not token:
            raise InvalidToken("missing")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("too_long")
        if not token.isascii():  # a JWT is base64url and dots
            raise InvalidToken("malformed")
        token_hash = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._cache.get(token_hash)
        if cached is not None:
            if self._is_expired(cached.expires_at, now):
                self._cache.discard(token_hash)
                raise InvalidToken("expired")
            return cached
        algorithm, key_id = _read_header(token)
        payload = await self._decode(token, algorithm, key_id)
        claims = self._claims_from(payload, token_hash, self._clock())
        self._cache.put(claims)
        return claims

    def _is_expired(self, expires_at: float, now: float) -> bool:
        return expires_at <= now - self.leeway

    def _decode_with(self, token: str, key: PublicKey | str, algorithm: str) -> dict[str, Any]:
        """Run PyJWT on one key; exp/nbf/iat are checked by _claims_from instead."""
        options: Options = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_sub": False,
            "verify_jti": False,
            "verify_iss": self.issuer is not None,
            "verify_aud": self.audience is not None,
        }
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options=options,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("signature") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("algorithm") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("audience") from None
        except jwt.MissingRequiredClaimError as error:
            reason = {"iss": "issuer", "aud": "audience"}.get(error.claim, "claims")
            raise InvalidToken(reason) from None
        except jwt.DecodeError:
            raise InvalidToken("malformed") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError):
            raise InvalidToken("claims") from None

    def _claims_from(self, payload: dict[str, Any], token_hash: bytes, now: float) -> Claims:
        expires_at = _numeric_date(payload, "exp")
        if expires_at is None:
            raise InvalidToken("claims")
        if self._is_expired(expires_at, now):
            raise InvalidToken("expired")
        for name in ("nbf", "iat"):
            not_before = _numeric_date(payload, name)
            if not_before is not None and not_before > now + self.leeway:
                raise InvalidToken("not_yet_valid")
        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("claims")
        return Claims(
            subject=subject,
            expires_at=int(expires_at),
            subscribe=_grant_patterns(payload.get(self.channels_claim)),
            publish=_grant_patterns(payload.get(self.publish_claim)),
            token_hash=token_hash,
        )


class JwksVerifier(TokenVerifier):
    """Verifies asymmetric JWTs against keys fetched (with aiohttp) from a JWKS URL."""

    def __init__(
        self,
        jwks_url: str,
        *,
        algorithms: Sequence[str],
        issuer: str | None,
        audience: str | None,
        leeway: float,
        channels_claim: str = "channels",
        publish_claim: str = "publish",
        refetch_interval: float = 30.0,
        refresh_interval: float = 300.0,
        fetch_timeout: float = 5.0,
        startup_retry: float = 1.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            channels_claim=channels_claim,
            publish_claim=publish_claim,
            cache_size=cache_size,
            clock=clock,
        )
        refused = [name for name in algorithms if name not in KEY_TYPE_BY_ALGORITHM]
        if refused or not algorithms:
            raise InvalidSettings(
                f"algorithms: a JWKS verifier accepts only {sorted(KEY_TYPE_BY_ALGORITHM)}, "
                f"got {list(algorithms)}"
            )
        self.jwks_url = jwks_url
        self.algorithms = tuple(algorithms)
        self.refetch_interval = refetch_interval
        self.refresh_interval = refresh_interval
        self.fetch_timeout = fetch_timeout
        self.startup_retry = startup_retry
        self._keys: list[JwksKey] | None = None
        self._last_fetch_ok = False
        # Set so the first on-demand fetch is never held back by the rate limit.
        self._last_on_demand_fetch = float("-inf")
        self._fetch_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._owns_session = False
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def key_status(self) -> str:
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
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
            self._refresh_task = None
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        if algorithm not in self.algorithms:
            raise InvalidToken("algorithm")
        candidates = self._candidates(algorithm, key_id)
        if not candidates:
            await self._refetch_on_demand(lambda: bool(self._candidates(algorithm, key_id)))
            candidates = self._candidates(algorithm, key_id)
        if not candidates:
            if self._keys is None:
                raise KeysUnavailable
            raise InvalidToken("unknown_key")
        for key in candidates[:-1]:
            try:
                return self._decode_with(token, key.public_key, algorithm)
            except InvalidToken as error:
                if error.reason != "signature":
                    raise  # the signature held: this key was the one, and its verdict stands
        return self._decode_with(token, candidates[-1].public_key, algorithm)

    def _candidates(self, algorithm: str, key_id: str | None) -> list[JwksKey]:
        """Keys that may check this token; a kid naming a key of the wrong type is refused."""
        keys = self._keys or []
        if key_id is not None:
            keys = [key for key in keys if key.key_id == key_id]
        fitting = [key for key in keys if key.fits(algorithm)]
        if keys and not fitting and key_id is not None:
            raise InvalidToken("algorithm")
        return fitting

    async def _refetch_on_demand(self, is_satisfied: Callable[[], bool]) -> None:
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
            if self.key_status != "fresh":
                delay = min(delay, self.refetch_interval)
            if first_delay is not None:
                delay, first_delay = first_delay, None
            await asyncio.sleep(delay)
            async with self._fetch_lock:
                await self._fetch()

    async def _fetch(self, *, is_startup: bool = False) -> None:
        """Fetch and install the key set; on any failure keep the last good keys."""
        if self._session is None:
            raise RuntimeError("JwksVerifier.start() must be awaited before verifying")
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
                    "JWKS fetch from %s failed: %s %s", self.jwks_url, type(error).__name__, error
                )
            return
        if self._keys is None or {k.jwk_json for k in keys} != {k.jwk_json for k in self._keys}:
            self._cache.clear()
        self._keys = keys
        self._last_fetch_ok = True

    async def _download(self, session: aiohttp.ClientSession) -> object:
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with session.get(self.jwks_url, timeout=timeout) as response:
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


class SecretVerifier(TokenVerifier):
    """Verifies HS256/384/512 JWTs with a shared secret (development, asgi_ws parity)."""

    def __init__(
        self,
        secret: str,
        *,
        algorithms: Sequence[str] = ("HS256",),
        issuer: str | None,
        audience: str | None,
        leeway: float,
        channels_claim: str = "channels",
        publish_claim: str = "publish",
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            channels_claim=channels_claim,
            publish_claim=publish_claim,
            cache_size=cache_size,
            clock=clock,
        )
        if not secret:
            raise InvalidSettings("jwt_secret: must not be empty")
        if not algorithms or not set(algorithms) <= SECRET_ALGORITHMS:
            raise InvalidSettings(
                f"algorithms: a secret verifier accepts only {sorted(SECRET_ALGORITHMS)}, "
                f"got {list(algorithms)}"
            )
        self.algorithms = tuple(algorithms)
        self._secret = secret

    @property
    def key_status(self) -> str:
        return "fresh"

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Nothing to fetch."""

    async def stop(self) -> None:
        """Nothing to stop."""

    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        if algorithm not in self.algorithms:
            raise InvalidToken("algorithm")
        return self._decode_with(token, self._secret, algorithm)


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


class ClaimsCache:
    """A bounded LRU of verified Claims keyed by sha256(token)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Claims] = OrderedDict()

    def get(self, token_hash: bytes) -> Claims | None:
        claims = self._entries.get(token_hash)
        if claims is not None:
            self._entries.move_to_end(token_hash)
        return claims

    def put(self, claims: Claims) -> None:
        if self.size <= 0:
            return
        self._entries[claims.token_hash] = claims
        self._entries.move_to_end(claims.token_hash)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, token_hash: bytes) -> None:
        self._entries.pop(token_hash, None)

    def clear(self) -> None:
        self._entries.clear()


MAX_HEADER_LENGTH: Final = 4096
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _read_header(token: str) -> tuple[str, str | None]:
    """The token's alg and kid; every other header (jku, x5u, jwk...) is ignored."""
    # Only the header segment is read here (PyJWT checks the whole token when it
    # verifies): reading all three twice doubled the cost of a new token.
    segment, dot, _ = token.partition(".")
    if not dot or len(segment) > MAX_HEADER_LENGTH or not _BASE64URL.fullmatch(segment):
        raise InvalidToken("malformed")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed")
    algorithm = header.get("alg")
    key_id = header.get("kid")
    if not isinstance(algorithm, str):
        raise InvalidToken("algorithm")
    if key_id is not None and not isinstance(key_id, str):
        raise InvalidToken("malformed")
    return algorithm, key_id


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim, None when absent; anything but a number is InvalidToken('claims')."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("claims")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidToken("claims") from None
    if not math.isfinite(number):
        raise InvalidToken("claims")
    return number


def _grant_patterns(value: object) -> tuple[str, ...]:
    """Grant patterns from a claim: lenient by design (see the module docstring)."""
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(entry for entry in value if isinstance(entry, str))
    return ()
