"""Private rooms: made by users at run time and kept in this process's memory.

No token lists a private room's channel (`room:NAME`): when a socket asks for one,
the bus calls `PrivateRooms.may_join`, registered as the authorizer for `room:{name}`,
and POST /send asks the same function before it publishes. So a user invited a
moment ago joins on the socket and token they already have. A restart forgets
every room.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp_wsbus

__all__ = [
    "MAX_MEMBERS",
    "MAX_ROOMS",
    "ROOM_PREFIX",
    "NotAMember",
    "PrivateRooms",
    "Room",
    "RoomError",
    "RoomExists",
    "RoomLimit",
    "check_room_name",
]

ROOM_PREFIX: Final = "room:"
MAX_ROOMS: Final = 1000  # the store lives in memory: bounded like everything else
MAX_MEMBERS: Final = 100

# Room names become channel names (room:NAME), one authorizer-pattern segment each.
_ROOM_NAME_RE: Final = re.compile(r"[a-z0-9_-]{1,32}")


def check_room_name(name: object) -> str:
    """Return `name` if it is a valid room name; raise ValueError saying why not."""
    if not isinstance(name, str) or _ROOM_NAME_RE.fullmatch(name) is None:
        raise ValueError("room names are 1 to 32 characters from a-z, 0-9, _ and -")
    return name


class RoomError(Exception):
    """A room request the store refuses."""


class RoomExists(RoomError):
    """The room name is taken."""


class NotAMember(RoomError):
    """Only members may do that (also said for a room that does not exist: no leak)."""


class RoomLimit(RoomError):
    """MAX_ROOMS or MAX_MEMBERS is reached."""


@dataclass(slots=True)
class Room:
    """One private room: who made it and who is in it."""

    name: str
    created_by: str
    members: list[str] = field(default_factory=list)  # in the order they were added

    @property
    def channel(self) -> str:
        return ROOM_PREFIX + self.name

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channel": self.channel,
            "created_by": self.created_by,
            "members": list(self.members),
        }


class PrivateRooms:
    """The app's private rooms, by name."""

    def __init__(self, *, max_rooms: int = MAX_ROOMS, max_members: int = MAX_MEMBERS) -> None:
        self.max_rooms = max_rooms
        self.max_members = max_members
        self._rooms: dict[str, Room] = {}

    async def may_join(self, claims: aiohttp_wsbus.Claims, name: str) -> bool:
        """Whether the token's user is a member of room `name`.

        The bus's authorizer for `room:{name}`, and the check POST /send makes
        before publishing to a room. Async like a real app's, which would ask its
        database here.
        """
        return self.is_member(claims.subject, name)

    def is_member(self, user: str, name: str) -> bool:
        room = self._rooms.get(name)
        return room is not None and user in room.members

    def create(self, name: str, creator: str) -> Room:
        """A new room named `name` whose first member is `creator`."""
        if name in self._rooms:
            raise RoomExists(name)
        if len(self._rooms) >= self.max_rooms:
            raise RoomLimit(f"at most {self.max_rooms} rooms")
        room = Room(name, creator, [creator])
        self._rooms[name] = room
        return room

    def invite(self, name: str, inviter: str, invitee: str) -> tuple[Room, bool]:
        """Add `invitee` to the room, if `inviter` is a member; also say whether they are new."""
        if not self.is_member(inviter, name):
            raise NotAMember(name)
        room = self._rooms[name]
        if invitee in room.members:
            return room, False
        if len(room.members) >= self.max_members:
            raise RoomLimit(f"at most {self.max_members} members")
        room.members.append(invitee)
        return room, True

    def rooms_of(self, user: str) -> list[Room]:
        """The rooms `user` is a member of, oldest first."""
        return [room for room in self._rooms.values() if user in room.members]
