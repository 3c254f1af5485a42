"""The WebSocket endpoint over real sockets: auth, grants, frames, close codes."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os

import jwt
import pytest
from aiohttp import WSMsgType
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus.protocol import BEARER_PREFIX, PROTOCOL

from .conftest import JwksServer, MakeToken
from .support import (
    WAIT,
    close_code,
    close_frame,
    eventually,
    masked_text_frame,
    next_frame,
    nothing_more,
    start_bus,
)


async def test_welcome_lists_subscribed_and_denied(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_channels=3)
    token = make_token(sub="alice", channels=["chat:*", "user:alice"])
    _, welcome = await server.open(
        token, ["chat:lobby", "user:alice", "user:bob", "bad name", "chat:a", "chat:b"]
    )
    assert welcome["user"] == "alice"
    assert isinstance(welcome["client"], str)
    assert welcome["client"]
    assert isinstance(welcome["expires_at"], int)
    assert welcome["subscribed"] == ["chat:lobby", "user:alice", "chat:a"]
    assert welcome["denied"] == {"user:bob": "forbidden", "bad name": "invalid", "chat:b": "limit"}
    assert welcome["positions"]["chat:lobby"]["offset"] == 0


async def test_subscriber_receives_only_its_channels(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    lobby, _ = await server.open(make_token(channels=["chat:*"]), ["chat:lobby"])
    other, _ = await server.open(make_token(channels=["chat:*"]), ["chat:other"])
    published = await server.bus.publish("chat:lobby", {"text": "hi"})
    frame = await next_frame(lobby)
    assert frame == {
        "type": "message",
        "channel": "chat:lobby",
        "offset": 1,
        "epoch": published.epoch,
        "data": {"text": "hi"},
    }
    await nothing_more(other)


async def test_subscriber_without_grant_never_receives(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    bob, welcome = await server.open(make_token(sub="bob", channels=["chat:lobby"]), ["chat:staff"])
    assert welcome["denied"] == {"chat:staff": "forbidden"}
    await server.bus.publish("chat:staff", "secret")
    await nothing_more(bob)


async def test_subscribe_and_unsubscribe_frames(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(channels=["chat:*"]), [])
    await socket.send_json({"type": "subscribe", "channels": ["chat:a", "news"]})
    subscribed = await next_frame(socket)
    assert subscribed["type"] == "subscribed"
    assert subscribed["subscribed"] == ["chat:a"]
    assert subscribed["denied"] == {"news": "forbidden"}
    await server.bus.publish("chat:a", 1)
    assert (await next_frame(socket))["data"] == 1
    await socket.send_json({"type": "unsubscribe", "channels": ["chat:a", "chat:never"]})
    assert await next_frame(socket) == {
        "type": "unsubscribed",
        "channels": ["chat:a"],
        "reason": "client",
    }
    await server.bus.publish("chat:a", 2)
    await nothing_more(socket)
    assert server.bus.registry.channel_count == 0


async def test_no_connect_frame_in_time_closes_4401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, auth_timeout=0.2)
    socket = await server.client.ws_connect("/ws")
    assert await close_code(socket) == 4401


async def test_each_late_socket_closes_4401_and_one_in_time_is_served(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    # One timer watches every socket waiting for its connect frame: each late one is
    # closed at its own deadline, and one that connected in time is left alone.
    server = await start_bus(aiohttp_client, jwks_server.url, auth_timeout=0.3)
    first = await server.client.ws_connect("/ws")
    in_time, welcome = await server.open(make_token(), [])
    assert welcome["type"] == "welcome"
    second = await server.client.ws_connect("/ws")  # a token verified since: a later deadline
    assert await close_code(first) == 4401
    assert await close_code(second) == 4401
    await in_time.send_json({"type": "ping"})
    assert await next_frame(in_time) == {"type": "pong"}
    late = await server.client.ws_connect("/ws")  # the timer wakes again for a newcomer
    assert await close_code(late) == 4401


async def test_bad_tokens_close_4401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, leeway=0)
    for token in ["garbage", make_token(exp_in=-10), make_token(aud="other")]:
        socket = await server.client.ws_connect("/ws")
        await socket.send_json({"type": "connect", "token": token, "channels": []})
        assert await close_code(socket) == 4401
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "channels": []})
    assert await close_code(socket) == 4401


async def test_token_in_query_only_when_allowed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    token = make_token(channels=["chat:*"])
    strict = await start_bus(aiohttp_client, jwks_server.url, auth_timeout=0.2)
    socket = await strict.client.ws_connect("/ws", params={"token": token, "channels": "chat:a"})
    assert await close_code(socket) == 4401  # the query is ignored; no connect frame came
    allowing = await start_bus(aiohttp_client, jwks_server.url, allow_query_token=True)
    socket = await allowing.client.ws_connect("/ws", params={"token": token, "channels": "chat:a"})
    welcome = await next_frame(socket)
    assert welcome["type"] == "welcome"
    assert welcome["subscribed"] == ["chat:a"]


async def test_malformed_frames_close_4400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token()
    for send in ("not json", f'{{"type":"connect","token":"{token}"}}', b"binary"):
        socket, _ = await server.open(token, [])
        if isinstance(send, bytes):
            await socket.send_bytes(send)
        else:
            await socket.send_str(send)
        assert await close_code(socket) == 4400
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "subscribe", "channels": []})
    assert await close_code(socket) == 4400


async def test_oversized_frame_closes_1009(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_message_size=1024)
    socket, _ = await server.open(make_token(), [])
    await socket.send_str(json.dumps({"type": "subscribe", "channels": ["x" * 2000]}))
    assert await close_code(socket) == 1009


async def test_expired_token_closes_4001_and_leaves_the_registry(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, leeway=0)
    socket, _ = await server.open(make_token(channels=["chat:*"], exp_in=1), ["chat:a"])
    assert await close_code(socket, timeout=4) == 4001
    assert server.bus.registry.subscribers("chat:a") == ()


async def test_refresh_extends_and_revokes(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    token = make_token(channels=["chat:a"], exp_in=600)
    await socket.send_json({"type": "refresh", "token": token})
    assert await next_frame(socket) == {
        "type": "unsubscribed",
        "channels": ["chat:b"],
        "reason": "revoked",
    }
    refreshed = await next_frame(socket)
    assert refreshed["type"] == "refreshed"
    assert refreshed["revoked"] == ["chat:b"]
    assert refreshed["expires_at"] == jwt.decode(token, options={"verify_signature": False})["exp"]
    await server.bus.publish("chat:b", "gone")
    await server.bus.publish("chat:a", "kept")
    assert (await next_frame(socket))["data"] == "kept"
    await nothing_more(socket)


async def test_refresh_with_another_users_token_closes_4403(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(sub="alice"), [])
    await socket.send_json({"type": "refresh", "token": make_token(sub="mallory")})
    assert await close_code(socket) == 4403


async def test_refresh_with_invalid_token_closes_4401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(sub="alice"), [])
    await socket.send_json({"type": "refresh", "token": "not.a.token"})
    assert await close_code(socket) == 4401


async def test_origin_outside_the_allow_list_gets_403_before_upgrade(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, allowed_origins=["https://app.example"]
    )
    refused = await server.client.get(
        "/ws",
        headers={
            "Origin": "https://evil.example",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert refused.status == 403
    assert await refused.json() == {"error": "origin_not_allowed"}
    socket = await server.client.ws_connect("/ws", origin="https://app.example")
    await socket.send_json({"type": "connect", "token": make_token(), "channels": []})
    assert (await next_frame(socket))["type"] == "welcome"


async def test_connection_limit_closes_1013(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_connections=1)
    await server.open(make_token(), [])
    extra = await server.client.ws_connect("/ws")
    assert await close_code(extra) == 1013


async def test_unreachable_jwks_closes_1013(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    jwks_server.fail = True
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(), "channels": []})
    assert await close_code(socket) == 1013


async def test_plain_get_is_told_to_upgrade(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    response = await server.client.get("/ws")
    assert response.status == 426
    assert (await response.json())["error"] == "websocket_upgrade_required"


async def test_trailing_slash_path_also_serves_the_socket(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    _, welcome = await server.open(make_token(), [], path="/ws/")
    assert welcome["user"] == "alice"


async def test_ping_frame_gets_pong(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(), [])
    await socket.send_str('{"type":"ping"}')
    message = await socket.receive(timeout=5)
    assert message.type == WSMsgType.TEXT
    assert json.loads(message.data) == {"type": "pong"}


async def test_tokens_never_reach_the_logs(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_bus(aiohttp_client, jwks_server.url, leeway=0)
    expired = make_token(exp_in=-60)
    wrong_audience = make_token(aud="elsewhere")
    valid = make_token(channels=["chat:*"], publish=[])
    for token in (expired, wrong_audience):
        socket = await server.client.ws_connect("/ws")
        await socket.send_json({"type": "connect", "token": token, "channels": []})
        assert await close_code(socket) == 4401
    socket, _ = await server.open(valid, ["chat:a"])
    await socket.send_json({"type": "refresh", "token": wrong_audience})
    assert await close_code(socket) == 4401
    refused = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:a", "data": 1},
        headers={"Authorization": f"Bearer {valid}"},
    )
    assert refused.status == 403
    assert caplog.records  # the refusals were logged...
    for token in (expired, wrong_audience, valid):
        for part in token.split("."):
            assert part not in caplog.text  # ...without any part of a token


async def raw_upgrade(
    port: int, path: str = "/ws"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Upgrade a plain socket to a WebSocket and stop reading at the 101's headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(handshake.encode())
    async with asyncio.timeout(WAIT):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_peers_that_drop_give_their_connection_slots_back(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_connections=3)
    port = server.client.server.port
    assert port is not None
    # Three peers upgrade and vanish without a frame; three more vanish instead
    # of answering the close that refuses them (1013 over the limit, 4401 for a
    # bad token).
    silent = [await raw_upgrade(port) for _ in range(3)]
    refused = [await raw_upgrade(port) for _ in range(2)]
    for _, writer in silent + refused:
        writer.transport.abort()
    bad_token = await raw_upgrade(port)
    bad_token[1].write(masked_text_frame(b'{"type":"connect","token":"garbage"}'))
    await bad_token[1].drain()
    await bad_token[0].read(2)  # the close frame's first bytes: 4401 is on its way
    bad_token[1].transport.abort()
    await eventually(lambda: server.bus.open_sockets == 0)
    sockets = [(await server.open(make_token(), []))[0] for _ in range(3)]
    assert len(sockets) == 3


async def test_a_socket_the_peer_closed_or_dropped_is_let_go_without_a_close_task(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    polite, _ = await server.open(make_token(sub="polite"), ["news"])
    rude, _ = await server.open(make_token(sub="rude"), ["news"])
    connections = list(server.bus.connections)
    await polite.close()  # aiohttp answers the close frame itself
    assert polite.close_code == 1000
    rude._response.connection.transport.abort()  # type: ignore[union-attr]
    await eventually(lambda: server.bus.open_sockets == 0)
    # Nothing could leave on either: no task was started to send a close.
    assert [c.closing for c in connections] == [None, None]
    assert all(c.is_closing for c in connections)


async def test_empty_and_oversized_tokens_close_4401_with_a_reason(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    for token, reason in [
        ("", "token missing"),
        (None, "token missing"),
        ("e" * 16385, "token too_long"),
        ("\ud800", "token malformed"),
    ]:
        socket = await server.client.ws_connect("/ws")
        frame: dict[str, object] = {"type": "connect", "channels": []}
        if token is not None:
            frame["token"] = token
        await socket.send_str(json.dumps(frame))  # a lone surrogate as a \\ud800 escape
        assert await close_frame(socket) == (4401, reason)


async def test_every_close_carries_a_reason(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_connections=1)
    socket, _ = await server.open(make_token(sub="alice"), [])
    extra = await server.client.ws_connect("/ws")
    assert await close_frame(extra) == (1013, "connection limit")
    await socket.send_json({"type": "refresh", "token": make_token(sub="mallory")})
    assert await close_frame(socket) == (4403, "refresh token is for another user")


async def test_a_frame_of_exactly_max_message_size_is_accepted(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_message_size=1024)
    socket, _ = await server.open(make_token(), [])
    frame = '{"type":"subscribe","channels":["chat:a"]}'
    exact = frame[:-1] + " " * (1024 - len(frame)) + "}"
    assert len(exact.encode()) == 1024
    await socket.send_str(exact)
    assert (await next_frame(socket))["subscribed"] == ["chat:a"]
    await socket.send_str(exact[:-1] + " }")
    assert await close_code(socket) == 1009


async def test_strings_that_are_not_unicode_are_answered_not_crashed_on(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    published = await server.bus.publish("chat:a", 1)
    since = {"chat:a": {"offset": published.offset, "epoch": "\ud800"}}
    socket, welcome = await server.open(
        make_token(channels=["*"]), ["chat:a", "bad\ud800"], since=since
    )
    assert welcome["denied"] == {"bad\ud800": "invalid"}
    assert welcome["recovered"] == {"chat:a": False}
    await nothing_more(socket)


async def test_json_nested_too_deeply_closes_4400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_message_size=1 << 20)
    for before_welcome in (True, False):
        if before_welcome:
            socket = await server.client.ws_connect("/ws")
        else:
            socket, _ = await server.open(make_token(), [])
        await socket.send_str("[" * 30000 + "]" * 30000)
        assert (await close_frame(socket))[0] == 4400


async def test_since_entries_are_answered_for_the_channels_asked_for(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    position = welcome["positions"]["chat:a"]
    await socket.send_json(
        {
            "type": "subscribe",
            "channels": ["chat:a", "chat:b"],
            "since": {"chat:a": position, "chat:c": position},
        }
    )
    answer = await next_frame(socket)
    assert answer["subscribed"] == ["chat:a", "chat:b"]
    # chat:a was live on this socket all along; chat:c was not asked for.
    assert answer["recovered"] == {"chat:a": True}


# -- the token in the handshake (Sec-WebSocket-Protocol) ------------------


def bearer(token: str) -> tuple[str, str]:
    return (PROTOCOL, BEARER_PREFIX + token)


async def test_a_token_in_the_handshake_is_welcomed_without_a_frame(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(sub="alice", channels=["chat:*"])
    socket = await server.client.ws_connect(
        "/ws", params={"channels": "chat:a,news,chat:a"}, protocols=bearer(token)
    )
    assert socket.protocol == PROTOCOL  # the token's entry is never echoed
    welcome = await next_frame(socket)
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "alice"
    assert welcome["subscribed"] == ["chat:a"]
    assert welcome["denied"] == {"news": "forbidden"}
    await server.bus.publish("chat:a", 1)
    assert (await next_frame(socket))["data"] == 1
    await socket.send_json({"type": "connect", "token": token})
    assert await close_code(socket) == 4400  # the handshake was the connect


async def test_the_handshake_carries_since_and_rewind_in_the_query(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    first = await server.bus.publish("chat:a", "one")
    await server.bus.publish("chat:a", "two")
    for name in ("b", "c"):
        await server.bus.publish(f"chat:{name}", name)
    since = {"chat:a": {"offset": 1, "epoch": first.epoch}}
    socket = await server.client.ws_connect(
        "/ws",
        params={
            "channels": "chat:a,chat:b",
            "since": json.dumps(since),
            "rewind": json.dumps({"chat:b": 1}),
        },
        protocols=bearer(token),
    )
    welcome = await next_frame(socket)
    assert welcome["recovered"] == {"chat:a": True}
    replayed = [await next_frame(socket) for _ in range(2)]
    assert sorted((frame["channel"], frame["data"]) for frame in replayed) == [
        ("chat:a", "two"),
        ("chat:b", "b"),
    ]


@pytest.mark.parametrize(
    ("token", "query", "expected"),
    [
        ("garbage", {}, (4401, "token malformed")),
        ("", {}, (4401, "token missing")),
        (None, {"since": "{not json"}, (4400, "since is not JSON, or nested too deeply")),
        (None, {"rewind": '{"chat:a": -1}'}, (4400, "rewind must map channels to integers >= 0")),
    ],
)
async def test_a_bad_handshake_token_or_query_closes_as_the_connect_frame_would(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    token: str | None,
    query: dict[str, str],
    expected: tuple[int, str],
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    offered = make_token() if token is None else token
    socket = await server.client.ws_connect("/ws", params=query, protocols=bearer(offered))
    assert await close_frame(socket) == expected


async def test_an_expired_handshake_token_closes_4401_expired(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, leeway=0)
    socket = await server.client.ws_connect("/ws", protocols=bearer(make_token(exp_in=-10)))
    assert await close_frame(socket) == (4401, "token expired")


@pytest.mark.parametrize(
    ("offered", "reason"),
    [
        ("wsbus.bearer.T", "a token in Sec-WebSocket-Protocol needs wsbus.v1 offered too"),
        ("other, wsbus.bearer.T", "a token in Sec-WebSocket-Protocol needs wsbus.v1 offered too"),
        (
            "wsbus.v1, wsbus.bearer.T, wsbus.bearer.U",
            "Sec-WebSocket-Protocol offers more than one token",
        ),
    ],
)
async def test_a_malformed_protocol_offer_is_refused_before_the_upgrade_and_never_logged(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    caplog: pytest.LogCaptureFixture,
    offered: str,
    reason: str,
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": offered,
    }
    with caplog.at_level(logging.DEBUG):
        response = await server.client.get("/ws", headers=headers)
        assert response.status == 400
        assert await response.json() == {"error": "bad_websocket_protocol", "reason": reason}
    assert "wsbus.bearer.T" not in caplog.text


async def test_the_connect_frame_path_still_works_with_the_protocol_offered(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket = await server.client.ws_connect("/ws", protocols=(PROTOCOL,))
    assert socket.protocol == PROTOCOL
    await socket.send_json(
        {"type": "connect", "token": make_token(channels=["a"]), "channels": ["a"]}
    )
    assert (await next_frame(socket))["subscribed"] == ["a"]
