"""The Bus: delivery to the registry's set, subscribe and its answers, unsubscribe, regrant."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus.bus import SubscribeResult
from aiohttp_wsbus.connection import Connection
from aiohttp_wsbus.protocol import SLOW_CONSUMER, TOKEN_EXPIRED, Position

from .conftest import JwksServer, MakeToken
from .support import (
    BusServer,
    GatedBroker,
    RawClient,
    SwitchableBroker,
    close_code,
    eventually,
    make_claims,
    masked_text_frame,
    next_frame,
    nothing_more,
    start_bus,
)

THREE = ["chat:a", "chat:b", "chat:c"]


def connection_of(server: BusServer, welcome: dict[str, Any]) -> Connection:
    return next(c for c in server.bus.connections if c.id == welcome["client"])


def subscribed_frame(result: SubscribeResult) -> dict[str, Any]:
    return {"type": "subscribed", **result.as_json()}


async def subscribe(
    server: BusServer,
    connection: Connection,
    socket: ClientWebSocketResponse,
    channels: list[str],
    since: dict[str, Position] | None = None,
) -> SubscribeResult:
    """Bus.subscribe, and check the socket is sent the frame it answers with."""
    result = await server.bus.subscribe(connection, channels, since or {}, subscribed_frame)
    assert await next_frame(socket) == subscribed_frame(result)
    return result


# -- delivery ----------------------------------------------------------------


async def test_a_message_reaches_exactly_the_registrys_subscribers(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    opened = [await server.open(token, c) for c in (["chat:a"], THREE[:2], ["chat:b"])]
    sockets = [socket for socket, _ in opened]
    connections = [connection_of(server, welcome) for _, welcome in opened]
    registry = server.bus.registry
    # Off the registry, off delivery: even with the socket still subscribed in its own eyes.
    registry.remove(connections[1], "chat:a")
    for channel in ("chat:a", "chat:b"):
        hearing = set(registry.subscribers(channel))
        delivered = server.bus.messages_delivered
        await server.bus.publish(channel, channel)
        assert server.bus.messages_delivered == delivered + len(hearing)
        for socket, connection in zip(sockets, connections, strict=True):
            if connection in hearing:
                assert (await next_frame(socket))["data"] == channel
    assert {c.id for c in registry.subscribers("chat:a")} == {connections[0].id}
    for socket in sockets:
        await nothing_more(socket)


async def test_a_channel_without_subscribers_is_delivered_to_nobody(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(channels=["*"]), ["chat:a"])
    published = await server.bus.publish("chat:nobody", 1)
    assert published.offset == 1
    assert server.bus.messages_delivered == 0
    await nothing_more(socket)


# -- subscribe ---------------------------------------------------------------


async def test_subscribe_answers_invalid_forbidden_and_limit(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_channels=3)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    connection = connection_of(server, welcome)
    asked = ["chat:b", "bad name", "chat:\ud800", "news", "chat:c", "chat:d", "chat:e"]
    result = await subscribe(server, connection, socket, asked)
    assert result.subscribed == ["chat:b", "chat:c"]
    assert result.denied == {
        "bad name": "invalid",
        "chat:\ud800": "invalid",
        "news": "forbidden",
        "chat:d": "limit",
        "chat:e": "limit",
    }
    assert set(result.positions) == {"chat:b", "chat:c"}
    assert result.recovered == {}
    assert set(connection.channels) == {"chat:a", "chat:b", "chat:c"}
    assert server.bus.registry.subscription_count == 3


async def test_subscribing_again_with_since_answers_recovered_and_replays_nothing(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    connection = connection_of(server, welcome)
    epoch = welcome["positions"]["chat:a"]["epoch"]
    for n in range(2):
        await server.bus.publish("chat:a", n)
        assert (await next_frame(socket))["data"] == n
    # Live on this socket all along: whatever position it names, it missed nothing.
    result = await subscribe(server, connection, socket, ["chat:a"], {"chat:a": Position(0, epoch)})
    assert result.subscribed == ["chat:a"]
    assert result.recovered == {"chat:a": True}
    assert result.denied == {}
    await nothing_more(socket)
    assert list(server.bus.registry.subscribers("chat:a")) == [connection]


async def test_a_channel_the_broker_cannot_subscribe_is_denied_unavailable(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = SwitchableBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), [])
    connection = connection_of(server, welcome)
    broker.is_up = False
    result = await subscribe(server, connection, socket, ["chat:a"])
    assert result.denied == {"chat:a": "unavailable"}
    assert result.subscribed == []
    assert not connection.channels
    assert server.bus.registry.channel_count == 0
    broker.is_up = True
    result = await subscribe(server, connection, socket, ["chat:a"])
    assert result.subscribed == ["chat:a"]


async def test_a_closed_connection_is_not_subscribed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = GatedBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    socket, welcome = await server.open(make_token(channels=["chat:*"]), [])
    connection = connection_of(server, welcome)
    connection.close(TOKEN_EXPIRED)
    result = await server.bus.subscribe(connection, THREE, {}, subscribed_frame)
    assert result == SubscribeResult()
    assert server.bus.registry.channel_count == 0
    assert broker.subscribes == 0
    assert await close_code(socket) == 4001


# -- unsubscribe and regrant ---------------------------------------------------


async def test_unsubscribe_returns_what_it_had_and_the_last_one_out_tells_the_broker(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = GatedBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    token = make_token(channels=["chat:*"])
    leaving, welcome = await server.open(token, THREE[:2])
    staying, _ = await server.open(token, ["chat:a"])
    connection = connection_of(server, welcome)
    left = server.bus.unsubscribe(connection, ["chat:a", "chat:b", "chat:never"])
    assert left == ["chat:a", "chat:b"]
    assert not connection.channels
    assert server.bus.unsubscribe(connection, ["chat:a"]) == []
    await eventually(lambda: broker.subscribed == {"chat:a"})
    for channel in ("chat:a", "chat:b"):
        await server.bus.publish(channel, channel)
    assert (await next_frame(staying))["data"] == "chat:a"
    await nothing_more(staying)
    await nothing_more(leaving)


async def test_regrant_drops_what_the_new_claims_do_not_grant_and_moves_the_expiry(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = GatedBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker, leeway=0)
    socket, welcome = await server.open(
        make_token(channels=["chat:*", "user:alice"]), ["chat:a", "user:alice"]
    )
    connection = connection_of(server, welcome)
    claims = make_claims(grants=("chat:*",))
    assert server.bus.regrant(connection, claims) == ["user:alice"]
    assert connection.claims is claims
    assert set(connection.channels) == {"chat:a"}
    await eventually(lambda: broker.subscribed == {"chat:a"})
    await server.bus.publish("user:alice", "revoked")
    await server.bus.publish("chat:a", "kept")
    assert (await next_frame(socket))["data"] == "kept"
    await nothing_more(socket)
    # The expiry follows the new claims: these are already past it.
    assert server.bus.regrant(connection, make_claims(grants=("chat:*",), expires_in=-1)) == []
    assert await close_code(socket) == 4001


# -- a socket closed while the broker is slow to subscribe (defect 5) ----------


async def wait_until_held(broker: GatedBroker, channels: list[str]) -> None:
    await eventually(lambda: broker.waiting == set(channels))


async def wait_until_settled(server: BusServer, broker: GatedBroker, subscribes: int) -> None:
    """Until every subscribe the broker was asked for is done, and given back."""
    await eventually(lambda: broker.subscribes == subscribes and not broker.subscribed)
    assert server.bus.registry.channel_count == 0
    assert server.bus.registry.subscription_count == 0
    assert not server.bus.connections


@pytest.mark.parametrize("frame", ["connect", "subscribe"])
async def test_a_socket_closed_during_a_slow_subscribe_leaves_nothing_behind(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken, frame: str
) -> None:
    broker = GatedBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    broker.gate.clear()
    socket = await server.client.ws_connect("/ws")
    token = make_token(channels=["chat:*"])
    if frame == "connect":
        await socket.send_json({"type": "connect", "token": token, "channels": THREE})
    else:
        await socket.send_json({"type": "connect", "token": token, "channels": []})
        assert (await next_frame(socket))["type"] == "welcome"
        await socket.send_json({"type": "subscribe", "channels": THREE})
    await wait_until_held(broker, THREE)
    (connection,) = server.bus.connections
    connection.close(TOKEN_EXPIRED)  # what its expiry timer does
    broker.gate.set()
    assert await close_code(socket) == 4001
    await wait_until_settled(server, broker, subscribes=3)
    assert not connection.channels


async def test_a_slow_consumer_closed_during_a_slow_subscribe_leaves_nothing_behind(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = GatedBroker()
    server = await start_bus(
        aiohttp_client, jwks_server.url, broker=broker, send_buffer_limit=64 * 1024
    )
    raw = await RawClient.connect(server, make_token(channels=["chat:*"]), ["chat:flood"])
    try:
        await eventually(lambda: broker.subscribed == {"chat:flood"})
        (connection,) = server.bus.connections
        broker.gate.clear()
        subscribe_frame = json.dumps({"type": "subscribe", "channels": THREE}).encode()
        await asyncio.get_running_loop().sock_sendall(raw.sock, masked_text_frame(subscribe_frame))
        await wait_until_held(broker, THREE)
        for n in range(300):  # 18 MB at most: more than any loopback socket holds
            await server.bus.publish("chat:flood", {"n": n, "pad": "x" * 60_000})
            await asyncio.sleep(0)  # one tick: the write scheduler flushes
            if connection.is_closing:
                break
        assert connection.closed_with == SLOW_CONSUMER
        broker.gate.set()
        await wait_until_settled(server, broker, subscribes=4)
    finally:
        raw.sock.close()
