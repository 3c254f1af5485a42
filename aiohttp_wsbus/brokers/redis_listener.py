"""RedisBroker's pub/sub side: one supervised connection per Redis node.

A Listener owns a connection and the subscriptions it carries; it tells the
broker what happened through the small ListenerHandler interface and never
reaches into the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.connection import Connection
from redis.exceptions import MovedError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..protocol import Position
from .redis_scripts import UNREACHABLE, ChannelKeys

__all__ = [
    "Listener",
    "ListenerHandler",
    "ListenerOptions",
    "Subscription",
    "address",
    "is_delivered",
    "is_gap",
]

logger = logging.getLogger("aiohttp_wsbus")


@dataclass(slots=True)
class Subscription:
    """One channel this node listens to, and the last offset it delivered."""

    channel: str
    keys: ChannelKeys
    ready: asyncio.Future[None]
    last: Position | None = None
    listener: Listener | None = None
    read_at: float = 0.0  # loop time of the last read of its top from Redis
    settled: asyncio.Future[None] | None = None  # RedisBroker._confirmed's, while waited on
    leaving: asyncio.TimerHandle | None = None  # its last subscriber left: unsubscribe then
    caught_up_on: int = 0  # the listener's connection its last catch-up ran on
    # Reads that found the channel past what this node delivered, waiting for it,
    # and whether a check of them is due this tick.
    behind: list[tuple[Position, asyncio.Future[None]]] | None = None
    is_waking: bool = False

    @property
    def is_confirmed(self) -> bool:
        """Whether Redis confirmed it (`ready` cancelled: it failed, or was dropped)."""
        return self.ready.done() and not self.ready.cancelled()

    @property
    def has_failed(self) -> bool:
        """Whether it failed or was dropped: kept only until the bus unsubscribes."""
        return self.ready.cancelled()

    @property
    def is_live(self) -> bool:
        """Whether it has caught up on its listener's current connection, which is up."""
        listener = self.listener
        return (
            listener is not None
            and listener.is_connected
            and self.caught_up_on == listener.connections
        )

    def is_behind(self, top: Position) -> bool:
        """Whether this node has yet to deliver `top` (a channel position read from Redis)."""
        if top.offset == 0:
            return False  # nothing to deliver twice: whatever comes next is news to all
        if not self.is_live:
            return True  # its catch-up will deliver what it missed, maybe up to `top`
        last = self.last
        if last is None:
            return False
        # Another epoch: `top` is in one the node has yet to hear (an empty channel's first
        # message, or a channel Redis lost started again), still on its way. (If the node
        # already moved past it to a newer one, the read waits out its time: unavailable.)
        return last.epoch != top.epoch or last.offset < top.offset


class ListenerHandler(Protocol):
    """What a Listener tells its broker (RedisBroker implements it)."""

    def on_connected(self, listener: Listener) -> None:
        """Redis answered on a new connection of `listener` (its `connections`-th)."""

    def on_disconnected(self, listener: Listener) -> None:
        """`listener` lost its connection, or could not make one; it retries by itself."""

    async def on_subscribed(self, subscription: Subscription) -> None:
        """Redis confirmed `subscription` (again, after a reconnect): catch up from the stream."""

    async def on_message(self, subscription: Subscription, payload: bytes) -> None:
        """A live message arrived on a confirmed subscription."""

    def on_topology_changed(self) -> None:
        """A subscribed slot moved: read the cluster's slots again."""


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    """How a broker's listeners talk to Redis; one value, shared by all of them."""

    sharded: bool  # SSUBSCRIBE instead of SUBSCRIBE
    timeout: float  # a connection that has not answered for this long is not connected
    ping_interval: float  # PING a connection silent for this long (at most timeout / 2)
    reconnect_delay: tuple[float, float]  # backoff between attempts: from, doubling up to
    warning_interval: float  # at most one "cannot reach" warning per node per this long


class Listener:
    """One supervised pub/sub connection to one Redis node, and the channels it carries.

    On a lost connection it reconnects with backoff and subscribes again; Redis
    confirming each subscription makes the handler catch up from the stream
    first. It logs a node it cannot reach (a WARNING at most every
    `warning_interval` seconds while that lasts, an INFO when it is back),
    naming it by `name` alone: never the URL, which may hold a password.
    """

    def __init__(
        self,
        handler: ListenerHandler,
        name: str,
        make_connection: Callable[[], Connection],
        options: ListenerOptions,
    ) -> None:
        self.name = name
        self.subscriptions: dict[bytes, Subscription] = {}
        self.first_attempt = asyncio.Event()
        self.connections = 0  # connections Redis answered on, the first one included
        self._handler = handler
        self._make_connection = make_connection
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._connection: Connection | None = None
        self._heard_at: float | None = None  # Redis's last answer on this connection
        self._pinged_at: float | None = None  # a PING still unanswered, sent then
        self._down_since: float | None = None
        self._warned_at = -math.inf
        self._write_lock = asyncio.Lock()
        self._task = self._loop.create_task(self._listen_forever())

    @property
    def is_connected(self) -> bool:
        """Whether Redis answered on this connection, and any PING within `timeout` seconds.

        A frozen Redis keeps its TCP connections open: only its silence tells,
        counted from the PING it leaves unanswered, so a busy event loop that
        reads a quiet connection late is not mistaken for it.
        """
        if self._heard_at is None:
            return False
        pinged_at = self._pinged_at
        return pinged_at is None or self._loop.time() - pinged_at <= self._options.timeout

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def add(self, subscription: Subscription) -> None:
        subscription.listener = self
        subscription.caught_up_on = 0  # here, once its confirmation's catch-up has run
        async with self._write_lock:
            self.subscriptions[subscription.keys.pubsub.encode()] = subscription
            await self._send_quietly("SUBSCRIBE", subscription.keys.pubsub)

    async def remove(self, subscription: Subscription, *, unsubscribe: bool = True) -> None:
        name = subscription.keys.pubsub.encode()
        if self.subscriptions.get(name) is subscription:
            del self.subscriptions[name]
        if unsubscribe:
            async with self._write_lock:
                # Subscribed again meanwhile (a new Subscription under the same name):
                # Redis holds one subscription per name, and it is the new one's now.
                if name not in self.subscriptions:
                    await self._send_quietly("UNSUBSCRIBE", subscription.keys.pubsub)

    def _command(self, name: str) -> str:
        return "S" + name if self._options.sharded else name

    async def _send_quietly(self, command: str, name: str) -> None:
        # Losing the connection here is the supervisor's to notice: it resubscribes.
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(*UNREACHABLE):
                await connection.send_command(self._command(command), name)

    async def _listen_forever(self) -> None:
        low, high = self._options.reconnect_delay
        delay = low
        while True:
            connections = self.connections
            try:
                await self._listen()
            except UNREACHABLE as error:
                self._lost(str(error) or type(error).__name__)
            except Exception:
                logger.exception("redis broker listener for %s failed; reconnecting", self.name)
            self.first_attempt.set()
            self._handler.on_disconnected(self)
            if self.connections > connections:  # it was connected: retry at once
                delay = low
            await asyncio.sleep(delay)
            delay = min(delay * 2, high)

    def _lost(self, reason: str) -> None:
        now = self._loop.time()
        if self._down_since is None:
            self._down_since = now
        if now - self._warned_at < self._options.warning_interval:
            logger.debug("redis broker: %s still unreachable (%s)", self.name, reason)
            return
        self._warned_at = now
        logger.warning("redis broker cannot reach %s (%s); retrying", self.name, reason)

    def _heard(self) -> None:
        is_new = self._heard_at is None
        self._heard_at = self._loop.time()
        self._pinged_at = None
        if not is_new:
            return
        self.connections += 1
        down_since, self._down_since = self._down_since, None
        if down_since is not None and self._warned_at >= down_since:
            seconds = self._heard_at - down_since
            logger.info("redis broker reached %s again after %.1f s", self.name, seconds)
        elif self.connections == 1:
            logger.info("redis broker connected to %s", self.name)
        else:
            logger.debug("redis broker reconnected to %s", self.name)
        self.first_attempt.set()
        self._handler.on_connected(self)

    async def _listen(self) -> None:
        connection = self._make_connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            async with self._write_lock:
                self._connection = connection
                # A copy: `remove` does not wait for the lock to forget a subscription.
                for subscription in list(self.subscriptions.values()):
                    name = subscription.keys.pubsub
                    await connection.send_command(self._command("SUBSCRIBE"), name)
                if not self.subscriptions:
                    await connection.send_command("PING")  # connected once answered
            await self._read_messages(connection)
        finally:
            self._connection = None
            self._heard_at = None
            self._pinged_at = None
            await connection.disconnect(nowait=True)

    async def _read_messages(self, connection: Connection) -> None:
        waiting_for_pong = False
        while True:
            try:
                reply = await connection.read_response(timeout=self._options.ping_interval)
            except MovedError:
                # The subscribed channel's slot is on another shard now.
                self._heard()
                self._handler.on_topology_changed()
                continue
            if reply is None:
                if waiting_for_pong:
                    raise RedisTimeoutError("redis did not answer a ping")
                async with self._write_lock:
                    await connection.send_command("PING")
                    self._pinged_at = self._loop.time()
                waiting_for_pong = True
                continue
            self._heard()
            waiting_for_pong = False
            if isinstance(reply, list) and len(reply) >= 3:
                await self._on_push(reply[0], reply[1], reply[2])

    async def _on_push(self, kind: bytes, name: bytes, payload: Any) -> None:
        subscription = self.subscriptions.get(name)
        if subscription is None:
            return
        if kind in (b"message", b"smessage"):
            if subscription.ready.done():  # earlier ones belong to a past subscription
                await self._handler.on_message(subscription, payload)
        elif kind in (b"subscribe", b"ssubscribe"):
            await self._handler.on_subscribed(subscription)
            if not subscription.ready.done():
                subscription.ready.set_result(None)
        elif kind == b"sunsubscribe":
            # Unasked: a cluster moved the channel's slot to another shard.
            self._handler.on_topology_changed()


def address(options: Mapping[str, Any]) -> str:
    """host:port/db (or the socket path) of a connection, for logs: never its password."""
    where = options.get("path") or f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    return f"{where}/{options.get('db', 0)}"


def is_delivered(last: Position | None, epoch: str, offset: int) -> bool:
    """Whether a node whose last delivered message is `last` has delivered this one."""
    return last is not None and epoch == last.epoch and offset <= last.offset


def is_gap(last: Position, epoch: str, offset: int) -> bool:
    """Whether a live message skips some after `last`.

    At offset 0 (a channel that held nothing) offset 1 of any epoch follows:
    the channel's first message starts the epoch.
    """
    if last.offset == 0 and offset == 1:
        return False
    return epoch != last.epoch or offset > last.offset + 1
