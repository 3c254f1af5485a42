"""Abuse limits as token buckets: one socket's frames and channel operations, and emits
per publisher. docs/limits.md lists every limit and what a client sees."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from .protocol import ClientFrame, Subscribe, Unsubscribe

__all__ = ["PublisherLimits", "SocketLimits", "TokenBucket"]

# Publishers' buckets kept before the idle (full) ones are swept out.
_MAX_IDLE_PUBLISHERS: Final = 10_000


class TokenBucket:
    """Holds up to `burst` tokens and gains `rate` a second; each request takes some."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, count: float, now: float) -> bool:
        """Take `count` tokens if the bucket holds them; False (taking none) if not."""
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens < count:
            self.tokens = tokens
            return False
        self.tokens = tokens - count
        return True

    def wait(self, count: float) -> float:
        """Seconds until `count` tokens will be there (as of the last take)."""
        return max(0.0, (count - self.tokens) / self.rate)

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst


class SocketLimits:
    """One socket's `client_rate` (every frame) and `subscribe_rate` (each channel of a
    subscribe or unsubscribe frame) buckets; the connect frame never reaches them."""

    __slots__ = ("_channels", "_clock", "_frames")

    def __init__(
        self,
        client_rate: tuple[float, int] | None,
        subscribe_rate: tuple[float, int] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        now = clock()
        self._clock = clock
        self._frames = None if client_rate is None else TokenBucket(*client_rate, now)
        self._channels = None if subscribe_rate is None else TokenBucket(*subscribe_rate, now)

    @classmethod
    def of(
        cls, client_rate: tuple[float, int] | None, subscribe_rate: tuple[float, int] | None
    ) -> SocketLimits | None:
        """The limits a socket needs, or None when both are off."""
        if client_rate is None and subscribe_rate is None:
            return None
        return cls(client_rate, subscribe_rate)

    def frame(self) -> str | None:
        """Count one frame, whatever it is; the limit it broke ("client"), or None."""
        if self._frames is not None and not self._frames.take(1, self._clock()):
            return "client"
        return None

    def channels(self, frame: ClientFrame) -> str | None:
        """Count a subscribe or unsubscribe frame's channels; "subscribe" if over, or None."""
        if self._channels is None or not isinstance(frame, Subscribe | Unsubscribe):
            return None
        if not self._channels.take(len(frame.channels), self._clock()):
            return "subscribe"
        return None


class PublisherLimits:
    """`emit_rate`: one bucket per publisher (an API key or a token subject)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = _MAX_IDLE_PUBLISHERS

    def retry_after(self, publisher: str) -> int | None:
        """Take one emit for `publisher`: None if allowed, else whole seconds to wait."""
        now = self._clock()
        bucket = self._buckets.get(publisher)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._forget_idle(now)
            bucket = self._buckets[publisher] = TokenBucket(self.rate, self.burst, now)
        if bucket.take(1, now):
            return None
        return max(1, math.ceil(bucket.wait(1)))

    def _forget_idle(self, now: float) -> None:
        # A full bucket is what a new one would be: forgetting it changes nothing.
        self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
        # Amortised: the next sweep waits until as many publishers again are new.
        self._prune_at = max(_MAX_IDLE_PUBLISHERS, 2 * len(self._buckets))
