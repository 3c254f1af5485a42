"""Presence in the broker contract: who is in a channel, and the joins and leaves.

A member is one user; each of their sockets subscribed to the channel is one
entry, keyed by connection id. A user joins when their first entry appears
anywhere in the cluster and leaves when their last one goes: the broker
decides that atomically, so a join or a leave is announced once per change.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "DEFAULT_PRESENCE",
    "Member",
    "OnPresence",
    "PresenceEvent",
    "PresenceOptions",
    "PresenceSnapshot",
    "PresenceTable",
    "decode_info",
    "is_announced",
]


@dataclass(frozen=True, slots=True)
class PresenceOptions:
    """How presence is kept: `ttl` seconds an entry lives without its node refreshing
    it (every ttl / 3), and `max_members` users a channel lists before snapshots
    carry only a count and joins and leaves are no longer announced."""

    ttl: float = 60.0
    max_members: int = 1000

    def __post_init__(self) -> None:
        if not math.isfinite(self.ttl) or self.ttl <= 0:
            raise ValueError("presence ttl must be a finite number of seconds above 0")
        if isinstance(self.max_members, bool) or self.max_members < 0:
            raise ValueError("max_members must be an int of at least 0")

    @property
    def refresh_interval(self) -> float:
        """Seconds between a node's refreshes of its entries, and between sweeps."""
        return self.ttl / 3


DEFAULT_PRESENCE: Final = PresenceOptions()


def is_announced(joined: bool, users: int, max_members: int) -> bool:
    """Whether a join or leave is announced, given the channel's user count after it.

    Only while the channel stays within `max_members` users both before and
    after the change: subscribers of a bigger channel hold a count, not a list.
    (RedisBroker's presence scripts apply the same rule.)
    """
    return users <= max_members if joined else users < max_members


@dataclass(frozen=True, slots=True)
class Member:
    """One user present in a channel: their info (shared: read it, do not change it)
    and how many sockets they have there."""

    info: Any
    connections: int

    def as_json(self) -> dict[str, Any]:
        return {"info": self.info, "connections": self.connections}


class PresenceSnapshot:
    """A channel's members, or only their count above the limit.

    Kept as the JSON text of the frame's form, `{user: {"info", "connections"}}`
    or `{"count": N}`: a snapshot goes into a welcome far more often than it is
    read as Members, and a channel's text is built once per change, not once
    per welcome (encoding 1000 members costs about 2 ms; joining their parts,
    kept encoded, 50 µs).
    """

    __slots__ = ("count", "is_listed", "text")

    def __init__(self, count: int, listing: str | None = None) -> None:
        self.count = count
        self.is_listed = listing is not None
        self.text = _count_only(count) if listing is None else listing

    def __repr__(self) -> str:
        return f"PresenceSnapshot({self.count}, {self.text if self.is_listed else None!r})"

    @property
    def listed(self) -> dict[str, dict[str, Any]] | None:
        """The members in the frame's form, decoded (None above the limit)."""
        return json.loads(self.text) if self.is_listed else None

    @property
    def members(self) -> dict[str, Member] | None:
        listed = self.listed
        if listed is None:
            return None
        return {u: Member(m["info"], m["connections"]) for u, m in listed.items()}

    @classmethod
    def of(cls, entries: Iterable[tuple[str, str]], limit: int | None) -> PresenceSnapshot:
        """Aggregate (user, info JSON) entries, one per socket, into members."""
        counts: dict[str, int] = {}
        infos: dict[str, str] = {}
        for user, info in entries:
            counts[user] = counts.get(user, 0) + 1
            infos[user] = info  # one of the user's sockets' info: the last read
        if limit is not None and len(counts) > limit:
            return cls(len(counts))
        parts = (listing_part(user, info, counts[user]) for user, info in infos.items())
        return cls(len(counts), listing(parts))


def _count_only(count: int) -> str:
    return f'{{"count":{count}}}'


@functools.lru_cache(maxsize=16384)  # a Redis snapshot builds every member's part again
def listing_part(user: str, info: str, connections: int) -> str:
    """One member's part of a listing: `"user":{"info":...,"connections":n}`.

    `info` is spliced in as it is, so it must be checked JSON (see `checked_info`).
    """
    return f'{json.dumps(user)}:{{"info":{checked_info(info)},"connections":{connections}}}'


def listing(parts: Iterable[str]) -> str:
    """A listing's JSON text from its members' parts."""
    return "{" + ",".join(parts) + "}"


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


# One decoder: json.loads with an argument would build a new one for every call.
_STRICT: Final = json.JSONDecoder(parse_constant=_refuse_constant)


@functools.lru_cache(maxsize=4096)  # a Redis snapshot checks every member's info again
def checked_info(info: str) -> str:
    """`info` if it is JSON a client can parse, else `{}` (written by a node of
    another version, say: no info, not a failure). NaN and Infinity are refused:
    JSON.parse would not read them."""
    try:
        _STRICT.decode(info)
    except ValueError:
        return "{}"
    return info


def decode_info(info: str) -> Any:
    """A member's info from its JSON text; `{}` for text that is not JSON."""
    return json.loads(checked_info(info))


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A user joined a channel (`info` is their info's JSON text) or left it (`info` None)."""

    channel: str
    user: str
    info: str | None = None

    @property
    def joined(self) -> bool:
        return self.info is not None


OnPresence = Callable[[PresenceEvent], None]


@dataclass(slots=True)
class _Channel:
    entries: dict[str, str] = field(default_factory=dict)  # connection -> user
    infos: dict[str, str] = field(default_factory=dict)  # user -> their latest info
    counts: dict[str, int] = field(default_factory=dict)  # user -> sockets
    parts: dict[str, str] = field(default_factory=dict)  # user -> their listing part
    text: str | None = None  # the listing, joined from `parts` when asked after a change

    def set(self, user: str, connections: int) -> None:
        self.counts[user] = connections
        self.parts[user] = listing_part(user, self.infos[user], connections)
        self.text = None


class PresenceTable:
    """Presence kept in one process (MemoryBroker's): join and leave return the event."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}

    def join(
        self, channel: str, connection_id: str, user: str, info: str, max_members: int
    ) -> PresenceEvent | None:
        held = self._channels.setdefault(channel, _Channel())
        if connection_id in held.entries:
            return None
        held.entries[connection_id] = user
        count = held.counts.get(user, 0) + 1
        held.infos[user] = checked_info(info)  # the latest socket's info wins
        held.set(user, count)
        if count == 1 and is_announced(True, len(held.counts), max_members):
            return PresenceEvent(channel, user, info)
        return None

    def leave(self, channel: str, connection_id: str, max_members: int) -> PresenceEvent | None:
        held = self._channels.get(channel)
        user = held.entries.pop(connection_id, None) if held is not None else None
        if held is None or user is None:
            return None
        count = held.counts[user] - 1
        if count:
            held.set(user, count)
            return None
        del held.counts[user], held.infos[user], held.parts[user]
        held.text = None
        if not held.entries:
            del self._channels[channel]
        if is_announced(False, len(held.counts), max_members):
            return PresenceEvent(channel, user)
        return None

    def snapshot(self, channel: str, limit: int | None) -> PresenceSnapshot:
        held = self._channels.get(channel)
        if held is None:
            return PresenceSnapshot(0, "{}")
        if limit is not None and len(held.counts) > limit:
            return PresenceSnapshot(len(held.counts))
        if held.text is None:
            held.text = listing(held.parts.values())
        return PresenceSnapshot(len(held.counts), held.text)
