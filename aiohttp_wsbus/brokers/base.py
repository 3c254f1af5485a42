"""The broker contract: how a bus shares messages, offsets and history with its peers.

A broker only translates this contract to its engine; it knows nothing of
sockets, tokens or grants.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import InvalidChannel
from ..grants import is_valid_channel
from ..protocol import Position
from ..revocations import Revocation

__all__ = [
    "APPLICATION",
    "Broker",
    "History",
    "Message",
    "Position",
    "Published",
    "check_publish",
    "is_valid_message_id",
    "recover",
    "scoped_message_id",
]

MAX_MESSAGE_ID_LENGTH: Final = 128
_MESSAGE_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_MESSAGE_ID_LENGTH}}}")


def is_valid_message_id(message_id: str) -> bool:
    """Idempotency ids are 1 to 128 printable ASCII characters."""
    return _MESSAGE_ID_RE.fullmatch(message_id) is not None


# The publisher scope of the application's own publishes: Bus.publish and the
# Redis publishers share it, so a back end may retry through either.
APPLICATION: Final = "app"


def scoped_message_id(publisher: str, message_id: str) -> str:
    """An idempotency id as the broker stores it: scoped by who published.

    Two publishers never share ids, so a client with a publish grant cannot
    claim an id the application will use and swallow its message.
    """
    return f"{publisher}/{message_id}"


def check_publish(channel: str, message_id: str | None) -> None:
    """Refuse a bad channel name (InvalidChannel) or idempotency id (ValueError)."""
    if not is_valid_channel(channel):
        raise InvalidChannel(f"invalid channel name: {channel!r}")
    if message_id is not None and not is_valid_message_id(message_id):
        raise ValueError("id must be 1 to 128 printable ASCII characters")


@dataclass(frozen=True, slots=True)
class Published:
    """Where a published message landed: its channel, offset and epoch."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Message:
    """One message in a channel's stream; `data` is its JSON text, encoded once."""

    channel: str
    offset: int
    epoch: str
    data: str


@dataclass(frozen=True, slots=True)
class History:
    """The answer to "what did I miss since this position?".

    `recovered` is True when every message after the asked position is in
    `messages`; otherwise `messages` is empty and the client continues from
    `position`, the stream's current top.
    """

    messages: list[Message]
    position: Position
    recovered: bool


def recover(
    position: Position | None, top: Position, first: int, messages: Sequence[Message]
) -> History:
    """The answer to `history()` that every broker gives, by the same rules.

    `first` is the first offset the channel's history still holds (top + 1
    when it holds none); `messages` are the held ones after `position`.
    """
    if position is None:
        return History([], top, recovered=False)
    if position.epoch != top.epoch or position.offset > top.offset:
        return History([], top, recovered=False)
    if position.offset == top.offset:
        return History([], top, recovered=True)
    if position.offset + 1 < first:
        return History([], top, recovered=False)  # fell out of the window
    return History(list(messages), top, recovered=True)


Deliver = Callable[[Message], None]
OnControl = Callable[[Mapping[str, Any]], None]


class Broker(ABC):
    """Carries published messages to every node subscribed to their channel."""

    # Times the broker re-established its engine connection after losing it;
    # a broker that reconnects increments it (the metrics read it).
    reconnects: int = 0

    @abstractmethod
    async def start(
        self,
        deliver: Deliver,
        *,
        history_size: int,
        history_ttl: float,
        on_control: OnControl | None = None,
    ) -> None:
        """Connect; from now on call `deliver` for each message on a subscribed channel,
        in offset order per channel, and `on_control` for each control message."""

    @abstractmethod
    async def stop(self) -> None:
        """Disconnect and release everything."""

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start delivering `channel` to this node (called on its first local subscriber)."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel` to this node (called when its last subscriber leaves)."""

    @abstractmethod
    async def publish(self, channel: str, data: str, *, message_id: str | None = None) -> Published:
        """Append `data` to the channel's stream and deliver it to every subscribed node.

        A `message_id` already published on this channel within the history TTL
        is not published again: the original offset is returned.
        Raises BrokerUnavailable when the engine cannot be reached.
        """

    @abstractmethod
    async def history(self, since: Mapping[str, Position | None]) -> dict[str, History]:
        """For each channel, the messages after its position (None: just the top)."""

    async def control(self, message: Mapping[str, Any]) -> None:
        """Hand a control message (JSON-able) to every node's bus, this one's included.

        Raises BrokerUnavailable when it cannot reach every node.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot carry control messages")

    async def revoke(self, revocation: Revocation) -> None:
        """Keep `revocation` until it ends (across restarts, if the engine persists) and
        hand it to every node's bus as {"type": "revoke", "revocation": {...}}."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep revocations")

    @property
    @abstractmethod
    def is_available(self) -> bool:
        """Whether publishing would reach the engine right now."""
