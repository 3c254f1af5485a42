"""Several server processes on one Redis: one bus, whichever node a client is on."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import BrokerUnavailable, RedisBroker, RedisPublisher, SyncRedisPublisher

from .conftest import JwksServer, MakeToken
from .redis_node import API_KEY
from .redis_nodes import Node, hs256
from .redis_server import RedisServer
from .support import close_code, eventually, next_frame, nothing_more, start_bus


async def test_a_subscriber_on_one_node_gets_every_message_once_in_order(
    nodes: list[Node], make_token: MakeToken, redis_url: str, redis_prefix: str
) -> None:
    node_a, node_b = nodes
    async with aiohttp.ClientSession() as session:
        socket, _ = await node_b.open(session, hs256(make_token), ["chat:lobby"])
        for n in range(5):
            await node_a.emit(session, "chat:lobby", n)
        async with RedisPublisher(redis_url, prefix=redis_prefix) as publisher:
            for n in range(5, 10):
                await publisher.publish("chat:lobby", n)
        with SyncRedisPublisher(redis_url, prefix=redis_prefix) as sync_publisher:
            for n in range(10, 15):
                await asyncio.to_thread(sync_publisher.publish, "chat:lobby", n)
        for n in range(15, 20):
            await node_b.emit(session, "chat:lobby", n)
        frames = [await next_frame(socket) for _ in range(20)]
        assert [f["data"] for f in frames] == list(range(20))
        assert [f["offset"] for f in frames] == list(range(1, 21))
        assert len({f["epoch"] for f in frames}) == 1
        await nothing_more(socket)
        await socket.close()


async def test_an_ephemeral_message_reaches_every_node_live_and_nothing_replays_it(
    nodes: list[Node], make_token: MakeToken
) -> None:
    node_a, node_b = nodes
    async with aiohttp.ClientSession() as session:
        on_a, _ = await node_a.open(session, hs256(make_token), ["chat:lobby"])
        on_b, welcome = await node_b.open(session, hs256(make_token), ["chat:lobby"])
        start = welcome["positions"]["chat:lobby"]
        body = {"channel": "chat:lobby", "data": "typing", "ephemeral": True}
        async with session.post(
            node_a.url + "/ws/emit", json=body, headers={"X-API-Key": API_KEY}
        ) as response:
            assert response.status == 202
        await node_a.emit(session, "chat:lobby", "said")
        for socket in (on_a, on_b):
            typing, said = await next_frame(socket), await next_frame(socket)
            assert (typing["data"], typing["ephemeral"]) == ("typing", True)
            assert "offset" not in typing
            assert (said["data"], said["offset"]) == ("said", 1)
        replay, _ = await node_a.open(session, hs256(make_token), [])
        await replay.send_json(
            {"type": "subscribe", "channels": ["chat:lobby"], "since": {"chat:lobby": start}}
        )
        assert (await next_frame(replay))["recovered"] == {"chat:lobby": True}
        assert (await next_frame(replay))["data"] == "said"  # the stored one only
        await nothing_more(replay)


async def test_grants_decide_delivery_on_every_node(
    nodes: list[Node], make_token: MakeToken
) -> None:
    node_a, node_b = nodes
    async with aiohttp.ClientSession() as session:
        chat_only, welcome = await node_b.open(
            session, hs256(make_token, channels=["chat:*"]), ["chat:lobby", "secret:plans"]
        )
        assert welcome["denied"] == {"secret:plans": "forbidden"}
        insider, _ = await node_b.open(
            session, hs256(make_token, sub="bob", channels=["secret:*"]), ["secret:plans"]
        )
        await node_a.emit(session, "secret:plans", "hidden")
        await node_a.emit(session, "chat:lobby", "open")
        assert (await next_frame(insider))["data"] == "hidden"
        frame = await next_frame(chat_only)
        assert (frame["channel"], frame["data"]) == ("chat:lobby", "open")
        await nothing_more(chat_only)
        await chat_only.close()
        await insider.close()


async def test_redis_down_refuses_clearly_and_all_recovers(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    own_redis: RedisServer,
    redis_prefix: str,
) -> None:
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        api_keys=["key-for-tests-only"],
        broker=RedisBroker(own_redis.url, prefix=redis_prefix, socket_timeout=0.5),
    )
    token = make_token()
    before, _ = await server.open(token, ["chat:lobby"])
    first = await server.bus.publish("chat:lobby", "before")
    assert (await next_frame(before))["data"] == "before"

    own_redis.kill()
    await eventually(lambda: not server.bus.broker.is_available)
    response = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:lobby", "data": 1},
        headers={"X-API-Key": "key-for-tests-only"},
    )
    assert response.status == 503
    assert (await response.json())["error"] == "broker_unavailable"
    with pytest.raises(BrokerUnavailable):
        await server.bus.publish("chat:lobby", "lost")
    refused = await server.client.ws_connect("/ws")
    assert await close_code(refused) == 1013

    await asyncio.to_thread(own_redis.start)  # without its data: a new epoch
    await eventually(lambda: server.bus.broker.is_available)
    response = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:lobby", "data": "after"},
        headers={"X-API-Key": "key-for-tests-only"},
    )
    assert response.status == 202
    frame = await next_frame(before)  # the socket that stayed open hears it
    assert (frame["data"], frame["offset"]) == ("after", 1)
    assert frame["epoch"] != first.epoch
    since = {"chat:lobby": {"offset": first.offset, "epoch": first.epoch}}
    later, welcome = await server.open(token, ["chat:lobby"], since=since)
    assert welcome["recovered"] == {"chat:lobby": False}
    assert welcome["positions"]["chat:lobby"] == {"offset": 1, "epoch": frame["epoch"]}
    await nothing_more(later)
    await before.close()
    await later.close()
