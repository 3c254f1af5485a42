"""Hostile input over real sockets: emit requests and client frames, fuzzed.

Each property runs against one bus started once per test, with a watcher
socket subscribed before the fuzzing starts: after every example a message is
published to the watcher's channel and must reach it, so no input may break
delivery for others. Known hostile inputs are pinned with their exact answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any, Final

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus.protocol import CloseCode

from .conftest import JwksServer, MakeToken
from .support import WAIT, BusServer, next_frame, start_bus

API_KEY: Final = "f" * 32
PROBE: Final = "watch:alive"  # the watcher's channel; the fuzzers never publish to it
FUZZ: Final = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass
class FuzzedBus:
    """One running bus, a watcher subscribed before the fuzzing, and tokens to fuzz with."""

    server: BusServer
    watcher: ClientWebSocketResponse
    tokens: dict[str, str]  # stand-ins the strategies use -> real tokens
    probes: int = 0

    @property
    def port(self) -> int:
        port = self.server.client.server.port
        assert port is not None
        return port

    async def open(self, *, welcomed: bool) -> ClientWebSocketResponse:
        """A new socket: welcomed (the fuzzer's good token, on fuzz:a) or not yet."""
        socket = await self.server.client.ws_connect("/ws")
        if welcomed:
            connect = {"type": "connect", "token": self.tokens["<valid>"], "channels": ["fuzz:a"]}
            await socket.send_json(connect)
            assert (await next_frame(socket))["type"] == "welcome"
        return socket

    async def watcher_still_hears(self) -> None:
        """A message published now reaches the watcher, and nothing else came first."""
        self.probes += 1
        await self.server.bus.publish(PROBE, self.probes)
        frame = await next_frame(self.watcher)
        assert (frame["channel"], frame["data"]) == (PROBE, self.probes)


@pytest.fixture
async def fuzzed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> FuzzedBus:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], client_publish=True
    )
    watcher, _ = await server.open(make_token(sub="watcher", channels=[PROBE]), [PROBE])
    tokens = {
        "<valid>": make_token(sub="fuzzer", channels=["fuzz:*"], publish=["fuzz:*"]),
        "<other user>": make_token(sub="mallory", channels=["fuzz:*"], publish=["fuzz:*"]),
        "<expired>": make_token(sub="fuzzer", channels=["fuzz:*"], exp_in=-3600),
    }
    return FuzzedBus(server, watcher, tokens)


# -- strategies shared by both fuzzers ---------------------------------------------

# Text of any code points, lone surrogates included.
lone_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.lists(st.one_of(st.characters(), lone_surrogate), max_size=12).map("".join)
channel_names = st.one_of(
    st.sampled_from(["fuzz:a", "fuzz:b", "fuzz:\ud800", "bad name", "", "*", PROBE, "x" * 201]),
    any_text,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# Depths around and far past Python's recursion limit, not only small ones.
depths = st.sampled_from([999, 1000, 1001, 5000, 30_000]) | st.integers(1, 30_000)


# -- emit ----------------------------------------------------------------------

# JSON text, built as text so that it can hold what no encoder writes: NaN,
# numbers past a double's range, lone surrogate escapes, huge integers.
json_atoms = st.one_of(
    st.sampled_from(
        [
            *("null", "true", "false", "-0", "NaN", "Infinity", "-Infinity", "1e999", "-1e999"),
            *('"\\ud800"', '"x\\udfffy"', '"\\u0000"', "2.5e-400"),
        ]
    ),
    st.integers().map(str),
    st.integers(4000, 6000).map(lambda digits: "1" * digits),  # past int("...")'s 4300
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    any_text.map(json.dumps),
)
json_keys = st.sampled_from(['"channel"', '"channels"', '"data"', '"payload"', '"id"', '"\\ud800"'])
json_texts = st.recursive(
    json_atoms,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(json_keys | any_text.map(json.dumps), inner), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
        )
    ),
    max_leaves=12,
)
emit_shaped = st.builds(
    lambda target, data, extra: "{" + ",".join([target, f'"data":{data}', *extra]) + "}",
    st.one_of(
        channel_names.filter(lambda c: c != PROBE).map(lambda c: f'"channel":{json.dumps(c)}'),
        st.lists(channel_names.filter(lambda c: c != PROBE), max_size=3).map(
            lambda cs: f'"channels":{json.dumps(cs)}'
        ),
    ),
    st.one_of(json_texts, depths.map(nested)),
    st.lists(
        st.one_of(
            any_text.map(lambda i: f'"id":{json.dumps(i)}'),
            json_texts.map(lambda v: f'"payload":{v}'),
            json_texts.map(lambda v: f'"extra":{v}'),
        ),
        max_size=2,
    ),
)
emit_bodies = st.one_of(
    emit_shaped.map(str.encode),
    json_texts.map(str.encode),
    depths.map(lambda depth: nested(depth).encode()),
    st.binary(max_size=300),
    st.text(max_size=40).map(lambda text: text.encode("utf-8")),
    st.text(alphabet=st.characters(max_codepoint=255), max_size=40).map(
        lambda text: text.encode("latin-1")
    ),
)
# What an HTTP header value may hold: visible ASCII, space, tab and obs-text (any
# byte from 0x80: not UTF-8, mostly). Other bytes are refused by aiohttp's HTTP
# parser before any handler runs.
header_values = st.binary(max_size=40).map(
    lambda raw: bytes(b for b in raw if b == 9 or 0x20 <= b != 0x7F).strip(b" \t")
)
credentials = st.one_of(
    st.sampled_from(["<api key>", "<valid>", "<other user>"]),
    st.sampled_from(["<expired>", None]),
    header_values.map(lambda v: b"X-API-Key: " + v),
    header_values.map(lambda v: b"Authorization: " + v),
    header_values.map(lambda v: b"Authorization: Bearer " + v),
)
content_types = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"Application/JSON",
            b"application/json; charset=latin-1",
        ]
    ),
    st.sampled_from(
        [
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
            b"",
            None,
        ]
    ),
    header_values,
)
# Compressed bodies are well formed here; broken ones are pinned below.
content_encodings = st.sampled_from([None, b"identity", b"gzip", b"deflate", b"x-unknown"])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def post_emit(port: int, headers: list[bytes], body: bytes) -> Answer:
    """POST /ws/emit over a plain socket: header bytes exactly as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [b"POST /ws/emit HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", *headers]
        head.append(b"Content-Length: %d" % len(body))
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        async with asyncio.timeout(WAIT):
            response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    fields = (line.partition(b":") for line in header_block.split(b"\r\n") if line)
    return Answer(
        int(status_line.split()[1]),
        {name.decode().lower(): value.decode().strip() for name, _, value in fields},
        payload,
    )


def credential_header(credential: str | bytes | None, tokens: dict[str, str]) -> list[bytes]:
    if credential is None:
        return []
    if isinstance(credential, bytes):
        return [credential]
    if credential == "<api key>":
        return [b"X-API-Key: " + API_KEY.encode()]
    return [b"Authorization: Bearer " + tokens[credential].encode()]


def check_emit_answer(answer: Answer, is_stranger: bool) -> None:
    """Never a 5xx; every answer is JSON, every error names itself."""
    assert answer.status < 500, answer
    assert answer.status in (202, 400, 401, 403, 413, 415), answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = json.loads(answer.body)
    if answer.status == 202:
        assert [p["channel"] for p in body["published"]], answer
    else:
        assert isinstance(body["error"], str), answer
    if is_stranger:  # the body of a request with no valid credential is never read
        assert answer.status in (401, 415), answer


async def emit(
    fuzzed: FuzzedBus,
    credential: str | bytes | None,
    content_type: bytes | None,
    encoding: bytes | None,
    body: bytes,
) -> None:
    """One fuzzed emit: check its answer, then that the watcher still hears."""
    headers = credential_header(credential, fuzzed.tokens)
    if content_type is not None:
        headers.append(b"Content-Type: " + content_type)
    if encoding is not None:
        headers.append(b"Content-Encoding: " + encoding)
        if encoding == b"gzip":
            body = gzip.compress(body)
        elif encoding == b"deflate":
            body = zlib.compress(body)
    answer = await post_emit(fuzzed.port, headers, body)
    event(f"answered {answer.status}")
    is_stranger = credential not in ("<api key>", "<valid>", "<other user>")
    check_emit_answer(answer, is_stranger)
    await fuzzed.watcher_still_hears()


@FUZZ
@given(
    is_json=st.booleans(),  # half the time JSON, so that the credentials are looked at
    credential=credentials,
    content_type=content_types,
    encoding=content_encodings,
)
async def test_no_emit_headers_get_a_server_error_or_stop_delivery(
    fuzzed: FuzzedBus,
    is_json: bool,
    credential: str | bytes | None,
    content_type: bytes | None,
    encoding: bytes | None,
) -> None:
    if is_json:
        content_type = b"application/json"
    await emit(fuzzed, credential, content_type, encoding, b'{"channel":"fuzz:a","data":1}')


@FUZZ
@given(
    credential=st.sampled_from(["<api key>", "<valid>"]),
    encoding=content_encodings,
    body=emit_bodies,
)
async def test_no_emit_body_gets_a_server_error_or_stops_delivery(
    fuzzed: FuzzedBus, credential: str, encoding: bytes | None, body: bytes
) -> None:
    await emit(fuzzed, credential, b"application/json", encoding, body)


EMIT_DATA_REFUSED: Final = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "1e999",
    "lone surrogate": '"\\ud800"',
    "lone surrogate key": '{"\\udfff":1}',
    "nested 30000 deep": nested(30_000),
}


@pytest.mark.parametrize("data", EMIT_DATA_REFUSED.values(), ids=EMIT_DATA_REFUSED.keys())
async def test_emit_data_no_client_could_decode_gets_400(fuzzed: FuzzedBus, data: str) -> None:
    body = f'{{"channel":"fuzz:a","data":{data}}}'.encode()
    headers = [b"X-API-Key: " + API_KEY.encode(), b"Content-Type: application/json"]
    answer = await post_emit(fuzzed.port, headers, body)
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"] == "invalid_request"
    # Refused before publishing: the channel's next message still takes offset 1.
    assert (await fuzzed.server.bus.publish("fuzz:a", "next")).offset == 1
    await fuzzed.watcher_still_hears()


@pytest.mark.parametrize("header", [b"X-API-Key: \xff\xfe\x80", b"Authorization: Bearer \xff\xc3("])
async def test_credentials_that_are_not_utf8_get_401(fuzzed: FuzzedBus, header: bytes) -> None:
    body = b'{"channel":"fuzz:a","data":1}'
    answer = await post_emit(fuzzed.port, [header, b"Content-Type: application/json"], body)
    assert answer.status == 401, answer
    assert json.loads(answer.body) == {"error": "unauthorized"}


# -- client frames -----------------------------------------------------------------

# Frames the server may send, and those that answer a client frame.
SERVER_FRAMES: Final = {
    "welcome",
    "subscribed",
    "unsubscribed",
    "refreshed",
    "pong",
    "message",
    # the answers to publish, rpc and history requests
    "published",
    "rpc_result",
    "history_result",
    "error",
}
# A frame is answered by a frame or closed with a code from docs/protocol.md's
# table, less 1000 and 1001 (never the answer to a frame: 1000 tells the JS
# client to stop for good) and 1011 (the server failed). 1006, no close frame
# at all, is not a code the server sends.
ANSWERING_CLOSES: Final = set(CloseCode) - {
    CloseCode.NORMAL,
    CloseCode.GOING_AWAY,
    CloseCode.INTERNAL_ERROR,
}

token_values = st.one_of(
    st.sampled_from(["<valid>", "<other user>", "<expired>"]),
    st.sampled_from(["", "x" * 16385, "é" * 20, "a.b.c"]),
    any_text,
)
# Right shapes, fuzzed values: names and epochs of any text, offsets of any size.
channel_lists = st.lists(channel_names, max_size=4)
positions = st.fixed_dictionaries({"offset": st.integers(), "epoch": any_text})
since_values = st.dictionaries(channel_names, positions, max_size=3)
rewind_values = st.dictionaries(channel_names, st.integers() | json_values, max_size=2)
refs = st.integers(0, 100) | st.integers(-2, 2**53 + 2) | json_values  # mostly usable


def frame_of(kind: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of one type: each field of the right shape or absent, and any extra field."""
    return st.fixed_dictionaries(
        {"type": st.just(kind)},
        optional={**fields, "extra": json_values},
    )


frame_objects = st.one_of(
    frame_of(
        "connect",
        token=token_values,
        channels=channel_lists,
        since=since_values,
        rewind=rewind_values,
    ),
    frame_of("subscribe", channels=channel_lists, since=since_values, rewind=rewind_values),
    st.builds(
        lambda channels, epoch: {
            "type": "subscribe",
            "channels": channels,
            "since": {c: {"offset": 0, "epoch": epoch} for c in channels},
        },
        st.lists(channel_names, min_size=1, max_size=3),
        any_text,
    ),
    frame_of("unsubscribe", channels=channel_lists),
    frame_of("refresh", token=token_values),
    frame_of("ping"),
    frame_of(
        "publish",
        ref=refs,
        channel=channel_names | json_values,
        data=json_values,
        id=any_text | json_values,
        ephemeral=json_values,
    ),
    frame_of("rpc", ref=refs, method=any_text | json_values, data=json_values),
    frame_of(
        "history",
        ref=refs,
        channel=channel_names | json_values,
        limit=st.integers() | json_values,
        before=st.integers() | json_values,
    ),
    # Wrong shapes: any type, any fields, any values.
    st.fixed_dictionaries(
        {"type": st.sampled_from(["connect", "subscribe", "unsubscribe", "refresh"]) | json_values},
        optional={
            "token": json_values,
            "channels": json_values,
            "since": json_values | st.dictionaries(channel_names, json_values, max_size=2),
        },
    ),
    st.dictionaries(any_text, json_values, max_size=3),
)
text_payloads = st.one_of(
    st.text(max_size=60),
    depths.map(nested),
    st.integers(4000, 6000).map(lambda digits: '{"type":"ping","extra":%s}' % ("9" * digits)),
    st.just(" " * 70_000),  # over max_message_size
)
# (kind, payload): a text frame's payload is a str, a binary one's bytes.
frames = st.one_of(
    frame_objects.map(lambda frame: ("object", frame)),
    text_payloads.map(lambda text: ("text", text)),
    st.binary(max_size=60).map(lambda data: ("binary", data)),
)
# Connects with a good token: their channels and positions are what is fuzzed.
connect_frames = st.fixed_dictionaries(
    {"type": st.just("connect"), "token": st.just("<valid>")},
    optional={"channels": channel_lists, "since": since_values},
).map(lambda frame: ("object", frame))


async def send(
    socket: ClientWebSocketResponse, frame: tuple[str, Any], tokens: dict[str, str]
) -> None:
    kind, payload = frame
    if kind == "binary":
        await socket.send_bytes(payload)
    elif kind == "text":
        await socket.send_str(payload)
    else:
        if isinstance(payload.get("token"), str):
            payload = {**payload, "token": tokens.get(payload["token"], payload["token"])}
        await socket.send_str(json.dumps(payload))  # ASCII: lone surrogates as \u escapes


async def answer(socket: ClientWebSocketResponse, welcomed: bool) -> str | None:
    """Read up to the frame that answers the one just sent: its type, or None if closed."""
    async with asyncio.timeout(WAIT):
        while True:
            message = await socket.receive()
            if message.type == WSMsgType.CLOSE:
                assert message.data in ANSWERING_CLOSES, (message.data, message.extra)
                event(f"closed {message.data}")
                return None
            assert message.type == WSMsgType.TEXT, (message.type, socket.close_code)
            frame = json.loads(message.data)
            assert frame["type"] in SERVER_FRAMES, frame
            if not welcomed:
                assert frame["type"] == "welcome", frame
            if frame["type"] == "unsubscribed" and frame["reason"] == "revoked":
                continue  # a refresh's news, before its refreshed
            if frame["type"] != "message":
                kind: str = frame["type"]
                event(f"answered {kind}")
                return kind


async def fuzz_frames(fuzzed: FuzzedBus, sent: list[tuple[str, Any]], *, welcomed: bool) -> None:
    socket = await fuzzed.open(welcomed=welcomed)
    try:
        for frame in sent:
            await send(socket, frame, fuzzed.tokens)
            answered = await answer(socket, welcomed)
            if answered is None:
                break
            welcomed = True
    finally:
        await socket.close()
    await fuzzed.watcher_still_hears()


@FUZZ
@given(
    is_connect=st.booleans(),  # half the time a connect with a good token: welcomes happen
    connect=connect_frames,
    other=frames,
    then=st.lists(frames, max_size=2),
)
async def test_every_first_frame_is_answered_or_closed_with_a_documented_code(
    fuzzed: FuzzedBus,
    is_connect: bool,
    connect: tuple[str, Any],
    other: tuple[str, Any],
    then: list[tuple[str, Any]],
) -> None:
    await fuzz_frames(fuzzed, [connect if is_connect else other, *then], welcomed=False)


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=3))
async def test_every_frame_after_welcome_is_answered_or_closed_with_a_documented_code(
    fuzzed: FuzzedBus, sent: list[tuple[str, Any]]
) -> None:
    await fuzz_frames(fuzzed, sent, welcomed=True)


@pytest.mark.parametrize(
    "token",
    ["", "x" * 16385, "é" * 20, "\ud800", "a.b.c"],
    ids=["empty", "over 16384", "not ASCII", "lone surrogate", "garbage"],
)
async def test_a_connect_token_that_cannot_be_a_jwt_closes_4401(
    fuzzed: FuzzedBus, token: str
) -> None:
    socket = await fuzzed.open(welcomed=False)
    await socket.send_str(json.dumps({"type": "connect", "token": token, "channels": []}))
    message = await socket.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, CloseCode.UNAUTHORIZED)
    assert (message.extra or "").startswith("token ")
    await fuzzed.watcher_still_hears()


async def test_lone_surrogates_in_names_and_epochs_are_answered_not_crashed_on(
    fuzzed: FuzzedBus,
) -> None:
    socket = await fuzzed.open(welcomed=False)
    connect = {
        "type": "connect",
        "token": fuzzed.tokens["<valid>"],
        "channels": ["fuzz:\ud800", "fuzz:a"],
        "since": {"fuzz:a": {"offset": 0, "epoch": "\ud800"}},
    }
    await socket.send_str(json.dumps(connect))
    welcome = await next_frame(socket)
    assert welcome["denied"] == {"fuzz:\ud800": "invalid"}
    assert welcome["subscribed"] == ["fuzz:a"]
    assert welcome["recovered"] == {"fuzz:a": False}
    await fuzzed.watcher_still_hears()


@pytest.mark.parametrize("welcomed", [False, True], ids=["first frame", "after welcome"])
async def test_json_nested_30000_deep_closes_4400(fuzzed: FuzzedBus, welcomed: bool) -> None:
    socket = await fuzzed.open(welcomed=welcomed)
    await socket.send_str(nested(30_000))
    message = await socket.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, CloseCode.BAD_REQUEST)
    await fuzzed.watcher_still_hears()


# -- found by the fuzzing above, and fixed ------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "body"),
    [(b"gzip", b'{"channel":"fuzz:a","data":1}'), (b"deflate", b"\x00not deflate")],
    ids=["gzip", "deflate"],
)
async def test_a_body_that_does_not_decompress_gets_400(
    fuzzed: FuzzedBus, encoding: bytes, body: bytes
) -> None:
    headers = [
        b"X-API-Key: " + API_KEY.encode(),
        b"Content-Type: application/json",
        b"Content-Encoding: " + encoding,
    ]
    answer = await post_emit(fuzzed.port, headers, body)
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"\x00", CloseCode.BAD_REQUEST),
        ('{"type":"connect","token":"x"}', CloseCode.BAD_REQUEST),
        (nested(30_000), CloseCode.BAD_REQUEST),
        ('{"type":"refresh","token":"garbage"}', CloseCode.UNAUTHORIZED),
        ("<other user>", CloseCode.FORBIDDEN),
    ],
    ids=["binary", "second connect", "nested 30000 deep", "bad refresh", "other user's refresh"],
)
async def test_a_bad_frame_followed_at_once_by_another_still_gets_its_close_code(
    fuzzed: FuzzedBus, bad: str | bytes, code: CloseCode
) -> None:
    socket = await fuzzed.open(welcomed=True)
    if isinstance(bad, bytes):
        await socket.send_bytes(bad)
    elif bad in fuzzed.tokens:
        await socket.send_json({"type": "refresh", "token": fuzzed.tokens[bad]})
    else:
        await socket.send_str(bad)
    await socket.send_json({"type": "ping"})  # already on its way when the close is decided
    message = await socket.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, code)
    await fuzzed.watcher_still_hears()


@pytest.mark.parametrize(
    ("payload", "opcode", "welcomed"),
    [
        (b"\xff\xfe", WSMsgType.TEXT, False),
        (b'{"type":"ping","x":"\xc3("}', WSMsgType.TEXT, True),
        (b"{}", WSMsgType.CONTINUATION, True),
    ],
    ids=["not UTF-8, first frame", "not UTF-8, after welcome", "stray continuation"],
)
async def test_frames_aiohttp_refuses_close_with_a_documented_code(
    fuzzed: FuzzedBus, payload: bytes, opcode: WSMsgType, welcomed: bool
) -> None:
    socket = await fuzzed.open(welcomed=welcomed)
    await socket.send_frame(payload, opcode)
    message = await socket.receive(timeout=WAIT)
    assert message.type == WSMsgType.CLOSE
    assert message.data in set(CloseCode), message
    await fuzzed.watcher_still_hears()
