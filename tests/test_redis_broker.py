"""RedisBroker against a real Redis: the broker contract (shared with MemoryBroker,
and run on a Redis Cluster too), nodes sharing offsets, expiry, and catching up
after lost connections. Cluster specifics are in test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import redis.asyncio

from aiohttp_wsbus import BrokerUnavailable, RedisBroker, RedisPublisher, SyncRedisPublisher
from aiohttp_wsbus.brokers import Broker, HistoryOptions, MemoryBroker, Message, Publication
from aiohttp_wsbus.brokers.base import EmptyEpoch
from aiohttp_wsbus.brokers.redis_control import CONTROL_CHANNEL
from aiohttp_wsbus.brokers.redis_scripts import ChannelKeys
from aiohttp_wsbus.protocol import MAX_EPOCH_LENGTH, Position
from aiohttp_wsbus.revocations import Revocation

from .redis_server import RedisMaker, RedisServer, free_port, until
from .support import eventually

Started = tuple[Broker, list[Message]]
MakeBroker = Callable[..., Awaitable[Started]]


@pytest.fixture(params=["memory", "redis", "redis-sharded", "redis-cluster"])
def make_broker(
    request: pytest.FixtureRequest,
) -> MakeBroker:
    """Each kind of broker, started; the contract tests run on all of them."""
    if request.param == "memory":

        async def memory(size: int = 100, ttl: float = 300.0) -> Started:
            broker = MemoryBroker()
            delivered: list[Message] = []
            await broker.start(
                delivered.append,
                HistoryOptions(size, ttl),
                # Recorded with the others, as Messages at offset 0.
                on_ephemeral=lambda channel, data: delivered.append(Message(channel, 0, "", data)),
            )
            return broker, delivered

        return memory
    make_redis = request.getfixturevalue("make_redis_broker")

    options: dict[str, object] = {"sharded": request.param == "redis-sharded"}
    if request.param == "redis-cluster":
        options = {"cluster": True, "url": request.getfixturevalue("redis_cluster_url")}

    async def redis_broker(size: int = 100, ttl: float = 300.0) -> Started:
        broker, delivered = await make_redis(size, ttl, **options)
        return broker, delivered

    return redis_broker


async def delivered_count(delivered: list[Message], count: int) -> None:
    await eventually(lambda: len(delivered) >= count)


# -- the broker contract ----------------------------------------------------


async def test_offsets_count_from_one_per_channel(make_broker: MakeBroker) -> None:
    broker, delivered = await make_broker()
    await broker.subscribe("a")
    await broker.subscribe("b")
    a1 = await broker.publish("a", "1")
    a2 = await broker.publish("a", "2")
    b1 = await broker.publish("b", "3")
    assert (a1.offset, a2.offset, b1.offset) == (1, 2, 1)
    assert a1.epoch == a2.epoch
    await delivered_count(delivered, 3)
    assert sorted(m.data for m in delivered) == ["1", "2", "3"]
    assert [m.data for m in delivered if m.channel == "a"] == ["1", "2"]
    assert all(set(m.epoch) <= set("0123456789abcdef-") for m in delivered)


async def test_ephemeral_messages_reach_subscribers_and_keep_nothing(
    make_broker: MakeBroker,
) -> None:
    broker, delivered = await make_broker()
    await broker.subscribe("a")
    await broker.publish_ephemeral("a", '"typing"')
    published = await broker.publish("a", '"said"')
    await delivered_count(delivered, 2)
    assert [(m.offset, m.data) for m in delivered] == [(0, '"typing"'), (1, '"said"')]
    assert published.offset == 1
    history = (await broker.history({"a": Position(0, published.epoch)}))["a"]
    assert [m.data for m in history.messages] == ['"said"']


async def test_history_after_a_position(make_broker: MakeBroker) -> None:
    broker, _ = await make_broker()
    first = await broker.publish("a", "1")
    await broker.publish("a", "2")
    await broker.publish("a", "3")
    answer = (await broker.history({"a": Position(1, first.epoch)}))["a"]
    assert answer.recovered
    assert [m.data for m in answer.messages] == ["2", "3"]
    assert [m.offset for m in answer.messages] == [2, 3]
    assert answer.position == Position(3, first.epoch)


async def test_history_beyond_the_window_is_not_recovered(make_broker: MakeBroker) -> None:
    broker, _ = await make_broker(size=3)
    first = await broker.publish("a", "1")
    for n in range(2, 8):
        await broker.publish("a", str(n))
    answer = (await broker.history({"a": Position(1, first.epoch)}))["a"]
    assert not answer.recovered
    assert answer.messages == []
    assert answer.position == Position(7, first.epoch)
    edge = (await broker.history({"a": Position(4, first.epoch)}))["a"]
    assert edge.recovered
    assert [m.data for m in edge.messages] == ["5", "6", "7"]


async def test_other_epoch_or_future_offset_is_not_recovered(make_broker: MakeBroker) -> None:
    broker, _ = await make_broker()
    first = await broker.publish("a", "1")
    assert not (await broker.history({"a": Position(1, "other")}))["a"].recovered
    assert not (await broker.history({"a": Position(9, first.epoch)}))["a"].recovered
    at_top = await broker.history({"a": Position(1, first.epoch), "b": None})
    assert at_top["a"].recovered
    assert at_top["a"].messages == []
    assert not at_top["b"].recovered


# -- the broker contract: channels that hold nothing -------------------------


def empty_epoch(position: Position) -> EmptyEpoch:
    epoch = EmptyEpoch.parse(position.epoch)
    assert epoch is not None, position
    assert position.offset == 0
    return epoch


def moved(position: Position, *, at_ms: int | None = None, generation: str = "") -> Position:
    """The same empty position, read at another time or on another generation."""
    epoch = empty_epoch(position)
    changed = EmptyEpoch(epoch.at_ms if at_ms is None else at_ms, generation or epoch.generation)
    return Position(0, str(changed))


async def test_a_channel_that_holds_nothing_answers_offset_0_of_an_empty_epoch(
    make_broker: MakeBroker,
) -> None:
    broker, _ = await make_broker()
    answer = (await broker.history({"new": None}))["new"]
    assert not answer.recovered
    assert len(answer.position.epoch) <= MAX_EPOCH_LENGTH
    empty_epoch(answer.position)
    again = (await broker.history({"new": answer.position}))["new"]
    assert again.recovered  # nothing was published since
    assert again.messages == []
    assert again.position.offset == 0


async def test_an_empty_position_recovers_the_whole_epoch_born_after_it(
    make_broker: MakeBroker,
) -> None:
    broker, _ = await make_broker()
    position = (await broker.history({"new": None}))["new"].position
    first = await broker.publish("new", "1")
    await broker.publish("new", "2")
    assert first.offset == 1
    answer = (await broker.history({"new": position}))["new"]
    assert answer.recovered
    assert [(m.offset, m.epoch, m.data) for m in answer.messages] == [
        (1, first.epoch, "1"),
        (2, first.epoch, "2"),
    ]
    assert answer.position == Position(2, first.epoch)


async def test_an_empty_position_older_than_the_ttl_is_not_recovered(
    make_broker: MakeBroker,
) -> None:
    broker, _ = await make_broker(ttl=300.0)
    position = (await broker.history({"new": None}))["new"].position
    at = empty_epoch(position).at_ms
    # Read 290 s ago: an epoch born since is still there. 300 s ago: one may
    # have been born and expired meanwhile.
    recent, stale = moved(position, at_ms=at - 290_000), moved(position, at_ms=at - 300_000)
    answers = await broker.history({"new": recent})
    assert answers["new"].recovered
    assert not (await broker.history({"new": stale}))["new"].recovered
    await broker.publish("new", "1")
    assert [m.data for m in (await broker.history({"new": recent}))["new"].messages] == ["1"]
    late = (await broker.history({"new": stale}))["new"]
    assert not late.recovered
    assert late.messages == []
    assert late.position.offset == 1


async def test_an_empty_position_is_not_recovered_once_offset_1_left_the_window(
    make_broker: MakeBroker,
) -> None:
    broker, _ = await make_broker(size=2)
    position = (await broker.history({"new": None}))["new"].position
    for n in range(3):
        last = await broker.publish("new", str(n))
    answer = (await broker.history({"new": position}))["new"]
    assert not answer.recovered
    assert answer.messages == []
    assert answer.position == Position(3, last.epoch)


async def test_an_empty_position_from_another_generation_is_not_recovered(
    make_broker: MakeBroker,
) -> None:
    broker, _ = await make_broker()
    position = (await broker.history({"new": None}))["new"].position
    other = moved(position, generation="f" * 16)
    assert other != position
    assert not (await broker.history({"new": other}))["new"].recovered
    await broker.publish("new", "1")
    assert not (await broker.history({"new": other}))["new"].recovered


async def test_same_id_is_published_once(make_broker: MakeBroker) -> None:
    broker, delivered = await make_broker()
    await broker.subscribe("a")
    await broker.subscribe("b")
    first = await broker.publish("a", "1", message_id="m-1")
    again = await broker.publish("a", "1", message_id="m-1")
    assert not first.is_repeat
    assert again == dataclasses.replace(first, is_repeat=True)
    other_channel = await broker.publish("b", "1", message_id="m-1")
    assert other_channel.offset == 1
    await broker.publish("a", "2")
    await delivered_count(delivered, 3)
    # In order per channel (a cluster may carry "a" and "b" on two shards).
    assert [m.data for m in delivered if m.channel == "a"] == ["1", "2"]
    assert [m.data for m in delivered if m.channel == "b"] == ["1"]


async def test_publish_many_keeps_order_offsets_options_and_ids(make_broker: MakeBroker) -> None:
    broker, delivered = await make_broker()
    await broker.subscribe("a")
    await broker.subscribe("b")
    kept_one = HistoryOptions(1, 300.0)
    before = await broker.publish("a", "0", message_id="m-0")
    published = await broker.publish_many(
        [
            Publication("a", "1", "m-1"),
            Publication("b", "2", history=kept_one),
            Publication("a", "1 again", "m-1"),
            Publication("a", "0 again", "m-0"),
            Publication("b", "3", history=kept_one),
            Publication("a", "4"),
        ]
    )
    assert [(p.channel, p.offset, p.is_repeat) for p in published] == [
        ("a", 2, False),
        ("b", 1, False),
        ("a", 2, True),
        ("a", 1, True),
        ("b", 2, False),
        ("a", 3, False),
    ]
    assert published[0].epoch == before.epoch
    await delivered_count(delivered, 5)
    assert [m.data for m in delivered if m.channel == "a"] == ["0", "1", "4"]
    assert [(m.offset, m.data) for m in delivered if m.channel == "b"] == [(1, "2"), (2, "3")]
    again = await broker.publish_many([Publication("a", "1", "m-1"), Publication("a", "5", "m-5")])
    assert [(p.offset, p.is_repeat) for p in again] == [(2, True), (4, False)]
    history = await broker.history(
        {"b": Position(1, published[1].epoch)}, options={"b": kept_one}
    )
    assert [m.data for m in history["b"].messages] == ["3"]  # kept as its options say
    assert await broker.publish_many([]) == []


# -- Redis: shared by nodes, expiring ----------------------------------------


async def test_nodes_share_offsets_epochs_and_ids(make_redis_broker: RedisMaker) -> None:
    one, _ = await make_redis_broker()
    two, on_two = await make_redis_broker()
    await two.subscribe("a")
    first = await one.publish("a", "1", message_id="x")
    second = await two.publish("a", "2")
    again = await two.publish("a", "1", message_id="x")
    assert (first.offset, second.offset) == (1, 2)
    assert first.epoch == second.epoch
    assert again == dataclasses.replace(first, is_repeat=True)
    await delivered_count(on_two, 2)
    assert [(m.offset, m.data) for m in on_two] == [(1, "1"), (2, "2")]


async def test_publishers_say_when_an_id_was_already_published(
    redis_url: str, redis_prefix: str
) -> None:
    async with RedisPublisher(redis_url, prefix=redis_prefix) as publisher:
        first = await publisher.publish("a", 1, id="x")
        again = await publisher.publish("a", 1, id="x")
    with SyncRedisPublisher(redis_url, prefix=redis_prefix) as sync:
        other = await asyncio.to_thread(sync.publish, "a", 1, id="x")
        fresh = await asyncio.to_thread(sync.publish, "a", 2, id="y")
    assert not first.is_repeat
    assert again == other == dataclasses.replace(first, is_repeat=True)
    assert (fresh.offset, fresh.is_repeat) == (2, False)


async def test_only_subscribed_channels_are_delivered(make_redis_broker: RedisMaker) -> None:
    one, delivered = await make_redis_broker(unsubscribe_after=0)
    await one.subscribe("wanted")
    await one.subscribe("dropped")
    await one.unsubscribe("dropped")
    await one.publish("dropped", "no")
    await one.publish("other", "no")
    await one.publish("wanted", "yes")
    await delivered_count(delivered, 1)
    await one.publish("wanted", "last")
    await delivered_count(delivered, 2)
    assert [m.data for m in delivered] == ["yes", "last"]


async def test_ephemeral_messages_reach_every_node_subscribed_and_only_those(
    make_redis_broker: RedisMaker,
) -> None:
    one, got_one = await make_redis_broker()
    two, got_two = await make_redis_broker()
    await two.subscribe("typing")
    await one.subscribe("other")
    await one.publish_ephemeral("typing", "1")
    await one.publish_ephemeral("other", "2")
    await eventually(lambda: len(got_one) == 1 and len(got_two) == 1)
    assert got_two == [Message("typing", 0, "", "1")]
    assert got_one == [Message("other", 0, "", "2")]


async def test_idle_channels_expire_and_start_a_new_epoch(
    make_redis_broker: RedisMaker, redis_url: str, redis_prefix: str
) -> None:
    broker, _ = await make_redis_broker(ttl=0.2)
    first = await broker.publish("a", "1", message_id="once")
    keys = ChannelKeys.of(redis_prefix, "a")
    async with redis.asyncio.Redis.from_url(redis_url) as client:
        await until(lambda: _gone(client.exists(keys.meta, keys.stream, keys.message_id("once"))))
    later = await broker.publish("a", "1", message_id="once")
    assert later.offset == 1
    assert later.epoch != first.epoch
    answer = (await broker.history({"a": Position(1, first.epoch)}))["a"]
    assert not answer.recovered


async def test_subscribed_channels_are_kept_alive(
    make_redis_broker: RedisMaker, redis_url: str, redis_prefix: str
) -> None:
    broker, _ = await make_redis_broker(ttl=1.0)
    await broker.subscribe("kept")
    await broker.publish("kept", "1")
    keys = ChannelKeys.of(redis_prefix, "kept")
    async with redis.asyncio.Redis.from_url(redis_url) as client:
        await client.pexpire(keys.meta, 600_000)
        # Only the keep-alive sets it back to the TTL.
        await until(lambda: _at_most(client.pttl(keys.meta), 1000))


async def test_channels_nobody_published_to_keep_no_keys(
    make_redis_broker: RedisMaker, redis_url: str, redis_prefix: str
) -> None:
    broker, _ = await make_redis_broker(ttl=0.6)
    await broker.subscribe("busy")
    await broker.publish("busy", "1")
    names = [f"quiet:{n}" for n in range(200)]
    for name in names:  # what the bus does for a subscriber
        await broker.subscribe(name)
    await broker.history(dict.fromkeys(names))
    busy = ChannelKeys.of(redis_prefix, "busy")
    async with redis.asyncio.Redis.from_url(redis_url) as client:
        # Two keep-alive rounds: the first is over, quiet channels included.
        for _ in range(2):
            await client.pexpire(busy.meta, 600_000)
            await until(lambda: _at_most(client.pttl(busy.meta), 600))
        for name in names:
            await broker.unsubscribe(name)
        keys = {key async for key in client.scan_iter(match=f"{{{redis_prefix}:*")}
        assert keys == {busy.meta.encode(), busy.stream.encode()}
        await broker.publish("quiet:7", "first")
        quiet = ChannelKeys.of(redis_prefix, "quiet:7")
        assert await client.exists(quiet.meta, quiet.stream) == 2


async def test_an_empty_position_is_not_recovered_after_redis_restarts(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url)
    position = (await broker.history({"a": None}))["a"].position
    own_redis.kill()  # without persistence: whatever was published meanwhile is lost
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: broker.is_available)
    await broker.publish("a", "after the restart")
    answer = (await broker.history({"a": position}))["a"]
    assert not answer.recovered
    assert answer.position.offset == 1


async def test_where_an_acl_forbids_info_empty_epochs_have_generation_0(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    async with redis.asyncio.Redis.from_url(own_redis.url) as admin:
        await admin.acl_setuser(
            "no-info",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-info"],
        )
    url = f"redis://no-info:pw@127.0.0.1:{own_redis.port}/0"
    broker, _ = await make_redis_broker(url=url)
    position = (await broker.history({"a": None}))["a"].position
    assert empty_epoch(position).generation == "0"
    await broker.publish("a", "1")
    assert (await broker.history({"a": position}))["a"].recovered


async def test_a_node_delivers_the_first_message_of_a_channel_with_no_history_kept(
    make_redis_broker: RedisMaker,
) -> None:
    broker, delivered = await make_redis_broker(size=0)
    await broker.subscribe("a")  # at offset 0 of an empty epoch
    await broker.publish("a", "1")
    await broker.publish("a", "2")
    await delivered_count(delivered, 2)
    assert [(m.offset, m.data) for m in delivered] == [(1, "1"), (2, "2")]


async def _gone(count: Awaitable[int]) -> bool:
    return await count == 0


async def _at_most(value: Awaitable[int], limit: int) -> bool:
    return await value <= limit


async def test_concurrent_publishes_wait_for_a_connection(make_redis_broker: RedisMaker) -> None:
    broker, _ = await make_redis_broker(max_connections=2)
    results = await asyncio.gather(*(broker.publish("a", str(n)) for n in range(300)))
    assert sorted(r.offset for r in results) == list(range(1, 301))


# -- Redis: lost connections and lost servers -------------------------------


async def test_a_lost_connection_is_caught_up_from_the_stream(
    make_redis_broker: RedisMaker, own_redis: RedisServer, redis_prefix: str
) -> None:
    broker, delivered = await make_redis_broker(url=own_redis.url, reconnect_delay=(0.3, 0.3))
    await broker.subscribe("a")
    async with RedisPublisher(own_redis.url, prefix=redis_prefix) as publisher:
        await publisher.publish("a", 0)
        await delivered_count(delivered, 1)
        async with redis.asyncio.Redis.from_url(own_redis.url) as client:
            await client.client_kill_filter(_type="pubsub")
        await eventually(lambda: not broker.is_available)
        for n in range(1, 21):  # while the node is not listening
            await publisher.publish("a", n)
        await eventually(lambda: broker.is_available)
        await publisher.publish("a", 21)
        await delivered_count(delivered, 22)
    assert [m.data for m in delivered] == [str(n) for n in range(22)]
    assert [m.offset for m in delivered] == list(range(1, 23))


async def publish_steadily(
    broker: RedisBroker, stop: asyncio.Event, published: list[tuple[str, int]]
) -> int:
    """Publish 0, 1, 2, ... until `stop`; record what landed; count the refusals."""
    refused = 0
    n = 0
    while not stop.is_set():
        try:
            result = await broker.publish("a", str(n))
            published.append((result.epoch, result.offset))
        except BrokerUnavailable:
            refused += 1
            await asyncio.sleep(0.01)  # Redis is down: pace the retries
        n += 1
        await asyncio.sleep(0)
    return refused


async def restart_while_publishing(
    server: RedisServer, make_redis_broker: RedisMaker
) -> tuple[list[Message], list[tuple[str, int]], int]:
    publisher, _ = await make_redis_broker(url=server.url)
    subscriber, delivered = await make_redis_broker(url=server.url)
    await subscriber.subscribe("a")
    stop = asyncio.Event()
    published: list[tuple[str, int]] = []
    task = asyncio.create_task(publish_steadily(publisher, stop, published))
    try:
        await eventually(lambda: len(delivered) >= 50)
        server.kill()
        await eventually(lambda: not subscriber.is_available and not publisher.is_available)
        await asyncio.to_thread(server.start)
        await eventually(lambda: subscriber.is_available and publisher.is_available)
        mark = len(published)
        await eventually(lambda: len(published) >= mark + 50)
    finally:
        stop.set()
        refused = await task
    await eventually(lambda: {(m.epoch, m.offset) for m in delivered} >= set(published[-50:]))
    return delivered, published, refused


def assert_in_order_once(delivered: list[Message]) -> None:
    seen = [(m.epoch, m.offset) for m in delivered]
    assert len(seen) == len(set(seen)), "a message was delivered twice"
    for before, after in itertools.pairwise(delivered):
        if before.epoch == after.epoch:
            assert after.offset == before.offset + 1, (before, after)


async def test_redis_restart_without_its_data_starts_a_new_epoch(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    delivered, published, refused = await restart_while_publishing(own_redis, make_redis_broker)
    assert refused > 0  # it really was down while publishing went on
    epochs = list(dict.fromkeys(m.epoch for m in delivered))
    assert len(epochs) == 2
    assert_in_order_once(delivered)
    new = [m for m in delivered if m.epoch == epochs[1]]
    assert [m.offset for m in new] == list(range(1, len(new) + 1))
    # Everything published into the new epoch arrived.
    assert {(m.epoch, m.offset) for m in new} == {p for p in published if p[0] == epochs[1]}


async def test_redis_restart_with_its_data_loses_nothing(
    make_redis_broker: RedisMaker, durable_redis: RedisServer
) -> None:
    delivered, published, refused = await restart_while_publishing(durable_redis, make_redis_broker)
    assert refused > 0
    assert len({m.epoch for m in delivered}) == 1
    assert [m.offset for m in delivered] == list(range(1, len(delivered) + 1))
    # A publish cut off by the kill may have landed though it raised: delivered, not listed.
    assert set(published) <= {(m.epoch, m.offset) for m in delivered}


async def test_broker_down_fails_fast_and_recovers(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url)
    assert broker.is_available
    own_redis.kill()
    # Whether or not the broker has noticed yet, a pipeline fails as a whole.
    with pytest.raises(BrokerUnavailable) as failed:
        await broker.publish_many([Publication("a", "1"), Publication("b", "2")])
    assert failed.value.published == []
    await eventually(lambda: not broker.is_available)
    with pytest.raises(BrokerUnavailable):
        await broker.publish("a", "1")
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("a")
    with pytest.raises(BrokerUnavailable):
        await broker.history({"a": None})
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: broker.is_available)
    assert (await broker.publish("a", "1")).offset == 1


async def test_a_broker_started_while_redis_is_down_connects_later(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    own_redis.kill()
    broker, _ = await make_redis_broker(url=own_redis.url, socket_timeout=0.5)
    assert not broker.is_available
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: broker.is_available)
    await broker.subscribe("a")
    assert (await broker.publish("a", "1")).offset == 1


async def test_a_frozen_redis_is_unavailable_within_the_socket_timeout(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url, socket_timeout=1.0)
    await broker.subscribe("a")
    assert broker.is_available
    with own_redis.frozen():
        await eventually(lambda: not broker.is_available, timeout=1.0 + 1.0)
        with pytest.raises(BrokerUnavailable):
            await broker.publish("a", "1")
    await eventually(lambda: broker.is_available)
    assert (await broker.publish("a", "1")).offset == 1


async def test_a_busy_event_loop_does_not_make_a_quiet_redis_look_frozen(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, delivered = await make_redis_broker(url=own_redis.url, socket_timeout=0.5)
    await broker.subscribe("a")
    await broker.publish("a", "1")
    await eventually(lambda: len(delivered) == 1)  # just heard from Redis: no PING out
    # The loop busy for longer than the socket timeout (a connect storm on a shared
    # core): Redis was never asked anything it left unanswered.
    time.sleep(0.5 * 2)  # noqa: ASYNC251 (blocking the loop is the point)
    assert broker.is_available
    assert (await broker.publish("a", "2")).offset == 2


async def test_reconnects_are_counted(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("a")  # its connection is a pub/sub one
    assert broker.reconnects == 0
    async with redis.asyncio.Redis.from_url(own_redis.url) as client:
        for count in (1, 2):
            await client.client_kill_filter(_type="pubsub")
            await eventually(lambda: broker.reconnects == count)  # noqa: B023
            await eventually(lambda: broker.is_available)


PASSWORD = "not-for-logs-8d1f"


async def test_an_unreachable_redis_is_warned_about_once_by_address_never_password(
    make_redis_broker: RedisMaker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp_wsbus")
    port = free_port()  # nothing listens there
    url = f"redis://wsbus:{PASSWORD}@127.0.0.1:{port}/3"
    await make_redis_broker(url=url, reconnect_delay=(0.01, 0.01), socket_timeout=0.5)

    def records(level: int) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == level and r.name == "aiohttp_wsbus"]

    await eventually(lambda: len(records(logging.DEBUG)) >= 10)  # ten more failed attempts
    [warning] = records(logging.WARNING)
    assert f"127.0.0.1:{port}/3" in warning.getMessage()
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


async def test_an_unreachable_redis_is_warned_about_again_and_its_return_logged(
    make_redis_broker: RedisMaker, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp_wsbus")
    broker, _ = await make_redis_broker(
        url=own_redis.url, reconnect_delay=(0.01, 0.05), warning_interval=0.3
    )
    own_redis.kill()

    def messages(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    await eventually(lambda: len(messages(logging.WARNING)) >= 2)
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: broker.is_available)
    [back] = [m for m in messages(logging.INFO) if "again" in m]
    assert back.startswith(f"redis broker reached 127.0.0.1:{own_redis.port}/0 again after ")


async def test_a_channel_stays_subscribed_for_unsubscribe_after_its_last_subscriber_left(
    make_redis_broker: RedisMaker, redis_url: str, redis_prefix: str
) -> None:
    one, delivered = await make_redis_broker(unsubscribe_after=0.3)
    pubsub = ChannelKeys.of(redis_prefix, "a").pubsub

    async def listeners() -> int:
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            [(_, count)] = await client.pubsub_numsub(pubsub)
            return int(count)

    await one.subscribe("a")
    await one.unsubscribe("a")
    await one.publish("a", "meanwhile")  # still delivered: the node still listens
    await delivered_count(delivered, 1)
    await one.subscribe("a")  # back in time: the same subscription, nothing sent to Redis
    started = time.monotonic()
    await one.unsubscribe("a")
    assert await listeners() == 1
    await until(lambda: _is(listeners(), 0))
    assert time.monotonic() - started >= 0.3
    await one.subscribe("b")
    await one.publish("a", "after")
    await one.publish("b", "b")
    await delivered_count(delivered, 2)
    assert [m.data for m in delivered] == ["meanwhile", "b"]


async def test_a_channel_subscribed_again_as_its_delay_ends_is_listened_to(
    make_redis_broker: RedisMaker,
) -> None:
    one, delivered = await make_redis_broker(unsubscribe_after=0.05)
    await one.subscribe("a")
    await one.unsubscribe("a")
    loop = asyncio.get_running_loop()
    again: list[asyncio.Task[None]] = []
    # Due in the same loop turn as the delay's end, and run after it.
    loop.call_later(0.05, lambda: again.append(loop.create_task(one.subscribe("a"))))
    time.sleep(0.1)  # noqa: ASYNC251  (blocks the loop so that both timers are due at once)
    await eventually(lambda: bool(again))
    await again[0]
    await one.publish("a", "heard")
    await delivered_count(delivered, 1)
    assert [m.data for m in delivered] == ["heard"]


async def test_a_stale_unsubscribe_leaves_a_newer_subscription_of_the_name_alone(
    make_redis_broker: RedisMaker,
) -> None:
    one, delivered = await make_redis_broker(unsubscribe_after=0)
    await one.subscribe("a")
    old = one._subscriptions["a"]
    listener = old.listener
    assert listener is not None
    async with listener._write_lock:  # the new SUBSCRIBE queues first, the old UNSUBSCRIBE next
        one._forget(old)
        again = asyncio.create_task(one.subscribe("a"))
        await asyncio.sleep(0)  # one turn: it waits for the lock
        stale = asyncio.create_task(listener.remove(old))
        await asyncio.sleep(0)
    await again
    await stale
    await one.publish("a", "heard")
    await delivered_count(delivered, 1)
    assert [m.data for m in delivered] == ["heard"]


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.parametrize("delay", [-1.0, float("nan")])
def test_unsubscribe_after_is_checked(delay: float) -> None:
    with pytest.raises(ValueError, match=r"unsubscribe_after must be >= 0 seconds, not "):
        RedisBroker("redis://localhost", unsubscribe_after=delay)


def test_prefix_is_checked() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisBroker("redis://localhost", prefix="has space")
    with pytest.raises(ValueError, match="prefix"):
        RedisBroker("redis://localhost", prefix="{tag}")


@pytest.mark.parametrize("kind", ["redis", "redis-sharded", "redis-cluster"])
async def test_control_reaches_every_node_and_revocations_outlive_them(
    kind: str, request: pytest.FixtureRequest, make_redis_broker: RedisMaker
) -> None:
    options: dict[str, object] = {"sharded": kind == "redis-sharded"}
    if kind == "redis-cluster":
        options = {"cluster": True, "url": request.getfixturevalue("redis_cluster_url")}
    heard: list[list[Mapping[str, Any]]] = [[], [], []]
    first, _ = await make_redis_broker(on_control=heard[0].append, **options)
    second, _ = await make_redis_broker(on_control=heard[1].append, **options)
    # Each node loads the revocations in force once Redis confirms its control channel
    # (again after any reconnect or slot move: loads may repeat).
    empty = {"type": "revocations", "revocations": []}
    await eventually(lambda: empty in heard[0] and empty in heard[1])
    disconnect = {"type": "disconnect", "user": "alice", "code": 4410, "reason": ""}
    await first.control(disconnect)
    await eventually(lambda: disconnect in heard[0] and disconnect in heard[1])
    revocation = Revocation.make(user="alice", until=time.time() + 60)
    await second.revoke(revocation)
    expected = {"type": "revoke", "revocation": revocation.as_json()}
    await eventually(lambda: expected in heard[0] and expected in heard[1])
    await make_redis_broker(on_control=heard[2].append, **options)
    loaded = {"type": "revocations", "revocations": [revocation.as_json()]}
    await eventually(lambda: loaded in heard[2])
    assert empty not in heard[2]


async def test_stored_revocations_keep_the_later_end_and_drop_ended_or_broken_ones(
    make_redis_broker: RedisMaker, redis_url: str, redis_prefix: str
) -> None:
    heard: list[Mapping[str, Any]] = []
    broker, _ = await make_redis_broker(on_control=heard.append)
    long = Revocation.make(user="bob", until=time.time() + 3600)
    await broker.revoke(long)
    await broker.revoke(Revocation.make(user="bob", until=time.time() + 60))  # shorter: kept long
    key = ChannelKeys.of(redis_prefix, CONTROL_CHANNEL).tag + ":revocations"
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        ended = {"until": time.time() - 1, "user": "old", "token_id": None, "issued_before": None}
        await client.hset(key, mapping={"user:old:": json.dumps(ended), "junk": "not json"})
        reloaded: list[Mapping[str, Any]] = []
        await make_redis_broker(on_control=reloaded.append)
        await eventually(lambda: bool(reloaded))
        assert reloaded == [{"type": "revocations", "revocations": [long.as_json()]}]
        assert await client.hlen(key) == 1  # the ended and the broken ones are gone
    finally:
        await client.aclose()
