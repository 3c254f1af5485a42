"""aiohttp_wsbus: a real-time channel bus for aiohttp.

`setup(app, jwks_url=...)` adds a WebSocket endpoint that pushes channel
messages to clients whose JWT grants them, and an HTTP emit endpoint.
"""

from .brokers import Broker, MemoryBroker, Published
from .bus import Bus
from .client import EmitClient, EmitError, SyncEmitClient
from .errors import (
    BrokerUnavailable,
    Forbidden,
    InvalidChannel,
    InvalidSettings,
    InvalidToken,
    KeysUnavailable,
    WsBusError,
)
from .protocol import CloseCode
from .tokens import Claims
from .web import BUS_KEY, get_bus, setup

__version__ = "0.1.0.dev0"

__all__ = [
    "BUS_KEY",
    "Broker",
    "BrokerUnavailable",
    "Bus",
    "Claims",
    "CloseCode",
    "EmitClient",
    "EmitError",
    "Forbidden",
    "InvalidChannel",
    "InvalidSettings",
    "InvalidToken",
    "KeysUnavailable",
    "MemoryBroker",
    "Published",
    "SyncEmitClient",
    "WsBusError",
    "get_bus",
    "setup",
]
