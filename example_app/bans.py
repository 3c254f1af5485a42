"""Banned users: whom staff banned, until when, kept in this process's memory.

POST /login refuses a banned user's name until the ban ends; the bus refuses the
tokens they already hold (`bus.revoke`). A restart forgets every ban (the
revocations live on with a broker that persists them, such as Redis).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_BANS", "MAX_BAN_MINUTES", "BanLimit", "Bans"]

MAX_BANS: Final = 1000  # the store lives in memory: bounded like everything else
MAX_BAN_MINUTES: Final = 30 * 24 * 60  # the longest revocation the bus keeps: 30 days


class BanLimit(Exception):
    """MAX_BANS bans are in force: no room for another."""


class Bans:
    """The bans in force, by user name."""

    def __init__(
        self, *, max_bans: int = MAX_BANS, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_bans = max_bans
        self._clock = clock
        self._until: dict[str, float] = {}

    def ban(self, user: str, until: float) -> None:
        """Refuse `user` until `until` (unix seconds); a later end replaces an earlier one."""
        self._forget_ended()
        if user not in self._until and len(self._until) >= self.max_bans:
            raise BanLimit(f"at most {self.max_bans} bans")
        self._until[user] = max(until, self._until.get(user, until))

    def banned_until(self, user: str) -> float | None:
        """When `user`'s ban ends, or None if they are not banned."""
        until = self._until.get(user)
        if until is None or until > self._clock():
            return until
        del self._until[user]
        return None

    def _forget_ended(self) -> None:
        now = self._clock()
        self._until = {user: until for user, until in self._until.items() if until > now}
