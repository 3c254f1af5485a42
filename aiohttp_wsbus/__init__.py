"""aiohttp_wsbus: a real-time channel bus for aiohttp.

`setup(app, jwks_url=...)` adds a WebSocket endpoint that pushes channel
messages to clients whose JWT grants them, and an HTTP emit endpoint.
`Client` subscribes from Python; `aiohttp_wsbus.testing` is the test kit.
"""

from typing import TYPE_CHECKING, Any

from .brokers import Broker, HistoryOptions, MemoryBroker, Published
from .brokers.presence import Member
from .bus import Bus
from .client import Client
from .client_requests import RequestError
from .client_subscription import (
    ClientClosed,
    ClosedByServer,
    Message,
    Subscription,
    SubscriptionDenied,
)
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
from .history import HistoryPage
from .hooks import ConnectionInfo
from .protocol import CloseCode, Position
from .tokens import Claims
from .web import BUS_KEY, get_bus, setup

if TYPE_CHECKING:
    from .brokers.redis import RedisBroker as RedisBroker
    from .brokers.redis_publisher import RedisPublisher as RedisPublisher
    from .brokers.redis_publisher import SyncRedisPublisher as SyncRedisPublisher

__version__ = "0.1.0.dev0"

# Public too, but imported on first use: they need the redis extra. They stay out
# of __all__ so that `from aiohttp_wsbus import *` works without it.
_NEEDS_REDIS = {
    "RedisBroker": "aiohttp_wsbus.brokers.redis",
    "RedisPublisher": "aiohttp_wsbus.brokers.redis_publisher",
    "SyncRedisPublisher": "aiohttp_wsbus.brokers.redis_publisher",
}


def __getattr__(name: str) -> Any:
    if name not in _NEEDS_REDIS:
        raise AttributeError(f"module 'aiohttp_wsbus' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(_NEEDS_REDIS[name])
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "redis":
            raise
        raise ImportError(
            f"aiohttp_wsbus.{name} needs the redis package: pip install 'aiohttp-wsbus[redis]'",
            name="aiohttp_wsbus",
        ) from error
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_NEEDS_REDIS])


__all__ = [
    "BUS_KEY",
    "Broker",
    "BrokerUnavailable",
    "Bus",
    "Claims",
    "Client",
    "ClientClosed",
    "CloseCode",
    "ClosedByServer",
    "ConnectionInfo",
    "EmitClient",
    "EmitError",
    "Forbidden",
    "HistoryOptions",
    "HistoryPage",
    "InvalidChannel",
    "InvalidSettings",
    "InvalidToken",
    "KeysUnavailable",
    "Member",
    "MemoryBroker",
    "Message",
    "Position",
    "Published",
    "RequestError",
    "Subscription",
    "SubscriptionDenied",
    "SyncEmitClient",
    "WsBusError",
    "get_bus",
    "setup",
]
