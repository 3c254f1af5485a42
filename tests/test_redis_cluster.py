"""RedisBroker and the publishers on a real 3-master Redis Cluster.

The broker contract runs on the cluster in test_redis_broker.py; these tests
spread channels over every shard, share offsets between nodes, publish from
outside, and lose a shard's pub/sub connection or a channel's slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio import RedisCluster

from aiohttp_wsbus import RedisBroker, RedisPublisher, SyncRedisPublisher
from aiohttp_wsbus.brokers import Message, Publication
from aiohttp_wsbus.brokers.redis_scripts import ChannelKeys

from .redis_server import RedisMaker
from .support import eventually


@pytest.fixture
async def cluster(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    """A cluster client of the test's own, to ask the servers where things are."""
    client = RedisCluster.from_url(redis_cluster_url)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture
def make_cluster_broker(make_redis_broker: RedisMaker, redis_cluster_url: str) -> RedisMaker:
    def make(**options: object) -> Awaitable[tuple[RedisBroker, list[Message]]]:
        return make_redis_broker(url=redis_cluster_url, cluster=True, **options)

    return make


async def owner(cluster: RedisCluster, prefix: str, channel: str) -> str:
    """The master that owns the channel's slot, as the servers answer CLUSTER KEYSLOT."""
    slot = await cluster.cluster_keyslot(ChannelKeys.of(prefix, channel).pubsub)
    return str(cluster.nodes_manager.get_node_from_slot(slot).name)


async def one_channel_per_shard(cluster: RedisCluster, prefix: str) -> dict[str, str]:
    """Channel names, one owned by each master: {master "host:port": channel}."""
    masters = {node.name for node in cluster.get_primaries()}
    chosen: dict[str, str] = {}
    for n in range(1000):
        chosen.setdefault(await owner(cluster, prefix, f"room:{n}"), f"room:{n}")
        if set(chosen) == masters:
            return chosen
    raise AssertionError(f"no channel for every master in 1000 names: {chosen}")


def node_client(name: str) -> redis.asyncio.Redis:
    """A plain connection to one cluster node (no redirects followed)."""
    return redis.asyncio.Redis.from_url(f"redis://{name}")


async def command(node: redis.asyncio.Redis, *args: Any) -> Any:
    """Any Redis command on one node (redis-py leaves execute_command untyped)."""
    return await node.execute_command(*args)  # type: ignore[no-untyped-call]


def by_channel(delivered: list[Message], channel: str) -> list[tuple[int, str]]:
    return [(m.offset, m.data) for m in delivered if m.channel == channel]


async def test_channels_on_every_shard_publish_and_listen_on_their_own_shard(
    make_cluster_broker: RedisMaker, cluster: RedisCluster, redis_prefix: str
) -> None:
    shards = await one_channel_per_shard(cluster, redis_prefix)
    assert len(shards) == 3
    broker, delivered = await make_cluster_broker()
    for channel in shards.values():
        await broker.subscribe(channel)
    for channel in shards.values():
        await broker.publish(channel, f"{channel} 1")
        await broker.publish(channel, f"{channel} 2")
    await eventually(lambda: len(delivered) >= 6)
    for master, channel in shards.items():
        assert by_channel(delivered, channel) == [(1, f"{channel} 1"), (2, f"{channel} 2")]
        keys = ChannelKeys.of(redis_prefix, channel)
        async with node_client(master) as node:
            assert await node.exists(keys.meta, keys.stream) == 2
            assert keys.pubsub.encode() in await command(node, "PUBSUB SHARDCHANNELS")
        for other in set(shards) - {master}:
            async with node_client(other) as node:
                listened = await command(node, "PUBSUB SHARDCHANNELS")
                assert keys.pubsub.encode() not in listened


async def test_a_cluster_that_lost_its_scripts_still_publishes_on_every_shard_in_order(
    make_cluster_broker: RedisMaker, cluster: RedisCluster, redis_prefix: str
) -> None:
    shards = await one_channel_per_shard(cluster, redis_prefix)
    broker, _ = await make_cluster_broker()
    await broker.publish_many([Publication(c, "1") for c in shards.values()])
    await cluster.script_flush()  # every master: as after a failover to a fresh replica
    batch = [Publication(c, str(n)) for n in (2, 3) for c in shards.values()]
    published = await broker.publish_many(batch)
    assert [p.offset for p in published] == [2, 2, 2, 3, 3, 3]
    history = await broker.history(dict.fromkeys(shards.values()))
    assert {h.position.offset for h in history.values()} == {3}


async def test_nodes_share_offsets_and_ids_across_shards(
    make_cluster_broker: RedisMaker, cluster: RedisCluster, redis_prefix: str
) -> None:
    channels = list((await one_channel_per_shard(cluster, redis_prefix)).values())
    one, _ = await make_cluster_broker()
    two, on_two = await make_cluster_broker()
    for channel in channels:
        await two.subscribe(channel)
    for channel in channels:
        first = await one.publish(channel, "1", message_id="x")
        second = await two.publish(channel, "2")
        again = await two.publish(channel, "1", message_id="x")
        assert (first.offset, second.offset) == (1, 2)
        assert first.epoch == second.epoch
        assert again == dataclasses.replace(first, is_repeat=True)
    await eventually(lambda: len(on_two) >= 6)
    for channel in channels:
        assert by_channel(on_two, channel) == [(1, "1"), (2, "2")]


async def test_publishers_publish_into_the_cluster(
    make_cluster_broker: RedisMaker,
    cluster: RedisCluster,
    redis_prefix: str,
    redis_cluster_url: str,
) -> None:
    channels = list((await one_channel_per_shard(cluster, redis_prefix)).values())
    broker, delivered = await make_cluster_broker()
    for channel in channels:
        await broker.subscribe(channel)
    async with RedisPublisher(redis_cluster_url, prefix=redis_prefix, cluster=True) as publisher:
        for channel in channels:
            assert (await publisher.publish(channel, {"n": 1}, id="once")).offset == 1
            repeat = await publisher.publish(channel, {"n": 1}, id="once")
            assert (repeat.offset, repeat.is_repeat) == (1, True)

    def publish_blocking() -> list[int]:
        with SyncRedisPublisher(redis_cluster_url, prefix=redis_prefix, cluster=True) as sync:
            return [sync.publish(channel, {"n": 2}).offset for channel in channels]

    assert await asyncio.to_thread(publish_blocking) == [2, 2, 2]
    await eventually(lambda: len(delivered) >= 6)
    for channel in channels:
        assert by_channel(delivered, channel) == [(1, '{"n":1}'), (2, '{"n":2}')]


async def test_a_lost_shard_connection_is_caught_up_from_the_stream(
    make_cluster_broker: RedisMaker,
    cluster: RedisCluster,
    redis_prefix: str,
    redis_cluster_url: str,
) -> None:
    shards = await one_channel_per_shard(cluster, redis_prefix)
    lost = next(iter(shards))
    broker, delivered = await make_cluster_broker(reconnect_delay=(0.3, 0.3))
    for channel in shards.values():
        await broker.subscribe(channel)
    async with RedisPublisher(redis_cluster_url, prefix=redis_prefix, cluster=True) as publisher:
        for channel in shards.values():
            await publisher.publish(channel, 0)
        await eventually(lambda: len(delivered) >= 3)
        async with node_client(lost) as node:
            assert await node.client_kill_filter(_type="pubsub") >= 1
        await eventually(lambda: not broker.is_available)
        for n in range(1, 21):  # while the node does not listen to one shard
            for channel in shards.values():
                await publisher.publish(channel, n)
        await eventually(lambda: broker.is_available)
        for channel in shards.values():
            await publisher.publish(channel, 21)
        await eventually(lambda: len(delivered) >= 3 * 22)
    for channel in shards.values():
        assert by_channel(delivered, channel) == [(n + 1, str(n)) for n in range(22)]


async def move_slot(cluster: RedisCluster, slot: int, source: str, target: str) -> None:
    """Reshard one slot from `source` to `target` the way redis-cli does: keys, then owner."""
    async with node_client(source) as old, node_client(target) as new:
        old_id = await command(old, "CLUSTER MYID")
        new_id = await command(new, "CLUSTER MYID")
        await command(new, "CLUSTER SETSLOT", slot, "IMPORTING", old_id)
        await command(old, "CLUSTER SETSLOT", slot, "MIGRATING", new_id)
        keys = await command(old, "CLUSTER GETKEYSINSLOT", slot, 1000)
        host, port = target.rsplit(":", 1)
        await command(old, "MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
        masters = [node.name for node in cluster.get_primaries()]
        for name in dict.fromkeys([target, source, *masters]):
            async with node_client(name) as node:
                await command(node, "CLUSTER SETSLOT", slot, "NODE", new_id)


async def test_subscriptions_follow_their_slot_to_another_shard(
    make_cluster_broker: RedisMaker,
    cluster: RedisCluster,
    redis_prefix: str,
    redis_cluster_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shards = await one_channel_per_shard(cluster, redis_prefix)
    (source, channel), (target, _) = list(shards.items())[:2]
    broker, delivered = await make_cluster_broker()
    late, on_late = await make_cluster_broker()  # reads the slots before they move
    await broker.subscribe(channel)
    async with RedisPublisher(redis_cluster_url, prefix=redis_prefix, cluster=True) as publisher:
        await publisher.publish(channel, 1)
        await eventually(lambda: len(delivered) >= 1)
        slot = await cluster.cluster_keyslot(ChannelKeys.of(redis_prefix, channel).pubsub)
        await move_slot(cluster, slot, source, target)
        # The source shard unsubscribed `broker`; `late` subscribes there and is MOVED.
        await late.subscribe(channel)
        for n in range(2, 6):
            await publisher.publish(channel, n)
        await eventually(lambda: len(delivered) >= 5 and len(on_late) >= 4)
    assert by_channel(delivered, channel) == [(n, str(n)) for n in range(1, 6)]
    assert by_channel(on_late, channel) == [(n, str(n)) for n in range(2, 6)]
    pubsub = ChannelKeys.of(redis_prefix, channel).pubsub.encode()
    async with node_client(target) as node:
        listeners = await command(node, "PUBSUB SHARDNUMSUB", pubsub)
    assert listeners == [(pubsub, 2)]  # both nodes listen there now
    # A moved slot is routine: followed without dropping a connection or a warning.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
