"""aiohttp_wsbus.jws: the same base64url segment answers as the installed PyJWT's own
check, on arbitrary input, the tokens it decodes are PyJWT's, and `decode` answers
as PyJWT does on arbitrary, re-signed and mutated tokens."""

from __future__ import annotations

import base64
import json
import re
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError
from jwt.utils import base64url_encode

from aiohttp_wsbus import jws
from aiohttp_wsbus.jws import DECODER, decode_segment

# What a segment is made of, weighted towards what the checks look at.
SEGMENT_BYTES = st.sampled_from(
    [
        *b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        *b"=+/!. ",
        0,
        0x80,
        0xFF,
    ]
)
segments = st.one_of(
    st.binary(max_size=40),
    st.lists(SEGMENT_BYTES, max_size=40).map(bytes),
    st.binary(max_size=30).map(lambda raw: jwt.utils.base64url_encode(raw)),
    st.tuples(st.binary(max_size=30), st.integers(1, 3)).map(
        lambda pair: jwt.utils.base64url_encode(pair[0]) + b"=" * pair[1]
    ),
    st.binary(max_size=30).map(base64.urlsafe_b64encode),
)


def answer(check: Callable[[bytes, str], bytes], segment: bytes) -> tuple[str, object]:
    try:
        return "decoded", check(segment, "header")
    except DecodeError as error:
        return "refused", str(error)


@given(segment=segments)
def test_the_segment_check_answers_as_pyjwts_own(segment: bytes) -> None:
    assert answer(decode_segment, segment) == answer(PyJWS._decode_base64url_segment, segment)


@pytest.mark.parametrize(
    "segment", [b"", b"QQ", b"QQ==", b"QQ=", b"QQ===", b"Q", b"QR", b"Q!Q=", b"+/+/"]
)
def test_edge_segments_answer_as_pyjwts_own(segment: bytes) -> None:
    assert answer(decode_segment, segment) == answer(PyJWS._decode_base64url_segment, segment)


def test_the_decoder_verifies_like_jwt_decode() -> None:
    token = jwt.encode({"sub": "u"}, "k" * 32, algorithm="HS256")
    assert DECODER.decode(token, "k" * 32, algorithms=["HS256"]) == {"sub": "u"}
    with pytest.raises(jwt.InvalidSignatureError):
        DECODER.decode(token, "x" * 32, algorithms=["HS256"])
    with pytest.raises(jwt.DecodeError):
        DECODER.decode(token[:-1] + "!", "k" * 32, algorithms=["HS256"])


# -- decode: PyJWT's answers, unrolled ------------------------------------------

ISSUER = "https://issuer.example"
AUDIENCE = "wsbus"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# Short on purpose: PyJWT warns of it, and decode must leave the warning to PyJWT.
SHORT_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
P521_KEY = ec.generate_private_key(ec.SECP521R1())
SECRET = b"k" * 32
# The key each algorithm signs with here; its public half is the right key to verify.
SIGNING_KEYS: dict[str, Any] = {
    "RS256": RSA_KEY,
    "RS384": RSA_KEY,
    "RS512": RSA_KEY,
    "PS256": RSA_KEY,
    "PS384": RSA_KEY,
    "PS512": RSA_KEY,
    "ES256": P256_KEY,
    "ES384": P384_KEY,
    "ES512": P521_KEY,
    "HS256": SECRET,
}
VERIFYING_KEYS = [
    RSA_KEY.public_key(),
    SHORT_RSA_KEY.public_key(),
    P256_KEY.public_key(),
    P384_KEY.public_key(),
    P521_KEY.public_key(),
    SECRET,
]
ALGORITHMS = sorted(jws.FAST_ALGORITHMS | {"EdDSA", "HS256"})

texts = st.one_of(st.sampled_from([ISSUER, AUDIENCE, "other", ""]), st.text(max_size=8))
claim_values = st.one_of(
    texts,
    st.lists(texts, max_size=3),
    st.lists(st.one_of(texts, st.integers()), max_size=3),
    st.none(),
    st.integers(),
)
payloads = st.dictionaries(
    st.sampled_from(["iss", "aud", "sub", "exp", "x"]), claim_values, max_size=3
).map(lambda claims: {"sub": "u", "exp": 1, "iss": ISSUER, "aud": AUDIENCE} | claims)
unusual_headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.one_of(st.sampled_from(ALGORITHMS), st.none(), st.integers(), st.just("")),
        "kid": st.one_of(st.text(max_size=4), st.integers()),
        "b64": st.booleans(),
        "crit": st.one_of(st.just(["b64"]), st.just([]), st.just("b64"), st.just(["x"])),
    },
)


def usually(value: Any, otherwise: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`value` three times in four, else a draw from `otherwise`."""
    return st.one_of(st.just(value), st.just(value), st.just(value), otherwise)


def public(key: Any) -> Any:
    return key if isinstance(key, bytes) else key.public_key()


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Any, str]:
    """(token, key, algorithm): mostly a token of that algorithm signed by that key's
    private half, else signed by another, with other headers, or broken after."""
    algorithm = draw(st.sampled_from(ALGORITHMS))
    signed_as = draw(
        usually(
            algorithm if algorithm in SIGNING_KEYS else "RS256",
            st.sampled_from(sorted(SIGNING_KEYS)),
        )
    )
    header = {"alg": signed_as, "typ": "JWT", "kid": "k"}
    header |= draw(usually({}, unusual_headers))
    payload = draw(st.one_of(payloads.map(json.dumps), st.sampled_from(["[]", "{", '"x"'])))
    signing_input = (
        base64url_encode(json.dumps(header).encode()) + b"." + base64url_encode(payload.encode())
    )
    signer = PyJWS().get_algorithm_by_name(signed_as)
    signature = signer.sign(signing_input, signer.prepare_key(SIGNING_KEYS[signed_as]))
    token = (signing_input + b"." + base64url_encode(signature)).decode()
    token = draw(usually(token, mutated(token)))
    key = draw(usually(public(SIGNING_KEYS[signed_as]), st.sampled_from(VERIFYING_KEYS)))
    return token, key, algorithm


def mutated(token: str) -> st.SearchStrategy[str]:
    """The token with one character changed, added or removed, or a segment replaced."""
    characters = st.sampled_from("Aa0_-=.+/!QgwEM ")
    position = st.integers(0, len(token))
    segments = token.split(".")
    return st.one_of(
        st.tuples(position, characters).map(lambda p: token[: p[0]] + p[1] + token[p[0] + 1 :]),
        st.tuples(position, characters).map(lambda p: token[: p[0]] + p[1] + token[p[0] :]),
        position.map(lambda at: token[:at] + token[at + 1 :]),
        st.tuples(st.integers(0, len(segments) - 1), segments_as_text).map(
            lambda p: ".".join([*segments[: p[0]], p[1], *segments[p[0] + 1 :]])
        ),
        st.integers(1, 3).map(lambda padding: token + "=" * padding),
    )


segments_as_text = segments.map(lambda segment: segment.decode("latin-1"))


def outcome(decode: Callable[[], object]) -> tuple[object, ...]:
    """What a decode returned or raised (type and words), and what it warned of."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            answer: tuple[object, ...] = ("payload", decode())
        except Exception as error:  # the comparison is the point: any exception
            # PyJWT's words may name an object by its address, which differs per call.
            words = re.sub(r" at 0x[0-9a-f]+", " at 0x…", str(error))
            answer = (type(error), words, getattr(error, "claim", None))
    return (*answer, [warning.category for warning in warned])


@settings(max_examples=300, deadline=None)
@given(
    case=cases(),
    issuer=st.sampled_from([None, ISSUER]),
    audience=st.sampled_from([None, AUDIENCE]),
)
def test_decode_answers_as_pyjwt(
    case: tuple[str, Any, str], issuer: str | None, audience: str | None
) -> None:
    token, key, algorithm = case
    options: jwt.types.Options = {
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_sub": False,
        "verify_jti": False,
        "verify_iss": issuer is not None,
        "verify_aud": audience is not None,
    }
    ours = outcome(lambda: jws.decode(token, key, algorithm, issuer=issuer, audience=audience))
    pyjwt = outcome(
        lambda: jwt.decode(
            token, key, algorithms=[algorithm], options=options, issuer=issuer, audience=audience
        )
    )
    assert ours == pyjwt


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256"])
def test_decode_answers_the_common_token_itself(algorithm: str) -> None:
    payload = {"sub": "u", "exp": 1, "iss": ISSUER, "aud": [AUDIENCE, "other"]}
    token = jwt.encode(payload, SIGNING_KEYS[algorithm], algorithm=algorithm, headers={"kid": "k"})
    verifying_key = public(SIGNING_KEYS[algorithm])
    assert jws.decode_common(token, verifying_key, algorithm, ISSUER, AUDIENCE) == payload


@pytest.mark.parametrize(
    ("algorithm", "header"),
    [
        ("HS256", {}),  # not a public-key algorithm
        ("RS256", {"crit": ["b64"], "b64": False}),  # a detached payload
        ("RS256", {"alg": "RS384"}),  # not the algorithm asked for
    ],
)
def test_decode_leaves_the_unusual_to_pyjwt(algorithm: str, header: dict[str, Any]) -> None:
    token = jwt.encode({"sub": "u"}, SIGNING_KEYS[algorithm], algorithm=algorithm, headers=header)
    verifying_key = public(SIGNING_KEYS[algorithm])
    assert jws.decode_common(token, verifying_key, algorithm, None, None) is None
