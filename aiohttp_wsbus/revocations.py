"""Revoked tokens: which tokens are refused, until when.

A revocation names one token id (`jti`), or one user's tokens (all of them, or
those issued before a time). It lives until `until`, at most 30 days ahead;
brokers that persist (Redis) keep it across restarts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from .tokens import Claims

__all__ = [
    "MAX_REVOCATION_SECONDS",
    "MAX_USER_LENGTH",
    "Revocation",
    "Revocations",
    "check_user",
    "seconds",
]

MAX_REVOCATION_SECONDS: Final = 30 * 24 * 3600
MAX_USER_LENGTH: Final = 256


def check_user(user: object, field: str = "user") -> str:
    """A user id (a token's `sub`) is 1 to 256 characters; raise ValueError naming `field`."""
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_LENGTH:
        raise ValueError(f"{field}: must be 1 to {MAX_USER_LENGTH} characters")
    return user


def seconds(value: object, field: str) -> float:
    """Unix seconds from a number or an aware datetime; raise ValueError naming `field`."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{field}: a datetime needs a time zone")
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{field}: must be unix seconds or an aware datetime")


@dataclass(frozen=True, slots=True)
class Revocation:
    """Tokens refused until `until` (unix seconds).

    Exactly one of `user` and `token_id`; `issued_before` (with `user` only)
    limits it to tokens issued before that time (a token without `iat` counts
    as issued before).
    """

    until: float
    user: str | None = None
    token_id: str | None = None
    issued_before: float | None = None

    @classmethod
    def make(
        cls,
        *,
        until: object,
        user: object = None,
        token_id: object = None,
        issued_before: object = None,
        now: float | None = None,
    ) -> Revocation:
        """Check every field; raise ValueError naming the first bad one."""
        now = time.time() if now is None else now
        if (user is None) == (token_id is None):
            raise ValueError("user: give user or token_id, exactly one")
        if user is not None:
            check_user(user)
        if token_id is not None and (
            not isinstance(token_id, str) or not 0 < len(token_id) <= MAX_USER_LENGTH
        ):
            raise ValueError(f"token_id: must be 1 to {MAX_USER_LENGTH} characters")
        if issued_before is not None and token_id is not None:
            raise ValueError("issued_before: only with user")
        before = None if issued_before is None else seconds(issued_before, "issued_before")
        ends = seconds(until, "until")
        if not now < ends <= now + MAX_REVOCATION_SECONDS:
            raise ValueError("until: must be in the future and at most 30 days ahead")
        return cls(ends, user, token_id, before)  # type: ignore[arg-type]

    def covers(self, claims: Claims) -> bool:
        """Whether this revocation refuses the token these claims came from."""
        if self.token_id is not None:
            return claims.token_id == self.token_id
        if claims.subject != self.user:
            return False
        if self.issued_before is None:
            return True
        return claims.issued_at is None or claims.issued_at < self.issued_before

    def as_json(self) -> dict[str, Any]:
        return {
            "until": self.until,
            "user": self.user,
            "token_id": self.token_id,
            "issued_before": self.issued_before,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Revocation:
        return cls(
            float(data["until"]),
            data.get("user"),
            data.get("token_id"),
            None if data.get("issued_before") is None else float(data["issued_before"]),
        )


class Revocations:
    """The revocations in force, looked up by user and by token id."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_user: dict[str, list[Revocation]] = {}
        self._by_token_id: dict[str, Revocation] = {}

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_user.values()) + len(self._by_token_id)

    def add(self, revocation: Revocation) -> None:
        if revocation.token_id is not None:
            held = self._by_token_id.get(revocation.token_id)
            if held is None or held.until < revocation.until:
                self._by_token_id[revocation.token_id] = revocation
        elif revocation.user is not None:
            self._by_user.setdefault(revocation.user, []).append(revocation)

    def replace(self, revocations: Iterable[Revocation]) -> None:
        """Forget every revocation and hold these instead (a reload from the broker)."""
        self._by_user.clear()
        self._by_token_id.clear()
        for revocation in revocations:
            self.add(revocation)

    def covers(self, claims: Claims) -> bool:
        """Whether a revocation in force refuses these claims' token."""
        if not self._by_user and not self._by_token_id:
            return False
        now = self._clock()
        if claims.token_id is not None:
            held = self._by_token_id.get(claims.token_id)
            if held is not None:
                if held.until > now:
                    return True
                del self._by_token_id[claims.token_id]
        revocations = self._by_user.get(claims.subject)
        if revocations:
            revocations[:] = [r for r in revocations if r.until > now]
            if not revocations:
                del self._by_user[claims.subject]
            return any(r.covers(claims) for r in revocations)
        return False
