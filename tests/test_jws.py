"""aiohttp_wsbus.jws: the same base64url segment answers as the installed PyJWT's own
check, on arbitrary input, and the tokens it decodes are PyJWT's."""

from __future__ import annotations

import base64
from collections.abc import Callable

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError

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
