"""The subscriber client's reconnect policy: what each close code asks, and the backoff.

The same policy as js/wsbus.js: both clients' tests check it against the
shared vectors in js/test-support/policy-vectors.json, and docs/protocol.md's
close-code table says it in words.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .protocol import CloseCode

__all__ = [
    "MAX_RECONNECT_DELAY",
    "MIN_RECONNECT_DELAY",
    "RATE_LIMITED_DELAY",
    "CloseAction",
    "CloseDecision",
    "backoff_delay",
    "decide",
    "refresh_delay",
]

MIN_RECONNECT_DELAY: Final = 0.5  # seconds
MAX_RECONNECT_DELAY: Final = 20.0
MIN_REFRESH_DELAY: Final = 1.0  # never refresh in a tight loop, whatever the clocks say
RATE_LIMITED_DELAY: Final = 5.0  # after 4429 the protocol asks for at least this long

# Codes after which reconnecting cannot help: the client stops.
_FATAL: Final = frozenset(
    {
        CloseCode.NORMAL,
        CloseCode.PROTOCOL_ERROR,
        CloseCode.INVALID_PAYLOAD,
        CloseCode.MESSAGE_TOO_BIG,
        CloseCode.BAD_REQUEST,
        CloseCode.FORBIDDEN,
        CloseCode.TOO_MANY_CONNECTIONS,
        CloseCode.SESSION_ENDED,
    }
)
# Closes that are the application's decision, not a failure: no error is reported.
_INTENDED: Final = frozenset({CloseCode.NORMAL, CloseCode.SESSION_ENDED})
# A fresh token fixes these at once (once per welcome, or an immediate retry could spin).
_FRESH_TOKEN: Final = frozenset({CloseCode.TOKEN_EXPIRED, CloseCode.RECONNECT})


class CloseAction(enum.Enum):
    """What the client does after the server closed its socket."""

    STOP = "stop"
    RECONNECT_NOW = "reconnect_now"  # with a fresh token, no wait
    BACKOFF = "backoff"  # after the next backoff delay


@dataclass(frozen=True, slots=True)
class CloseDecision:
    action: CloseAction
    is_error: bool  # reported to the application's "error" listeners
    at_least: float = 0.0  # seconds the backoff waits at the least


def decide(code: int, *, was_welcomed: bool, has_retried_unauthorized: bool) -> CloseDecision:
    """The action for a close with `code`; 1006 stands for a socket gone without a close frame."""
    if code in _FATAL:
        return CloseDecision(CloseAction.STOP, is_error=code not in _INTENDED)
    if code == CloseCode.UNAUTHORIZED:
        # getToken runs again on every connect: that is the fresh token; twice is final.
        if has_retried_unauthorized:
            return CloseDecision(CloseAction.STOP, is_error=True)
        return CloseDecision(CloseAction.RECONNECT_NOW, is_error=False)
    if code in _FRESH_TOKEN and was_welcomed:
        return CloseDecision(CloseAction.RECONNECT_NOW, is_error=False)
    if code == CloseCode.TOO_MANY_REQUESTS:
        return CloseDecision(CloseAction.BACKOFF, is_error=False, at_least=RATE_LIMITED_DELAY)
    return CloseDecision(CloseAction.BACKOFF, is_error=False)


def backoff_delay(
    attempt: int,
    random_value: float,
    minimum: float = MIN_RECONNECT_DELAY,
    maximum: float = MAX_RECONNECT_DELAY,
) -> float:
    """Full jitter: attempt n (from 1) waits a uniform random time in
    [minimum, min(maximum, minimum * 2^n)] seconds; `random_value` is in [0, 1]."""
    ceiling = min(maximum, minimum * 2.0 ** min(attempt, 64))  # 2^64 is past any maximum
    return minimum + random_value * (max(ceiling, minimum) - minimum)


def refresh_delay(expires_at: float, now: float, refresh_before: float) -> float:
    """Seconds until the token expiring at `expires_at` is refreshed: `refresh_before` its
    exp, or halfway for a token that lives less (never sooner than a second)."""
    remaining = expires_at - now
    delay = remaining - refresh_before
    return delay if delay >= 0 else max(remaining / 2, MIN_REFRESH_DELAY)
