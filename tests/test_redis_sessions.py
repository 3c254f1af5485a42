"""Ending sessions across two server processes on one Redis: disconnect, unsubscribe, revoke."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import ClientWebSocketResponse

from .conftest import MakeToken
from .redis_node import API_KEY
from .redis_nodes import Node, hs256, start_node, stop_node
from .redis_server import RedisServer
from .support import close_frame, next_frame, nothing_more

HEADERS = {"X-API-Key": API_KEY}


async def control(
    session: aiohttp.ClientSession, node: Node, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(node.url + "/ws" + path, json=body, headers=HEADERS) as response:
        return response.status, await response.json()


async def refused(node: Node, session: aiohttp.ClientSession, token: str) -> tuple[int, str]:
    socket: ClientWebSocketResponse = await session.ws_connect(node.url + "/ws")
    await socket.send_json({"type": "connect", "token": token, "channels": []})
    return await close_frame(socket)


async def test_a_disconnect_on_one_node_closes_the_users_sockets_on_both_within_a_second(
    nodes: list[Node], make_token: MakeToken
) -> None:
    node_a, node_b = nodes
    async with aiohttp.ClientSession() as session:
        on_a, _ = await node_a.open(session, hs256(make_token, sub="alice"), [])
        on_b, _ = await node_b.open(session, hs256(make_token, sub="alice"), [])
        bob, _ = await node_b.open(session, hs256(make_token, sub="bob"), [])
        assert await control(session, node_a, "/users/alice/disconnect", {"reason": "ban"}) == (
            202,
            {"accepted": True},
        )
        assert await close_frame(on_a, timeout=1) == (4410, "ban")
        assert await close_frame(on_b, timeout=1) == (4410, "ban")
        await nothing_more(bob)
        again, _ = await node_b.open(session, hs256(make_token, sub="alice"), [])
        status, _ = await control(session, node_a, "/users/alice/disconnect", {"reconnect": True})
        assert status == 202
        assert (await close_frame(again, timeout=1))[0] == 4012


async def test_unsubscribe_user_on_one_node_stops_delivery_on_the_other(
    nodes: list[Node], make_token: MakeToken
) -> None:
    node_a, node_b = nodes
    async with aiohttp.ClientSession() as session:
        token = hs256(make_token, sub="alice", channels=["chat:*"])
        on_b, _ = await node_b.open(session, token, ["chat:a", "chat:b"])
        status, _ = await control(
            session, node_a, "/users/alice/unsubscribe", {"channels": ["chat:a"]}
        )
        assert status == 202
        assert await next_frame(on_b) == {
            "type": "unsubscribed",
            "channels": ["chat:a"],
            "reason": "server",
        }
        await node_a.emit(session, "chat:a", "never")
        await node_a.emit(session, "chat:b", "still")
        assert (await next_frame(on_b))["data"] == "still"
        await nothing_more(on_b)


async def test_a_revocation_holds_on_every_node_and_across_restarts_and_a_sigkill(
    nodes: list[Node], make_token: MakeToken, redis_url: str, redis_prefix: str
) -> None:
    node_a, node_b = nodes
    old = hs256(make_token, sub="alice", publish=["chat:*"], iat=int(time.time()) - 60)
    async with aiohttp.ClientSession() as session:
        live, _ = await node_b.open(session, old, [])
        refreshing, _ = await node_b.open(session, hs256(make_token, sub="alice", iat=1), [])
        body = {"user": "alice", "issued_before": time.time() - 1, "until": time.time() + 120}
        assert (await control(session, node_a, "/revocations", body))[0] == 202
        assert await close_frame(live, timeout=1) == (4410, "token revoked")
        assert await close_frame(refreshing, timeout=1) == (4410, "token revoked")
        assert await refused(node_b, session, old) == (4401, "token revoked")
        async with session.post(
            node_b.url + "/ws/emit",
            json={"channel": "chat:a", "data": 1},
            headers={"Authorization": f"Bearer {old}"},
        ) as emitted:
            assert emitted.status == 401
        fresh = hs256(make_token, sub="alice", iat=int(time.time()) + 1)
        socket, _ = await node_b.open(session, fresh, [])
        await socket.send_json({"type": "refresh", "token": old})
        assert await close_frame(socket) == (4401, "token revoked")
        # A node started later, and one that came back after a SIGKILL, load it from Redis.
        node_a.process.kill()
        await node_a.process.wait()
        await stop_node(node_b)
        for node in await asyncio.gather(*(start_node(redis_url, redis_prefix) for _ in "ab")):
            try:
                assert await refused(node, session, old) == (4401, "token revoked")
                socket, _ = await node.open(session, fresh, [])  # a fresh token still works
                await socket.close()
            finally:
                await stop_node(node)


async def test_with_redis_down_control_answers_503_and_applies_nothing(
    own_redis: RedisServer, redis_prefix: str, make_token: MakeToken
) -> None:
    node = await start_node(own_redis.url, redis_prefix)
    try:
        async with aiohttp.ClientSession() as session:
            socket, _ = await node.open(session, hs256(make_token, sub="alice"), [])
            own_redis.kill()
            calls: list[tuple[str, dict[str, Any]]] = [
                ("/users/alice/disconnect", {}),
                ("/users/alice/unsubscribe", {"channels": ["chat:a"]}),
                ("/revocations", {"user": "alice", "until": time.time() + 60}),
            ]
            for path, body in calls:
                deadline = time.monotonic() + 10
                while (answer := await control(session, node, path, body))[0] != 503:
                    assert time.monotonic() < deadline, answer
                    await asyncio.sleep(0.1)
                assert answer == (503, {"error": "broker_unavailable"})
            await nothing_more(socket)
    finally:
        await stop_node(node)
