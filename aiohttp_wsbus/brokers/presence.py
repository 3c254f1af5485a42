"""Presence in the broker contract: who is in a channel, and the joins and leaves.

A member is one user; each of their sockets subscribed to the channel is one
entry, keyed by connection id. A user joins when their first entry appears
anywhere in the cluster and leaves when their last one goes: the broker
decides that atomically, so a join or a leave is announced once per change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
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


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """A channel's members, or only their count (`listed` None) above the limit.

    `listed` is already in the frame's form, {user: {"info", "connections"}}:
    a snapshot goes into a welcome far more often than it is read as Members.
    """

    count: int
    listed: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def members(self) -> dict[str, Member] | None:
        if self.listed is None:
            return None
        return {u: Member(m["info"], m["connections"]) for u, m in self.listed.items()}

    def as_json(self) -> Mapping[str, Any]:
        """The frame's form: {user: {"info", "connections"}}, or {"count": N}."""
        return {"count": self.count} if self.listed is None else self.listed

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
        listed = {
            user: {"info": decode_info(info), "connections": counts[user]}
            for user, info in infos.items()
        }
        return cls(len(counts), listed)


def decode_info(info: str) -> Any:
    """A member's info from its JSON text; `{}` for text that is not JSON."""
    try:
        return json.loads(info)
    except ValueError:  # written by a node of another version, say: no info, not a failure
        return {}


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
    # user -> {"info", "connections"}, the frame's form, kept as the sockets come
    # and go so that a snapshot is a copy. Replaced, never changed: a snapshot
    # handed out earlier must not change under its reader.
    listed: dict[str, Mapping[str, Any]] = field(default_factory=dict)


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
        before = held.listed.get(user)
        count = 1 if before is None else before["connections"] + 1
        # The latest socket's info wins (a refreshed token may carry a new one).
        held.listed[user] = {"info": decode_info(info), "connections": count}
        if count == 1 and is_announced(True, len(held.listed), max_members):
            return PresenceEvent(channel, user, info)
        return None

    def leave(self, channel: str, connection_id: str, max_members: int) -> PresenceEvent | None:
        held = self._channels.get(channel)
        user = held.entries.pop(connection_id, None) if held is not None else None
        if held is None or user is None:
            return None
        before = held.listed[user]
        if before["connections"] > 1:
            held.listed[user] = {"info": before["info"], "connections": before["connections"] - 1}
            return None
        del held.listed[user]
        if not held.entries:
            del self._channels[channel]
        if is_announced(False, len(held.listed), max_members):
            return PresenceEvent(channel, user)
        return None

    def snapshot(self, channel: str, limit: int | None) -> PresenceSnapshot:
        held = self._channels.get(channel)
        if held is None:
            return PresenceSnapshot(0, {})
        if limit is not None and len(held.listed) > limit:
            return PresenceSnapshot(len(held.listed))
        return PresenceSnapshot(len(held.listed), dict(held.listed))
