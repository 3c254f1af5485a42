"""max_connections_per_user counted on every node: two server processes on one Redis."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio

from aiohttp_wsbus.brokers.redis_users import UserSockets

from .conftest import MakeToken
from .redis_nodes import Node, hs256, start_node, stop_node
from .redis_server import until
from .support import WAIT, close_frame, next_frame

pytestmark = pytest.mark.redis


async def refused(node: Node, session: aiohttp.ClientSession, token: str) -> tuple[int, str]:
    """Connect, and return the close the node answers the connect frame with."""
    socket = await node.open_raw(session, token)
    return await close_frame(socket)


async def test_a_users_socket_limit_holds_across_two_nodes(
    redis_url: str, redis_prefix: str, make_token: MakeToken
) -> None:
    first, second = await asyncio.gather(
        *(start_node(redis_url, redis_prefix, max_connections_per_user=3) for _ in range(2))
    )
    try:
        async with aiohttp.ClientSession() as session:
            alice = hs256(make_token, sub="alice")
            held = [
                (await first.open(session, alice, []))[0],
                (await second.open(session, alice, []))[0],
                (await first.open(session, alice, []))[0],
            ]
            assert await refused(second, session, alice) == (4408, "too many connections")
            assert await refused(first, session, alice) == (4408, "too many connections")
            _, welcome = await second.open(session, hs256(make_token, sub="bob"), [])
            assert welcome["user"] == "bob"
            # A socket closed on one node frees a place on the other.
            await held[0].close()
            async with asyncio.timeout(WAIT):
                while True:
                    socket = await second.open_raw(session, alice)
                    frame = await socket.receive(timeout=WAIT)
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        break
                    assert frame.data == 4408  # not yet given back: try again
            assert frame.json()["type"] == "welcome"
            await socket.send_json({"type": "ping"})
            assert await next_frame(socket) == {"type": "pong"}
    finally:
        await asyncio.gather(stop_node(first), stop_node(second))


async def test_a_dead_nodes_share_expires_and_a_live_nodes_share_is_kept(
    redis_url: str, redis_prefix: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    live = UserSockets(redis_prefix, refresh=0.2)
    dead = UserSockets(redis_prefix, refresh=0.2)
    keeping = asyncio.get_running_loop().create_task(live.keep(client))
    try:
        assert await live.take(client, "alice", 2)
        assert await dead.take(client, "alice", 2)  # this node then dies: no release
        assert not await live.take(client, "alice", 2)
        # The dead node's share expires after three refreshes it never made; the live
        # node's, rewritten all along, stays: one place frees up, not two.
        await until(lambda: live.take(client, "alice", 2))
        assert not await live.take(client, "alice", 2)
        live.release("alice")
        await until(lambda: live.take(client, "alice", 2))
    finally:
        keeping.cancel()
        await asyncio.wait({keeping})
        await client.aclose()
