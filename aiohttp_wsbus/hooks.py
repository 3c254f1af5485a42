"""Lifecycle hooks: the application hears who connects, subscribes, unsubscribes and leaves.

Each hook is an aiohttp-style signal (frozen when the application starts, like
`app.on_startup`) whose handlers get a `ConnectionInfo`. Handlers run one after
another; a failing handler is logged and counted and the others still run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosignal import Signal

from .errors import Forbidden
from .tokens import Claims

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["ConnectionInfo", "Hooks"]

logger = logging.getLogger("aiohttp_wsbus")


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """One socket as the application's hooks see it."""

    id: str
    user: str
    claims: Claims
    remote: str | None  # the peer's address as the socket sees it (a proxy's, behind one)
    channels: frozenset[str]

    @classmethod
    def of(cls, connection: Connection) -> ConnectionInfo:
        peer = connection.transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        return cls(
            connection.id,
            connection.claims.subject,
            connection.claims,
            remote,
            frozenset(connection.channels),
        )


class Hooks:
    """The bus's four signals and how they are sent."""

    def __init__(self, owner: object, errors: collections.Counter[str]) -> None:
        self.on_connect: Signal[ConnectionInfo] = Signal(owner)
        self.on_disconnect: Signal[ConnectionInfo, int] = Signal(owner)
        self.on_subscribe: Signal[ConnectionInfo, list[str]] = Signal(owner)
        self.on_unsubscribe: Signal[ConnectionInfo, list[str], str] = Signal(owner)
        self._errors = errors

    def freeze(self) -> None:
        for signal in (self.on_connect, self.on_disconnect, self.on_subscribe, self.on_unsubscribe):
            signal.freeze()

    async def connect(self, info: ConnectionInfo) -> None:
        """Run on_connect; Forbidden refuses the socket, any other error is raised too."""
        for handler in self.on_connect:
            try:
                await handler(info)
            except Forbidden:
                raise
            except Exception:
                self._errors["on_connect"] += 1
                logger.exception("on_connect hook failed for user %r", info.user)
                raise

    async def send(
        self, name: str, handlers: Iterable[Callable[..., Awaitable[object]]], *args: Any
    ) -> None:
        """Run every handler of a notification hook; a failure is logged and counted."""
        for handler in handlers:
            try:
                await handler(*args)
            except Exception:
                self._errors[name] += 1
                logger.exception("%s hook failed", name)
