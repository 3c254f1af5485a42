"""What the subscriber client hands the application: Messages, through Subscriptions."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import WsBusError
from .protocol import Position

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "ClientClosed",
    "ClosedByServer",
    "Message",
    "Subscription",
    "SubscriptionDenied",
    "as_position",
]


class ClientClosed(WsBusError):
    """The client was closed: nothing more will arrive."""


class ClosedByServer(ClientClosed):
    """The server closed the socket with a code that tells the client to stop (or report it).

    `code` is the close code (docs/protocol.md), `reason` the server's short reason.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed by server: {code}{f' {reason}' if reason else ''}")
        self.code = code
        self.reason = reason


class SubscriptionDenied(WsBusError):
    """The server will not deliver `channel`: `reason` is forbidden, invalid, limit,
    revoked (a refreshed token no longer grants it) or server (the application took it away)."""

    def __init__(self, channel: str, reason: str) -> None:
        super().__init__(f"subscription to {channel!r} denied: {reason}")
        self.channel = channel
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a channel.

    `recovered`: replayed from the channel's history after a reconnect.
    `after_gap`: messages before this one on its channel may be lost (the
    client could not recover them): reload what this channel feeds.
    `ephemeral`: a live-only message (offset 0, epoch ""): never stored or
    replayed, and no part of the channel's position.
    """

    channel: str
    offset: int
    epoch: str
    data: Any
    recovered: bool = False
    after_gap: bool = False
    ephemeral: bool = False

    @property
    def position(self) -> Position:
        """Where this message is in its channel: save it, subscribe later with `since=`."""
        return Position(self.offset, self.epoch)


def as_position(value: object) -> Position | None:
    """A Position from a Position, a Message, or {"offset": N, "epoch": E}; None for None."""
    if value is None or isinstance(value, Position):
        return value
    if isinstance(value, Message):
        return value.position
    if isinstance(value, Mapping):
        offset, epoch = value.get("offset"), value.get("epoch")
        if isinstance(offset, int) and not isinstance(offset, bool) and isinstance(epoch, str):
            return Position(offset, epoch)
    raise ValueError(f"not a position (offset and epoch): {value!r}")


class _End:
    """Put in a subscription's queue when nothing more will come."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Subscription:
    """A channel the application listens to: `async with` it, then `async for` its Messages.

    Entering waits until the server subscribed it (SubscriptionDenied if it
    will not); iterating ends when the client is closed, or raises the
    server's reason (ClosedByServer, SubscriptionDenied) when it stopped it.
    """

    def __init__(self, client: Client, channel: str, since: Position | None) -> None:
        self.client = client
        self.channel = channel
        self.since = since
        self.ready = asyncio.Event()  # the server subscribed it (or it ended)
        self._queue: asyncio.Queue[Message | _End] = asyncio.Queue(client.max_queued)
        self._end: _End | None = None
        self._taken = asyncio.Event()  # a reader took a message, or the subscription ended

    async def __aenter__(self) -> Subscription:
        await self.client._add(self)
        await self.ready.wait()
        if self._end is not None and self._end.error is not None:
            await self.client._remove(self)
            raise self._end.error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.end(None)
        await self.client._remove(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        is_over = self._end is not None and self._queue.empty()
        item = self._end if is_over and self._end is not None else await self._queue.get()
        self._taken.set()
        if isinstance(item, Message):
            return item
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message, waiting at most `timeout` seconds (TimeoutError after)."""
        async with asyncio.timeout(timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                raise ClientClosed(f"the subscription to {self.channel!r} has ended") from None

    async def put(self, message: Message) -> None:
        """Queue a message; waits while `max_queued` are waiting to be read."""
        while self._end is None:
            if not self._queue.full():
                self._queue.put_nowait(message)
                return
            self._taken.clear()
            await self._taken.wait()

    def end(self, error: BaseException | None) -> None:
        """Nothing more will come: the reader gets what is queued, then `error` or the end."""
        if self._end is not None:
            return
        self._end = _End(error)
        self.ready.set()
        self._taken.set()  # a put waiting for room gives up
        # Wake a reader waiting on an empty queue; a full queue is drained first.
        if self._queue.empty():
            self._queue.put_nowait(self._end)
