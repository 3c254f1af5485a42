"""RedisBroker races found in review: sockets left on a channel whose node subscription
is gone, and sockets that get a message twice after the node's pub/sub reconnects.

Real Redis (the test's own), real sockets; waits are on frames and on the
broker's state, each bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio
from aiohttp import ClientWebSocketResponse
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import BrokerUnavailable, RedisBroker
from aiohttp_wsbus.brokers import Published
from aiohttp_wsbus.brokers.redis_scripts import ChannelKeys
from aiohttp_wsbus.protocol import Position
from aiohttp_wsbus.testing import broker_outage

from .conftest import JwksServer, MakeToken
from .redis_server import PubSubProxy, RedisMaker, RedisServer
from .support import BusServer, eventually, next_frame, start_bus


async def test_a_socket_that_joined_an_unconfirmed_subscription_is_not_left_deaf(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    own_redis: RedisServer,
) -> None:
    # The first socket's subscribe times out (Redis frozen) and drops the node's
    # subscription although a second socket joined it meanwhile. If Redis answers
    # that socket's position read (it came back within socket_timeout), the socket
    # is welcomed as subscribed on a channel this node no longer listens to.
    server = await bus_on_own_redis(socket_timeout=1.0)
    broker = server.bus.broker
    token = make_token(channels=["chat:*"])
    connect = {"type": "connect", "token": token, "channels": ["chat:x"]}
    with own_redis.frozen():
        first = await server.client.ws_connect("/ws")
        await first.send_json(connect)
        await eventually(lambda: len(server.bus.registry.subscribers("chat:x")) == 1)
        joined = await server.client.ws_connect("/ws")
        await joined.send_json(connect)
        await eventually(lambda: len(server.bus.registry.subscribers("chat:x")) == 2)
        welcome = await next_frame(first)  # 2 socket timeouts: the node gives up
        assert welcome["denied"] == {"chat:x": "unavailable"}
    # Redis answers again, within the joined socket's read's socket_timeout.
    welcome = await next_frame(joined)
    assert welcome["type"] == "welcome"
    if welcome["subscribed"] == []:
        assert welcome["denied"] == {"chat:x": "unavailable"}  # told: fine
        return
    assert welcome["subscribed"] == ["chat:x"]
    await eventually(lambda: broker.is_available, timeout=15.0)
    held = set(server.bus.registry.subscribers("chat:x"))
    node_listens = "chat:x" in broker._subscriptions  # type: ignore[attr-defined]
    published = await server.bus.publish("chat:x", "after the welcome")
    try:
        frame = await next_frame(joined, timeout=3.0)
    except TimeoutError:
        pytest.fail(
            f"welcomed as subscribed at {welcome['positions']['chat:x']}, still held by the "
            f"registry ({len(held)} socket), node subscribed: {node_listens}; offset "
            f"{published.offset} published after it never arrived"
        )
    assert (frame["offset"], frame["data"]) == (published.offset, "after the welcome")


@dataclass
class MissedOne:
    """A node whose pub/sub connection is down after it delivered offset 1 of a channel
    to `staying`, while another node published offset 2 (`missed`); `joined` is a
    socket of it open on another channel."""

    server: BusServer
    staying: ClientWebSocketResponse
    joined: ClientWebSocketResponse
    first: Published
    missed: Published


@pytest.fixture
def missed_one(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_redis_broker: RedisMaker,
    make_token: MakeToken,
    own_redis: RedisServer,
    stats: redis.asyncio.Redis,
) -> Callable[[str], Awaitable[MissedOne]]:
    # The node's pub/sub connection is lost (CLIENT KILL, an output buffer limit) while
    # Redis still answers commands: the node hears offset 2 only on its catch-up.
    async def make(channel: str) -> MissedOne:
        server = await bus_on_own_redis(reconnect_delay=(2.0, 2.0))
        other, _ = await make_redis_broker(url=own_redis.url)  # another node, same prefix
        token = make_token(channels=["chat:*"])
        staying, _ = await server.open(token, [channel])
        joined, _ = await server.open(token, ["chat:elsewhere"])
        first = await server.bus.publish(channel, "1")
        assert (await next_frame(staying))["offset"] == 1
        await stats.client_kill_filter(_type="pubsub")
        await eventually(lambda: not server.bus.broker.is_available)
        missed = await other.publish(channel, '"2"')
        assert missed.offset == 2
        return MissedOne(server, staying, joined, first, missed)

    return make


async def test_a_socket_joining_while_the_pubsub_connection_is_down_gets_nothing_twice(
    missed_one: Callable[[str], Awaitable[MissedOne]],
) -> None:
    # A socket joining then reads its position from Redis, past what the node has
    # delivered; the listener's catch-up after it reconnects delivers those messages
    # to every local socket, the new one included.
    node = await missed_one("chat:d")
    # An open socket subscribes (new sockets are refused while the node is unavailable).
    await node.joined.send_json({"type": "subscribe", "channels": ["chat:d"]})
    subscribed = await next_frame(node.joined)
    assert subscribed["subscribed"] == ["chat:d"], subscribed
    assert subscribed["positions"]["chat:d"] == {"offset": 2, "epoch": node.missed.epoch}
    await eventually(lambda: node.server.bus.broker.is_available, timeout=10.0)
    assert (await next_frame(node.staying))["offset"] == 2  # caught up: right for this one
    after = await node.server.bus.publish("chat:d", "3")
    frame = await next_frame(node.joined)
    # Its welcome said offset 2: the next message it gets must be offset 3, once.
    assert (frame["offset"], frame["data"]) == (after.offset, "3"), frame


async def test_a_recovery_while_the_pubsub_connection_is_down_replays_nothing_twice(
    missed_one: Callable[[str], Awaitable[MissedOne]],
) -> None:
    # As above, with `since`: the replay comes from Redis, then the listener's
    # catch-up delivers the same messages live.
    node = await missed_one("chat:r")
    since = {"chat:r": {"offset": 1, "epoch": node.first.epoch}}
    await node.joined.send_json({"type": "subscribe", "channels": ["chat:r"], "since": since})
    subscribed = await next_frame(node.joined)
    assert subscribed["recovered"] == {"chat:r": True}, subscribed
    replayed = await next_frame(node.joined)
    assert (replayed["offset"], replayed["recovered"]) == (node.missed.offset, True)
    await eventually(lambda: node.server.bus.broker.is_available, timeout=10.0)
    assert (await next_frame(node.staying))["offset"] == 2
    after = await node.server.bus.publish("chat:r", "3")
    frame = await next_frame(node.joined)
    assert (frame["offset"], frame["data"]) == (after.offset, "3"), frame


async def test_stopping_releases_a_subscribe_still_waiting_for_redis(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    # A subscription in flight when the broker stops is never confirmed: its waiters
    # (and the one timer they share) should end with the broker, not 2 socket
    # timeouts later.
    broker, _ = await make_redis_broker(url=own_redis.url, socket_timeout=3.0)
    subscribing = asyncio.ensure_future(broker.subscribe("pending"))
    await asyncio.sleep(0)  # the subscription is taken and its SUBSCRIBE on its way
    await broker.stop()
    try:
        async with asyncio.timeout(1.0):
            await asyncio.gather(subscribing, return_exceptions=True)
    except TimeoutError:
        subscribing.cancel()
        pytest.fail("subscribe() still waiting for Redis after stop()")
    assert isinstance(subscribing.exception(), BrokerUnavailable)


async def test_sockets_subscribing_together_while_the_pubsub_connection_is_down_are_all_told(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
) -> None:
    # The first socket's broker subscribe fails at once (the pub/sub connection is
    # down) without taking the channel; a socket subscribing in the same tick finds
    # no subscription to wait for, reads its position (Redis still answers reads) and
    # is subscribed to a channel this node will not listen to while it stays.
    server = await bus_on_own_redis(reconnect_delay=(2.0, 2.0))
    broker = server.bus.broker
    token = make_token(channels=["chat:*"])
    sockets = [(await server.open(token, [f"chat:own{n}"]))[0] for n in range(2)]
    await stats.client_kill_filter(_type="pubsub")
    await eventually(lambda: not broker.is_available)
    frame = {"type": "subscribe", "channels": ["chat:z"]}
    for socket in sockets:  # written without yielding: the server reads them in one tick
        await socket.send_json(frame)
    answers = [await next_frame(socket) for socket in sockets]
    await eventually(lambda: broker.is_available, timeout=10.0)
    subscribed = [s for s, a in zip(sockets, answers, strict=True) if a["subscribed"]]
    assert all(a["subscribed"] or a["denied"] == {"chat:z": "unavailable"} for a in answers)
    if not subscribed:
        return
    published = await server.bus.publish("chat:z", "heard?")
    for socket in subscribed:
        try:
            got = await next_frame(socket, timeout=3.0)
        except TimeoutError:
            pytest.fail(
                f"answers {answers}: a subscribed socket never got offset "
                f"{published.offset}; node subscribed: "
                f"{'chat:z' in broker._subscriptions}"  # type: ignore[attr-defined]
            )
        assert got["offset"] == published.offset


async def test_stopping_releases_a_read_waiting_for_the_node_to_catch_up(
    make_redis_broker: RedisMaker, own_redis: RedisServer, stats: redis.asyncio.Redis
) -> None:
    # A read that found the channel past what the node delivered waits for the
    # node's catch-up; a broker that stops has none to give, and ends the wait.
    broker, _ = await make_redis_broker(url=own_redis.url, reconnect_delay=(30.0, 30.0))
    other, _ = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("chat:w")
    await stats.client_kill_filter(_type="pubsub")
    await eventually(lambda: not broker.is_available)
    await other.publish("chat:w", '"missed"')
    reading = asyncio.ensure_future(broker.history_for_subscribers({"chat:w": None}))
    await eventually(lambda: bool(broker._subscriptions["chat:w"].behind))
    await broker.stop()
    async with asyncio.timeout(1.0):
        history = await reading
    assert history["chat:w"].position.offset == 1


@dataclass
class ProxiedNode:
    """A bus whose Redis pub/sub answers `proxy` can hold, and `other`, a broker of
    another node on the same Redis (not behind the proxy)."""

    server: BusServer
    other: RedisBroker
    proxy: PubSubProxy

    async def subscribe_while_held(
        self, socket: ClientWebSocketResponse, frame: dict[str, Any], channel: str
    ) -> dict[str, Any]:
        """Send `frame` while the node's pub/sub answers are held, release them once it
        is answered or its read waits for the node to deliver `channel`; the answer."""
        await socket.send_json(frame)
        answer = asyncio.ensure_future(next_frame(socket))
        subscriptions = self.server.bus.broker._subscriptions  # type: ignore[attr-defined]
        await eventually(lambda: answer.done() or bool(subscriptions[channel].behind))
        self.proxy.release()
        return await answer


@pytest.fixture
async def proxied_node(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    pubsub_proxy: PubSubProxy,
    make_redis_broker: RedisMaker,
    own_redis: RedisServer,
    redis_prefix: str,
) -> ProxiedNode:
    broker = RedisBroker(pubsub_proxy.url, prefix=redis_prefix)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    other, _ = await make_redis_broker(url=own_redis.url)
    return ProxiedNode(server, other, pubsub_proxy)


async def test_a_recovery_from_an_empty_channel_gets_its_first_message_once(
    proxied_node: ProxiedNode, make_token: MakeToken
) -> None:
    # The node listens to an empty channel (its position: offset 0 of an empty epoch).
    # Another node publishes the channel's first message, still on its way to this
    # node when a socket recovers from the empty position: its read finds offset 1 of
    # a real epoch, which is_behind does not count as ahead of the node (another
    # epoch), so the socket gets it replayed and then live from the node.
    server = proxied_node.server
    token = make_token(channels=["chat:*"])
    staying, welcome = await server.open(token, ["chat:e"])
    empty = welcome["positions"]["chat:e"]
    assert empty["offset"] == 0 and empty["epoch"].startswith("~"), empty
    joined, _ = await server.open(token, ["chat:elsewhere"])
    proxied_node.proxy.hold()
    first = await proxied_node.other.publish("chat:e", '"1"')
    assert first.offset == 1
    frame = {"type": "subscribe", "channels": ["chat:e"], "since": {"chat:e": empty}}
    subscribed = await proxied_node.subscribe_while_held(joined, frame, "chat:e")
    assert subscribed["recovered"] == {"chat:e": True}, subscribed
    replayed = await next_frame(joined)
    assert (replayed["offset"], replayed["recovered"]) == (1, True), replayed
    assert (await next_frame(staying))["offset"] == 1  # the node delivered it
    after = await server.bus.publish("chat:e", "2")
    live = await next_frame(joined)
    assert (live["offset"], live["data"]) == (after.offset, "2"), live


async def test_a_socket_joining_a_channel_redis_lost_gets_its_new_first_message_once(
    proxied_node: ProxiedNode, make_token: MakeToken, stats: redis.asyncio.Redis
) -> None:
    # Redis lost a channel the node listens to (FLUSHALL, an eviction) with the pub/sub
    # connection up; another node's publish starts a new epoch, on its way to this node
    # when a socket joins: its read finds offset 1 of the new epoch and it starts
    # there; the node then hears offset 1, catches up (a new epoch) and delivers it.
    server = proxied_node.server
    token = make_token(channels=["chat:*"])
    staying, _ = await server.open(token, ["chat:l"])
    joined, _ = await server.open(token, ["chat:elsewhere"])
    old = await server.bus.publish("chat:l", "old")
    assert (await next_frame(staying))["offset"] == 1
    await stats.flushall()
    proxied_node.proxy.hold()
    new = await proxied_node.other.publish("chat:l", '"new"')
    assert (new.offset, new.epoch != old.epoch) == (1, True)
    since = {"chat:l": {"offset": old.offset, "epoch": old.epoch}}  # a reconnecting client
    frame = {"type": "subscribe", "channels": ["chat:l"], "since": since}
    subscribed = await proxied_node.subscribe_while_held(joined, frame, "chat:l")
    assert subscribed["subscribed"] == ["chat:l"], subscribed
    start = subscribed["positions"]["chat:l"]
    assert (await next_frame(staying))["offset"] == 1  # the node delivered it
    after = await server.bus.publish("chat:l", "after")
    live = await next_frame(joined)
    # Told it starts at `start`: the next message must come after it, once.
    assert (live["offset"], live["epoch"], live["data"]) == (after.offset, after.epoch, "after"), (
        start,
        live,
    )


async def test_a_history_page_of_a_channel_the_node_listens_to_does_not_wait_for_its_catch_up(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]],
    make_redis_broker: RedisMaker,
    make_token: MakeToken,
    own_redis: RedisServer,
    stats: redis.asyncio.Redis,
) -> None:
    # A page read (bus.history, a socket's history request, the HTTP queries) has no
    # live stream after it, so nothing it could get twice: the wait for the node's
    # catch-up only delays it, and refuses it once the pub/sub connection stays down,
    # although Redis answers the read (a channel the node does not listen to is
    # answered at once).
    server = await bus_on_own_redis(socket_timeout=1.0, reconnect_delay=(30.0, 30.0))
    broker = server.bus.broker
    other, _ = await make_redis_broker(url=own_redis.url)
    token = make_token(channels=["chat:*"])
    staying, _ = await server.open(token, ["chat:h"])
    await server.bus.publish("chat:h", "1")
    assert (await next_frame(staying))["offset"] == 1
    await stats.client_kill_filter(_type="pubsub")
    await eventually(lambda: not broker.is_available)
    await other.publish("chat:h", '"2"')
    await other.publish("chat:elsewhere", '"2"')
    elsewhere = await server.bus.history("chat:elsewhere")  # not listened to: answered
    assert [m.offset for m in elsewhere.messages] == [1]
    try:
        page = await server.bus.history("chat:h")
    except BrokerUnavailable:
        pytest.fail(
            "a history page of a channel the node listens to was refused "
            "(2 socket timeouts waiting for a catch-up) although Redis answered it"
        )
    assert [m.offset for m in page.messages] == [1, 2]


async def test_two_catch_ups_of_one_subscription_deliver_each_message_once(
    make_redis_broker: RedisMaker, own_redis: RedisServer
) -> None:
    # A cluster's slot moving while a catch-up runs on the old shard's listener starts
    # another on the new one from the same position: together they deliver each
    # message once, and the node's position never goes back.
    broker, delivered = await make_redis_broker(url=own_redis.url)
    await broker.subscribe("chat:c")
    published = [await broker.publish("chat:c", f'"{n}"') for n in range(3)]
    await eventually(lambda: len(delivered) == 3)
    subscription = broker._subscriptions["chat:c"]
    subscription.last = Position(published[0].offset, published[0].epoch)  # two behind
    await asyncio.gather(broker._catch_up(subscription), broker._catch_up(subscription))
    assert [m.offset for m in delivered] == [1, 2, 3, 2, 3]  # the two missed, once each
    assert subscription.last == Position(published[2].offset, published[2].epoch)


async def test_a_broker_outage_denies_a_socket_joining_a_channel_its_node_listens_to(
    bus_on_own_redis: Callable[..., Awaitable[BusServer]], make_token: MakeToken
) -> None:
    # aiohttp_wsbus.testing's outage stands in for the broker: "subscriptions are denied
    # unavailable". A socket joining a channel this node already listens to takes its
    # start from broker.delivered_position, which the tap passes through unchecked.
    server = await bus_on_own_redis()
    token = make_token(channels=["chat:*"])
    await server.open(token, ["chat:o"])  # the node listens to chat:o
    joined, _ = await server.open(token, ["chat:elsewhere"])
    with broker_outage(server.bus):
        await joined.send_json({"type": "subscribe", "channels": ["chat:o"]})
        subscribed = await next_frame(joined)
    assert subscribed["denied"] == {"chat:o": "unavailable"}, subscribed


async def test_a_new_epoch_held_for_a_socket_while_another_channel_waits_reaches_it(
    proxied_node: ProxiedNode,
    make_token: MakeToken,
    stats: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    # One subscribe frame: chat:c starts where the node stands (delivered_position, its
    # old epoch), chat:d recovers and its read waits for the node (the node is behind).
    # Meanwhile Redis lost chat:c and the node delivers its new epoch's first message:
    # held for the socket, news after the start it was told, but _go_live keeps only
    # held messages of the start's epoch, so the socket never gets it.
    server = proxied_node.server
    token = make_token(channels=["chat:*"])
    staying, _ = await server.open(token, ["chat:c", "chat:d"])
    joined, _ = await server.open(token, ["chat:elsewhere"])
    old = await server.bus.publish("chat:c", "c1")
    d1 = await server.bus.publish("chat:d", "d1")
    assert [(await next_frame(staying))["offset"] for _ in range(2)] == [1, 1]
    proxied_node.proxy.hold()
    keys = ChannelKeys.of(redis_prefix, "chat:c")
    await stats.delete(keys.meta, keys.stream)  # Redis lost chat:c
    new = await proxied_node.other.publish("chat:c", '"c new 1"')
    assert (new.offset, new.epoch != old.epoch) == (1, True)
    await proxied_node.other.publish("chat:d", '"d2"')
    since = {"chat:d": {"offset": d1.offset, "epoch": d1.epoch}}
    frame = {"type": "subscribe", "channels": ["chat:c", "chat:d"], "since": since}
    subscribed = await proxied_node.subscribe_while_held(joined, frame, "chat:d")
    assert subscribed["positions"]["chat:c"] == {"offset": 1, "epoch": old.epoch}, subscribed
    assert (await next_frame(staying))["epoch"] == new.epoch  # the node delivered it
    after = await server.bus.publish("chat:c", "c new 2")
    frames = [await next_frame(joined) for _ in range(2)]
    on_c = [(f["offset"], f["epoch"]) for f in frames if f["channel"] == "chat:c"]
    # Told it starts at offset 1 of the old epoch: next comes all of the new one, in order.
    assert on_c[:1] == [(new.offset, new.epoch)], (frames, after)
