"""MemoryBroker specifics: epochs per process, expiry and id lifetimes on its clock.

The broker contract it shares with RedisBroker is tested in test_redis_broker.py.
"""

from __future__ import annotations

import pytest

from aiohttp_wsbus.brokers import HistoryOptions, MemoryBroker, Message
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
    position = (await broker.history({"kept": None}))["kept"].position
    clock.now += 100
    published = await broker.publish("kept", "x")
    assert published.epoch == position.epoch
    assert published.offset == 1


async def test_an_id_is_remembered_for_the_ttl_only() -> None:
    broker, delivered, clock = await started(ttl=10)
    first = await broker.publish("a", "1", message_id="m-1")
    again = await broker.publish("a", "1", message_id="m-1")
    assert again == first
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
