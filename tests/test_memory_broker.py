"""MemoryBroker specifics: epochs per process, expiry and id lifetimes on its clock.

The broker contract it shares with RedisBroker is tested in test_redis_broker.py.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Collection

import pytest

from aiohttp_wsbus.brokers import HistoryOptions, MemoryBroker, Message
from aiohttp_wsbus.brokers.base import EmptyEpoch, Publication
from aiohttp_wsbus.protocol import Position


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def started(size: int = 100, ttl: float = 300.0) -> tuple[MemoryBroker, list[Message], Clock]:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    delivered: list[Message] = []
    await broker.start(delivered.append, HistoryOptions(size, ttl))
    return broker, delivered, clock


async def test_a_new_broker_is_a_new_epoch() -> None:
    one, _, _ = await started()
    two, _, _ = await started()
    assert (await one.publish("a", "1")).epoch != (await two.publish("a", "1")).epoch


async def test_an_empty_position_from_another_broker_is_not_recovered() -> None:
    one, _, _ = await started()
    two, _, _ = await started()
    position = (await one.history({"a": None}))["a"].position
    await two.publish("a", "1")  # as if `one` restarted and lost what it had
    assert not (await two.history({"a": position}))["a"].recovered


async def test_reading_channels_keeps_no_stream() -> None:
    broker, _, _ = await started()
    for n in range(1000):
        await broker.subscribe(f"c{n}")
        await broker.history({f"c{n}": None})
    assert broker.channel_count == 0
    await broker.publish("c7", "x")
    assert broker.channel_count == 1


async def test_an_empty_position_recovers_for_the_ttl_on_the_brokers_clock() -> None:
    broker, _, clock = await started(ttl=10)
    position = (await broker.history({"a": None}))["a"].position
    assert EmptyEpoch.parse(position.epoch) == EmptyEpoch(1_000_000, position.epoch[-16:])
    clock.now += 9.9
    await broker.publish("a", "1")
    answer = (await broker.history({"a": position}))["a"]
    assert answer.recovered
    assert [m.data for m in answer.messages] == ["1"]
    clock.now += 0.1  # 10 s after the read: an epoch may have come and gone meanwhile
    assert not (await broker.history({"a": position}))["a"].recovered


async def test_a_channel_forgotten_before_its_ttl_ends_earlier_empty_positions() -> None:
    clock = Clock()
    broker = MemoryBroker(max_channels=2, clock=clock)
    await broker.start(lambda message: None, HistoryOptions(100, 300))
    position = (await broker.history({"quiet": None}))["quiet"].position
    await broker.publish("quiet", "missed")
    await broker.publish("flood:1", "x")
    await broker.publish("flood:2", "x")  # "quiet" is forgotten to make room
    await broker.publish("quiet", "new")
    answer = (await broker.history({"quiet": position}))["quiet"]
    assert answer.position.offset == 1  # a new epoch, from 1 again
    assert not answer.recovered  # "missed" is gone: no silent gap


async def test_idle_channels_are_forgotten_after_the_ttl() -> None:
    broker, _, clock = await started(ttl=10)
    for n in range(1000):
        await broker.publish(f"c{n}", "x")
    assert broker.channel_count == 1000
    clock.now += 11
    await broker.publish("fresh", "x")
    assert broker.channel_count == 1


async def test_subscribed_channels_keep_their_epoch_past_the_ttl() -> None:
    broker, _, clock = await started(ttl=10)
    await broker.subscribe("kept")
    first = await broker.publish("kept", "x")
    clock.now += 100
    published = await broker.publish("kept", "y")
    assert published.epoch == first.epoch
    assert published.offset == 2


async def test_an_id_is_remembered_for_the_ttl_only() -> None:
    broker, delivered, clock = await started(ttl=10)
    first = await broker.publish("a", "1", message_id="m-1")
    again = await broker.publish("a", "1", message_id="m-1")
    assert again == dataclasses.replace(first, is_repeat=True)
    assert len(delivered) == 1
    other_channel = await broker.publish("b", "1", message_id="m-1")
    assert other_channel.offset == 1
    assert len(delivered) == 2
    clock.now += 5
    await broker.publish("a", "keepalive")
    clock.now += 6
    later = await broker.publish("a", "1", message_id="m-1")
    assert later.offset == 3  # the id outlived its ttl


async def test_a_flood_of_channels_is_capped_least_recently_used_first() -> None:
    clock = Clock()
    broker = MemoryBroker(max_channels=10, clock=clock)
    await broker.start(lambda message: None, HistoryOptions(100, 300))
    await broker.subscribe("kept")
    kept = await broker.publish("kept", "x")
    for n in range(50):
        clock.now += 1
        await broker.publish(f"flood:{n}", "x")
    assert broker.channel_count == 10
    again = await broker.publish("kept", "y")
    assert (again.epoch, again.offset) == (kept.epoch, 2)  # a subscribed stream survives
    recent = await broker.publish("flood:49", "z")
    assert recent.offset == 2  # the most recent ones survive too
    forgotten = (await broker.history({"flood:0": Position(1, "any")}))["flood:0"]
    assert forgotten.position.offset == 0  # the oldest was forgotten: a new stream


def test_max_channels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        MemoryBroker(max_channels=0)


async def test_kept_history_adds_nothing_for_the_garbage_collector_to_walk() -> None:
    broker = MemoryBroker()
    await broker.start(lambda message: None, HistoryOptions(1000, 300.0))
    gc.collect()
    before = len(gc.get_objects())
    for n in range(1000):
        await broker.publish("a", f'"{n}"')
    gc.collect()
    # 1000 messages kept: a full collection walks none of them (a stream is a few objects).
    assert len(gc.get_objects()) - before < 20
    page = await broker.history({"a": Position(998, (await broker.publish("a", "1")).epoch)})
    assert [(m.offset, m.data) for m in page["a"].messages] == [
        (999, '"998"'),
        (1000, '"999"'),
        (1001, "1"),
    ]


async def test_a_batch_publishes_and_delivers_each_message_in_order() -> None:
    broker, delivered, _ = await started()
    publications = [Publication("a", "1"), Publication("b", "2", "x"), Publication("b", "3", "x")]
    published = await broker.publish_many(publications)
    assert [(p.channel, p.offset, p.is_repeat) for p in published] == [
        ("a", 1, False),
        ("b", 1, False),
        ("b", 1, True),
    ]
    assert [(m.channel, m.offset, m.data) for m in delivered] == [("a", 1, "1"), ("b", 1, "2")]


async def test_a_leave_is_done_at_once_unless_a_subclass_wraps_leave() -> None:
    broker = MemoryBroker()
    await broker.join("c1", "alice", "{}", ["chat:a"])
    assert broker.leave_at_once("c1", ["chat:a"])  # done, nothing awaited
    assert (await broker.presence(["chat:a"]))["chat:a"].count == 0

    class Wrapped(MemoryBroker):
        async def leave(self, connection_id: str, channels: Collection[str]) -> None:
            await super().leave(connection_id, channels)

    wrapped = Wrapped()
    await wrapped.join("c1", "alice", "{}", ["chat:a"])
    assert not wrapped.leave_at_once("c1", ["chat:a"])  # its own leave must see it
    assert (await wrapped.presence(["chat:a"]))["chat:a"].count == 1
