"""Ephemeral messages through Redis: pub/sub only, no stream, no offset.

An ephemeral message goes out on the channel's own pub/sub channel, so it
reaches exactly the nodes subscribed to the channel, as `*` followed by its
data. Message payloads start with their epoch (hex) and presence events with
`!` (redis_presence.PRESENCE_MARK): `*` starts neither.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis, RedisCluster

from .redis_scripts import ChannelKeys

__all__ = ["EPHEMERAL_MARK", "parse_ephemeral", "publish_ephemeral"]

EPHEMERAL_MARK: Final = b"*"

# KEYS: the channel's meta key (it names the cluster slot of the pub/sub channel).
# ARGV: publish command, pub/sub channel, payload.
_PUBLISH: Final = "redis.call(ARGV[1], ARGV[2], ARGV[3])"


async def publish_ephemeral(
    redis: Redis | RedisCluster, keys: ChannelKeys, data: str, *, sharded: bool
) -> None:
    """Publish `data` (JSON text) to the nodes subscribed to the channel of `keys`."""
    command = "SPUBLISH" if sharded else "PUBLISH"
    payload = EPHEMERAL_MARK + data.encode()
    await redis.eval(_PUBLISH, 1, keys.meta, command, keys.pubsub, payload)


def parse_ephemeral(payload: bytes) -> str | None:
    """The data of an ephemeral message's payload, or None if the payload is not one."""
    if payload[:1] != EPHEMERAL_MARK:
        return None
    return payload[1:].decode()
