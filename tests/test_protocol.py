"""Client frame parsing and server frame encoding."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiohttp_wsbus.protocol import (
    BadFrame,
    CloseCode,
    Connect,
    Ping,
    Position,
    Refresh,
    Subscribe,
    Unsubscribe,
    encode,
    encode_message,
    parse_client_frame,
    text_frame,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def test_connect_frame() -> None:
    frame = parse_client_frame(
        '{"type":"connect","token":"t","channels":["a","b","a"],'
        '"since":{"a":{"offset":4,"epoch":"e"}}}'
    )
    assert frame == Connect("t", ["a", "b"], {"a": Position(4, "e")})


def test_other_frames() -> None:
    assert parse_client_frame('{"type":"subscribe","channels":["x"]}') == Subscribe(["x"], {})
    assert parse_client_frame('{"type":"unsubscribe","channels":["x"]}') == Unsubscribe(["x"])
    assert parse_client_frame('{"type":"refresh","token":"t2"}') == Refresh("t2")
    assert parse_client_frame('{"type":"ping"}') == Ping()


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"type":"dance"}',
        '{"channels":["a"]}',
        '{"type":"subscribe"}',
        '{"type":"subscribe","channels":"a"}',
        '{"type":"subscribe","channels":[1]}',
        '{"type":"refresh"}',
        '{"type":"connect","token":5}',
        '{"type":"connect","token":"t","since":[]}',
        '{"type":"connect","token":"t","since":{"a":{"offset":-1,"epoch":"e"}}}',
        '{"type":"connect","token":"t","since":{"a":{"offset":true,"epoch":"e"}}}',
        '{"type":"connect","token":"t","since":{"a":{"offset":1}}}',
    ],
)
def test_malformed_frames_raise_bad_frame(text: str) -> None:
    with pytest.raises(BadFrame):
        parse_client_frame(text)


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_bad_frame(text: str) -> None:
    with contextlib.suppress(BadFrame):
        parse_client_frame(text)


@given(data=json_values, offset=st.integers(min_value=1, max_value=2**53), recovered=st.booleans())
def test_message_encoding_is_byte_identical_to_json_dumps(
    data: Any, offset: int, recovered: bool
) -> None:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    fast = encode_message("chat:lobby", offset, "e1f2", text, recovered=recovered)
    frame: dict[str, Any] = {
        "type": "message",
        "channel": "chat:lobby",
        "offset": offset,
        "epoch": "e1f2",
        "data": data,
    }
    if recovered:
        frame["recovered"] = True
    assert fast == json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


@given(frame=st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_control_frames_encode_as_json_dumps_does(frame: dict[str, Any]) -> None:
    # The encoder is made once; its bytes are json.dumps's, escapes (ASCII only) and all.
    assert encode(frame) == json.dumps(frame, separators=(",", ":")).encode()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_lengths(size: int) -> None:
    payload = b"x" * size
    frame = text_frame(payload)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size
        assert frame[2:] == payload
    elif size < 65536:
        assert frame[1] == 126
        assert int.from_bytes(frame[2:4], "big") == size
        assert frame[4:] == payload
    else:
        assert frame[1] == 127
        assert int.from_bytes(frame[2:10], "big") == size
        assert frame[10:] == payload


def test_the_served_js_client_names_every_close_code_the_server_sends() -> None:
    source = (Path(__file__).parent.parent / "aiohttp_wsbus" / "static" / "wsbus.js").read_text()
    block = re.search(r"export const CloseCodes = Object\.freeze\(\{(.*?)\}\);", source, re.S)
    assert block is not None
    named = {name: int(code) for name, code in re.findall(r"(\w+): (\d+),", block.group(1))}
    assert {code.name: code.value for code in CloseCode}.items() <= named.items()
