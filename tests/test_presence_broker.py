"""Presence in the broker contract (brokers/presence.py), on every kind of broker:
joins and leaves once per user, snapshots, the member limit, and (Redis) a node
that stops refreshing its members is swept by the others."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from aiohttp_wsbus import RedisBroker
from aiohttp_wsbus.brokers import Broker, HistoryOptions, MemoryBroker
from aiohttp_wsbus.brokers.presence import (
    Member,
    PresenceEvent,
    PresenceOptions,
    PresenceTable,
)
from aiohttp_wsbus.brokers.redis_presence import RedisPresence

from .support import WAIT, eventually

Node = tuple[Broker, list[PresenceEvent]]
MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture(params=["memory", "redis", "redis-sharded", "redis-cluster"])
async def make_node(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[MakeNode]:
    """Brokers of one kind, started with presence; stopped after the test."""
    started: list[Broker] = []

    async def make(ttl: float = 60.0, max_members: int = 1000) -> Node:
        broker: Broker
        if request.param == "memory":
            broker = MemoryBroker()
        elif request.param == "redis-cluster":
            url = request.getfixturevalue("redis_cluster_url")
            broker = RedisBroker(url, prefix=redis_prefix, cluster=True)
        else:
            url = request.getfixturevalue("redis_url")
            broker = RedisBroker(url, prefix=redis_prefix, sharded=request.param == "redis-sharded")
        events: list[PresenceEvent] = []
        await broker.start(
            lambda message: None,
            HistoryOptions(),
            on_presence=events.append,
            presence=PresenceOptions(ttl, max_members),
        )
        started.append(broker)
        return broker, events

    yield make
    for broker in started:
        await broker.stop()


async def test_a_user_joins_with_their_first_socket_and_leaves_with_their_last(
    make_node: MakeNode,
) -> None:
    broker, events = await make_node()
    await broker.subscribe("room")  # Redis announces only to nodes listening to the channel
    await broker.join("c1", "alice", '{"name":"Alice"}', ["room"])
    await broker.join("c2", "alice", '{"name":"Alice"}', ["room"])
    await broker.join("c1", "alice", '{"name":"Alice"}', ["room"])  # again: harmless
    after = await broker.join("c3", "bob", "{}", ["room"], snapshot=["room"], limit=10)
    assert after["room"].listed == {  # read in the same round trip, after the join
        "alice": {"info": {"name": "Alice"}, "connections": 2},
        "bob": {"info": {}, "connections": 1},
    }
    await eventually(lambda: len(events) >= 2)
    assert events == [
        PresenceEvent("room", "alice", '{"name":"Alice"}'),
        PresenceEvent("room", "bob", "{}"),
    ]
    snapshot = (await broker.presence(["room"]))["room"]
    assert snapshot.count == 2
    assert snapshot.members == {
        "alice": Member({"name": "Alice"}, 2),
        "bob": Member({}, 1),
    }
    await broker.leave("c1", ["room"])
    await broker.leave("c9", ["room", "elsewhere"])  # never joined: harmless
    await broker.leave("c3", ["room"])
    await eventually(lambda: len(events) >= 3)
    await broker.leave("c2", ["room"])
    await eventually(lambda: len(events) >= 4)
    assert events[2:] == [PresenceEvent("room", "bob"), PresenceEvent("room", "alice")]
    assert (await broker.presence(["room"]))["room"].members == {}


async def test_above_the_member_limit_only_the_count_and_no_announcements(
    make_node: MakeNode,
) -> None:
    broker, events = await make_node(max_members=2)
    await broker.subscribe("big")
    for user in ("u1", "u2", "u3"):
        await broker.join("c-" + user, user, "{}", ["big"])
    await eventually(lambda: len(events) >= 2)
    snapshots = await broker.presence(["big"], limit=2)
    assert snapshots["big"].count == 3
    assert snapshots["big"].members is None
    assert json.loads(snapshots["big"].text) == {"count": 3}
    assert (await broker.presence(["big"], limit=0))["big"].count == 3
    everyone = (await broker.presence(["big"]))["big"].members
    assert everyone is not None and set(everyone) == {"u1", "u2", "u3"}
    await broker.leave("c-u3", ["big"])  # back to 2: the list is no longer announced
    await broker.leave("c-u2", ["big"])  # 1 of 2: announced again
    await eventually(lambda: len(events) >= 3)
    assert [e.user for e in events] == ["u1", "u2", "u2"]
    assert not events[2].joined


async def test_a_channel_nobody_joined_is_empty(make_node: MakeNode) -> None:
    broker, _ = await make_node()
    snapshot = (await broker.presence(["nobody"], limit=10))["nobody"]
    assert (snapshot.count, snapshot.members) == (0, {})


async def test_a_snapshot_is_json_a_client_parses_whatever_info_was_written(
    make_node: MakeNode,
) -> None:
    broker, _ = await make_node()
    # Written by a node of another version, say: spliced into welcomes as it is, so
    # what JSON.parse would refuse (not JSON, NaN) is shown as no info.
    await broker.join("c1", 'a"b', r'{"n":"é\\"}', ["room"])
    await broker.join("c2", "bob", "{not json", ["room"])
    await broker.join("c3", "carol", '{"x":NaN}', ["room"])
    snapshot = (await broker.presence(["room"], limit=10))["room"]
    assert json.loads(snapshot.text, parse_constant=pytest.fail) == {
        'a"b': {"info": {"n": "é\\"}, "connections": 1},
        "bob": {"info": {}, "connections": 1},
        "carol": {"info": {}, "connections": 1},
    }


def test_the_memory_table_builds_a_listing_once_per_change() -> None:
    table = PresenceTable()
    table.join("room", "c1", "alice", "{}", 10)
    first = table.snapshot("room", 10).text
    assert table.snapshot("room", 10).text is first  # shared by every welcome until...
    table.join("room", "c2", "alice", "{}", 10)  # ...a change: her second socket
    assert json.loads(table.snapshot("room", 10).text) == {
        "alice": {"info": {}, "connections": 2}
    }
    table.leave("room", "c1", 10)
    table.leave("room", "c2", 10)
    assert table.snapshot("room", 10).text == "{}"


# -- Redis: many nodes --------------------------------------------------------


@pytest.fixture
def redis_nodes(make_node: MakeNode, request: pytest.FixtureRequest) -> MakeNode:
    if "memory" in request.node.callspec.id:
        pytest.skip("one process: MemoryBroker has no other node")
    return make_node


async def test_every_node_hears_a_join_once_and_the_snapshot_is_cluster_wide(
    redis_nodes: MakeNode,
) -> None:
    a, a_events = await redis_nodes()
    b, b_events = await redis_nodes()
    await asyncio.gather(a.subscribe("room"), b.subscribe("room"))
    await a.join("ca", "alice", "{}", ["room"])
    await b.join("cb1", "bob", "{}", ["room"])
    await b.join("cb2", "bob", "{}", ["room"])  # bob's second tab, on the other node
    await a.join("ca2", "bob", "{}", ["room"])
    await eventually(lambda: len(a_events) >= 2 and len(b_events) >= 2)
    for events in (a_events, b_events):
        assert [(e.user, e.joined) for e in events] == [("alice", True), ("bob", True)]
    members = (await a.presence(["room"]))["room"].members
    assert members == {"alice": Member({}, 1), "bob": Member({}, 3)}


async def test_members_of_a_node_that_stopped_refreshing_are_swept_with_their_leave(
    redis_nodes: MakeNode,
) -> None:
    ttl = 0.6
    alive, events = await redis_nodes(ttl=ttl)
    gone, _ = await redis_nodes(ttl=ttl)
    await alive.subscribe("room")
    await alive.join("c-alice", "alice", "{}", ["room"])
    await gone.join("c-carol", "carol", "{}", ["room"])
    await gone.stop()  # no leave sent, no refresh any more: as if it crashed
    await eventually(lambda: any(not e.joined for e in events), timeout=ttl * 2 + WAIT)
    assert [e for e in events if not e.joined] == [PresenceEvent("room", "carol")]
    members = (await alive.presence(["room"]))["room"].members
    assert members is not None and set(members) == {"alice"}  # alive's refreshes kept her


async def test_a_read_sweeps_ghosts_even_where_no_node_sweeps(
    redis_nodes: MakeNode,
) -> None:
    reader, _ = await redis_nodes(ttl=0.3)
    gone, _ = await redis_nodes(ttl=0.3)
    await gone.join("c-carol", "carol", "{}", ["quiet"])
    await gone.stop()

    async def listed() -> bool:
        return bool((await reader.presence(["quiet"]))["quiet"].members)

    deadline = asyncio.get_running_loop().time() + WAIT
    while await listed():
        assert asyncio.get_running_loop().time() < deadline, "carol stayed listed"
        await asyncio.sleep(0.05)  # polling a read, bounded by the deadline


async def test_a_node_re_adds_its_members_after_redis_lost_them(
    redis_nodes: MakeNode, redis_url: str, redis_prefix: str
) -> None:
    broker, events = await redis_nodes(ttl=1.5)
    await broker.subscribe("room")
    await broker.join("c-alice", "alice", "{}", ["room"])
    await eventually(lambda: len(events) >= 1)
    client: Any = redis.asyncio.Redis.from_url(redis_url)
    if isinstance(broker, RedisBroker) and broker.cluster:
        await client.aclose()
        client = redis.asyncio.RedisCluster.from_url(broker.url)
    try:
        tag = "{" + redis_prefix + ":room}"
        for suffix in (":presence", ":presence:info", ":presence:users", ":presence:expiry"):
            await client.delete(tag + suffix)  # as after a Redis restart without persistence
    finally:
        await client.aclose()
    joined = PresenceEvent("room", "alice", "{}")
    assert events == [joined]
    # The refresh (every ttl / 3) finds her gone and joins her again.
    await eventually(lambda: len(events) >= 2, timeout=WAIT * 2)
    assert events == [joined, joined]


def test_unreadable_presence_payloads_are_ignored() -> None:
    for payload in (b"!", b"!{}", b'!["join"]', b'!["join","u",1]', b'!["jump","u"]'):
        assert RedisPresence.parse("room", payload) is None
    assert RedisPresence.parse("room", b'!["leave","u"]') == PresenceEvent("room", "u")
