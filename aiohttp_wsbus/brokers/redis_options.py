"""The history options the servers use, left in Redis for the publishers to check.

Every process that writes a channel's stream (each node's RedisBroker, each
RedisPublisher) must trim and expire it alike. Each node writes its view
(Namespaces.writers_view: the default history and each pattern's) under
`<prefix>:options`; a publisher compares its own before its first publish and
refuses to run with different ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .redis_scripts import UNREACHABLE

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = ["check_options", "options_key", "share_options", "shortest_ttl"]

logger = logging.getLogger("aiohttp_wsbus")


def options_key(prefix: str) -> str:
    return f"{prefix}:options"


def _encode(view: Mapping[str, Any]) -> str:
    return json.dumps(view, sort_keys=True, separators=(",", ":"))


def shortest_ttl(view: Mapping[str, Any]) -> float:
    """The shortest history TTL in a writers' view, in seconds."""
    return float(min(ttl for _, ttl in [view["history"], *view["channels"].values()]))


async def share_options(
    redis: Redis | RedisCluster | None, prefix: str, view: Mapping[str, Any]
) -> None:
    """Write this node's view (the last node started wins); log if Redis is down."""
    if redis is None:
        return
    try:
        await redis.set(options_key(prefix), _encode(view))
    except UNREACHABLE as error:
        logger.warning("redis broker: cannot leave the history options for publishers: %s", error)


def check_options(found: bytes | str | None, view: Mapping[str, Any]) -> None:
    """Raise ValueError when the servers' view (`found`, None if none) differs from `view`."""
    if found is None:
        return  # no server has started on this Redis yet: nothing to differ from
    text = found.decode() if isinstance(found, bytes) else found
    if text == _encode(view):
        return
    raise ValueError(
        "this publisher's history options differ from the servers' "
        f"(servers: {text}; publisher: {_encode(view)}): give it the history= and "
        "channels= of setup()"
    )

