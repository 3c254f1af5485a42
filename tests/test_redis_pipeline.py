"""RedisBroker's round trips: calls made while one is in flight leave together on
the next, scripts travel by SHA, equal reads share one run, and a socket joining a
channel its node already listens to starts where the node stands, without one.

The Autopipeline itself runs against a recording stand-in for Redis; the rest
against a redis-server of the test's own, whose command counts it reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import RedisBroker
from aiohttp_wsbus.brokers import Publication
from aiohttp_wsbus.brokers.redis_pipeline import Autopipeline, Script, ScriptCall
from aiohttp_wsbus.protocol import Position

from .conftest import JwksServer, MakeToken
from .redis_server import PubSubProxy, RedisMaker, RedisServer
from .support import BusServer, eventually, next_frame, nothing_more, start_bus

READ = Script("return 'read'", is_shared=True)
WRITE = Script("return 'write'")


def read(channel: str) -> ScriptCall:
    return ScriptCall(READ, (channel,), ())


def write(channel: str, data: str) -> ScriptCall:
    return ScriptCall(WRITE, (channel,), (data,))


class Recorder:
    """Stands in for Redis: records each batch, answers each call with its keys and
    arguments once the test lets the batch through."""

    def __init__(self) -> None:
        self.batches: list[list[ScriptCall]] = []
        self.sent = asyncio.Event()
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        self.batches.append(list(calls))
        self.sent.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [(*call.keys, *call.args) for call in calls]


async def test_calls_made_while_a_batch_is_in_flight_leave_together_on_the_next() -> None:
    recorder = Recorder()
    pipeline = Autopipeline(recorder.run)
    first = asyncio.create_task(pipeline.call([write("a", "1")]))
    await recorder.sent.wait()
    later = [asyncio.create_task(pipeline.call([write("a", str(n))])) for n in (2, 3, 4)]
    many = asyncio.create_task(pipeline.call([write("b", "5"), write("a", "6")]))
    await asyncio.sleep(0)  # every task above has made its call
    recorder.release.set()
    assert await first == [("a", "1")]
    assert [await task for task in later] == [[("a", "2")], [("a", "3")], [("a", "4")]]
    assert await many == [("b", "5"), ("a", "6")]
    # One batch in flight, then everything made meanwhile, in the order it was made.
    assert [[call.args[0] for call in batch] for batch in recorder.batches] == [
        ["1"],
        ["2", "3", "4", "5", "6"],
    ]


async def test_equal_reads_in_one_batch_run_once_and_share_the_answer() -> None:
    recorder = Recorder()
    recorder.release.set()
    pipeline = Autopipeline(recorder.run)
    answers = await asyncio.gather(
        *(pipeline.call([read("a")]) for _ in range(100)),
        pipeline.call([read("b"), read("a")]),
        pipeline.call([write("a", "x"), write("a", "x")]),  # writes never share
    )
    assert answers[:100] == [[("a",)]] * 100
    assert answers[100:] == [[("b",), ("a",)], [("a", "x"), ("a", "x")]]
    assert recorder.batches == [[read("a"), read("b"), write("a", "x"), write("a", "x")]]


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    recorder = Recorder()
    recorder.error = ConnectionError("redis is gone")
    recorder.release.set()
    pipeline = Autopipeline(recorder.run)
    outcomes = await asyncio.gather(
        pipeline.call([write("a", "1")]),
        pipeline.call([read("b")]),
        return_exceptions=True,
    )
    assert list(outcomes) == [recorder.error, recorder.error]
    recorder.error = None
    assert await pipeline.call([read("c")]) == [("c",)]  # the next batch goes out


async def test_stopping_fails_the_batch_in_flight_and_those_waiting() -> None:
    recorder = Recorder()
    pipeline = Autopipeline(recorder.run)
    in_flight = asyncio.create_task(pipeline.call([write("a", "1")]))
    await recorder.sent.wait()
    waiting = asyncio.create_task(pipeline.call([write("a", "2")]))
    await asyncio.sleep(0)
    await pipeline.stop()
    for task in (in_flight, waiting):
        with pytest.raises(redis.exceptions.ConnectionError, match="stopped"):
            await task


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    recorder = Recorder()
    pipeline = Autopipeline(recorder.run)
    gone = asyncio.create_task(pipeline.call([write("a", "1")]))
    stays = asyncio.create_task(pipeline.call([write("a", "2")]))
    await recorder.sent.wait()
    gone.cancel()
    recorder.release.set()
    assert await stays == [("a", "2")]
    assert gone.cancelled()


# -- against Redis ------------------------------------------------------------



async def calls_of(client: redis.asyncio.Redis, command: str) -> int:
    info = await client.info("commandstats")
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_connect_storms_position_reads_of_one_channel_share_one_script_run(
    make_redis_broker: RedisMaker, own_redis: RedisServer, stats: redis.asyncio.Redis
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("a")
    await broker.publish("a", "1")
    await stats.config_resetstat()
    answers = await asyncio.gather(*(broker.history({"a": None}) for _ in range(500)))
    assert {answer["a"].position.offset for answer in answers} == {1}
    # Each batch runs the read once, however many sockets asked in it.
    assert await calls_of(stats, "evalsha") <= 3
    assert await calls_of(stats, "eval") == 0  # the script's text is not sent again


async def test_scripts_travel_by_sha_and_come_back_after_redis_lost_them(
    make_redis_broker: RedisMaker, own_redis: RedisServer, stats: redis.asyncio.Redis
) -> None:
    broker, _ = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("a")
    assert (await broker.publish("a", "1")).offset == 1
    await stats.config_resetstat()
    assert (await broker.publish("a", "2")).offset == 2
    assert await calls_of(stats, "eval") == 0
    await stats.script_flush()  # as after a restart or a failover
    batch = [Publication("a", str(n)) for n in range(3, 8)]
    published = await broker.publish_many(batch)
    assert [p.offset for p in published] == [3, 4, 5, 6, 7]
    assert (await broker.history({"a": None}))["a"].position.offset == 7
    await stats.script_flush()
    history = await broker.history({"a": Position(published[0].offset, published[0].epoch)})
    assert [m.data for m in history["a"].messages] == ["4", "5", "6", "7"]


async def test_concurrent_publishes_land_in_call_order_each_with_its_own_offset(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    broker, delivered = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("a")
    await broker.subscribe("b")
    published = await asyncio.gather(
        *(broker.publish("a" if n % 3 else "b", str(n)) for n in range(300))
    )
    for channel in ("a", "b"):
        mine = [(p.offset, n) for n, p in enumerate(published) if p.channel == channel]
        assert [offset for offset, _ in mine] == list(range(1, len(mine) + 1))
    await eventually(lambda: len(delivered) >= 300)
    for channel in ("a", "b"):
        sent = [str(n) for n, p in enumerate(published) if p.channel == channel]
        assert [m.data for m in delivered if m.channel == channel] == sent


async def test_a_socket_joining_a_channel_its_node_listens_to_starts_there_without_a_read(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    server = await bus_on_own_redis()
    token = make_token(channels=["chat:*"])
    first, _ = await server.open(token, ["chat:a"])
    published = await server.bus.publish("chat:a", 1)
    assert (await next_frame(first))["offset"] == 1  # the node has delivered it
    await stats.config_resetstat()
    second, welcome = await server.open(token, ["chat:a"])
    assert welcome["positions"]["chat:a"] == {"offset": 1, "epoch": published.epoch}
    assert await calls_of(stats, "evalsha") == 0
    assert await calls_of(stats, "eval") == 0
    await server.bus.publish("chat:a", 2)
    for socket in (first, second):
        frame = await next_frame(socket)
        assert (frame["offset"], frame["data"]) == (2, 2)
        await nothing_more(socket)


async def test_sockets_arriving_while_their_channel_is_being_subscribed_wait_not_read(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    own_redis: RedisServer,
    stats: redis.asyncio.Redis,
) -> None:
    server = await bus_on_own_redis(socket_timeout=5.0)
    published = await server.bus.publish("chat:a", "1")
    await stats.config_resetstat()
    token = make_token(channels=["chat:*"])
    sockets = []
    with own_redis.frozen():  # the first socket's SUBSCRIBE waits for Redis, and so do the rest
        for _ in range(3):
            socket = await server.client.ws_connect("/ws")
            await socket.send_json({"type": "connect", "token": token, "channels": ["chat:a"]})
            sockets.append(socket)
        await eventually(lambda: len(server.bus.registry.subscribers("chat:a")) == 3)
    for socket in sockets:
        welcome = await next_frame(socket)
        assert welcome["positions"]["chat:a"] == {"offset": 1, "epoch": published.epoch}
    # The subscription's own catch-up read, and none for the sockets that waited for it.
    assert await calls_of(stats, "evalsha") == 1


async def test_sockets_joining_an_empty_channel_share_its_recent_read_and_still_recover(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    server = await bus_on_own_redis()
    token = make_token(channels=["chat:*"])
    first, welcome = await server.open(token, ["chat:e"])
    empty = welcome["positions"]["chat:e"]
    assert empty["offset"] == 0 and empty["epoch"].startswith("~")  # nothing published
    await stats.config_resetstat()
    second, welcome = await server.open(token, ["chat:e"])
    # The same read: the channel held nothing then, and the node delivered nothing since.
    assert welcome["positions"]["chat:e"] == empty
    assert await calls_of(stats, "evalsha") == 0
    await second.close()
    await server.bus.publish("chat:e", "missed")
    assert (await next_frame(first))["data"] == "missed"
    # The shared position recovers what was published after it, as its own read would.
    again, welcome = await server.open(token, ["chat:e"], since={"chat:e": empty})
    assert welcome["recovered"] == {"chat:e": True}
    frame = await next_frame(again)
    assert (frame["data"], frame["recovered"]) == ("missed", True)


async def test_an_empty_channels_read_is_shared_for_a_tenth_of_the_ttl_at_most(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    server = await bus_on_own_redis({"history_ttl": 2.0})
    token = make_token(channels=["chat:*"])
    _, welcome = await server.open(token, ["chat:e"])
    first_read = welcome["positions"]["chat:e"]
    # A tenth of history_ttl (2 s here) is the most a read is shared for: then read again.
    await asyncio.sleep(0.25)
    await stats.config_resetstat()
    _, welcome = await server.open(token, ["chat:e"])
    second_read = welcome["positions"]["chat:e"]
    assert await calls_of(stats, "evalsha") == 1
    assert second_read["offset"] == 0 and second_read["epoch"] != first_read["epoch"]
    # That read is the one the next sockets share.
    _, welcome = await server.open(token, ["chat:e"])
    assert welcome["positions"]["chat:e"] == second_read
    assert await calls_of(stats, "evalsha") == 1


async def test_sockets_whose_connect_frames_arrive_together_wait_for_one_subscription(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    # The first socket's handler starts the node's subscription; the others, woken in
    # the same tick, must wait for it rather than read the channel's position before
    # Redis confirmed it (what is published in between would reach none of them).
    server = await bus_on_own_redis()
    published = await server.bus.publish("chat:t", "1")
    token = make_token(channels=["chat:*"])
    sockets = [await server.client.ws_connect("/ws") for _ in range(10)]
    await stats.config_resetstat()
    connect = {"type": "connect", "token": token, "channels": ["chat:t"]}
    for socket in sockets:  # written without yielding: the server reads them in one tick
        await socket.send_json(connect)
    for socket in sockets:
        welcome = await next_frame(socket)
        assert welcome["positions"]["chat:t"] == {"offset": 1, "epoch": published.epoch}
    assert await calls_of(stats, "subscribe") == 1
    assert await calls_of(stats, "evalsha") == 1  # the subscription's own catch-up read
    await server.bus.publish("chat:t", "2")
    for socket in sockets:
        assert (await next_frame(socket))["offset"] == 2


async def test_sockets_coming_back_soon_after_the_last_one_left_need_no_round_trip(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    # A network blip: every socket of a channel leaves, then they reconnect.
    server = await bus_on_own_redis(unsubscribe_after=5.0)
    token = make_token(channels=["chat:*"])
    first, _ = await server.open(token, ["chat:b"])
    await server.bus.publish("chat:b", "1")
    assert (await next_frame(first))["data"] == "1"
    await first.close()
    await eventually(lambda: not server.bus.registry.subscribers("chat:b"))
    published = await server.bus.publish("chat:b", "2")  # nobody here hears it
    await stats.config_resetstat()
    again, welcome = await server.open(token, ["chat:b"])
    # The node kept listening: it knows where the channel stands without asking.
    assert welcome["positions"]["chat:b"] == {"offset": 2, "epoch": published.epoch}
    assert await calls_of(stats, "subscribe") == 0
    assert await calls_of(stats, "evalsha") == 0
    await server.bus.publish("chat:b", "3")
    frame = await next_frame(again)
    assert (frame["offset"], frame["data"]) == (3, "3")


async def test_sockets_that_joined_a_subscription_redis_never_confirmed_are_told_unavailable(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    own_redis: RedisServer,
) -> None:
    # Left subscribed without the node's subscription, they would hear nothing live.
    server = await bus_on_own_redis(socket_timeout=0.3)
    token = make_token(channels=["chat:*"])
    connect = {"type": "connect", "token": token, "channels": ["chat:x"]}
    with own_redis.frozen():
        first = await server.client.ws_connect("/ws")
        await first.send_json(connect)
        await eventually(lambda: bool(server.bus.registry.subscribers("chat:x")))
        joined = await server.client.ws_connect("/ws")
        await joined.send_json(connect)
        for socket in (first, joined):  # answered while Redis is still frozen
            welcome = await next_frame(socket)
            assert welcome["denied"] == {"chat:x": "unavailable"}
            assert welcome["subscribed"] == []
    assert not server.bus.registry.subscribers("chat:x")


async def test_sockets_joining_a_subscription_redis_never_confirmed_are_told_unavailable(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    pubsub_proxy: PubSubProxy,
    redis_prefix: str,
    make_token: MakeToken,
) -> None:
    # Redis answers reads but never the node's SUBSCRIBE: a joiner whose read works
    # would be subscribed with nothing to hear, and so would every later one.
    pubsub_proxy.never = b"chat:x"
    broker = RedisBroker(pubsub_proxy.url, prefix=redis_prefix, socket_timeout=0.3)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    token = make_token(channels=["chat:*"])
    connect = {"type": "connect", "token": token, "channels": ["chat:x"]}
    first = await server.client.ws_connect("/ws")
    await first.send_json(connect)
    await eventually(lambda: bool(server.bus.registry.subscribers("chat:x")))
    joined = await server.client.ws_connect("/ws")
    await joined.send_json(connect)
    for socket in (first, joined):
        welcome = await next_frame(socket)
        assert welcome["denied"] == {"chat:x": "unavailable"}
        assert welcome["subscribed"] == []
    assert not server.bus.registry.subscribers("chat:x")
    # Once Redis answers again the channel works for the next socket.
    pubsub_proxy.never = None
    await eventually(lambda: broker.is_available)
    again, welcome = await server.open(token, ["chat:x"])
    assert welcome["subscribed"] == ["chat:x"]
    await server.bus.publish("chat:x", "live")
    assert (await next_frame(again))["data"] == "live"
