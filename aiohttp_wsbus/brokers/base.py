"""The broker contract: how a bus shares messages, offsets and history with its peers.

A broker only translates this contract to its engine; it knows nothing of
sockets, tokens or grants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..errors import BrokerUnavailable, InvalidChannel
from ..grants import is_valid_channel
from ..protocol import Position
from ..revocations import Revocation
from .presence import DEFAULT_PRESENCE, OnPresence, PresenceOptions, PresenceSnapshot

__all__ = [
    "APPLICATION",
    "DEFAULT_HISTORY",
    "MAX_HISTORY_SIZE",
    "Broker",
    "Deliver",
    "EmptyEpoch",
    "History",
    "HistoryOptions",
    "Message",
    "OnControl",
    "OnEphemeral",
    "Position",
    "Publication",
    "Published",
    "check_publish",
    "is_valid_message_id",
    "recover",
    "scoped_message_id",
    "subject_publisher",
]

MAX_HISTORY_SIZE: Final = 100_000
MAX_MESSAGE_ID_LENGTH: Final = 128
_MESSAGE_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_MESSAGE_ID_LENGTH}}}")
_EMPTY_EPOCH_RE: Final = re.compile(r"~([0-9]{1,16})-([0-9a-f]{1,40})")


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


def subject_publisher(subject: str) -> str:
    """The publisher scope of a token's subject: its Bearer emits and socket publishes."""
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).digest()
    return "user:" + digest[:8].hex()


def check_publish(channel: str, message_id: str | None) -> None:
    """Refuse a bad channel name (InvalidChannel) or idempotency id (ValueError)."""
    if not is_valid_channel(channel):
        raise InvalidChannel(f"invalid channel name: {channel!r}")
    if message_id is not None and not is_valid_message_id(message_id):
        raise ValueError("id must be 1 to 128 printable ASCII characters")


_Frozen = TypeVar("_Frozen", bound=type)


def _direct_init(cls: _Frozen) -> _Frozen:
    """Give a frozen, slotted dataclass an __init__ that fills its slots directly.

    The generated one calls object.__setattr__ once a field (a frozen class
    refuses plain assignment), about twice the cost; Message and Published are
    made once a published message. Same parameters, defaults and result.
    """
    fields = dataclasses.fields(cls)
    if any(not f.init or f.default_factory is not dataclasses.MISSING for f in fields):
        raise TypeError(f"{cls.__name__}: only plain fields, with or without a default")
    setters = {f"_set_{f.name}": getattr(cls, f.name).__set__ for f in fields}
    defaults = {f"_default_{f.name}": f.default for f in fields}
    parameters = ", ".join(
        f.name if f.default is dataclasses.MISSING else f"{f.name}=_default_{f.name}"
        for f in fields
    )
    body = "".join(f"    _set_{f.name}(self, {f.name})\n" for f in fields)
    namespace: dict[str, Any] = {}
    exec(  # noqa: S102 -- as dataclasses makes __init__, from the field names only
        f"def __init__(self, {parameters}):\n{body}", setters | defaults, namespace
    )
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls



@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """How much of a channel's stream is kept for recovery.

    The last `size` messages (0 to 100000; 0 keeps offsets and epochs but no
    messages and no idempotency ids), for `ttl` seconds after the channel's
    last publish or while it has a subscriber. Brokers get the default from
    `start()` and a channel's own with each publish (setup's `channels`);
    publishers in other processes take the same values, so every writer trims
    and expires alike.
    """

    size: int = 100
    ttl: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError("history size must be an int")
        if not 0 <= self.size <= MAX_HISTORY_SIZE:
            raise ValueError(f"history size must be 0 to {MAX_HISTORY_SIZE}")
        if not math.isfinite(self.ttl) or self.ttl <= 0:
            raise ValueError("history ttl must be a finite number of seconds above 0")


DEFAULT_HISTORY: Final = HistoryOptions()


@_direct_init
@dataclass(frozen=True, slots=True)
class Published:
    """Where a published message landed: its channel, offset and epoch.

    `is_repeat` is True when its id was already published on the channel
    within the history TTL: nothing was published again, and the offset and
    epoch are the original ones. An ephemeral message lands nowhere: offset 0,
    epoch "" and `is_ephemeral`.
    """

    channel: str
    offset: int
    epoch: str
    is_repeat: bool = False
    is_ephemeral: bool = False


@_direct_init
@dataclass(frozen=True, slots=True)
class Publication:
    """One message of a batch publish: what `Broker.publish` takes, as one value."""

    channel: str
    data: str
    message_id: str | None = None
    history: HistoryOptions | None = None


@_direct_init
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


@dataclass(frozen=True, slots=True)
class EmptyEpoch:
    """The epoch of a channel that holds nothing: no state is kept for it anywhere.

    It names when it was read (`at_ms`, milliseconds on the engine's clock) and
    the engine's `generation`, which changes whenever the engine may have lost
    channels before their TTL (a restart, a failover, a flood of channels).
    Written `~<at_ms>-<generation>` (at most 58 characters): a client at
    offset 0 of it can recover later although the engine remembers nothing.
    """

    at_ms: int
    generation: str

    def __str__(self) -> str:
        return f"~{self.at_ms}-{self.generation}"

    @classmethod
    def parse(cls, epoch: str) -> EmptyEpoch | None:
        """The EmptyEpoch an epoch string names, or None if it names a real one."""
        match = _EMPTY_EPOCH_RE.fullmatch(epoch)
        return None if match is None else cls(int(match[1]), match[2])


def recover(
    position: Position | None,
    top: Position,
    first: int,
    messages: Sequence[Message],
    *,
    now: EmptyEpoch | None,
    ttl: float,
) -> History:
    """The answer to `history()` that every broker gives, by the same rules.

    `top` is the channel's last position (offset 0 of the empty epoch `now`
    when it holds nothing); `first` is the first offset its history still
    holds (top + 1 when it holds none); `messages` are the held ones after
    `position`, or all of them when `position` is an empty epoch. `now` is
    the empty epoch of this read, needed only to recover from an empty epoch;
    `ttl` is the history TTL in seconds.
    """
    if position is None:
        return History([], top, recovered=False)
    if position.offset == 0 and position.epoch != top.epoch:
        since = EmptyEpoch.parse(position.epoch)
        if since is not None:
            return _recover_from_empty(since, top, first, messages, now, ttl)
    if position.epoch != top.epoch or position.offset > top.offset:
        return History([], top, recovered=False)
    if position.offset == top.offset:
        return History([], top, recovered=True)
    if position.offset + 1 < first:
        return History([], top, recovered=False)  # fell out of the window
    return History(list(messages), top, recovered=True)


def _recover_from_empty(
    since: EmptyEpoch,
    top: Position,
    first: int,
    messages: Sequence[Message],
    now: EmptyEpoch | None,
    ttl: float,
) -> History:
    # The channel held nothing at `since`, so whatever it holds now was born
    # after that, unless a whole epoch was born and lost in between: one that
    # may have expired (past the TTL; a millisecond's rounding either way) or
    # that the engine may have lost (a new generation).
    if (
        now is None
        or now.generation != since.generation
        or not 0 <= now.at_ms - since.at_ms < ttl * 1000 - 1
    ):
        return History([], top, recovered=False)
    if EmptyEpoch.parse(top.epoch) is not None:
        return History([], top, recovered=True)  # still nothing
    if first == 1:
        return History(list(messages), top, recovered=True)  # the whole epoch born since
    return History([], top, recovered=False)


Deliver = Callable[[Message], None]
OnControl = Callable[[Mapping[str, Any]], None]
# (channel, data JSON text): a message for the channel's current subscribers only.
OnEphemeral = Callable[[str, str], None]


class Broker(ABC):
    """Carries published messages to every node subscribed to their channel."""

    # Times the broker re-established its engine connection after losing it;
    # a broker that reconnects increments it (the metrics read it).
    reconnects: int = 0

    @abstractmethod
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
        """Connect; from now on call `deliver` for each message on a subscribed channel,
        in offset order per channel, `on_control` for each control message,
        `on_presence` for each join or leave and `on_ephemeral` for each ephemeral
        message on a subscribed channel; keep each channel's history as `history`
        says, and presence as `presence` says."""

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
    async def publish(
        self,
        channel: str,
        data: str,
        *,
        message_id: str | None = None,
        history: HistoryOptions | None = None,
    ) -> Published:
        """Append `data` to the channel's stream and deliver it to every subscribed node.

        `history` is the channel's (None: the default from `start()`); the
        channel keeps it until its next publish. A `message_id` already
        published on this channel within the history TTL is not published
        again: the original offset is returned, with `is_repeat` (a channel
        that keeps no history keeps no ids either). Raises BrokerUnavailable
        when the engine cannot be reached.
        """

    async def publish_many(self, publications: Sequence[Publication]) -> list[Published]:
        """`publish` each of `publications`, in order; where each landed, in the same order.

        A broker that can send them in one round trip does (RedisBroker: one
        pipeline). Raises BrokerUnavailable, its `published` holding the first
        ones known to have landed, when the engine cannot be reached midway.
        """
        published: list[Published] = []
        for publication in publications:
            try:
                published.append(
                    await self.publish(
                        publication.channel,
                        publication.data,
                        message_id=publication.message_id,
                        history=publication.history,
                    )
                )
            except BrokerUnavailable as error:
                raise BrokerUnavailable(str(error), published=published) from None
        return published

    @abstractmethod
    async def history(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        """For each channel, the messages after its position (None: just the top), by `recover`.

        `options` holds the history options of channels that have their own
        (the others have the default from `start()`). Only a publish makes
        state for a channel: one that holds nothing is answered offset 0 of an
        EmptyEpoch of this moment, and nothing is kept.
        """

    async def history_for_subscribers(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        """`history`, for sockets that go live on this node from the positions it answers:
        what this node delivers after that must follow them, without a message twice.

        A broker whose live stream can lag its engine (RedisBroker) waits here
        until this node has delivered up to what it read; by default, `history`.
        """
        return await self.history(since, options=options)

    async def delivered_position(self, channel: str) -> Position | None:
        """Where this node's live stream of `channel` stands (its last delivered message),
        if the broker knows without asking its engine; None: ask `history`.

        A new subscriber on this node may start there instead of at the engine's
        top: what comes after it reaches the node live, in order. A broker whose
        top is always what it delivered (MemoryBroker) answers None.
        """
        return None

    async def publish_ephemeral(self, channel: str, data: str) -> None:
        """Hand `data` to every node subscribed to `channel` now (`on_ephemeral`), this one's
        included: no offset, no history, no idempotency, nothing kept to replay.

        Raises BrokerUnavailable when the engine cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot carry ephemeral messages")

    async def control(self, message: Mapping[str, Any]) -> None:
        """Hand a control message (JSON-able) to every node's bus, this one's included.

        Raises BrokerUnavailable when it cannot reach every node.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot carry control messages")

    async def revoke(self, revocation: Revocation) -> None:
        """Keep `revocation` until it ends (across restarts, if the engine persists) and
        hand it to every node's bus as {"type": "revoke", "revocation": {...}}."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep revocations")

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
        """Add one socket of `user` (its info: JSON text) to each channel's presence;
        return the `snapshot` channels' members after it (as `presence`), in the
        same round trip.

        Announces the user's join (`on_presence` on every node subscribed to the
        channel) when it is their first socket there anywhere. Joining again is
        harmless. Raises BrokerUnavailable when the engine cannot be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot keep presence")

    async def leave(self, connection_id: str, channels: Collection[str]) -> None:
        """Remove one socket from each channel's presence; announce the user's leave
        when it was their last socket there. Leaving a channel not joined is harmless."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep presence")

    def leave_at_once(self, connection_id: str, channels: Collection[str]) -> bool:
        """`leave`, done now if this broker can do it without waiting (one kept in this
        process); False (the default) if it cannot, and nothing was done: then call
        `leave`. Spares a closing socket a task when thousands close at once."""
        return False

    async def presence(
        self, channels: Collection[str], *, limit: int | None = None
    ) -> dict[str, PresenceSnapshot]:
        """Each channel's members; only their count for a channel with more than
        `limit` users."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep presence")

    async def share_options(self, writers_view: Mapping[str, Any]) -> None:
        """Leave the history options every channel writer must use where the application's
        other processes can check theirs (RedisBroker: the Redis publishers); JSON-able."""
        return  # one process: nobody else writes

    async def admit_connection(self, user: str, limit: int, here: int) -> bool:
        """Take one of the `limit` sockets `user` may hold on every node; False if all are
        taken. `here` is how many this node holds (all there are, for a broker in one
        process: the default). Raises BrokerUnavailable when it cannot count."""
        return here < limit

    def release_connection(self, user: str) -> None:
        """Give back a socket admit_connection took (it closed)."""
        return  # one process counts the bus's own connections: nothing to give back

    @property
    @abstractmethod
    def is_available(self) -> bool:
        """Whether publishing would reach the engine right now."""
