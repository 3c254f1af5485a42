"""The subscription registry: channel -> connections (the only road to delivery),
and user -> connections (what a disconnect or revocation reaches)."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Final

from .errors import Forbidden

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Connections", "Registry"]

_NOBODY: Final[Collection[Connection]] = ()


class Connections(Collection["Connection"]):
    """Every authenticated connection, indexed by user.

    A user's only connection is kept as itself, several as a set: most users
    hold one socket, and an idle socket must cost no more than one dict slot.
    """

    def __init__(self) -> None:
        self._by_user: dict[str, Connection | set[Connection]] = {}
        self._count = 0

    def add(self, connection: Connection) -> None:
        user = connection.claims.subject
        held = self._by_user.get(user)
        if held is None:
            self._by_user[user] = connection
        elif isinstance(held, set):
            held.add(connection)
        elif held is not connection:
            self._by_user[user] = {held, connection}
        else:
            return
        self._count += 1

    def discard(self, connection: Connection) -> None:
        user = connection.claims.subject
        held = self._by_user.get(user)
        if held is connection:
            del self._by_user[user]
        elif isinstance(held, set) and connection in held:
            held.discard(connection)
            if len(held) == 1:
                self._by_user[user] = next(iter(held))
        else:
            return
        self._count -= 1

    def of(self, user: str) -> list[Connection]:
        """The user's connections on this node (a copy: safe to close them while iterating)."""
        held = self._by_user.get(user)
        if held is None:
            return []
        return list(held) if isinstance(held, set) else [held]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Connection]:
        for held in list(self._by_user.values()):
            if isinstance(held, set):
                yield from list(held)
            else:
                yield held

    def __contains__(self, connection: object) -> bool:
        subject = getattr(getattr(connection, "claims", None), "subject", None)
        held = self._by_user.get(subject) if isinstance(subject, str) else None
        return held is connection or (isinstance(held, set) and connection in held)


class Registry:
    """Which connections hear which channels.

    A connection is in a channel's set only while its current grants cover the
    channel or an authorizer allowed it for this connection: `add` refuses
    otherwise, and `regrant` drops what is no longer granted or allowed. The
    bus delivers a channel's messages to this set and nothing else.
    """

    def __init__(self) -> None:
        self._subscribers: dict[str, dict[Connection, None]] = {}
        # Each subscribed channel's name as first seen, in a tuple of its own: the
        # one string every subscriber's `channels` holds (each frame parses its own
        # copy, and an idle socket would keep it), and the one tuple of every
        # subscriber that has no other channel.
        self._names: dict[str, tuple[str]] = {}

    def subscribers(self, channel: str) -> Collection[Connection]:
        """The connections subscribed to `channel` (a live view: do not keep it)."""
        return self._subscribers.get(channel, _NOBODY)

    def add(self, connection: Connection, channel: str) -> bool:
        """Subscribe; return True when this is the channel's first subscriber here."""
        if not connection.may_subscribe(channel):
            raise Forbidden([channel])
        subscribers = self._subscribers.get(channel)
        is_first = subscribers is None
        if subscribers is None:
            subscribers = self._subscribers[channel] = {}
            alone = self._names[channel] = (channel,)
        else:
            alone = self._names[channel]
        subscribers[connection] = None
        connection.join(alone[0], alone)
        return is_first

    def remove(self, connection: Connection, channel: str) -> bool:
        """Unsubscribe; return True when the channel has no subscriber here any more."""
        connection.leave(channel)
        subscribers = self._subscribers.get(channel)
        if subscribers is None or connection not in subscribers:
            return False
        del subscribers[connection]
        if subscribers:
            return False
        del self._subscribers[channel]
        del self._names[channel]
        return True

    def remove_all(self, connection: Connection) -> list[str]:
        """Unsubscribe from everything; return the channels left with no subscriber."""
        emptied = [c for c in list(connection.channels) if self.remove(connection, c)]
        connection.channels = ()
        return emptied

    def regrant(self, connection: Connection) -> tuple[list[str], list[str]]:
        """Drop the channels the connection's claims and allowances no longer cover.

        Returns (revoked channels, channels left with no subscriber).
        """
        revoked = [c for c in list(connection.channels) if not connection.may_subscribe(c)]
        emptied = [c for c in revoked if self.remove(connection, c)]
        return revoked, emptied

    @property
    def channel_count(self) -> int:
        return len(self._subscribers)

    @property
    def subscription_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())
