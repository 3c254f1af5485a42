"""PyJWT's decoder, and the same decode unrolled for the bus's one way of calling it.

PyJWT (2.13 and later) checks each segment's alphabet with a Python generator,
one step per character: for an RS256 token that was more than half of
`jwt.decode` (118 µs against 45 µs for the RSA verification it wraps). This
module's `decode_segment` makes the same checks, in the same order and with the
same errors, with one regular expression and a look at the last character.

`decode` is what `DECODER.decode` does for the options the bus always passes
(exp, nbf, iat, sub and jti left to the caller; iss and aud checked when given),
step for step and with the same exceptions, without PyJWT's layers of option
merging and dictionaries: PyJWT's RS256 decode cost 29.5 µs a token against
15.7 µs for the RSA verification inside it, this one 24.7 µs (benchmarks/README.md,
"Connect path profile"). The signature is still checked by PyJWT's
own algorithm objects. Anything out of the common shape (another algorithm
family, a `b64` or `crit` header, an `alg` other than the one asked for, a key
PyJWT would warn about) goes to `DECODER.decode` itself, so the answer is always
PyJWT's. tests/test_jws.py holds both to PyJWT's answers on arbitrary and
mutated tokens, against whichever PyJWT is installed.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import jwt
from jwt.algorithms import Algorithm
from jwt.exceptions import (
    DecodeError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

__all__ = ["DECODER", "FAST_ALGORITHMS", "decode", "decode_common", "decode_segment"]

_ALPHABET: Final = re.compile(rb"[A-Za-z0-9_-]*")
_TO_STANDARD: Final = bytes.maketrans(b"-_", b"+/")
# The last character of a segment whose unused low bits are all zero, by the
# segment's length modulo 4: what re-encoding the decoded bytes gives back.
_CANONICAL_LAST: Final[Mapping[int, frozenset[int]]] = {
    2: frozenset(b"AQgw"),
    3: frozenset(b"AEIMQUYcgkosw048"),
}
_PADDING: Final = {0: b"", 2: b"==", 3: b"="}


def decode_segment(segment: bytes, name: str) -> bytes:
    """PyJWS._decode_base64url_segment, alphabet checked by a regular expression."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if padding > 2 or (padding and len(segment) % 4 != 0):
        raise DecodeError(f"Invalid {name} padding")
    remainder = len(stripped) % 4
    if remainder == 1 or _ALPHABET.fullmatch(stripped) is None:
        raise DecodeError(f"Invalid {name} padding")
    # PyJWT re-encodes what it decoded and compares: a segment whose last
    # character carries set unused bits is the one that comes back different.
    if remainder and stripped[-1] not in _CANONICAL_LAST[remainder]:
        raise DecodeError(f"Invalid {name} padding")
    return binascii.a2b_base64(stripped.translate(_TO_STANDARD) + _PADDING[remainder])


class _JWS(jwt.PyJWS):
    _decode_base64url_segment = staticmethod(decode_segment)


class _Decoder(jwt.PyJWT):
    def __init__(self) -> None:
        super().__init__()
        self._jws = _JWS(options=self._get_sig_options())


DECODER: Final = _Decoder()
"""Use as `jwt.decode`: `DECODER.decode(token, key, algorithms=..., options=...)`."""

FAST_ALGORITHMS: Final = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
)
"""What `decode` decodes itself; any other algorithm goes to PyJWT."""

_ALGORITHMS: Final[Mapping[str, Algorithm]] = {
    name: _JWS().get_algorithm_by_name(name) for name in FAST_ALGORITHMS
}


def decode(
    token: str, key: Any, algorithm: str, *, issuer: str | None, audience: str | None
) -> dict[str, Any]:
    """The payload, as DECODER.decode(token, key, algorithms=[algorithm], issuer=issuer,
    audience=audience, options=...) returns it with exp, nbf, iat, sub and jti unchecked
    (and iss, aud only when given); its exceptions too."""
    payload = decode_common(token, key, algorithm, issuer, audience)
    if payload is not None:
        return payload
    options: jwt.types.Options = {
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_sub": False,
        "verify_jti": False,
        "verify_iss": issuer is not None,
        "verify_aud": audience is not None,
    }
    return DECODER.decode(
        token, key, algorithms=[algorithm], options=options, issuer=issuer, audience=audience
    )


def decode_common(
    token: str, key: Any, algorithm: str, issuer: str | None, audience: str | None
) -> dict[str, Any] | None:
    """PyJWT's decode, step for step, for the common shape; None leaves it to PyJWT.

    Every exception raised here is the one PyJWT raises at the same step, and
    nothing is raised after a step that PyJWT would take differently.
    """
    verifier = _ALGORITHMS.get(algorithm)
    if verifier is None:
        return None
    # PyJWS._load
    try:
        signing_input, crypto_segment = token.encode().rsplit(b".", 1)
        header_segment, payload_segment = signing_input.split(b".", 1)
    except ValueError:
        raise DecodeError("Not enough segments") from None
    header = _json_object(decode_segment(header_segment, "header"), "header")
    if "b64" in header or "crit" in header:
        return None  # detached payloads and critical extensions: PyJWT's rules
    payload_data = decode_segment(payload_segment, "payload")
    signature = decode_segment(crypto_segment, "crypto")
    # PyJWS._validate_headers
    if "kid" in header and not isinstance(header["kid"], str):
        raise InvalidTokenError("Key ID header parameter must be a string")
    # PyJWS._verify_signature
    if header.get("alg") != algorithm:
        return None  # missing, empty or not allowed: PyJWT words each
    prepared = verifier.prepare_key(key)
    if verifier.check_key_length(prepared) is not None:
        return None  # PyJWT warns (or refuses, if told to)
    if not verifier.verify(signing_input, prepared, signature):
        raise InvalidSignatureError("Signature verification failed")
    payload = _json_object(payload_data, "payload")  # PyJWT._decode_payload
    # PyJWT._validate_claims: nothing required; exp, nbf, iat, sub, jti not asked for
    if issuer is not None:
        _check_issuer(payload, issuer)
    if audience is not None:
        _check_audience(payload, audience)
    return payload


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    """A segment's JSON object, refused in PyJWT's words (`name`: header or payload)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise DecodeError(f"Invalid {name} string: {error}") from error
    if not isinstance(value, dict):
        raise DecodeError(f"Invalid {name} string: must be a json object")
    return value


def _check_issuer(payload: dict[str, Any], issuer: str) -> None:
    """PyJWT._validate_iss for one issuer."""
    if "iss" not in payload:
        raise MissingRequiredClaimError("iss")
    issued_by = payload["iss"]
    if not isinstance(issued_by, str):
        raise InvalidIssuerError("Payload Issuer (iss) must be a string")
    if issued_by != issuer:
        raise InvalidIssuerError("Invalid issuer")


def _check_audience(payload: dict[str, Any], audience: str) -> None:
    """PyJWT._validate_aud for one audience, not strict."""
    if "aud" not in payload or not payload["aud"]:
        raise MissingRequiredClaimError("aud")
    claimed = payload["aud"]
    if isinstance(claimed, str):
        claimed = [claimed]
    if not isinstance(claimed, list):
        raise InvalidAudienceError("Invalid claim format in token")
    if any(not isinstance(entry, str) for entry in claimed):
        raise InvalidAudienceError("Invalid claim format in token")
    if audience not in claimed:
        raise InvalidAudienceError("Audience doesn't match")
