"""The Redis control channel: control messages to every node, and the revocations kept.

Every node subscribes to one pub/sub channel, `{prefix:!control}` (`!` is in no
channel name, so no client can subscribe or publish to it), and hands each
JSON message it carries to its bus. Revocations live in one hash under the
same hash tag, `{prefix:!control}:revocations`, one field per revocation,
expiring when the last of them ends; a node (re)loads them each time Redis
confirms its control subscription, so one that was cut off catches up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster

from ..revocations import Revocation
from .redis_scripts import ChannelKeys, milliseconds

__all__ = ["CONTROL_CHANNEL", "ControlChannel"]

logger = logging.getLogger("aiohttp_wsbus")

CONTROL_CHANNEL: Final = "!control"

PUBLISH_SCRIPT: Final = "return redis.call(ARGV[2], KEYS[1], ARGV[1])"
# KEYS[1] the revocations hash; ARGV[1] now (s). Drops ended or unreadable entries.
LOAD_SCRIPT: Final = """
local now = tonumber(ARGV[1])
local stored = redis.call('HGETALL', KEYS[1])
local held = {}
for i = 1, #stored, 2 do
  local ok, record = pcall(cjson.decode, stored[i + 1])
  local ends = ok and type(record) == 'table' and tonumber(record['until'])
  if ends and ends > now then
    table.insert(held, stored[i + 1])
  else
    redis.call('HDEL', KEYS[1], stored[i])
  end
end
return held
"""

# KEYS[1] the revocations hash; ARGV: field, revocation JSON, until (ms), the control
# channel, the message, the publish command, until (s). Stored (keeping the later end
# of two revocations of the same tokens) and announced in one step.
REVOKE_SCRIPT: Final = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local ok, record = pcall(cjson.decode, held or '')
if not (ok and type(record) == 'table' and tonumber(record['until'])
        and tonumber(record['until']) >= tonumber(ARGV[7])) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if redis.call('PEXPIRETIME', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
redis.call(ARGV[6], ARGV[4], ARGV[5])
return 1
"""


class ControlChannel:
    """The names and commands of one prefix's control channel."""

    def __init__(self, prefix: str, *, sharded: bool) -> None:
        self.keys = ChannelKeys.of(prefix, CONTROL_CHANNEL)
        self.revocations_key = self.keys.tag + ":revocations"
        self._publish_command = "SPUBLISH" if sharded else "PUBLISH"

    async def publish(self, redis: Redis | RedisCluster, message: Mapping[str, Any]) -> None:
        # A script, so that a cluster routes it by the channel's slot (sharded pub/sub).
        await redis.eval(
            PUBLISH_SCRIPT, 1, self.keys.pubsub, json.dumps(message), self._publish_command
        )

    async def revoke(self, redis: Redis | RedisCluster, revocation: Revocation) -> None:
        record = revocation.as_json()
        message = {"type": "revoke", "revocation": record}
        field = (
            f"token_id:{revocation.token_id}"
            if revocation.token_id is not None
            else f"user:{revocation.user}:{revocation.issued_before or ''}"
        )
        await redis.eval(
            REVOKE_SCRIPT,
            1,
            self.revocations_key,
            field,
            json.dumps(record),
            milliseconds(revocation.until),
            self.keys.pubsub,
            json.dumps(message),
            self._publish_command,
            revocation.until,
        )

    async def load(self, redis: Redis | RedisCluster) -> dict[str, Any]:
        """Every revocation in force, as the control message that replaces a bus's own."""
        # A script, like every command here: a cluster client routes EVAL by its key.
        held = await redis.eval(LOAD_SCRIPT, 1, self.revocations_key, time.time())
        revocations = []
        for raw in held:
            try:
                revocations.append(Revocation.from_json(json.loads(raw)).as_json())
            except (ValueError, TypeError, KeyError):  # never let one record stop the rest
                logger.warning("redis broker: skipped an unreadable stored revocation")
        return {"type": "revocations", "revocations": revocations}

    @staticmethod
    def parse(payload: bytes) -> dict[str, Any] | None:
        """A control message, or None if the payload is not one (never an exception)."""
        try:
            message = json.loads(payload)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None
