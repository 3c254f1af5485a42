"""The subscriber client's events: listeners per event name, each failure reported, none fatal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

__all__ = ["EVENTS", "Events", "Listener"]

logger = logging.getLogger("aiohttp_wsbus.client")

Listener = Callable[..., object]
EVENTS: Final = frozenset(
    {"state", "subscribed", "denied", "recovered", "disconnected", "refreshed", "error"}
)


class _Entry:
    """One registration of a listener (the same listener twice is two entries)."""

    __slots__ = ("listener",)

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def __call__(self, *args: object) -> object:
        return self.listener(*args)


class Events:
    """Listeners by event; a listener that raises is reported on "error", not raised."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[_Entry]] = {}

    def on(self, event: str, listener: Listener) -> Callable[[], None]:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {sorted(EVENTS)}")
        listeners = self._listeners.setdefault(event, [])
        entry = _Entry(listener)
        listeners.append(entry)

        def stop() -> None:
            if entry in listeners:
                listeners.remove(entry)

        return stop

    def emit(self, event: str, *args: object) -> None:
        for listener in list(self._listeners.get(event, ())):
            try:
                listener(*args)
            except Exception as error:
                if event == "error":
                    logger.exception("an error listener failed")
                else:
                    self.emit("error", error)
