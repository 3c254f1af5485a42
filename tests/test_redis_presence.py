"""Presence across two real server processes on one real Redis: each node's users
see everyone, one join and one leave per user whatever their tabs, a SIGKILLed
node's members leave within presence_ttl plus one sweep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .conftest import MakeToken
from .redis_node import API_KEY
from .redis_nodes import Node, hs256, start_node, stop_node
from .support import next_frame, nothing_more

ROOM = "chat:room"
TTL = 1.5  # presence_ttl of these nodes: a sweep every 0.5 s


@pytest.fixture
async def presence_nodes(redis_url: str, redis_prefix: str) -> AsyncIterator[list[Node]]:
    settings = {"presence": ["chat:*"], "presence_ttl": TTL}
    started = await asyncio.gather(
        *(start_node(redis_url, redis_prefix, **settings) for _ in range(2))
    )
    try:
        yield list(started)
    finally:
        await asyncio.gather(
            *(stop_node(node) for node in started if node.process.returncode is None)
        )


def token(make_token: MakeToken, sub: str, **claims: object) -> str:
    claims.setdefault("presence", ["chat:*"])
    return hs256(make_token, sub=sub, channels=["chat:*"], info={"name": sub}, **claims)


async def test_users_on_two_nodes_see_each_other_once_whatever_their_tabs(
    presence_nodes: list[Node], make_token: MakeToken
) -> None:
    a, b = presence_nodes
    async with aiohttp.ClientSession() as session:
        alice, welcome = await a.open(session, token(make_token, "alice"), [ROOM])
        assert list(welcome["presence"][ROOM]) == ["alice"]
        assert (await next_frame(alice))["user"] == "alice"
        bob, welcome = await b.open(session, token(make_token, "bob"), [ROOM])
        assert set(welcome["presence"][ROOM]) == {"alice", "bob"}
        join = {"type": "join", "channel": ROOM, "user": "bob", "info": {"name": "bob"}}
        assert await next_frame(alice) == join
        assert await next_frame(bob) == join
        second_tab, welcome = await a.open(session, token(make_token, "bob"), [ROOM])
        assert welcome["presence"][ROOM]["bob"]["connections"] == 2
        eve, welcome = await b.open(session, token(make_token, "eve", presence=None), [ROOM])
        assert "presence" not in welcome  # no grant: no snapshot, no join, no leave
        assert (await next_frame(alice))["user"] == "eve"
        await second_tab.close()
        await nothing_more(alice)  # bob still has a tab: no leave
        await bob.close()
        leave = await next_frame(alice, timeout=1.0)
        assert leave == {"type": "leave", "channel": ROOM, "user": "bob"}
        await a.emit(session, ROOM, "after")
        assert (await next_frame(eve))["data"] == "after"
        async with session.get(
            f"{b.url}/ws/channels/{ROOM}/presence", headers={"X-API-Key": API_KEY}
        ) as response:
            assert set((await response.json())["members"]) == {"alice", "eve"}


async def test_a_killed_nodes_members_leave_within_the_ttl_and_one_sweep(
    presence_nodes: list[Node], make_token: MakeToken
) -> None:
    a, b = presence_nodes
    async with aiohttp.ClientSession() as session:
        alice, _ = await a.open(session, token(make_token, "alice"), [ROOM])
        await next_frame(alice)
        await b.open(session, token(make_token, "carol"), [ROOM])
        assert (await next_frame(alice))["user"] == "carol"
        b.process.kill()  # SIGKILL: no leave is sent, no refresh any more
        await b.process.wait()
        # Her entry expires at most TTL after b's last refresh; a sweep follows
        # within TTL / 3. The rest is slack for a loaded machine.
        leave = await next_frame(alice, timeout=TTL + TTL / 3 + 1.0)
        assert leave == {"type": "leave", "channel": ROOM, "user": "carol"}
        async with session.get(
            f"{a.url}/ws/channels/{ROOM}/presence", headers={"X-API-Key": API_KEY}
        ) as response:
            assert (await response.json())["members"] == {
                "alice": {"info": {"name": "alice"}, "connections": 1}
            }
        await nothing_more(alice)
