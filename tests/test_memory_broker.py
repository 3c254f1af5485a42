"""MemoryBroker: offsets, epochs, bounded history, idempotency ids."""

from __future__ import annotations

from aiohttp_wsbus.brokers import MemoryBroker, Message
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
    await broker.start(delivered.append, history_size=size, history_ttl=ttl)
    return broker, delivered, clock


async def test_offsets_count_from_one_per_channel() -> None:
    broker, delivered, _ = await started()
    a1 = await broker.publish("a", "1")
    a2 = await broker.publish("a", "2")
    b1 = await broker.publish("b", "3")
    assert (a1.offset, a2.offset, b1.offset) == (1, 2, 1)
    assert a1.epoch == a2.epoch
    assert [m.data for m in delivered] == ["1", "2", "3"]


async def test_history_after_a_position() -> None:
    broker, _, _ = await started()
    first = await broker.publish("a", "1")
    await broker.publish("a", "2")
    await broker.publish("a", "3")
    answer = (await broker.history({"a": Position(1, first.epoch)}))["a"]
    assert answer.recovered
    assert [m.data for m in answer.messages] == ["2", "3"]
    assert answer.position == Position(3, first.epoch)


async def test_history_beyond_the_window_is_not_recovered() -> None:
    broker, _, _ = await started(size=3)
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


async def test_other_epoch_or_future_offset_is_not_recovered() -> None:
    broker, _, _ = await started()
    first = await broker.publish("a", "1")
    assert not (await broker.history({"a": Position(1, "other")}))["a"].recovered
    assert not (await broker.history({"a": Position(9, first.epoch)}))["a"].recovered


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


async def test_same_id_is_published_once() -> None:
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
