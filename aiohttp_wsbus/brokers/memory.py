"""MemoryBroker: one process, no engine; the default, and a complete implementation."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..protocol import Position
from .base import (
    DEFAULT_HISTORY,
    Broker,
    Deliver,
    History,
    HistoryOptions,
    Message,
    Published,
    recover,
)

__all__ = ["MemoryBroker"]


@dataclass(slots=True)
class _Stream:
    """One channel's offsets, bounded history and recent idempotency ids."""

    epoch: str
    offset: int = 0
    touched: float = 0.0
    messages: deque[Message] = field(default_factory=deque)
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)


class MemoryBroker(Broker):
    """Keeps each channel's last `history.size` messages for `history.ttl` seconds.

    Each channel's stream has a random epoch, made when the stream is: a new
    MemoryBroker (a process restart), or a channel idle past the TTL with no
    subscriber here, starts a new epoch, so clients asking to recover across it
    are told they could not.

    At most `max_channels` channels keep a stream: past that, the least recently
    used one with no subscriber here is forgotten first, so a flood of distinct
    channels cannot grow memory without bound.
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
        self._history = DEFAULT_HISTORY
        # Least recently touched first, so expiring idle channels is a scan of the head.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

    async def start(self, deliver: Deliver, history: HistoryOptions) -> None:
        self._deliver = deliver
        self._history = history

    async def stop(self) -> None:
        self._deliver = None

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
        deadline = now - self._history.ttl
        while self._streams:
            channel, stream = next(iter(self._streams.items()))
            if stream.touched > deadline:
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

    def _stream(self, channel: str, now: float) -> _Stream:
        self._expire(now)
        stream = self._streams.get(channel)
        if stream is None:
            self._make_room(now)
            stream = self._streams[channel] = _Stream(secrets.token_hex(8))
        else:
            self._streams.move_to_end(channel)
        stream.touched = now
        return stream

    async def publish(self, channel: str, data: str, *, message_id: str | None = None) -> Published:
        now = self._clock()
        stream = self._stream(channel, now)
        if message_id is not None:
            seen = stream.ids.get(message_id)
            if seen is not None and seen[1] > now - self._history.ttl:
                return Published(channel, seen[0], stream.epoch)
        stream.offset += 1
        message = Message(channel, stream.offset, stream.epoch, data)
        stream.messages.append(message)
        if len(stream.messages) > self._history.size:
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
        if len(stream.ids) <= 2 * self._history.size:
            return
        deadline = now - self._history.ttl
        stream.ids = {k: v for k, v in stream.ids.items() if v[1] > deadline}
        while len(stream.ids) > 2 * self._history.size:
            del stream.ids[next(iter(stream.ids))]

    async def history(self, since: Mapping[str, Position | None]) -> dict[str, History]:
        now = self._clock()
        answers: dict[str, History] = {}
        for channel, position in since.items():
            # Made here if new, so a subscriber's position names the epoch that
            # the channel's first message will count in.
            stream = self._stream(channel, now)
            answers[channel] = _recover(stream, position, Position(stream.offset, stream.epoch))
        return answers


def _recover(stream: _Stream, position: Position | None, top: Position) -> History:
    messages = stream.messages
    first = messages[0].offset if messages else top.offset + 1
    if position is None or not first <= position.offset + 1 <= top.offset:
        return recover(position, top, first, [])
    return recover(position, top, first, list(messages)[position.offset + 1 - first :])
