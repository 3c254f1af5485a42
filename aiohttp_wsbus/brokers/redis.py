"""RedisBroker: many processes on many machines share one bus through Redis.

Each channel's offset, epoch, history (a Stream) and idempotency ids live in
Redis under one hash tag, `{prefix:channel}`, so they sit on one cluster slot
and one Lua script publishes atomically. Each node subscribes (pub/sub) only
to the channels it has local subscribers for, and after a lost connection
fetches what it missed from the streams before going live again. On a Redis
Cluster it keeps one sharded pub/sub connection per master and moves each
subscription to the master that owns its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import BrokerUnavailable
from ..protocol import Position
from ..revocations import Revocation
from .base import (
    DEFAULT_HISTORY,
    Broker,
    Deliver,
    EmptyEpoch,
    History,
    HistoryOptions,
    Message,
    OnControl,
    OnEphemeral,
    Publication,
    Published,
    recover,
)
from .presence import DEFAULT_PRESENCE, OnPresence, PresenceOptions, PresenceSnapshot
from .redis_control import CONTROL_CHANNEL, ControlChannel
from .redis_ephemeral import parse_ephemeral, publish_ephemeral
from .redis_listener import (
    Listener,
    ListenerOptions,
    Subscription,
    address,
    is_delivered,
    is_gap,
)
from .redis_options import share_options, shortest_ttl
from .redis_pipeline import Autopipeline, Script, ScriptCall, run_scripts
from .redis_presence import PRESENCE_MARK, RedisPresence
from .redis_scripts import (
    HISTORY_SCRIPT,
    KEEP_SCRIPT,
    PUBLISH_SCRIPT,
    UNREACHABLE,
    ChannelKeys,
    Top,
    check_prefix,
    milliseconds,
    parse_published,
    parse_top,
    publish_arguments,
)
from .redis_users import UserSockets

__all__ = ["RedisBroker"]

logger = logging.getLogger("aiohttp_wsbus")

_PUBLISH: Final = Script(PUBLISH_SCRIPT)
_HISTORY: Final = Script(HISTORY_SCRIPT, is_shared=True)  # equal reads share one answer
_KEEP: Final = Script(KEEP_SCRIPT)
# An empty channel's position names when it was read (EmptyEpoch), and recovering
# from it works for one TTL after that read. Subscribers that share one read lose
# its age from that window, so a read is shared for at most a second, and at most a
# tenth of the shortest TTL: enough for a connect storm's sockets to share one.
_SHARE_EMPTY_FOR: Final = 1.0
_UNCONFIRMED: Final = "redis did not confirm the subscription"


def _share_empty_for(ttl: float) -> float:
    return min(_SHARE_EMPTY_FOR, ttl / 10)


async def _fail(error: Exception) -> None:
    raise error


def _settle(settled: asyncio.Future[None]) -> None:
    """Wake a subscription's waiters: their time is up, or Redis answered."""
    if not settled.done():
        settled.set_result(None)


def _answered(settled: asyncio.Future[None], timer: asyncio.TimerHandle, _: object) -> None:
    timer.cancel()
    _settle(settled)


class RedisBroker(Broker):
    """Shares offsets, history and messages between every node on one Redis.

    `sharded=True` uses SPUBLISH/SSUBSCRIBE (Redis 7). `cluster=True` talks to
    a Redis Cluster (`url` names any of its nodes): commands go through a
    cluster client, and each shard that owns subscribed channels gets its own
    sharded pub/sub connection; it implies `sharded=True`.

    `socket_timeout` bounds every command, so a Redis that is down makes
    `publish` fail fast with BrokerUnavailable, and `is_available` turns false
    once a pub/sub connection has left a PING unanswered for that long: an idle
    one is pinged every `ping_interval` seconds, at most `socket_timeout / 2`. The
    listeners reconnect with `reconnect_delay` backoff (from, doubling up to)
    by themselves; a Redis node they cannot reach is logged as a WARNING at
    most every `warning_interval` seconds, by host:port/db, never by URL.

    A channel stays subscribed for `unsubscribe_after` seconds after its last
    local subscriber left: the sockets of a reconnect storm (a network blip, a
    proxy restart) find it confirmed and start where the node stands, with no
    SUBSCRIBE (nor a read, unless the channel holds nothing).
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "wsbus",
        sharded: bool = False,
        cluster: bool = False,
        socket_timeout: float = 2.0,
        ping_interval: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.05, 5.0),
        max_connections: int = 32,
        warning_interval: float = 30.0,
        unsubscribe_after: float = 5.0,
    ) -> None:
        if not unsubscribe_after >= 0:  # NaN too
            raise ValueError(f"unsubscribe_after must be >= 0 seconds, not {unsubscribe_after!r}")
        self._unsubscribe_after = unsubscribe_after
        self.url = url
        self.prefix = check_prefix(prefix)
        self.cluster = cluster
        self.sharded = sharded or cluster
        self._listener_options = ListenerOptions(
            sharded=self.sharded,
            timeout=socket_timeout,
            ping_interval=min(ping_interval, socket_timeout / 2),
            reconnect_delay=reconnect_delay,
            warning_interval=warning_interval,
        )
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._deliver: Deliver | None = None
        self._history = DEFAULT_HISTORY
        self._redis: Redis | RedisCluster | None = None
        self._subscriptions: dict[str, Subscription] = {}
        self._listeners: dict[str, Listener] = {}
        self._topology_read = asyncio.Event()
        self._topology_stale = asyncio.Event()
        self._connection_slots = asyncio.Semaphore(max_connections)
        self._tasks: list[asyncio.Task[None]] = []
        self._leaving: set[asyncio.Task[None]] = set()  # unsubscribes after their delay
        self._on_control: OnControl | None = None
        self._control = ControlChannel(self.prefix, sharded=self.sharded)
        self._users = UserSockets(self.prefix)
        self._keep_every: float | None = None  # seconds; the shortest TTL / 3
        self._share_empty_for = _share_empty_for(DEFAULT_HISTORY.ttl)
        self._on_presence: OnPresence | None = None
        self._on_ephemeral: OnEphemeral | None = None
        self._presence = self._new_presence(DEFAULT_PRESENCE)
        # Concurrent publishes and reads each leave in one pipeline per round trip.
        self._publishes = Autopipeline(self._run_scripts)
        self._reads = Autopipeline(self._run_scripts)

    def _new_presence(self, options: PresenceOptions) -> RedisPresence:
        return RedisPresence(
            self.prefix, options, sharded=self.sharded, slots=self._connection_slots
        )

    # -- lifetime --------------------------------------------------------

    async def start(
        self,
        deliver: Deliver,
        history: HistoryOptions,
        *,
        on_control: OnControl | None = None,
        on_presence: OnPresence | None = None,
        presence: PresenceOptions = DEFAULT_PRESENCE,
        on_ephemeral: OnEphemeral | None = None,
    ) -> None:
        self._deliver = deliver
        self._history = history
        self._share_empty_for = _share_empty_for(history.ttl)
        self._on_control = on_control
        self._on_presence = on_presence
        self._on_ephemeral = on_ephemeral
        self._presence = self._new_presence(presence)
        options: dict[str, Any] = {
            "socket_timeout": self._socket_timeout,
            "socket_connect_timeout": self._socket_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,  # the listeners read pub/sub pushes as plain replies
        }
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep())]
        if on_presence is not None:
            self._tasks.append(loop.create_task(self._presence.keep(lambda: self._redis)))
        if self.cluster:
            # A cluster node refuses connections beyond max_connections instead of
            # queueing them; _connection_slot keeps publishes within it.
            self._redis = RedisCluster.from_url(
                self.url, max_connections=self._max_connections + 2, **options
            )
            self._tasks.append(loop.create_task(self._follow_topology()))
        else:
            # Concurrent publishes wait for one of max_connections, never fail for want of one.
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=self._max_connections,
                timeout=self._socket_timeout,
                **options,
            )
            self._redis = Redis.from_pool(pool)
            name = address(pool.connection_kwargs)
            self._listeners[""] = self._new_listener(name, pool.make_connection)
            self._topology_read.set()
        self._tasks.append(loop.create_task(self._users.keep(self._redis)))
        if on_control is not None:
            # Held for good; its confirmation (again after each reconnect) loads revocations.
            # On a cluster, placing subscriptions on their shards (_follow_topology) adds it.
            control = Subscription(CONTROL_CHANNEL, self._control.keys, loop.create_future())
            self._subscriptions[CONTROL_CHANNEL] = control
            if not self.cluster:
                await self._listeners[""].add(control)
        # Start up connected when Redis is there; a Redis that is down is not fatal.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._socket_timeout * 2):
                await self._topology_read.wait()
                listeners = list(self._listeners.values())
                await asyncio.gather(*(listener.first_attempt.wait() for listener in listeners))

    async def stop(self) -> None:
        self._deliver = None
        self._on_control = None
        self._on_presence = None
        self._on_ephemeral = None
        # Forgotten: a later unsubscribe arms no timer, a later start begins afresh, and
        # waiters on one Redis never confirmed wake now (its cancelled `ready` settles them).
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions.values():
            self._forget(subscription)
            for _, waiter in subscription.behind or ():  # no more to wait for
                if not waiter.done():
                    waiter.set_result(None)
            subscription.behind = None
        for task in (*self._tasks, *self._leaving):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._leaving, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(self._publishes.stop(), self._reads.stop())
        await asyncio.gather(*(listener.stop() for listener in self._listeners.values()))
        self._listeners = {}
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def is_available(self) -> bool:
        listeners = self._listeners.values()
        return bool(listeners) and all(listener.is_connected for listener in listeners)

    # -- subscriptions ---------------------------------------------------

    def subscribe(self, channel: str) -> Coroutine[Any, Any, None]:
        """Listen to `channel`; returns once Redis confirmed it, so nothing after is missed.

        The channel is taken at the call, before the first await: the bus calls
        this for a channel's first socket, and the reads for the sockets that join
        it meanwhile (`history`, `delivered_position`) wait for this confirmation.
        """
        subscription = self._subscriptions.get(channel)
        if subscription is not None and subscription.has_failed:
            self._forget(subscription)  # failed, its unsubscribe not run yet: anew
        elif subscription is not None:
            if subscription.leaving is not None:  # a subscriber came back in time
                subscription.leaving.cancel()
                subscription.leaving = None
            return self._ready(subscription)
        keys = ChannelKeys.of(self.prefix, channel)
        subscription = Subscription(channel, keys, asyncio.get_running_loop().create_future())
        self._subscriptions[channel] = subscription
        if not self.is_available:
            return self._failed(subscription, BrokerUnavailable("redis is not reachable"))
        try:
            listener = self._listener_for(keys)
        except UNREACHABLE as error:
            return self._failed(subscription, BrokerUnavailable(f"redis: {error}"))
        return self._listen(listener, subscription)

    def _failed(
        self, subscription: Subscription, error: BrokerUnavailable
    ) -> Coroutine[Any, Any, None]:
        """Keep `subscription` as failed until the bus unsubscribes: sockets joining it
        meanwhile read it as failed too, instead of as a channel nobody listens to."""
        subscription.ready.cancel()
        return _fail(error)

    async def _listen(self, listener: Listener, subscription: Subscription) -> None:
        await listener.add(subscription)
        await self._ready(subscription)

    async def unsubscribe(self, channel: str) -> None:
        """Stop listening to `channel`: `unsubscribe_after` seconds from now unless a
        subscriber comes back first, at once if Redis has not confirmed it."""
        subscription = self._subscriptions.get(channel)
        if subscription is None:
            return
        if self._unsubscribe_after and subscription.is_confirmed:
            if subscription.leaving is None:
                loop = asyncio.get_running_loop()
                subscription.leaving = loop.call_later(
                    self._unsubscribe_after, self._leave, subscription
                )
            return
        await self._drop(subscription)

    def _leave(self, subscription: Subscription) -> None:
        """Its time without subscribers is up (loop timer)."""
        subscription.leaving = None
        if self._subscriptions.get(subscription.channel) is subscription:
            # Forgotten now, not when the task runs: a subscribe in between makes
            # a new subscription rather than keep this one, which is going.
            self._forget(subscription)
            task = asyncio.get_running_loop().create_task(self._drop(subscription))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    def _forget(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.channel) is subscription:
            del self._subscriptions[subscription.channel]
        if subscription.leaving is not None:
            subscription.leaving.cancel()
            subscription.leaving = None
        subscription.ready.cancel()

    async def _drop(self, subscription: Subscription) -> None:
        self._forget(subscription)
        if subscription.listener is not None:
            await subscription.listener.remove(subscription)

    async def _ready(self, subscription: Subscription) -> None:
        if not await self._confirmed(subscription):
            # Failed, but kept until the bus unsubscribes: the sockets that joined
            # meanwhile read it as failed too, instead of an unsubscribed channel.
            subscription.ready.cancel()
            raise BrokerUnavailable(_UNCONFIRMED)

    async def _confirmed(self, subscription: Subscription) -> bool:
        """Wait for Redis to confirm `subscription`, at most 2 socket timeouts from the
        first wait; whether it did.

        A connect storm's sockets wait here together: one timer and one future per
        subscription, not per socket (asyncio.wait makes both for each caller).
        """
        ready = subscription.ready
        if not ready.done():
            settled = subscription.settled
            if settled is None:
                loop = asyncio.get_running_loop()
                settled = subscription.settled = loop.create_future()
                timer = loop.call_later(self._socket_timeout * 2, _settle, settled)
                ready.add_done_callback(functools.partial(_answered, settled, timer))
            await asyncio.shield(settled)  # a cancelled waiter leaves it to the others
        return subscription.is_confirmed

    def _listener_for(self, keys: ChannelKeys) -> Listener:
        """The pub/sub connection a channel belongs on: the only one, or its shard's."""
        if not isinstance(self._redis, RedisCluster):
            return self._listeners[""]
        node = self._redis.get_node_from_key(keys.pubsub)
        assert node is not None  # None is only for replica=True
        return self._listener_on(node)

    def _new_listener(self, name: str, make_connection: Callable[[], Connection]) -> Listener:
        return Listener(self, name, make_connection, self._listener_options)

    def _listener_on(self, node: ClusterNode) -> Listener:
        listener = self._listeners.get(node.name)
        if listener is None:
            options = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            connect = functools.partial(node.connection_class, **options)
            listener = self._listeners[node.name] = self._new_listener(node.name, connect)
        return listener

    # -- cluster topology ------------------------------------------------

    def on_connected(self, listener: Listener) -> None:
        """A listener connected: count it if it replaces a lost connection (ListenerHandler)."""
        if listener.connections > 1:
            self.reconnects += 1

    def on_disconnected(self, listener: Listener) -> None:
        """A listener lost its node: its slots may have moved (ListenerHandler)."""
        self.on_topology_changed()

    def on_topology_changed(self) -> None:
        """A listener lost its node or a slot moved: read the cluster's slots again.

        (ListenerHandler.) Outside a cluster nothing waits on this.
        """
        self._topology_stale.set()

    async def _follow_topology(self) -> None:
        """Keep one listener per master and each subscription on its slot's owner."""
        assert isinstance(self._redis, RedisCluster)
        low, high = self._listener_options.reconnect_delay
        delay = low
        while True:
            self._topology_stale.clear()
            try:
                await self._redis.nodes_manager.initialize()
                await self._place_subscriptions(self._redis)
            except UNREACHABLE as error:
                if delay == low:
                    logger.warning("redis cluster: cannot read its slots (%s); retrying", error)
                self._topology_read.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, high)
                continue
            delay = low
            self._topology_read.set()
            await self._topology_stale.wait()
            await asyncio.sleep(low)  # one read for a burst of reports

    async def _place_subscriptions(self, cluster: RedisCluster) -> None:
        masters = {node.name: node for node in cluster.get_primaries()}
        for node in masters.values():
            self._listener_on(node)
        for subscription in list(self._subscriptions.values()):
            listener = self._listener_for(subscription.keys)
            if subscription.listener is listener or subscription.has_failed:
                continue  # in place, or failed and waiting for the bus's unsubscribe
            # The old shard already dropped it (or is gone): no SUNSUBSCRIBE there.
            if subscription.listener is not None:
                await subscription.listener.remove(subscription, unsubscribe=False)
            logger.info("redis cluster: %s moved to %s", subscription.channel, listener.name)
            await listener.add(subscription)  # its confirmation catches up from the stream
            if self._subscriptions.get(subscription.channel) is not subscription:
                await listener.remove(subscription)  # unsubscribed meanwhile
        for name, listener in list(self._listeners.items()):
            if name not in masters and not listener.subscriptions:
                del self._listeners[name]
                await listener.stop()

    # -- publishing and history ------------------------------------------

    @contextlib.contextmanager
    def _reached(self) -> Iterator[Redis | RedisCluster]:
        """The Redis client; BrokerUnavailable if Redis is not reachable, before or during."""
        if not self.is_available or self._redis is None:
            raise BrokerUnavailable("redis is not reachable")
        try:
            yield self._redis
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None

    async def control(self, message: Mapping[str, Any]) -> None:
        with self._reached() as redis:
            await self._control.publish(redis, message)

    async def revoke(self, revocation: Revocation) -> None:
        with self._reached() as redis:
            await self._control.revoke(redis, revocation)

    async def join(
        self,
        connection_id: str,
        user: str,
        info: str,
        channels: Collection[str],
        *,
        snapshot: Collection[str] = (),
        limit: int | None = None,
    ) -> dict[str, PresenceSnapshot]:
        with self._reached() as redis:
            return await self._presence.join(
                redis, connection_id, user, info, channels, snapshot=snapshot, limit=limit
            )

    async def leave(self, connection_id: str, channels: Collection[str]) -> None:
        with self._reached() as redis:
            await self._presence.leave(redis, connection_id, channels)

    async def presence(
        self, channels: Collection[str], *, limit: int | None = None
    ) -> dict[str, PresenceSnapshot]:
        with self._reached() as redis:
            return await self._presence.read(redis, channels, limit)

    def _to_bus(self, message: Mapping[str, Any] | None) -> None:
        if message is None or self._on_control is None:
            return
        try:
            self._on_control(message)
        except Exception:  # a bad message must not take the listener down
            logger.exception("redis broker: control message %r failed", message.get("type"))

    async def admit_connection(self, user: str, limit: int, here: int) -> bool:
        return await self._users.take(self._redis, user, limit)

    def release_connection(self, user: str) -> None:
        self._users.release(user)

    async def share_options(self, writers_view: Mapping[str, Any]) -> None:
        await share_options(self._redis, self.prefix, writers_view)
        self._keep_every = shortest_ttl(writers_view) / 3
        self._share_empty_for = _share_empty_for(shortest_ttl(writers_view))
        if self._tasks:  # started: _keep starts again with it
            self._tasks[0].cancel()
            self._tasks[0] = asyncio.get_running_loop().create_task(self._keep())

    async def publish(
        self,
        channel: str,
        data: str,
        *,
        message_id: str | None = None,
        history: HistoryOptions | None = None,
    ) -> Published:
        """PUBLISH_SCRIPT, in the next pipeline with every publish made meanwhile."""
        publication = Publication(channel, data, message_id, history)
        with self._reached():
            (answer,) = await self._publishes.call([self._publish_call(publication)])
            if isinstance(answer, Exception):
                raise answer  # its own: UNREACHABLE ones turn into BrokerUnavailable
        return parse_published(channel, answer)

    async def publish_many(self, publications: Sequence[Publication]) -> list[Published]:
        """PUBLISH_SCRIPT for each, in order, in the next pipeline (as `publish`).

        A pipeline keeps its commands' order on its connection (on each shard's,
        in a cluster), so each channel's offsets follow the batch's order.
        """
        calls = [self._publish_call(publication) for publication in publications]
        with self._reached():
            answers = await self._publishes.call(calls)
        published: list[Published] = []
        for publication, answer in zip(publications, answers, strict=True):
            if isinstance(answer, Exception):
                raise BrokerUnavailable(f"redis: {answer}", published=published)
            published.append(parse_published(publication.channel, answer))
        return published

    def _publish_call(self, publication: Publication) -> ScriptCall:
        keys, args = publish_arguments(
            ChannelKeys.of(self.prefix, publication.channel),
            publication.data,
            publication.message_id,
            publication.history or self._history,
            sharded=self.sharded,
        )
        return ScriptCall(_PUBLISH, tuple(keys), tuple(args))

    async def _run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """One batch of the autopipelines, on one of the broker's connections."""
        if self._redis is None:
            raise BrokerUnavailable("the broker is not started")
        async with self._connection_slots:
            return await run_scripts(self._redis, calls)

    async def publish_ephemeral(self, channel: str, data: str) -> None:
        keys = ChannelKeys.of(self.prefix, channel)
        with self._reached() as redis:
            async with self._connection_slots:
                await publish_ephemeral(redis, keys, data, sharded=self.sharded)

    async def delivered_position(self, channel: str) -> Position | None:
        """The last message delivered from `channel`, once Redis confirmed its subscription
        and while its connection is up: a connect storm's sockets start there without a
        round trip each. An empty channel's position, read from Redis since the
        subscription, serves only while that read is recent (_SHARE_EMPTY_FOR)."""
        subscription = self._subscriptions.get(channel)
        if subscription is None:
            return None
        if not await self._confirmed(subscription):  # its first subscriber waits for Redis
            raise BrokerUnavailable(_UNCONFIRMED)
        last, listener = subscription.last, subscription.listener
        if last is None or listener is None or not listener.is_connected:
            return None
        if EmptyEpoch.parse(last.epoch) is None:
            return last
        age = asyncio.get_running_loop().time() - subscription.read_at
        return last if age < self._share_empty_for else None

    async def history(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        asked_at = asyncio.get_running_loop().time()
        try:
            tops = await self._read({c: (p, False) for c, p in since.items()})
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        for channel, top in tops.items():
            if since[channel] is None:
                self._read_empty(channel, top.position, asked_at)
        ttls = {c: (options or {}).get(c, self._history).ttl for c in tops}
        return {
            c: recover(since[c], t.position, t.first, t.messages, now=t.now, ttl=ttls[c])
            for c, t in tops.items()
        }

    async def history_for_subscribers(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        # A subscribe still waiting for Redis must land first, or this read
        # could miss a message published between it and the subscription; one
        # Redis never confirmed leaves its joiners nothing to hear.
        for channel in since:
            subscription = self._subscriptions.get(channel)
            if subscription is not None and not await self._confirmed(subscription):
                raise BrokerUnavailable(_UNCONFIRMED)
        histories = await self.history(since, options=options)
        await self._delivered_up_to({c: h.position for c, h in histories.items()})
        return histories

    async def _delivered_up_to(self, tops: Mapping[str, Position]) -> None:
        """Wait until this node has delivered each channel it listens to up to its top
        read from Redis, at most 2 socket timeouts in all.

        A subscriber starts at the top it read and gets what the node delivers
        after it: delivered again, the messages between the node's position and
        that top (still on their way, or a catch-up's after a lost connection)
        would reach it twice.
        """
        waits = []
        for channel, top in tops.items():
            subscription = self._subscriptions.get(channel)
            if subscription is not None and subscription.is_behind(top):
                waiter = asyncio.get_running_loop().create_future()
                subscription.behind = [*(subscription.behind or ()), (top, waiter)]
                waits.append(waiter)
        if not waits:
            return
        try:
            async with asyncio.timeout(self._socket_timeout * 2):
                await asyncio.gather(*waits)
        except TimeoutError:
            raise BrokerUnavailable("redis: this node did not catch up with the channel") from None

    def _caught_up(self, subscription: Subscription) -> None:
        """Wake the reads waiting for `subscription` to deliver what they found."""
        subscription.is_waking = False
        waiting = []
        for top, waiter in subscription.behind or ():
            if waiter.done():
                continue
            if subscription.is_behind(top):
                waiting.append((top, waiter))
            else:
                waiter.set_result(None)
        subscription.behind = waiting or None

    def _read_empty(self, channel: str, top: Position, asked_at: float) -> None:
        """A read asked at `asked_at` (loop time) found `channel` still empty: later
        subscribers may start there too.

        Only while the node has delivered nothing from it either: the read was
        made after the subscription was confirmed, so whatever comes after it
        reaches this node live.
        """
        subscription = self._subscriptions.get(channel)
        if (
            subscription is None
            or not subscription.is_confirmed
            or subscription.last is None
            or subscription.listener is None
            or not subscription.listener.is_connected
        ):
            return
        now, last = EmptyEpoch.parse(top.epoch), EmptyEpoch.parse(subscription.last.epoch)
        if now is not None and last is not None and now.generation == last.generation:
            subscription.last = top
            subscription.read_at = asked_at

    async def _read(self, since: Mapping[str, tuple[Position | None, bool]]) -> dict[str, Top]:
        """Run HISTORY_SCRIPT for each channel, in the next pipeline with every read
        made meanwhile (a connect storm's position reads of one channel share one)."""
        ttl = milliseconds(self._history.ttl)
        calls = []
        for channel, (position, whole_new_epoch) in since.items():
            keys = ChannelKeys.of(self.prefix, channel)
            arguments = (
                ttl,
                position.epoch if position else "",
                position.offset if position else 0,
                "1" if whole_new_epoch else "0",
            )
            calls.append(ScriptCall(_HISTORY, (keys.meta, keys.stream), arguments))
        answers = await self._reads.call(calls)
        tops = {}
        for channel, answer in zip(since, answers, strict=True):
            if isinstance(answer, Exception):
                raise answer
            tops[channel] = parse_top(channel, answer)
        return tops

    async def _keep(self) -> None:
        """Keep subscribed channels' history and epoch alive past the TTL, like MemoryBroker.

        PEXPIRE extends only keys that exist: a channel nobody published to
        keeps no state in Redis, however long it is subscribed.
        """
        ttl = milliseconds(self._history.ttl)
        while True:
            await asyncio.sleep(self._keep_every or self._history.ttl / 3)
            channels = [c for c in self._subscriptions if c != CONTROL_CHANNEL]
            for start in range(0, len(channels), 500):
                with contextlib.suppress(*UNREACHABLE):
                    await self._extend(channels[start : start + 500], ttl)

    async def _extend(self, channels: list[str], ttl: int) -> None:
        if self._redis is None:
            return
        calls = []
        for channel in channels:
            keys = ChannelKeys.of(self.prefix, channel)
            calls.append(ScriptCall(_KEEP, (keys.meta, keys.stream), (ttl,)))  # by its own TTL
        async with self._connection_slots:
            await run_scripts(self._redis, calls)

    async def on_message(self, subscription: Subscription, payload: bytes) -> None:
        """Deliver a live message, catching up first if one was missed (ListenerHandler)."""
        if subscription.channel == CONTROL_CHANNEL:
            self._to_bus(self._control.parse(payload))
            return
        if payload[:1] == PRESENCE_MARK:
            event = RedisPresence.parse(subscription.channel, payload)
            if event is not None and self._on_presence is not None:
                self._on_presence(event)
            return
        ephemeral = parse_ephemeral(payload)
        if ephemeral is not None:
            if self._on_ephemeral is not None:
                self._on_ephemeral(subscription.channel, ephemeral)
            return
        epoch_bytes, offset_bytes, data = payload.split(b" ", 2)
        epoch, offset = epoch_bytes.decode(), int(offset_bytes)
        last = subscription.last
        if last is not None and is_gap(last, epoch, offset):
            # Something was missed (a new epoch, or a gap): take it from the stream.
            await self._catch_up(subscription)
            last = subscription.last
        if is_delivered(last, epoch, offset):
            return
        self._hand_over(subscription, Message(subscription.channel, offset, epoch, data.decode()))

    async def on_subscribed(self, subscription: Subscription) -> None:
        """Redis confirmed a subscription: catch up from the stream (ListenerHandler).

        For the control channel, that is every revocation in force.
        """
        if subscription.channel != CONTROL_CHANNEL:
            await self._catch_up(subscription)
        elif self._redis is not None:
            self._to_bus(await self._control.load(self._redis))

    async def _catch_up(self, subscription: Subscription) -> None:
        """Deliver what the stream holds after the last delivered offset (on (re)subscribe)."""
        last = subscription.last
        asked_at = asyncio.get_running_loop().time()
        listener = subscription.listener
        connection = listener.connections if listener is not None else 0
        answer = await self._read({subscription.channel: (last, last is not None)})
        top = answer[subscription.channel]
        subscription.read_at = asked_at
        if subscription.listener is listener:  # not moved to another shard meanwhile
            subscription.caught_up_on = connection
        if last is None:
            # A new subscription starts at the top: its subscribers read the rest as history.
            subscription.last = top.position
            self._wake(subscription)
            return
        if top.messages and top.position.epoch == last.epoch and top.first > last.offset + 1:
            logger.warning(
                "redis broker: %s offsets %d to %d fell out of the history while disconnected",
                subscription.channel,
                last.offset + 1,
                top.first - 1,
            )
        # Each message once, and never back, should another catch-up of it (on a
        # cluster's old and new shard) have delivered some meanwhile.
        for message in top.messages:
            if not is_delivered(subscription.last, message.epoch, message.offset):
                self._hand_over(subscription, message)
        if not is_delivered(subscription.last, top.position.epoch, top.position.offset):
            subscription.last = top.position
        self._wake(subscription)

    def _hand_over(self, subscription: Subscription, message: Message) -> None:
        subscription.last = Position(message.offset, message.epoch)
        if self._deliver is not None and self._subscriptions.get(message.channel) is subscription:
            self._deliver(message)
        if subscription.behind:  # per message: the check inline, the call when needed
            self._wake(subscription)

    def _wake(self, subscription: Subscription) -> None:
        """Check the reads waiting for `subscription` once this tick, whatever it delivers."""
        if subscription.behind and not subscription.is_waking:
            subscription.is_waking = True
            asyncio.get_running_loop().call_soon(self._caught_up, subscription)

