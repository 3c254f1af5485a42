"""POST {base_path}/emit: auth, validation, and every error as JSON with a 4xx."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus.emit import _EMIT_SCHEMA, _encoding
from aiohttp_wsbus.emit_batch import simple_message

from .conftest import JwksServer, MakeToken
from .support import WAIT, BusServer, eventually, next_frame, nothing_more, start_bus

API_KEY = "k" * 32


async def emit_server(aiohttp_client: AiohttpClient, jwks_server: JwksServer) -> BusServer:
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY])


async def test_emit_with_api_key_delivers_and_answers_202(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    response = await server.client.post(
        "/ws/emit",
        json={"channels": ["chat:a", "chat:b"], "data": {"n": 1}},
        headers={"X-API-Key": API_KEY},
    )
    assert response.status == 202
    body = await response.json()
    assert [(p["channel"], p["offset"]) for p in body["published"]] == [
        ("chat:a", 1),
        ("chat:b", 1),
    ]
    frames = [await next_frame(socket), await next_frame(socket)]
    assert {(f["channel"], json.dumps(f["data"])) for f in frames} == {
        ("chat:a", '{"n": 1}'),
        ("chat:b", '{"n": 1}'),
    }


async def test_payload_is_accepted_for_asgi_ws_users(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    response = await server.client.post(
        "/ws/emit", json={"channel": "chat:a", "payload": "old"}, headers={"X-API-Key": API_KEY}
    )
    assert response.status == 202
    assert (await next_frame(socket))["data"] == "old"


async def test_emit_with_bearer_token_needs_publish_grants(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    token = make_token(publish=["chat:lobby"])
    allowed = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:lobby", "data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert allowed.status == 202
    refused = await server.client.post(
        "/ws/emit",
        json={"channels": ["chat:lobby", "chat:staff"], "data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert refused.status == 403
    assert await refused.json() == {"error": "forbidden", "channels": ["chat:staff"]}


async def test_missing_or_wrong_credentials_get_401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    body = {"channel": "chat:a", "data": 1}
    for headers in (
        {},
        {"X-API-Key": "x" * 32},
        {"X-API-Key": API_KEY[:-1]},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic " + API_KEY},
        {"Authorization": f"Bearer {make_token(exp_in=-3600)}"},
    ):
        response = await server.client.post("/ws/emit", json=body, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await response.json() == {"error": "unauthorized"}
    await nothing_more(socket)


async def test_invalid_bodies_get_400_naming_the_field(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    cases: list[tuple[Any, str]] = [
        ({"data": 1}, "channel"),
        ({"channel": "a", "channels": ["b"], "data": 1}, "channel"),
        ({"channel": "a"}, "data"),
        ({"channel": "a", "data": 1, "payload": 2}, "data"),
        ({"channel": "bad name", "data": 1}, "channels"),
        ({"channels": [], "data": 1}, "channels"),
        ({"channels": [f"c{n}" for n in range(101)], "data": 1}, "channels"),
        ({"channel": 5, "data": 1}, "channel"),
        ({"channel": "a", "data": 1, "extra": True}, "extra"),
        ([1, 2], "_schema"),
    ]
    for body, field in cases:
        response = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": API_KEY})
        assert response.status == 400, body
        answer = await response.json()
        assert answer["error"] == "invalid_request"
        assert field in answer["fields"], (body, answer)


async def test_not_json_gets_415_and_broken_json_400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    headers = {"X-API-Key": API_KEY}
    plain = await server.client.post("/ws/emit", data="channel=a", headers=headers)
    assert plain.status == 415
    assert (await plain.json())["error"] == "unsupported_media_type"
    broken = await server.client.post(
        "/ws/emit", data="{nope", headers={**headers, "Content-Type": "application/json"}
    )
    assert broken.status == 400
    assert (await broken.json())["error"] == "invalid_request"


async def test_body_over_the_limit_gets_413(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_max_size=1000
    )
    response = await server.client.post(
        "/ws/emit", json={"channel": "a", "data": "x" * 2000}, headers={"X-API-Key": API_KEY}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 200  # no Content-Length: the limit applies while reading

    streamed = await server.client.post(
        "/ws/emit",
        data=chunks(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert streamed.status == 413


async def test_other_methods_get_405_json(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    response = await server.client.get("/ws/emit")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert await response.json() == {"error": "method_not_allowed"}


async def test_same_id_publishes_once(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    answers = []
    for _ in range(2):
        response = await server.client.post(
            "/ws/emit",
            json={"channel": "chat:a", "data": "once", "id": "order-17"},
            headers={"X-API-Key": API_KEY},
        )
        assert response.status == 202
        answers.append(await response.json())
    assert answers[0] == answers[1]
    assert (await next_frame(socket))["data"] == "once"
    await nothing_more(socket)


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["channel", "channels", "data", "payload", "id", "messages", "x"])
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(body=json_bodies)
async def test_no_body_gets_a_server_error(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, body: Any
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    response = await server.client.post(
        "/ws/emit",
        data=json.dumps(body),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status in (202, 400), (body, response.status)
    assert response.content_type == "application/json"


async def raw_request(server: BusServer, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request over a plain socket (headers as given, body maybe partial).

    Returns the status and body of the answer, which must come within WAIT.
    """
    port = server.client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            status_line = await reader.readline()
            headers = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            answer = await reader.readexactly(length)
        return int(status_line.split()[1]), answer
    finally:
        writer.close()


def request_head(headers: dict[str, str], path: str = "/ws/emit") -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines) + "\r\n"


async def test_credentials_are_checked_before_a_body_is_read(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    head = request_head({"Content-Type": "application/json", "Content-Length": "1000000"})
    # Only a few bytes of the promised megabyte: the answer comes anyway.
    status, body = await raw_request(server, head, b'{"channel": "a", "da')
    assert status == 401
    assert json.loads(body) == {"error": "unauthorized"}


async def test_a_chunked_body_over_the_limit_that_came_whole_gets_413(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_max_size=1000
    )
    head = request_head(
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked", "X-API-Key": API_KEY}
    )
    # No Content-Length, and every chunk arrives with the headers: read at once, still bounded.
    chunk = b" " * 600
    chunked = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    status, body = await raw_request(server, head, chunked * 2 + b"0\r\n\r\n")
    assert status == 413
    assert json.loads(body) == {"error": "payload_too_large", "limit": 1000}


async def test_a_body_slower_than_emit_timeout_gets_408(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_timeout=0.2)
    head = request_head(
        {"Content-Type": "application/json", "Content-Length": "100", "X-API-Key": API_KEY}
    )
    status, body = await raw_request(server, head, b'{"channel": "a"')
    assert status == 408
    assert json.loads(body) == {"error": "request_timeout", "limit": 0.2}


@pytest.mark.parametrize(
    "data", ["NaN", "Infinity", "-Infinity", "1e999", "[" * 2000 + "]" * 2000, '"\\ud800"']
)
async def test_data_json_cannot_carry_is_400_and_takes_no_offset(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken, data: str
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    for subscribers in ("none", "one"):
        channel = "chat:b" if subscribers == "none" else "chat:a"
        response = await server.client.post(
            "/ws/emit",
            data=f'{{"channel": "{channel}", "data": {data}}}',
            headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        )
        assert response.status == 400, await response.text()
        answer = await response.json()
        assert answer["error"] == "invalid_request"
        assert set(answer["fields"]) <= {"_body", "data"}
        # Nothing was published: the next message takes offset 1.
        assert (await server.bus.publish(channel, "after")).offset == 1
    assert (await next_frame(socket))["offset"] == 1
    await nothing_more(socket)


async def test_a_lone_surrogate_never_poisons_history_for_later_recovery(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), ["chat:p"])
    position = welcome["positions"]["chat:p"]
    await socket.close()
    response = await server.client.post(
        "/ws/emit",
        data='{"channel": "chat:p", "data": "\\ud800"}',
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status == 400
    await server.bus.publish("chat:p", "fine")
    again, welcome = await server.open(
        make_token(channels=["chat:*"]), ["chat:p"], since={"chat:p": position}
    )
    assert welcome["recovered"] == {"chat:p": True}
    assert (await next_frame(again))["data"] == "fine"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_broken_compressed_body_is_400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, encoding: str
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    garbage = b"\x1f\x8b\x08\x00not really compressed at all"
    head = request_head(
        {
            "Content-Type": "application/json",
            "Content-Encoding": encoding,
            "Content-Length": str(len(garbage)),
            "X-API-Key": API_KEY,
        }
    )
    status, body = await raw_request(server, head, garbage)
    assert status == 400
    assert json.loads(body)["error"] == "invalid_request"


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
async def test_credentials_that_are_not_utf8_are_401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, header: str
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    value = "Bearer \xff\xfe\xc3" if header == "Authorization" else "\xff\xfe\xc3" * 10
    head = request_head({"Content-Type": "application/json", "Content-Length": "2", header: value})
    status, body = await raw_request(server, head, b"{}")
    assert status == 401
    assert json.loads(body) == {"error": "unauthorized"}


async def test_a_client_leaving_mid_body_logs_no_error(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    head = request_head(
        {"Content-Type": "application/json", "Content-Length": "1000", "X-API-Key": API_KEY}
    )
    _, writer = await asyncio.open_connection("127.0.0.1", server.client.server.port)
    writer.write(head.encode() + b"\r\n" + b'{"channel": "a", "data": "')
    await writer.drain()
    await eventually(lambda: server.bus.settings is not None and _reading(server))
    writer.transport.abort()
    # The server notices and finishes the request; then a new one is served as usual.
    response = await server.client.post(
        "/ws/emit", json={"channel": "a", "data": 1}, headers={"X-API-Key": API_KEY}
    )
    assert response.status == 202
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _reading(server: BusServer) -> bool:
    # The emit handler holds a body deadline while a body is arriving.
    routes = server.app.router.routes()
    handler = next(r.handler for r in routes if r.resource and r.resource.canonical == "/ws/emit")
    return bool(handler.__self__._body_deadlines)  # type: ignore[attr-defined]


async def test_idempotency_ids_are_scoped_by_publisher(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    body = {"channel": "chat:a", "data": "from mallory", "id": "order-17:shipped"}
    mallory = {"Authorization": "Bearer " + make_token(sub="mallory", publish=["chat:*"])}
    first = await server.client.post("/ws/emit", json=body, headers=mallory)
    assert first.status == 202
    # The back end's real message with the same id is published, not swallowed.
    body["data"] = "from the back end"
    real = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": API_KEY})
    again = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": API_KEY})
    offsets = [(await r.json())["published"][0]["offset"] for r in (first, real, again)]
    assert offsets == [1, 2, 2]  # each publisher's repeat is still published once
    in_process = await server.bus.publish("chat:a", "app", id="order-17:shipped")
    assert in_process.offset == 3
    assert [(await next_frame(socket))["data"] for _ in range(3)] == [
        "from mallory",
        "from the back end",
        "app",
    ]
    await nothing_more(socket)


emit_fields = st.sampled_from(["channel", "channels", "data", "payload", "id", "ephemeral", "x"])
field_values = (
    st.none()
    | st.booleans()
    | st.integers(-1, 2)
    | st.floats(allow_nan=False)
    | st.sampled_from(["a", "chat:1", "no spaces", "", "x" * 300, "m-1", "\x7f"])
    | st.lists(st.sampled_from(["a", "b"]), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)


@given(body=st.dictionaries(emit_fields, field_values) | field_values)
def test_the_common_body_loads_as_the_schema_loads_it(body: Any) -> None:
    fast = simple_message(body)
    # The fast path only accepts, and only what the schema accepts, as the schema has it;
    # every refusal (and its wording) is the schema's.
    if fast is not None:
        assert fast == _EMIT_SCHEMA.load(body)


@pytest.mark.parametrize(
    "body",
    [
        {"channel": "a", "data": {"t": 1}},
        {"channel": "a", "data": None, "id": "m-1"},
        {"channel": "a", "data": 1, "ephemeral": True},
    ],
)
def test_the_common_body_skips_the_schema(body: dict[str, Any]) -> None:
    assert simple_message(body) == _EMIT_SCHEMA.load(body)


@given(st.binary(max_size=8) | st.sampled_from([b"{", b"{}", b'{\x00"\x00', b"{\x00\x00\x00"]))
def test_body_encoding_is_told_as_json_loads_tells_it(raw: bytes) -> None:
    assert _encoding(raw) == json.detect_encoding(raw)
