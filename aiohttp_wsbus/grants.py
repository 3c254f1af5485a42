"""Channel-name rules and grant patterns: may a token's grants cover a channel?"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_CHANNEL_LENGTH", "is_valid_channel", "may"]

MAX_CHANNEL_LENGTH = 200

# Letters, digits and a few separators; never '*', spaces or control characters.
_CHANNEL_RE = re.compile(rf"[A-Za-z0-9_\-.:@/=]{{1,{MAX_CHANNEL_LENGTH}}}")


def is_valid_channel(channel: object) -> bool:
    """Whether `channel` is a well-formed channel name."""
    return isinstance(channel, str) and _CHANNEL_RE.fullmatch(channel) is not None


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
    return any(_pattern_covers(pattern, channel) for pattern in patterns)
