"""Token verification: a raw JWT -> Claims, with a key set from a JWKS URL or a secret.

This module knows nothing of sockets. A verifier turns a raw JWT into `Claims` or
raises `InvalidToken(reason)` / `KeysUnavailable`; `websocket.py` and `emit.py`
map those to close codes and statuses.
Fetching and refreshing the key set is `jwks.py`'s work.

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

import base64
import binascii
import hashlib
import itertools
import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeVar

import aiohttp
import jwt

from . import jws
from .errors import InvalidSettings, InvalidToken, KeysUnavailable
from .grants import grant_patterns
from .jwks import PUBLIC_KEY_ALGORITHMS, SECRET_ALGORITHMS, JwksKey, JwksKeySet, PublicKey

__all__ = ["Claims", "ClaimsCache", "JwksVerifier", "SecretVerifier", "TokenVerifier"]

# Longer tokens are refused unread (a token is verified and cached per socket).
MAX_TOKEN_LENGTH: Final = 16384


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its holder (never the token itself)."""

    subject: str
    expires_at: int
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    token_hash: bytes
    token_id: str | None = None  # `jti`
    issued_at: float | None = None  # `iat`
    # The verified claims the fields above do not hold as the token said them, as
    # compact JSON (kept out of repr: it may hold personal data). Bytes, not a dict:
    # every open socket keeps its token's Claims, and bytes cost a third of a dict of
    # lists and nothing to the garbage collector. Without `sub`, `exp`, `jti` and
    # `iat`, what is left (issuer, audience, grants) is often the same for many
    # tokens, and the verifier then keeps one copy of it for all.
    payload: bytes = field(default=b"{}", repr=False)

    @property
    def extra(self) -> Mapping[str, Any]:
        """Every verified claim, read-only, rebuilt from the fields and `payload` at
        each read.

        Each read is a fresh copy (its lists are this caller's own): to read several
        claims, keep it in a local. Values and types are the token's; the order of
        the names is not.
        """
        claims: dict[str, Any] = {"sub": self.subject, "exp": self.expires_at}
        if self.token_id is not None:
            claims["jti"] = self.token_id
        issued_at = self.issued_at
        if issued_at is not None:
            claims["iat"] = int(issued_at) if float(issued_at).is_integer() else issued_at
        claims.update(json.loads(self.payload))  # an exp or iat that is no integer, as said
        return MappingProxyType(claims)


class TokenVerifier(ABC):
    """Turns a raw JWT into Claims; subclasses only say where keys come from."""

    # The algorithms this kind of key source can check (a subset is allowed).
    usable_algorithms: ClassVar[frozenset[str]]

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        issuer: str | None,
        audience: str | None,
        leeway: float,
        channels_claim: str,
        publish_claim: str,
        cache_size: int,
        clock: Callable[[], float],
    ) -> None:
        if not algorithms or not set(algorithms) <= self.usable_algorithms:
            raise InvalidSettings(
                f"algorithms: {type(self).__name__} accepts only {sorted(self.usable_algorithms)}, "
                f"got {list(algorithms)}"
            )
        self.algorithms = tuple(algorithms)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.channels_claim = channels_claim
        self.publish_claim = publish_claim
        self._clock = clock
        self._cache = ClaimsCache(cache_size)
        self._repeated = RepeatedValues()

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

    @property
    def fetch_count(self) -> int:
        """Key set fetches attempted (none for a verifier that fetches nothing)."""
        return 0

    @property
    def fetch_failures(self) -> int:
        """Key set fetches that failed."""
        return 0

    @abstractmethod
    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        """Check the signature, iss and aud of a token whose alg is allowed; return its payload."""

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
        if algorithm not in self.algorithms:
            raise InvalidToken("algorithm")
        payload = await self._decode(token, algorithm, key_id)
        claims = self._claims_from(payload, token_hash, self._clock())
        self._cache.put(claims)
        return claims

    def _is_expired(self, expires_at: float, now: float) -> bool:
        return expires_at <= now - self.leeway

    def _decode_with(self, token: str, key: PublicKey | str, algorithm: str) -> dict[str, Any]:
        """Check one key's signature, iss and aud as PyJWT does; exp/nbf/iat: _claims_from."""
        try:
            return jws.decode(token, key, algorithm, issuer=self.issuer, audience=self.audience)
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
        token_id = payload.get("jti")
        issued_at = _numeric_date(payload, "iat")
        one = self._repeated.one
        return Claims(
            subject=subject,
            expires_at=int(expires_at),
            subscribe=one(grant_patterns(payload.get(self.channels_claim))),
            publish=one(grant_patterns(payload.get(self.publish_claim))),
            token_hash=token_hash,
            token_id=token_id if isinstance(token_id, str) else None,
            issued_at=issued_at,
            payload=one(_PAYLOAD_ENCODER.encode(_not_in_fields(payload)).encode()),
        )


class JwksVerifier(TokenVerifier):
    """Verifies asymmetric JWTs against the keys served at a JWKS URL."""

    usable_algorithms = PUBLIC_KEY_ALGORITHMS

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
            algorithms=algorithms,
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            channels_claim=channels_claim,
            publish_claim=publish_claim,
            cache_size=cache_size,
            clock=clock,
        )
        # A changed key set may have dropped a key: forget what its tokens proved.
        self.key_set = JwksKeySet(
            jwks_url,
            algorithms=self.algorithms,
            on_change=self._cache.clear,
            refetch_interval=refetch_interval,
            refresh_interval=refresh_interval,
            fetch_timeout=fetch_timeout,
            startup_retry=startup_retry,
            clock=clock,
        )

    @property
    def key_status(self) -> str:
        return self.key_set.status

    @property
    def fetch_count(self) -> int:
        return self.key_set.fetch_count

    @property
    def fetch_failures(self) -> int:
        return self.key_set.fetch_failures

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Fetch the keys (a failure only logs) and keep them fresh; see JwksKeySet.start."""
        await self.key_set.start(session)

    async def stop(self) -> None:
        await self.key_set.stop()

    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        candidates = self._candidates(algorithm, key_id)
        if not candidates:
            await self.key_set.refetch_unless(lambda: bool(self._candidates(algorithm, key_id)))
            candidates = self._candidates(algorithm, key_id)
        if not candidates:
            if self.key_set.keys is None:
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
        keys = self.key_set.keys or []
        if key_id is not None:
            keys = [key for key in keys if key.key_id == key_id]
        fitting = [key for key in keys if key.fits(algorithm)]
        if keys and not fitting and key_id is not None:
            raise InvalidToken("algorithm")
        return fitting


class SecretVerifier(TokenVerifier):
    """Verifies HS256/384/512 JWTs with a shared secret (development, asgi_ws parity)."""

    usable_algorithms = SECRET_ALGORITHMS

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
            algorithms=algorithms,
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
        self._secret = secret

    @property
    def key_status(self) -> str:
        return "fresh"

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Nothing to fetch."""

    async def stop(self) -> None:
        """Nothing to stop."""

    async def _decode(self, token: str, algorithm: str, key_id: str | None) -> dict[str, Any]:
        return self._decode_with(token, self._secret, algorithm)


MAX_SHARED_LENGTH: Final = 256  # characters of a string, bytes, entries of a tuple
_Shareable = TypeVar("_Shareable", str, bytes, tuple[str, ...])
# ASCII only: the bytes always decode, whatever strings (lone surrogates too) a token held.
_PAYLOAD_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


class RepeatedValues:
    """One copy of what many tokens repeat: the grant tuples and the claims beyond
    the subject, times and id (`Claims.payload`).

    Every socket keeps its token's claims while it is open, so without this 10000
    users hold 10000 copies of the same grants. Bounded: only short values are
    held, and the table is emptied when full, so values that never repeat cost a
    little sharing, never memory.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._values: dict[str | bytes | tuple[str, ...], Any] = {}

    def one(self, value: _Shareable) -> _Shareable:
        """The copy of `value` already held, else `value` (then held, if short)."""
        held: _Shareable | None = self._values.get(value)
        if held is not None:
            return held
        if len(value) > MAX_SHARED_LENGTH:
            return value
        if len(self._values) >= self.size:
            self._values.clear()
        self._values[value] = value
        return value


class ClaimsCache:
    """A bounded LRU of verified Claims keyed by sha256(token).

    A plain dict kept in recency order (a hit moves its entry to the end): an
    OrderedDict's entry costs 45 bytes more, and every open socket's token has
    one. When full, the oldest sixteenth leaves at once: finding a dict's oldest
    entry walks past the slots emptied since it last resized, so one walk a batch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[bytes, Claims] = {}

    def get(self, token_hash: bytes) -> Claims | None:
        claims = self._entries.pop(token_hash, None)
        if claims is not None:
            self._entries[token_hash] = claims
        return claims

    def put(self, claims: Claims) -> None:
        if self.size <= 0:
            return
        entries = self._entries
        entries.pop(claims.token_hash, None)
        entries[claims.token_hash] = claims
        if len(entries) > self.size:
            oldest = len(entries) - self.size + self.size // 16
            for token_hash in list(itertools.islice(entries, oldest)):
                del entries[token_hash]

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


def _not_in_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """The claims `Claims.extra` cannot rebuild from the typed fields: `sub` always is
    (a verified token's is a non-empty string), `jti` when a string, `exp` and `iat`
    when integers (they are held as numbers: a float, or an integer beyond a float's
    precision, stays in the payload as said)."""
    rest = dict(payload)
    del rest["sub"]
    if isinstance(rest.get("jti"), str):
        del rest["jti"]
    for name in ("exp", "iat"):
        value = rest.get(name)
        if type(value) is int and int(float(value)) == value:
            del rest[name]
    return rest


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

