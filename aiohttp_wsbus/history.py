"""Reading a channel's position and last messages: `bus.history`, `bus.position(s)`,
the `history` frame and `GET {base_path}/channels/{channel}/history`."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .brokers.base import MAX_HISTORY_SIZE, Broker, HistoryOptions, Message, check_publish
from .protocol import MAX_OFFSET, Position

__all__ = ["DEFAULT_HISTORY_LIMIT", "HistoryPage", "check_page", "read_history", "read_positions"]

DEFAULT_HISTORY_LIMIT: Final = 50
# A page read while publishes keep trimming the history is read again, this often at most.
_READS: Final = 3


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A channel's last messages (before an offset), oldest first, and its position.

    Without `before`, `position` is the channel's last position when it was
    read and the last message (if any) is at that position: a page that loaded
    this state subscribes with `since=position` and misses nothing.
    """

    channel: str
    position: Position
    messages: list[Message]

    def as_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "position": self.position.as_json(),
            "messages": [{"offset": m.offset, "data": json.loads(m.data)} for m in self.messages],
        }


def check_page(limit: int, before: int | None) -> None:
    """Refuse a limit or before out of bounds (ValueError naming the field)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_SIZE:
        raise ValueError(f"limit: must be an integer from 1 to {MAX_HISTORY_SIZE}")
    if before is not None and (
        isinstance(before, bool) or not isinstance(before, int) or not 1 <= before <= MAX_OFFSET
    ):
        raise ValueError("before: must be an offset from 1 to 2^63 - 1")


async def read_positions(
    broker: Broker,
    channels: Collection[str],
    *,
    options: Mapping[str, HistoryOptions] | None = None,
) -> dict[str, Position]:
    """Each channel's last position (offset 0 of an empty epoch: nothing held), in one read.

    `options` as for `Broker.history`. Raises InvalidChannel for a bad name.
    """
    for channel in channels:
        check_publish(channel, None)
    answers = await broker.history(dict.fromkeys(channels), options=options)
    return {channel: answer.position for channel, answer in answers.items()}


async def read_history(
    broker: Broker, channel: str, *, limit: int, before: int | None, history: HistoryOptions
) -> HistoryPage:
    """The last `limit` messages of `channel` with offsets below `before` (all: None).

    `history` is the channel's history options: the broker holds at most the
    last `history.size` messages, so the read starts no further back than
    that. Raises
    InvalidChannel, or ValueError naming a bad limit or before.
    """
    check_publish(channel, None)
    check_page(limit, before)
    options = {channel: history}
    kept = history.size
    position = (await broker.history({channel: None}, options=options))[channel].position
    for _ in range(_READS):
        end = position.offset if before is None else min(position.offset, before - 1)
        start = max(0, end - limit, position.offset - kept)
        if end <= start:
            return HistoryPage(channel, position, [])
        since = {channel: Position(start, position.epoch)}
        answer = (await broker.history(since, options=options))[channel]
        if answer.recovered:
            messages = [m for m in answer.messages if before is None or m.offset < before]
            return HistoryPage(channel, answer.position, messages[-limit:])
        position = answer.position  # trimmed or expired meanwhile: read from the new top
    return HistoryPage(channel, position, [])
