"""What an application published, and a broker that is down: both by standing in for the
bus's broker while a test watches or breaks it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast
from unittest.mock import ANY

from ..brokers.base import Broker, History, Published
from ..bus import Bus
from ..errors import BrokerUnavailable
from ..protocol import Position
from ..revocations import Revocation

__all__ = ["ANY", "BrokerOutage", "Capture", "CapturedMessage", "broker_outage", "capture"]


class _BrokerTap:
    """Stands in for a bus's broker: records publishes, refuses work during an outage,
    and passes everything else to the real broker."""

    def __init__(self, real: Broker) -> None:
        self.real = real
        self.captures: list[Capture] = []
        self.outages = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @property
    def is_available(self) -> bool:
        return self.outages == 0 and self.real.is_available

    @property
    def reconnects(self) -> int:
        return self.real.reconnects

    def _check(self) -> None:
        if self.outages:
            raise BrokerUnavailable("broker made unavailable by aiohttp_wsbus.testing")

    # Arguments pass through as given: the tap follows the broker contract as it grows.
    async def publish(self, channel: str, data: str, **options: Any) -> Published:
        self._check()
        published = await self.real.publish(channel, data, **options)
        if not published.is_repeat:
            for recorder in self.captures:
                recorder.record(CapturedMessage(channel, json.loads(data), published.offset))
        return published

    async def subscribe(self, channel: str, *args: Any, **options: Any) -> None:
        self._check()
        await self.real.subscribe(channel, *args, **options)

    async def history(
        self, since: Mapping[str, Position | None], **options: Any
    ) -> dict[str, History]:
        self._check()
        return await self.real.history(since, **options)

    async def delivered_position(self, channel: str, **options: Any) -> Position | None:
        self._check()  # a socket joining a channel the node listens to starts there
        return await self.real.delivered_position(channel, **options)

    async def history_for_subscribers(
        self, since: Mapping[str, Position | None], **options: Any
    ) -> dict[str, History]:
        self._check()
        return await self.real.history_for_subscribers(since, **options)

    async def control(self, message: Mapping[str, Any], **options: Any) -> None:
        self._check()
        await self.real.control(message, **options)

    async def revoke(self, revocation: Revocation, **options: Any) -> None:
        self._check()
        await self.real.revoke(revocation, **options)


def _tap(bus: Bus) -> _BrokerTap:
    broker: object = bus.broker
    if isinstance(broker, _BrokerTap):
        return broker
    tap = _BrokerTap(bus.broker)
    bus.broker = cast(Broker, tap)
    return tap


def _untap(bus: Bus) -> None:
    broker: object = bus.broker
    if isinstance(broker, _BrokerTap) and not broker.captures and not broker.outages:
        bus.broker = broker.real


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """One message the application published: its channel, data (decoded) and offset."""

    channel: str
    data: Any
    offset: int


class Capture:
    """The messages published on a bus while `capture(bus)` was open, in order."""

    def __init__(self) -> None:
        self.messages: list[CapturedMessage] = []
        self._arrived = asyncio.Event()

    def record(self, message: CapturedMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    def on(self, channel: str) -> list[Any]:
        """The data published to `channel`, in order."""
        return [m.data for m in self.messages if m.channel == channel]

    def _matches(self, channel: str, data: Any) -> list[CapturedMessage]:
        return [m for m in self.messages if m.channel == channel and data == m.data]

    def _seen(self) -> str:
        if not self.messages:
            return "nothing was published at all"
        lines = [f"  {m.channel}: {m.data!r}" for m in self.messages]
        return "published:\n" + "\n".join(lines)

    def assert_published(self, channel: str, data: Any = ANY) -> CapturedMessage:
        """Fail unless a message with `data` (any, by default) was published to `channel`."""
        found = self._matches(channel, data)
        if not found:
            wanted = "a message" if data is ANY else f"{data!r}"
            raise AssertionError(f"expected {wanted} on {channel!r}; {self._seen()}")
        return found[0]

    def assert_nothing_published(self, channel: str) -> None:
        """Fail if anything was published to `channel`."""
        found = self.on(channel)
        if found:
            raise AssertionError(f"expected nothing on {channel!r}, but it got {found!r}")

    async def wait_published(
        self, channel: str, data: Any = ANY, timeout: float = 5.0
    ) -> CapturedMessage:
        """Wait until `data` is published to `channel` (by a background task, say)."""
        async with asyncio.timeout(timeout):
            while not self._matches(channel, data):
                self._arrived.clear()
                await self._arrived.wait()
        return self.assert_published(channel, data)


@contextlib.contextmanager
def capture(bus: Bus) -> Iterator[Capture]:
    """Record what is published on `bus` (in-process and over the emit endpoint) meanwhile."""
    tap = _tap(bus)
    recorder = Capture()
    tap.captures.append(recorder)
    try:
        yield recorder
    finally:
        tap.captures.remove(recorder)
        _untap(bus)


class BrokerOutage:
    """The bus's broker unavailable, as if its engine were gone, until `end()`.

    Meanwhile new sockets are closed with 1013, subscriptions are denied
    `unavailable` and publishing raises BrokerUnavailable (emit answers 503).
    """

    def __init__(self, bus: Bus, seconds: float | None = None) -> None:
        self.bus = bus
        self.ended = asyncio.Event()
        _tap(bus).outages += 1
        self._timer = None
        if seconds is not None:
            self._timer = asyncio.get_running_loop().call_later(seconds, self.end)

    def end(self) -> None:
        """Bring the broker back."""
        if self.ended.is_set():
            return
        self.ended.set()
        if self._timer is not None:
            self._timer.cancel()
        _tap(self.bus).outages -= 1
        _untap(self.bus)

    def __enter__(self) -> BrokerOutage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.end()


def broker_outage(bus: Bus, seconds: float | None = None) -> BrokerOutage:
    """Make the broker unavailable now: for `seconds`, or until the outage's `end()`
    (or the end of its `with` block)."""
    return BrokerOutage(bus, seconds)
