"""aiohttp_wsbus: a real-time channel bus for aiohttp.

`setup(app, jwks_url=...)` adds a WebSocket endpoint that pushes channel
messages to clients whose JWT grants them, and an HTTP emit endpoint.
"""

from typing import TYPE_CHECKING, Any

from .brokers import Broker, HistoryOptions, MemoryBroker, Published
from .bus import Bus
from .emit_client import EmitClient, EmitError, SyncEmitClient
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

if TYPE_CHECKING:
    from .brokers.redis import RedisBroker
    from .brokers.redis_publisher import RedisPublisher, SyncRedisPublisher

__version__ = "0.1.0.dev0"

# Imported on first use, so that redis stays an optional extra.
_LAZY = {
    "RedisBroker": "aiohttp_wsbus.brokers.redis",
    "RedisPublisher": "aiohttp_wsbus.brokers.redis_publisher",
    "SyncRedisPublisher": "aiohttp_wsbus.brokers.redis_publisher",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'aiohttp_wsbus' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


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
    "HistoryOptions",
    "InvalidChannel",
    "InvalidSettings",
    "InvalidToken",
    "KeysUnavailable",
    "MemoryBroker",
    "Published",
    "RedisBroker",
    "RedisPublisher",
    "SyncEmitClient",
    "SyncRedisPublisher",
    "WsBusError",
    "get_bus",
    "setup",
]
