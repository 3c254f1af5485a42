"""RedisBroker's pub/sub side: one supervised connection per Redis node.

A Listener owns a connection and the subscriptions it carries; it tells the
broker what happened through the small ListenerHandler interface and never
reaches into the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.connection import Connection
from redis.exceptions import MovedError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..protocol import Position
from .redis_scripts import UNREACHABLE, ChannelKeys

__all__ = ["Listener", "ListenerHandler", "Subscription"]

logger = logging.getLogger("aiohttp_wsbus")


@dataclass(slots=True)
class Subscription:
    """One channel this node listens to, and the last offset it delivered."""

    channel: str
    keys: ChannelKeys
    ready: asyncio.Future[None]
    last: Position | None = None
    listener: Listener | None = None


class ListenerHandler(Protocol):
    """What a Listener tells its broker (RedisBroker implements it)."""

    async def on_subscribed(self, subscription: Subscription) -> None:
        """Redis confirmed `subscription` (again, after a reconnect): catch up from the stream."""

    async def on_message(self, subscription: Subscription, payload: bytes) -> None:
        """A live message arrived on a confirmed subscription."""

    def on_topology_changed(self) -> None:
        """A subscribed slot moved, or the node was lost: read the cluster's slots again."""


class Listener:
    """One supervised pub/sub connection to one Redis node, and the channels it carries.

    On a lost connection it reconnects with backoff and subscribes again; Redis
    confirming each subscription makes the handler catch up from the stream first.
    """

    def __init__(
        self,
        handler: ListenerHandler,
        name: str,
        make_connection: Callable[[], Connection],
        *,
        sharded: bool,
        ping_interval: float,
        reconnect_delay: tuple[float, float],
    ) -> None:
        self.name = name
        self.subscriptions: dict[bytes, Subscription] = {}
        self.is_connected = False
        self.first_attempt = asyncio.Event()
        self._handler = handler
        self._make_connection = make_connection
        self._sharded = sharded
        self._ping_interval = ping_interval
        self._reconnect_delay = reconnect_delay
        self._connection: Connection | None = None
        self._was_connected = False
        self._write_lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def add(self, subscription: Subscription) -> None:
        subscription.listener = self
        async with self._write_lock:
            self.subscriptions[subscription.keys.pubsub.encode()] = subscription
            await self._send_quietly("SUBSCRIBE", subscription.keys.pubsub)

    async def remove(self, subscription: Subscription, *, unsubscribe: bool = True) -> None:
        name = subscription.keys.pubsub.encode()
        if self.subscriptions.get(name) is subscription:
            del self.subscriptions[name]
        if unsubscribe:
            async with self._write_lock:
                await self._send_quietly("UNSUBSCRIBE", subscription.keys.pubsub)

    def _command(self, name: str) -> str:
        return "S" + name if self._sharded else name

    async def _send_quietly(self, command: str, name: str) -> None:
        # Losing the connection here is the supervisor's to notice: it resubscribes.
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(*UNREACHABLE):
                await connection.send_command(self._command(command), name)

    async def _listen_forever(self) -> None:
        low, high = self._reconnect_delay
        delay = low
        while True:
            self._was_connected = False
            try:
                await self._listen()
            except UNREACHABLE as error:
                if self._was_connected:
                    logger.warning("redis connection lost (%s); reconnecting", error)
            except Exception:
                logger.exception("redis broker listener failed; reconnecting")
            self.first_attempt.set()
            self._handler.on_topology_changed()
            if self._was_connected:
                delay = low
            await asyncio.sleep(delay)
            delay = min(delay * 2, high)

    async def _listen(self) -> None:
        connection = self._make_connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            async with self._write_lock:
                self._connection = connection
                for subscription in self.subscriptions.values():
                    name = subscription.keys.pubsub
                    await connection.send_command(self._command("SUBSCRIBE"), name)
                if not self.subscriptions:
                    await connection.send_command("PING")
            self.is_connected = self._was_connected = True
            self.first_attempt.set()
            logger.info("redis broker connected to %s", self.name)
            await self._read_messages(connection)
        finally:
            self._connection = None
            self.is_connected = False
            await connection.disconnect(nowait=True)

    async def _read_messages(self, connection: Connection) -> None:
        waiting_for_pong = False
        while True:
            try:
                reply = await connection.read_response(timeout=self._ping_interval)
            except MovedError:
                # The subscribed channel's slot is on another shard now.
                self._handler.on_topology_changed()
                continue
            if reply is None:
                if waiting_for_pong:
                    raise RedisTimeoutError("redis did not answer a ping")
                async with self._write_lock:
                    await connection.send_command("PING")
                waiting_for_pong = True
                continue
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
