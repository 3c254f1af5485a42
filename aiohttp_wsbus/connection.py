"""One client socket: its claims, its subscriptions, its send buffer, its expiry."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from .brokers.base import Message
from .grants import may
from .protocol import SLOW_CONSUMER, TOKEN_EXPIRED, Close, encode, encode_message, text_frame
from .tokens import Claims

__all__ = ["Connection", "ConnectionHub", "Expiries", "WriteScheduler", "message_frame"]

# Up to this many channels a connection keeps them as a tuple, more as a set: a set
# of one channel costs 216 bytes and a garbage-collected container per socket, a
# tuple of strings 48 bytes, untracked after its first collection.
MAX_TUPLE_CHANNELS: Final = 8


class WriteScheduler:
    """Writes every connection's queued frames once per loop tick.

    Frames queued for one socket within a tick leave in one transport write,
    and publishing never waits on any socket.
    """

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Connection] = []
        self._scheduled = False

    def mark(self, connection: Connection) -> None:
        self._dirty.append(connection)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for connection in dirty:
            connection.flush()


class Expiries:
    """Closes each connection with 4001 when its token runs out: one loop timer for all.

    A timer per socket costs a TimerHandle, a bound method and a context per
    connection, and a cancelled one stays in the loop's heap until its time
    would have come (which keeps aiohttp's cancelled keep-alive timers there
    too); here tokens issued in the same second share one entry.
    """

    __slots__ = ("_deadlines", "_due", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Each deadline as first filed (the one float its connections keep) and its
        # connections, as dict keys (about half the bytes of a set's). An emptied
        # entry stays until its deadline passes: no key is ever pushed twice.
        self._due: dict[float, tuple[float, dict[Connection, None]]] = {}
        self._deadlines: list[float] = []  # a heap of _due's keys
        self._timer: asyncio.TimerHandle | None = None

    def add(self, connection: Connection, deadline: float) -> float:
        """Close `connection` at `deadline` (wall-clock seconds); return the deadline as
        held here, for the connection to keep (one float for every socket filed under it)."""
        due = self._due.get(deadline)
        if due is None:
            due = self._due[deadline] = (deadline, {})
            heapq.heappush(self._deadlines, deadline)
            if self._deadlines[0] == deadline:
                self._schedule()
        due[1][connection] = None
        return due[0]

    def discard(self, connection: Connection, deadline: float) -> None:
        """Forget `connection`'s `deadline` (refreshed, or closed)."""
        due = self._due.get(deadline)
        if due is not None:
            due[1].pop(connection, None)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, self._deadlines[0] - time.time())
        self._timer = self._loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.time()
        while self._deadlines and self._deadlines[0] <= now:
            _, due = self._due.pop(heapq.heappop(self._deadlines))
            for connection in due:
                connection.close(TOKEN_EXPIRED)
        if self._deadlines and self._timer is None:
            self._schedule()


class ConnectionHub:
    """What every connection of one bus shares: the write scheduler, the expiry
    timer, the send buffer limit, the bus's close callbacks (one reference a
    socket instead of five) and what the connections' ids are made of."""

    __slots__ = (
        "closer",
        "expiries",
        "id_prefix",
        "numbers",
        "on_close",
        "scheduler",
        "send_buffer_limit",
    )

    def __init__(
        self,
        *,
        scheduler: WriteScheduler,
        expiries: Expiries,
        send_buffer_limit: int,
        on_close: Callable[[Connection], None],
        closer: Callable[[Connection, Close], None],
    ) -> None:
        self.scheduler = scheduler
        self.expiries = expiries
        self.send_buffer_limit = send_buffer_limit
        self.on_close = on_close
        self.closer = closer
        # A connection's id is this prefix (random per process: ids stay unique
        # across workers and restarts, as presence needs) and its number here.
        self.id_prefix = secrets.token_urlsafe(9)
        self.numbers = itertools.count(1)


class Connection:
    """A subscribed client socket, as the bus sees it."""

    __slots__ = (
        "__weakref__",
        "_expiry",
        "_hub",
        "_outbox",
        "allowed",
        "channels",
        "claims",
        "closed_with",
        "closing",
        "is_announced",
        "number",
        "pending",
        "socket",
        "transport",
    )

    def __init__(
        self,
        socket: web.WebSocketResponse,
        transport: asyncio.Transport,
        claims: Claims,
        hub: ConnectionHub,
    ) -> None:
        # Kept as a number, its id made at each read: an id string per idle socket
        # cost 65 bytes.
        self.number = next(hub.numbers)
        self.socket = socket
        self.transport = transport
        self.claims = claims
        # The subscribed channels, in the order subscribed while few (see
        # MAX_TUPLE_CHANNELS); changed by `join` and `leave` only.
        self.channels: tuple[str, ...] | set[str] = ()
        # Channels an authorizer allowed this socket (None: none; most sockets).
        self.allowed: set[str] | None = None
        self.is_announced = False  # on_connect accepted it: on_disconnect will follow
        # Channels being recovered: live messages (and presence frames, as bytes)
        # wait here until the replay is out. Made only while a subscribe is in
        # flight: idle sockets carry no dict.
        self.pending: dict[str, list[Message | bytes]] | None = None
        self.closed_with: Close | None = None  # set by `close`: then it sends nothing more
        self.closing: asyncio.Task[None] | None = None  # the close being sent
        self._hub = hub
        # None while nothing waits; one frame is kept as bytes, several as a list.
        # Bytes are not tracked by the garbage collector: a message queued for
        # 10000 sockets must not create 10000 containers, or the collections it
        # triggers stall the loop (seen as a 3x p99 latency at 10000 subscribers).
        self._outbox: bytes | list[bytes] | None = None
        self._expiry: float | None = None  # the deadline it is filed under in the hub's expiries

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.claims.subject!r}>"

    @property
    def id(self) -> str:
        """This connection's id (the welcome frame's `client`), unique across processes."""
        return f"{self._hub.id_prefix}{self.number:x}"

    @property
    def is_closing(self) -> bool:
        """Whether `close` was called: the connection left the registry and sends nothing."""
        return self.closed_with is not None

    @property
    def send_buffer_limit(self) -> int:
        """Bytes waiting to be written above which the peer is a slow consumer."""
        return self._hub.send_buffer_limit

    def join(self, channel: str, alone: tuple[str, ...] = ()) -> None:
        """Note `channel` as subscribed here (the registry's part of a subscribe).

        `alone`, if given, is `(channel,)`, kept when it is the only channel: the
        registry hands every such socket the same tuple.
        """
        channels = self.channels
        if isinstance(channels, set):
            channels.add(channel)
        elif channel not in channels:
            if not channels and alone:
                self.channels = alone
            elif len(channels) < MAX_TUPLE_CHANNELS:
                self.channels = (*channels, channel)
            else:
                self.channels = {*channels, channel}

    def leave(self, channel: str) -> None:
        """Forget `channel` (the registry's part of an unsubscribe)."""
        channels = self.channels
        if isinstance(channels, set):
            channels.discard(channel)
        elif channel in channels:
            self.channels = tuple(c for c in channels if c != channel)

    def may_subscribe(self, channel: str) -> bool:
        """Whether the token's grants cover `channel`, or an authorizer allowed it here."""
        allowed = self.allowed
        return (allowed is not None and channel in allowed) or may(self.claims.subscribe, channel)

    # -- sending ---------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a control frame (welcome, subscribed, ...) for this socket."""
        self.enqueue(text_frame(encode(frame)))

    def enqueue(self, frame: bytes) -> None:
        """Queue a ready-built WebSocket frame; it leaves at the end of this tick."""
        if self.closed_with is not None:  # is_closing, without a call on the delivery path
            return
        outbox = self._outbox
        if outbox is None:
            self._outbox = frame
            self._hub.scheduler.mark(self)
        elif isinstance(outbox, bytes):
            self._outbox = [outbox, frame]
        else:
            outbox.append(frame)

    def hold(self, channel: str) -> None:
        """Hold live messages for `channel` until `release` (its replay goes first)."""
        if self.pending is None:
            self.pending = {}
        self.pending[channel] = []

    def held(self, channel: str) -> int:
        """How many items are held for `channel` so far."""
        held = self.pending.get(channel) if self.pending else None
        return 0 if held is None else len(held)

    def release(self, channel: str) -> list[Message | bytes]:
        """Stop holding `channel`; return what was held, in order."""
        if self.pending is None:
            return []
        held = self.pending.pop(channel, [])
        if not self.pending:
            self.pending = None
        return held

    def deliver(self, message: Message, frame: bytes) -> None:
        """Queue a published message, or hold it while its channel is being recovered."""
        held = self.pending.get(message.channel) if self.pending else None
        if held is not None:
            held.append(message)
        else:
            self.enqueue(frame)

    def deliver_frame(self, channel: str, frame: bytes) -> None:
        """Queue a ready frame about `channel` (a join, a leave), after its replay if
        one is being sent."""
        held = self.pending.get(channel) if self.pending else None
        if held is not None:
            held.append(frame)
        else:
            self.enqueue(frame)

    def flush(self) -> None:
        """Write queued frames to the socket; close it if the peer is not keeping up."""
        outbox = self._outbox
        if outbox is None:
            return
        self._outbox = None
        if self.closed_with is not None or self.transport.is_closing():
            return
        self.transport.write(outbox if isinstance(outbox, bytes) else b"".join(outbox))
        if self.transport.get_write_buffer_size() > self._hub.send_buffer_limit:
            self.close(SLOW_CONSUMER)

    # -- lifetime --------------------------------------------------------

    def expire_at(self, deadline: float) -> None:
        """Close with 4001 at `deadline` (wall-clock seconds) unless refreshed first."""
        if self.is_closing:
            return
        expiries = self._hub.expiries
        if self._expiry is not None:
            expiries.discard(self, self._expiry)
        self._expiry = expiries.add(self, deadline)

    def close(self, close: Close) -> None:
        """Leave the registry now, then close the socket in the background."""
        if self.is_closing:
            return
        if close is not SLOW_CONSUMER:
            self.flush()  # what was queued before the close still goes out
            if self.is_closing:  # the flush found a slow consumer and closed it
                return
        self.closed_with = close
        self._outbox = None
        if self._expiry is not None:
            self._hub.expiries.discard(self, self._expiry)
            self._expiry = None
        self._hub.on_close(self)
        self._hub.closer(self, close)

    async def send_close(self, close: Close, timeout: float) -> None:
        """Send the close frame and wait for the peer; abort the socket if it won't drain."""
        try:
            async with asyncio.timeout(timeout):
                await self.socket.close(
                    code=close.code,
                    message=close.reason.encode(),
                    drain=close is not SLOW_CONSUMER,
                )
        except TimeoutError:
            self.transport.abort()
        except Exception:  # the peer went away mid-close: nothing left to tell it
            with contextlib.suppress(Exception):
                self.transport.abort()


def message_frame(message: Message, *, recovered: bool = False) -> bytes:
    """A published message as one ready WebSocket frame (built once per message)."""
    return text_frame(
        encode_message(
            message.channel, message.offset, message.epoch, message.data, recovered=recovered
        )
    )
