"""The Bus: publish, deliver to the registry, and the glue to the broker."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .brokers.base import Broker, History, HistoryOptions, Message, Published, check_publish
from .connection import Connection, WriteScheduler
from .errors import BrokerUnavailable
from .grants import is_valid_channel, may
from .protocol import CloseCode, Position, encode_data, encode_message, text_frame
from .registry import Registry
from .settings import Settings
from .tokens import Claims, TokenVerifier

__all__ = ["Bus", "SubscribeResult"]

logger = logging.getLogger("aiohttp_wsbus")


@dataclass(slots=True)
class SubscribeResult:
    """What became of a request to subscribe to some channels."""

    subscribed: list[str] = field(default_factory=list)
    denied: dict[str, str] = field(default_factory=dict)
    recovered: dict[str, bool] = field(default_factory=dict)
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "subscribed": self.subscribed,
            "denied": self.denied,
            "recovered": self.recovered,
            "positions": self.positions,
        }


class Bus:
    """Publishes messages and delivers them to the sockets whose grants cover the channel."""

    def __init__(self, settings: Settings, broker: Broker, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.broker = broker
        self.verifier = verifier
        self.registry = Registry()
        self.connections: set[Connection] = set()
        self.open_sockets = 0  # upgraded sockets, authenticated or not
        # Plain counters, read by the metrics collector at scrape time.
        self.messages_published = 0
        self.messages_delivered = 0  # one per subscriber a message was handed to
        self.slow_consumer_closes = 0
        self.auth_failures: collections.Counter[str] = collections.Counter()
        self._scheduler: WriteScheduler | None = None
        self._background_tasks: set[asyncio.Task[None]] = set()

    # -- lifetime --------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        self._scheduler = WriteScheduler(asyncio.get_running_loop())
        await self.verifier.start(session)
        history = HistoryOptions(self.settings.history_size, self.settings.history_ttl)
        await self.broker.start(self.deliver, history)

    async def stop(self) -> None:
        await self.close_all(CloseCode.GOING_AWAY)
        await self.broker.stop()
        await self.verifier.stop()

    async def close_all(self, code: CloseCode) -> None:
        """Close every socket with `code`, concurrently, each under close_timeout."""
        for connection in list(self.connections):
            connection.close(code)
        if self._background_tasks:
            await asyncio.gather(*self._background_tasks, return_exceptions=True)

    # -- publishing ------------------------------------------------------

    async def publish(self, channel: str, data: Any, *, id: str | None = None) -> Published:
        """Publish `data` (any JSON value) to `channel`; return where it landed.

        Raises InvalidChannel for a bad name, ValueError for data that is not
        JSON or a bad id, and BrokerUnavailable when the broker is down.
        """
        return await self.publish_encoded(channel, encode_data(data), message_id=id)

    async def publish_encoded(
        self, channel: str, data: str, *, message_id: str | None = None
    ) -> Published:
        """Publish data that is already JSON text."""
        check_publish(channel, message_id)
        published = await self.broker.publish(channel, data, message_id=message_id)
        if not published.is_repeat:
            self.messages_published += 1
        return published

    def deliver(self, message: Message) -> None:
        """Hand one message to its channel's subscribers (called by the broker)."""
        subscribers = self.registry.subscribers(message.channel)
        if not subscribers:
            return
        frame = _frame(message)
        self.messages_delivered += len(subscribers)
        for connection in subscribers:
            connection.deliver(message, frame)

    # -- connections -----------------------------------------------------

    def connect(self, socket: Any, transport: asyncio.Transport, claims: Claims) -> Connection:
        """Register an authenticated socket; it closes itself at exp + leeway."""
        assert self._scheduler is not None, "the bus is not started"
        connection = Connection(
            secrets.token_urlsafe(12),
            socket,
            transport,
            claims,
            scheduler=self._scheduler,
            send_buffer_limit=self.settings.send_buffer_limit,
            on_close=self._forget,
            closer=self._start_closing,
        )
        self.connections.add(connection)
        connection.expire_at(asyncio.get_running_loop(), claims.expires_at + self.settings.leeway)
        return connection

    def _forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if connection.close_code == CloseCode.SLOW_CONSUMER:
            self.slow_consumer_closes += 1
        connection.pending = None
        self._drop_interest(self.registry.remove_all(connection))

    def _start_closing(self, connection: Connection, code: CloseCode) -> None:
        task = asyncio.get_running_loop().create_task(
            connection.send_close(code, self.settings.close_timeout)
        )
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    def _drop_interest(self, channels: Collection[str]) -> None:
        """Tell the broker this node no longer needs `channels`."""
        for channel in channels:
            task = asyncio.get_running_loop().create_task(self._unsubscribe_broker(channel))
            self._background_tasks.add(task)
            task.add_done_callback(self._background_tasks.discard)

    async def _unsubscribe_broker(self, channel: str) -> None:
        # A subscriber may have come back while this was scheduled.
        if self.registry.subscribers(channel):
            return
        with contextlib.suppress(BrokerUnavailable):  # it forgets interest on reconnect
            await self.broker.unsubscribe(channel)

    async def subscribe(
        self,
        connection: Connection,
        channels: list[str],
        since: Mapping[str, Position],
        reply: Callable[[SubscribeResult], dict[str, Any]],
    ) -> SubscribeResult:
        """Subscribe `connection` to the granted channels among `channels`.

        Queues `reply(result)` (a welcome or subscribed frame), then, for each
        channel with a position in `since` that can be recovered, the missed
        messages, then the live ones that arrived meanwhile: no gap, no duplicate.
        """
        result = SubscribeResult()
        accepted = self._admit(connection, channels, result)
        for channel in accepted:
            # Held from the moment it joins the registry until the replay is queued.
            connection.hold(channel)
            if self.registry.add(connection, channel):
                try:
                    await self.broker.subscribe(channel)
                except BrokerUnavailable:
                    self._drop(connection, [channel])
                    result.denied[channel] = "unavailable"
        accepted = [c for c in accepted if c in connection.channels]
        histories: dict[str, History] = {}
        if accepted:
            try:
                histories = await self.broker.history({c: since.get(c) for c in accepted})
            except BrokerUnavailable:
                self._drop(connection, accepted)
                result.denied.update(dict.fromkeys(accepted, "unavailable"))
                accepted = []
        # Revoked or closed while the broker answered: those are gone already.
        accepted = [c for c in accepted if c in connection.channels]
        for channel in accepted:
            history = histories[channel]
            result.subscribed.append(channel)
            result.positions[channel] = history.position.as_json()
            if channel in since:
                result.recovered[channel] = history.recovered
        connection.send(reply(result))
        for channel in accepted:
            self._go_live(connection, channel, histories[channel], since.get(channel))
        return result

    def _go_live(
        self, connection: Connection, channel: str, history: History, since: Position | None
    ) -> None:
        held = connection.release(channel)
        epoch = history.position.epoch
        last = history.position.offset
        if since is not None and history.recovered:
            last = since.offset
            for message in history.messages:
                if message.offset > last:
                    connection.enqueue(_frame(message, recovered=True))
                    last = message.offset
        for message in held:
            if last == 0 and message.offset == 1:
                epoch = message.epoch  # a channel's first message starts its epoch
            if message.epoch == epoch and message.offset > last:
                connection.enqueue(_frame(message))
                last = message.offset

    def _admit(
        self, connection: Connection, channels: list[str], result: SubscribeResult
    ) -> list[str]:
        accepted: list[str] = []
        room = self.settings.max_channels - len(connection.channels)
        for channel in channels:
            if not is_valid_channel(channel):
                result.denied[channel] = "invalid"
            elif not may(connection.claims.subscribe, channel):
                result.denied[channel] = "forbidden"
            elif channel in connection.channels:
                result.subscribed.append(channel)
            elif room <= 0:
                result.denied[channel] = "limit"
            else:
                accepted.append(channel)
                room -= 1
        return accepted

    def _drop(self, connection: Connection, channels: list[str]) -> None:
        for channel in channels:
            connection.release(channel)
        self._drop_interest([c for c in channels if self.registry.remove(connection, c)])

    def unsubscribe(self, connection: Connection, channels: list[str]) -> list[str]:
        """Unsubscribe from those of `channels` the connection has; return them."""
        left = [c for c in channels if c in connection.channels]
        self._drop(connection, left)
        return left

    def regrant(self, connection: Connection, claims: Claims) -> list[str]:
        """Switch to a refreshed token's claims; return the channels it no longer grants."""
        connection.claims = claims
        revoked, emptied = self.registry.regrant(connection)
        for channel in revoked:
            connection.release(channel)
        self._drop_interest(emptied)
        connection.expire_at(asyncio.get_running_loop(), claims.expires_at + self.settings.leeway)
        return revoked


def _frame(message: Message, *, recovered: bool = False) -> bytes:
    return text_frame(
        encode_message(
            message.channel, message.offset, message.epoch, message.data, recovered=recovered
        )
    )
