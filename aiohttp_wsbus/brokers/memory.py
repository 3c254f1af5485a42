"""MemoryBroker: one process, no engine; the default, and a complete implementation."""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from .presence import (
    DEFAULT_PRESENCE,
    OnPresence,
    PresenceOptions,
    PresenceSnapshot,
    PresenceTable,
)

__all__ = ["MemoryBroker"]


@dataclass(slots=True)
class _Stream:
    """One channel's offsets, bounded history and recent idempotency ids."""

    epoch: str
    history: HistoryOptions = DEFAULT_HISTORY  # its last publish's
    offset: int = 0
    touched: float = 0.0
    # Each kept message as (offset, data): a tuple of atomic values, which the garbage
    # collector stops tracking, where a Message would be one more object every full
    # collection walks (100 per channel: the collections took a fifth of a busy
    # publisher's CPU). Read back as Messages, rarely.
    messages: deque[tuple[int, str]] = field(default_factory=deque)
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)


class MemoryBroker(Broker):
    """Keeps each channel's last `history.size` messages for `history.ttl` seconds.

    A channel's stream is made by its first publish, with a random epoch: a
    new MemoryBroker (a process restart), or a channel idle past the TTL with
    no subscriber here, starts a new epoch, so clients asking to recover across
    it are told they could not. Reading a channel never makes a stream.

    At most `max_channels` channels keep a stream: past that, the least recently
    used one with no subscriber here is forgotten first, so a flood of distinct
    channels cannot grow memory without bound. Forgetting one before its TTL
    starts a new generation of empty epochs (see EmptyEpoch).
    """

    def __init__(
        self, *, max_channels: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        self._max_channels = max_channels
        self._clock = clock
        self._subscribed: set[str] = set()
        self._deliver: Deliver | None = None
        self._on_control: OnControl | None = None
        self._on_ephemeral: OnEphemeral | None = None
        self._revocations: list[Revocation] = []
        self._on_presence: OnPresence | None = None
        self._presence_options = DEFAULT_PRESENCE
        self._presence = PresenceTable()
        self._history = DEFAULT_HISTORY
        self._generation = secrets.token_hex(8)
        # Least recently touched first, so expiring idle channels is a scan of the head.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

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
        self._on_control = on_control
        self._on_ephemeral = on_ephemeral
        self._on_presence = on_presence
        self._presence_options = presence
        if on_control is not None and self._revocations:
            # Revocations outlive a bus stopped and started again on this broker.
            on_control(self._revocations_message())

    async def stop(self) -> None:
        self._deliver = None
        self._on_control = None
        self._on_ephemeral = None
        self._on_presence = None
        self._presence = PresenceTable()  # the sockets were this process's: all gone

    async def publish_ephemeral(self, channel: str, data: str) -> None:
        if self._on_ephemeral is not None:
            self._on_ephemeral(channel, data)

    async def control(self, message: Mapping[str, Any]) -> None:
        if self._on_control is not None:
            self._on_control(message)

    async def revoke(self, revocation: Revocation) -> None:
        now = time.time()
        self._revocations = [r for r in self._revocations if r.until > now] + [revocation]
        await self.control({"type": "revoke", "revocation": revocation.as_json()})

    def _revocations_message(self) -> dict[str, Any]:
        now = time.time()
        self._revocations = [r for r in self._revocations if r.until > now]
        return {"type": "revocations", "revocations": [r.as_json() for r in self._revocations]}

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
        max_members = self._presence_options.max_members
        for channel in channels:
            event = self._presence.join(channel, connection_id, user, info, max_members)
            if event is not None and self._on_presence is not None:
                self._on_presence(event)
        return await self.presence(snapshot, limit=limit)

    async def leave(self, connection_id: str, channels: Collection[str]) -> None:
        self._leave(connection_id, channels)

    def leave_at_once(self, connection_id: str, channels: Collection[str]) -> bool:
        if type(self).leave is not MemoryBroker.leave:
            return False  # a subclass that wraps leave sees every leave through it
        self._leave(connection_id, channels)
        return True

    def _leave(self, connection_id: str, channels: Collection[str]) -> None:
        limit = self._presence_options.max_members
        for channel in channels:
            event = self._presence.leave(channel, connection_id, limit)
            if event is not None and self._on_presence is not None:
                self._on_presence(event)

    async def presence(
        self, channels: Collection[str], *, limit: int | None = None
    ) -> dict[str, PresenceSnapshot]:
        return {channel: self._presence.snapshot(channel, limit) for channel in channels}

    async def subscribe(self, channel: str) -> None:
        # Every message is local; interest only keeps the stream (and its epoch) alive.
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    @property
    def is_available(self) -> bool:
        return True

    @property
    def channel_count(self) -> int:
        """How many channels hold history or offsets right now."""
        return len(self._streams)

    def _expire(self, now: float) -> None:
        # Streams are in the order they were touched: the scan stops at the first one
        # still within its TTL (one with a shorter TTL behind it waits for _existing).
        while self._streams:
            channel, stream = next(iter(self._streams.items()))
            if stream.touched > now - stream.history.ttl:
                break
            if channel in self._subscribed:
                stream.touched = now
                self._streams.move_to_end(channel)
                continue
            del self._streams[channel]

    def _make_room(self, now: float) -> None:
        # Subscribed streams are skipped (moved to the tail, as if just used);
        # if every stream is subscribed the cap gives way rather than lose them.
        for _ in range(len(self._streams)):
            if len(self._streams) < self._max_channels:
                return
            channel, stream = next(iter(self._streams.items()))
            if channel in self._subscribed:
                stream.touched = now
                self._streams.move_to_end(channel)
            else:
                del self._streams[channel]
                # Lost before its TTL: an empty epoch read before now cannot vouch
                # that nothing was published on any channel since.
                self._generation = secrets.token_hex(8)

    def _existing(self, channel: str, now: float) -> _Stream | None:
        """The channel's stream, touched, or None if it has none (idle ones expire first)."""
        self._expire(now)
        stream = self._streams.get(channel)
        if (
            stream is not None
            and stream.touched <= now - stream.history.ttl
            and channel not in self._subscribed
        ):
            del self._streams[channel]
            stream = None
        if stream is not None:
            self._streams.move_to_end(channel)
            stream.touched = now
        return stream

    def _stream(self, channel: str, now: float) -> _Stream:
        """The channel's stream, touched; made with a new epoch if it has none."""
        stream = self._existing(channel, now)
        if stream is None:
            self._make_room(now)
            stream = self._streams[channel] = _Stream(secrets.token_hex(8), touched=now)
        return stream

    async def publish(
        self,
        channel: str,
        data: str,
        *,
        message_id: str | None = None,
        history: HistoryOptions | None = None,
    ) -> Published:
        return self._publish(channel, data, message_id, history, self._clock())

    async def publish_many(self, publications: Sequence[Publication]) -> list[Published]:
        if type(self).publish is not MemoryBroker.publish:
            # A subclass that wraps publish sees every message of a batch through it.
            return await super().publish_many(publications)
        # One clock read and no coroutine per message: a batch publishes in one go.
        now = self._clock()
        publish = self._publish
        return [publish(p.channel, p.data, p.message_id, p.history, now) for p in publications]

    def _publish(
        self,
        channel: str,
        data: str,
        message_id: str | None,
        history: HistoryOptions | None,
        now: float,
    ) -> Published:
        stream = self._stream(channel, now)
        stream.history = history = history or self._history
        if history.size == 0:
            message_id = None  # no history, no ids: nothing is kept for this channel
            stream.ids.clear()
        if message_id is not None:
            seen = stream.ids.get(message_id)
            if seen is not None and seen[1] > now - history.ttl:
                return Published(channel, seen[0], stream.epoch, is_repeat=True)
        stream.offset += 1
        message = Message(channel, stream.offset, stream.epoch, data)
        stream.messages.append((stream.offset, data))
        while len(stream.messages) > history.size:
            stream.messages.popleft()
        if message_id is not None:
            stream.ids[message_id] = (stream.offset, now)
            self._forget_old_ids(stream, now)
        if self._deliver is not None:
            self._deliver(message)
        return Published(channel, message.offset, stream.epoch)

    def _forget_old_ids(self, stream: _Stream, now: float) -> None:
        # Ids are kept for the TTL; trimming when the table doubles the history
        # keeps this amortised O(1) and the table bounded.
        size = stream.history.size
        if len(stream.ids) <= 2 * size:
            return
        deadline = now - stream.history.ttl
        stream.ids = {k: v for k, v in stream.ids.items() if v[1] > deadline}
        while len(stream.ids) > 2 * size:
            del stream.ids[next(iter(stream.ids))]

    async def history(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        now = self._clock()
        empty = EmptyEpoch(math.floor(now * 1000), self._generation)
        answers: dict[str, History] = {}
        for channel, position in since.items():
            stream = self._existing(channel, now)
            ttl = (options or {}).get(channel, self._history).ttl
            if stream is None:
                answers[channel] = recover(
                    position, Position(0, str(empty)), 1, [], now=empty, ttl=ttl
                )
                continue
            top = Position(stream.offset, stream.epoch)
            messages = stream.messages
            first = messages[0][0] if messages else top.offset + 1
            after = _after(position, stream.epoch)
            held: list[Message] = []
            if after is not None and first <= after + 1 <= top.offset:
                kept = itertools.islice(messages, after + 1 - first, None)
                held = [Message(channel, offset, stream.epoch, data) for offset, data in kept]
            answers[channel] = recover(position, top, first, held, now=empty, ttl=ttl)
        return answers


def _after(position: Position | None, epoch: str) -> int | None:
    """The offset to read after: the position's in this epoch, 0 from an empty epoch."""
    if position is None:
        return None
    if position.epoch == epoch:
        return position.offset
    if position.offset == 0 and EmptyEpoch.parse(position.epoch) is not None:
        return 0
    return None
