"""Presence in the broker contract: who is in a channel, and the joins and leaves.

A member is one user; each of their sockets subscribed to the channel is one
entry, keyed by connection id. A user joins when their first entry appears
anywhere in the cluster and leaves when their last one goes: the broker
decides that atomically, so a join or a leave is announced once per change.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """A channel's members, or only their count (`members` None) above the limit."""

    count: int
    members: dict[str, Member] | None = None

    def as_json(self) -> dict[str, Any]:
        """The frame's form: {user: {"info", "connections"}}, or {"count": N}."""
        if self.members is None:
            return {"count": self.count}
        return {user: member.as_json() for user, member in self.members.items()}

    @classmethod
    def of(cls, entries: Iterable[tuple[str, Any]], limit: int | None) -> PresenceSnapshot:
        """Aggregate (user, info) entries, one per socket, into members.

        `info` is the decoded info, or its JSON text (decoded here, once per user).
        """
        counts: dict[str, int] = {}
        infos: dict[str, Any] = {}
        for user, info in entries:
            counts[user] = counts.get(user, 0) + 1
            infos[user] = info  # one of the user's sockets' info: the last read
        if limit is not None and len(counts) > limit:
            return cls(len(counts))
        members = {
            user: Member(decode_info(info) if isinstance(info, str) else info, counts[user])
            for user, info in infos.items()
        }
        return cls(len(counts), members)


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
    # connection -> user, decoded info (decoded once, at the join, not per snapshot)
    entries: dict[str, tuple[str, Any]] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)  # user -> entries


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
        held.entries[connection_id] = (user, decode_info(info))
        count = held.users.get(user, 0) + 1
        held.users[user] = count
        if count == 1 and is_announced(True, len(held.users), max_members):
            return PresenceEvent(channel, user, info)
        return None

    def leave(self, channel: str, connection_id: str, max_members: int) -> PresenceEvent | None:
        held = self._channels.get(channel)
        entry = held.entries.pop(connection_id, None) if held is not None else None
        if held is None or entry is None:
            return None
        user = entry[0]
        count = held.users[user] - 1
        if count:
            held.users[user] = count
            return None
        del held.users[user]
        if not held.entries:
            del self._channels[channel]
        if is_announced(False, len(held.users), max_members):
            return PresenceEvent(channel, user)
        return None

    def snapshot(self, channel: str, limit: int | None) -> PresenceSnapshot:
        held = self._channels.get(channel)
        if held is None:
            return PresenceSnapshot(0, {})
        if limit is not None and len(held.users) > limit:
            return PresenceSnapshot(len(held.users))  # without reading every entry
        return PresenceSnapshot.of(held.entries.values(), limit)
