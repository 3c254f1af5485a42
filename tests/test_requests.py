"""Request frames over real sockets: client publish (grants, hooks, idempotency,
ephemeral), RPC, history, the in-flight cap and what closes a socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import Bus, Claims, ConnectionInfo, Forbidden
from aiohttp_wsbus.protocol import MAX_REQUESTS_IN_FLIGHT

from .conftest import JwksServer, MakeToken
from .support import WAIT, BusServer, close_code, close_frame, next_frame, nothing_more, start_bus

ANSWERS = ("published", "rpc_result", "history_result", "error")
BAD_REF = "ref must be an integer from 0 to 2^53"


async def answer(socket: ClientWebSocketResponse, ref: int) -> tuple[dict[str, Any], list[Any]]:
    """The answer to request `ref`, and the other frames that came before it."""
    before: list[Any] = []
    while True:
        frame = await next_frame(socket)
        if frame["type"] in ANSWERS and frame["ref"] == ref:
            return frame, before
        before.append(frame)


async def request(socket: ClientWebSocketResponse, **frame: Any) -> dict[str, Any]:
    await socket.send_json(frame)
    found, _ = await answer(socket, frame["ref"])
    return found


async def publishing_bus(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> BusServer:
    settings.setdefault("client_publish", True)
    return await start_bus(aiohttp_client, jwks_server.url, **settings)


# -- client publish ------------------------------------------------------------


async def test_client_publish_is_off_by_default(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(publish=["chat:*"]), ["chat:lobby"])
    frame = {"type": "publish", "ref": 1, "channel": "chat:lobby", "data": "hi"}
    found = await request(socket, **frame)
    assert found["error"] == "disabled"
    await nothing_more(socket)


async def test_a_granted_publish_reaches_subscribers_and_answers_its_offset(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    listener, _ = await server.open(make_token(sub="bob"), ["chat:lobby"])
    speaker, _ = await server.open(make_token(publish=["chat:lobby"]), [])
    found = await request(speaker, type="publish", ref=7, channel="chat:lobby", data={"text": "hi"})
    assert found == {"type": "published", "ref": 7, "offset": 1, "epoch": found["epoch"]}
    message = await next_frame(listener)
    assert message == {
        "type": "message",
        "channel": "chat:lobby",
        "offset": 1,
        "epoch": found["epoch"],
        "data": {"text": "hi"},
    }


async def test_an_ungranted_publish_is_forbidden_and_reaches_nobody(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    listener, _ = await server.open(make_token(sub="bob"), ["chat:staff"])
    speaker, _ = await server.open(make_token(publish=["chat:lobby"]), ["chat:staff"])
    found = await request(speaker, type="publish", ref=1, channel="chat:staff", data="hi")
    assert found == {"type": "error", "ref": 1, "error": "forbidden"}
    await nothing_more(listener)
    await nothing_more(speaker)
    assert (await server.bus.position("chat:staff")).offset == 0


async def test_a_publish_authorizer_decides_what_the_token_does_not_grant(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.authorizer("room:{name}", action="publish")
        async def members(claims: Claims, name: str) -> bool:
            return name == "open"

    server = await publishing_bus(aiohttp_client, jwks_server, prepare=prepare)
    socket, _ = await server.open(make_token(publish=[]), [])
    allowed = await request(socket, type="publish", ref=1, channel="room:open", data=1)
    refused = await request(socket, type="publish", ref=2, channel="room:shut", data=1)
    assert allowed["type"] == "published"
    assert refused["error"] == "forbidden"


async def test_the_publish_hook_stamps_the_verified_subject_or_refuses(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.on_publish("chat:{room}")
        async def stamp(claims: Claims, data: Any, room: str) -> Any:
            if room == "quiet":
                raise Forbidden([f"chat:{room}"])
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise ValueError("text must be a string")
            return {"text": data["text"], "from": claims.subject, "room": room}

    server = await publishing_bus(aiohttp_client, jwks_server, prepare=prepare)
    listener, _ = await server.open(make_token(sub="bob"), ["chat:lobby", "chat:quiet"])
    speaker, _ = await server.open(make_token(sub="alice", publish=["chat:*"]), [])
    spoofed = {"text": "hi", "from": "bob"}
    found = await request(speaker, type="publish", ref=1, channel="chat:lobby", data=spoofed)
    assert found["type"] == "published"
    message = await next_frame(listener)
    assert message["data"] == {"text": "hi", "from": "alice", "room": "lobby"}
    quiet = await request(speaker, type="publish", ref=2, channel="chat:quiet", data=spoofed)
    assert quiet["error"] == "forbidden"
    bad = await request(speaker, type="publish", ref=3, channel="chat:lobby", data=[1])
    assert bad == {"type": "error", "ref": 3, "error": "invalid", "reason": "text must be a string"}
    await nothing_more(listener)


async def test_a_bearer_emit_goes_through_the_publish_hook_too(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.on_publish("chat:{room}")
        async def stamp(claims: Claims, data: Any, room: str) -> Any:
            if data == "refuse":
                raise Forbidden()
            if data == "bad":
                raise ValueError("not like that")
            return {"said": data, "from": claims.subject}

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare, api_keys=["k" * 16])
    listener, _ = await server.open(make_token(sub="bob"), ["chat:lobby", "chat:other"])
    bearer = {"Authorization": f"Bearer {make_token(publish=['chat:*'])}"}
    body = {"channels": ["chat:lobby", "chat:other"], "data": "hi"}
    response = await server.client.post("/ws/emit", json=body, headers=bearer)
    assert response.status == 202
    frames = [await next_frame(listener), await next_frame(listener)]
    assert [f["data"] for f in frames] == [{"said": "hi", "from": "alice"}] * 2
    refused = await server.client.post("/ws/emit", json={**body, "data": "refuse"}, headers=bearer)
    assert (refused.status, await refused.json()) == (
        403,
        {"error": "forbidden", "channels": ["chat:lobby"]},
    )
    bad = await server.client.post("/ws/emit", json={**body, "data": "bad"}, headers=bearer)
    assert bad.status == 400
    assert (await bad.json())["fields"] == {"data": ["not like that"]}
    # The application's own emits (the API key) are its to shape.
    keyed = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": "k" * 16})
    assert keyed.status == 202
    assert (await next_frame(listener))["data"] == "hi"


async def test_a_failing_publish_hook_answers_unavailable_and_is_counted(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.on_publish("chat:lobby")
        async def broken(claims: Claims, data: Any) -> Any:
            raise RuntimeError("database down")

    server = await publishing_bus(aiohttp_client, jwks_server, prepare=prepare)
    socket, _ = await server.open(make_token(), ["chat:lobby"])
    with caplog.at_level(logging.ERROR, "aiohttp_wsbus"):
        found = await request(socket, type="publish", ref=1, channel="chat:lobby", data=1)
    assert found["error"] == "unavailable"
    assert "database down" not in str(found)
    assert server.bus.hook_errors["on_publish"] == 1
    await nothing_more(socket)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ({"channel": "bad name", "data": 1}, "invalid channel name"),
        ({"channel": "chat:lobby", "data": 1, "id": ""}, "id must be"),
        ({"channel": "chat:lobby", "data": 1, "id": "x", "ephemeral": True}, "takes no id"),
        ({"channel": "chat:lobby"}, "data is required"),
        ({"channel": 5, "data": 1}, "channel must be a string"),
        ({"channel": "chat:lobby", "data": 1, "ephemeral": "yes"}, "ephemeral must be"),
    ],
)
async def test_a_bad_publish_is_answered_invalid_and_the_socket_stays(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    frame: dict[str, Any],
    reason: str,
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(), ["chat:lobby"])
    found = await request(socket, type="publish", ref=3, **frame)
    assert found["error"] == "invalid"
    assert reason in found["reason"]
    await nothing_more(socket)


async def test_data_json_cannot_carry_is_invalid(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(), [])
    await socket.send_str('{"type":"publish","ref":1,"channel":"chat:lobby","data":NaN}')
    found, _ = await answer(socket, 1)
    assert found["error"] == "invalid"


async def test_an_idempotent_publish_retried_across_a_reconnect_is_delivered_once(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    listener, _ = await server.open(make_token(sub="bob"), ["chat:lobby"])
    first, _ = await server.open(make_token(), [])
    frame = {"type": "publish", "ref": 1, "channel": "chat:lobby", "data": "once", "id": "m-1"}
    original = await request(first, **frame)
    await server.bus.disconnect("alice", reconnect=True)  # the socket drops: 4012
    assert await close_code(first) == 4012
    second, _ = await server.open(make_token(), [])
    retried = await request(second, **{**frame, "ref": 2})
    assert (retried["offset"], retried["epoch"]) == (original["offset"], original["epoch"])
    assert (await next_frame(listener))["data"] == "once"
    await nothing_more(listener)
    # The id is the publisher's: the application's own publish with it is not swallowed.
    assert (await server.bus.publish("chat:lobby", "app", id="m-1")).offset == 2


# -- ephemeral messages ------------------------------------------------------------


async def test_ephemeral_messages_go_live_only_and_are_never_replayed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await publishing_bus(aiohttp_client, jwks_server)
    listener, welcome = await server.open(make_token(sub="bob"), ["chat:lobby"])
    start = welcome["positions"]["chat:lobby"]
    speaker, _ = await server.open(make_token(), [])
    typing = {"type": "publish", "ref": 1, "channel": "chat:lobby", "data": "typing"}
    found = await request(speaker, **typing, ephemeral=True)
    assert found == {"type": "published", "ref": 1}
    assert await next_frame(listener) == {
        "type": "message",
        "channel": "chat:lobby",
        "ephemeral": True,
        "data": "typing",
    }
    await server.bus.publish("chat:lobby", "said")
    await server.bus.publish("chat:lobby", "typing again", ephemeral=True)
    assert (await next_frame(listener))["data"] == "said"
    assert (await next_frame(listener))["data"] == "typing again"
    # A client recovering from before all that gets the stored message only.
    later, welcome = await server.open(
        make_token(sub="carol"), ["chat:lobby"], since={"chat:lobby": start}
    )
    assert welcome["recovered"] == {"chat:lobby": True}
    replayed = await next_frame(later)
    assert (replayed["offset"], replayed["data"], replayed["recovered"]) == (1, "said", True)
    await nothing_more(later)
    page = await server.bus.history("chat:lobby")
    assert [m.data for m in page.messages] == ['"said"']
    assert page.position.offset == 1


async def test_ephemeral_emit_over_http(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    key = "k" * 16
    server = await start_bus(aiohttp_client, jwks_server.url, api_keys=[key])
    listener, _ = await server.open(make_token(), ["chat:lobby"])
    body = {"channel": "chat:lobby", "data": "typing", "ephemeral": True}
    response = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": key})
    assert response.status == 202
    assert await response.json() == {"published": [{"channel": "chat:lobby", "ephemeral": True}]}
    assert (await next_frame(listener))["ephemeral"] is True
    with_id = await server.client.post(
        "/ws/emit", json={**body, "id": "x"}, headers={"X-API-Key": key}
    )
    assert with_id.status == 400
    assert "id" in (await with_id.json())["fields"]
    with pytest.raises(ValueError, match="takes no id"):
        await server.bus.publish("chat:lobby", 1, id="x", ephemeral=True)


# -- rpc -----------------------------------------------------------------------------


def rpc_methods(bus: Bus, release: asyncio.Event) -> None:
    @bus.rpc("echo")
    async def echo(info: ConnectionInfo, data: Any) -> Any:
        return {"user": info.user, "data": data}

    @bus.rpc("check")
    async def check(info: ConnectionInfo, data: Any) -> Any:
        raise ValueError("quantity must be positive")

    @bus.rpc("secret")
    async def secret(info: ConnectionInfo, data: Any) -> Any:
        raise Forbidden()

    @bus.rpc("crash")
    async def crash(info: ConnectionInfo, data: Any) -> Any:
        raise RuntimeError("password=hunter2 in a traceback")

    @bus.rpc("unencodable")
    async def unencodable(info: ConnectionInfo, data: Any) -> Any:
        return {1, 2}

    @bus.rpc("wait")
    async def wait(info: ConnectionInfo, data: Any) -> Any:
        await release.wait()
        return data


async def test_rpc_answers_and_errors_never_close_the_socket(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        rpc_timeout=0.2,
        prepare=lambda bus: rpc_methods(bus, release),
    )
    socket, _ = await server.open(make_token(), [])
    found = await request(socket, type="rpc", ref=1, method="echo", data=[1, 2])
    assert found == {"type": "rpc_result", "ref": 1, "data": {"user": "alice", "data": [1, 2]}}
    with caplog.at_level(logging.ERROR, "aiohttp_wsbus"):
        errors = {
            method: await request(socket, type="rpc", ref=n, method=method)
            for n, method in enumerate(["nope", "check", "secret", "crash", "unencodable"], 2)
        }
        timed_out = await request(socket, type="rpc", ref=9, method="wait", data=1)
    assert errors["nope"]["error"] == "not_found"
    assert errors["check"] == {
        "type": "error",
        "ref": 3,
        "error": "invalid",
        "reason": "quantity must be positive",
    }
    assert errors["secret"]["error"] == "forbidden"
    assert errors["crash"] == {"type": "error", "ref": 5, "error": "internal"}
    assert errors["unencodable"]["error"] == "internal"
    assert timed_out == {"type": "error", "ref": 9, "error": "timeout"}
    assert "hunter2" in caplog.text  # logged for the operator, never sent
    assert server.bus.hook_errors["rpc"] == 2
    await nothing_more(socket)


async def test_more_than_16_requests_in_flight_are_answered_limit(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    release = asyncio.Event()
    server = await start_bus(
        aiohttp_client, jwks_server.url, prepare=lambda bus: rpc_methods(bus, release)
    )
    socket, _ = await server.open(make_token(), [])
    for ref in range(MAX_REQUESTS_IN_FLIGHT + 1):
        await socket.send_json({"type": "rpc", "ref": ref, "method": "wait", "data": ref})
    refused = await next_frame(socket)
    assert refused["ref"] == MAX_REQUESTS_IN_FLIGHT
    assert refused["error"] == "limit"
    release.set()
    answers = [await next_frame(socket) for _ in range(MAX_REQUESTS_IN_FLIGHT)]
    assert sorted(a["data"] for a in answers) == list(range(MAX_REQUESTS_IN_FLIGHT))
    # Answered ones no longer count.
    found = await request(socket, type="rpc", ref=99, method="wait", data="again")
    assert found["data"] == "again"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ({"type": "rpc", "method": "echo"}, BAD_REF),
        ({"type": "rpc", "ref": -1, "method": "echo"}, BAD_REF),
        ({"type": "rpc", "ref": 2**53 + 1, "method": "echo"}, BAD_REF),
        ({"type": "rpc", "ref": True, "method": "echo"}, BAD_REF),
        ({"type": "rpc", "ref": 1.5, "method": "echo"}, BAD_REF),
        ({"type": "shout", "ref": 1}, "unknown frame type"),
    ],
)
async def test_a_request_without_a_usable_ref_or_an_unknown_frame_closes_4400(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    frame: dict[str, Any],
    reason: str,
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(), [])
    await socket.send_json(frame)
    assert await close_frame(socket) == (4400, reason)


async def test_the_largest_ref_is_answered(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(), [])
    found = await request(socket, type="rpc", ref=2**53, method="nope")
    assert found["error"] == "not_found"


async def test_a_request_as_first_frame_closes_4400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "publish", "ref": 1, "channel": 5})
    assert await close_frame(socket) == (4400, "the first frame must be connect")


# -- history and rewind --------------------------------------------------------------


async def test_the_history_frame_reads_granted_channels_only(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    for n in range(1, 6):
        await server.bus.publish("chat:lobby", n)
        await server.bus.publish("staff:room", n)
    socket, _ = await server.open(make_token(channels=["chat:*"]), [])
    page = await request(socket, type="history", ref=1, channel="chat:lobby", limit=2)
    epoch = page["position"]["epoch"]
    assert page == {
        "type": "history_result",
        "ref": 1,
        "channel": "chat:lobby",
        "position": {"offset": 5, "epoch": epoch},
        "messages": [{"offset": 4, "data": 4}, {"offset": 5, "data": 5}],
    }
    older = await request(socket, type="history", ref=2, channel="chat:lobby", before=2)
    assert older["messages"] == [{"offset": 1, "data": 1}]
    default = await request(socket, type="history", ref=3, channel="chat:lobby")
    assert [m["offset"] for m in default["messages"]] == [1, 2, 3, 4, 5]
    forbidden = await request(socket, type="history", ref=4, channel="staff:room")
    assert forbidden == {"type": "error", "ref": 4, "error": "forbidden"}
    bad = await request(socket, type="history", ref=5, channel="chat:lobby", limit=0)
    assert bad["error"] == "invalid"
    assert bad["reason"].startswith("limit")


async def test_rewind_replays_the_last_messages_on_the_first_subscribe(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, history_size=3)
    for n in range(1, 6):
        await server.bus.publish("chat:lobby", n)
    socket, welcome = await server.open(
        make_token(), ["chat:lobby", "chat:empty"], rewind={"chat:lobby": 2, "chat:empty": 9}
    )
    assert welcome["subscribed"] == ["chat:lobby", "chat:empty"]
    assert welcome["recovered"] == {}
    replayed = [await next_frame(socket) for _ in range(2)]
    assert [(f["offset"], f["recovered"]) for f in replayed] == [(4, True), (5, True)]
    await nothing_more(socket)
    await socket.send_json({"type": "subscribe", "channels": ["chat:more"], "rewind": {}})
    assert (await next_frame(socket))["subscribed"] == ["chat:more"]
    for n in range(1, 6):
        await server.bus.publish("chat:other", n)
    # More than history_size replays what is kept.
    await socket.send_json(
        {"type": "subscribe", "channels": ["chat:other"], "rewind": {"chat:other": 100}}
    )
    assert (await next_frame(socket))["type"] == "subscribed"
    assert [(await next_frame(socket))["offset"] for _ in range(3)] == [3, 4, 5]
    await nothing_more(socket)


async def test_a_bad_rewind_closes_4400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(), [])
    await socket.send_json({"type": "subscribe", "channels": ["chat:a"], "rewind": {"chat:a": -1}})
    assert await close_code(socket, WAIT) == 4400
