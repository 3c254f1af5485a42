"""Channel-name rules and grant patterns: may a token's grants cover a channel?"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

__all__ = [
    "MAX_CHANNEL_LENGTH",
    "PatternTable",
    "grant_patterns",
    "is_valid_channel",
    "is_valid_pattern",
    "may",
]

T = TypeVar("T")

MAX_CHANNEL_LENGTH = 200

# Letters, digits and a few separators; never '*', spaces or control characters.
_CHANNEL_RE = re.compile(rf"[A-Za-z0-9_\-.:@/=]{{1,{MAX_CHANNEL_LENGTH}}}")


def is_valid_channel(channel: object) -> bool:
    """Whether `channel` is a well-formed channel name."""
    return isinstance(channel, str) and _CHANNEL_RE.fullmatch(channel) is not None


def is_valid_pattern(pattern: object) -> bool:
    """Whether `pattern` is a grant pattern: a channel name, `prefix:*` or `*`."""
    if not isinstance(pattern, str):
        return False
    if pattern == "*":
        return True
    if pattern.endswith(":*"):
        return is_valid_channel(pattern[:-1])
    return is_valid_channel(pattern)


def grant_patterns(value: object) -> tuple[str, ...]:
    """Grant patterns from a token claim: a list of strings or one space-separated string.

    Lenient by design: entries that are not strings are ignored, and a pattern
    that covers no channel simply never matches.
    """
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(entry for entry in value if isinstance(entry, str))
    return ()


def _pattern_covers(pattern: str, channel: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(":*"):
        prefix = pattern[:-1]  # keep the ':'
        return len(channel) > len(prefix) and channel.startswith(prefix)
    return pattern == channel


def may(patterns: Iterable[str], channel: str) -> bool:
    """Whether any grant pattern covers `channel`.

    A pattern is an exact channel name, `prefix:*` (the prefix, a colon and at
    least one more character) or `*`. An invalid channel is never covered.
    """
    if not is_valid_channel(channel):
        return False
    # A loop, not any(generator): no object made per check, on every connect's path.
    for pattern in patterns:  # noqa: SIM110
        if _pattern_covers(pattern, channel):
            return True
    return False


class PatternTable(Generic[T]):
    """Values by grant pattern; `find` answers the most specific pattern covering a channel.

    An exact name beats any `prefix:*`, a longer prefix a shorter one, and `*`
    comes last; a channel no pattern covers gets `default`. `find` looks up
    the channel's own prefixes (one per ':' in it), whatever the table's size.
    """

    def __init__(self, values: Mapping[str, T], default: T) -> None:
        invalid = [p for p in values if not is_valid_pattern(p)]
        if invalid:
            raise ValueError(f"not a grant pattern: {invalid[0]!r}")
        self.default = default
        self._exact = {p: v for p, v in values.items() if not p.endswith("*")}
        self._prefixes = {p[:-1]: v for p, v in values.items() if p.endswith(":*")}
        self._everything = values.get("*", default)

    def find(self, channel: str) -> T:
        value = self._exact.get(channel)
        if value is not None:
            return value
        if self._prefixes:
            # A prefix ends with ':' and leaves at least one character after it.
            colon = channel.rfind(":", 0, len(channel) - 1)
            while colon >= 0:
                value = self._prefixes.get(channel[: colon + 1])
                if value is not None:
                    return value
                colon = channel.rfind(":", 0, colon)
        return self._everything
