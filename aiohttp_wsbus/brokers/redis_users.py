"""Each user's sockets counted on every node through Redis (max_connections_per_user).

A user's count is one hash, `{prefix:user:<user>}:sockets`: one field per node,
"<count> <expires ms>". A node takes a socket with one script (atomic, so two
nodes never both take the last one) and gives it back when it closes; every
REFRESH seconds it rewrites its fields, so a node that died without giving its
sockets back stops counting after three times that. Sockets whose peers vanished
count until the heartbeat drops them: the count is exact for live sockets and
approximate, within one heartbeat, for dead ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
from typing import TYPE_CHECKING, Final

from ..errors import BrokerUnavailable
from .redis_scripts import UNREACHABLE

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = ["UserSockets"]

REFRESH: Final = 10.0  # seconds between a node's rewrites of its counts, which outlive it 3x

# KEYS: the user's hash. ARGV: this node, the limit, expiry ms.
# Drops expired nodes' fields; takes a socket for this node unless the live
# fields already add up to the limit. Returns 1 if taken, else 0.
TAKE_SCRIPT: Final = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local total, mine = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local count, expires = string.match(fields[i + 1], '^(%d+) (%d+)$')
  if not count or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    total = total + tonumber(count)
    if fields[i] == ARGV[1] then mine = tonumber(count) end
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], (mine + 1) .. ' ' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS: the user's hash. ARGV: this node, its count of the user's sockets, expiry ms.
SET_SCRIPT: Final = """
if tonumber(ARGV[2]) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + ttl))
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


class UserSockets:
    """This node's share of every user's socket count in Redis."""

    def __init__(self, prefix: str, *, refresh: float = REFRESH) -> None:
        self.prefix = prefix
        self.refresh = refresh  # seconds between rewrites; a share outlives its last by 3x
        self.node = secrets.token_hex(8)
        self.counts: collections.Counter[str] = collections.Counter()
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    def key(self, user: str) -> str:
        return f"{{{self.prefix}:user:{user}}}:sockets"

    async def take(self, redis: Redis | RedisCluster | None, user: str, limit: int) -> bool:
        """Take one of `user`'s `limit` sockets; raise BrokerUnavailable if Redis is down."""
        if redis is None:
            raise BrokerUnavailable("the broker is not started")
        expires = int(self.refresh * 3000)
        try:
            taken = await redis.eval(TAKE_SCRIPT, 1, self.key(user), self.node, limit, expires)
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        if taken != 1:
            return False
        self.counts[user] += 1
        return True

    def release(self, user: str) -> None:
        """Give one of `user`'s sockets back (written by `keep`, at once)."""
        if self.counts[user] <= 1:
            del self.counts[user]
        else:
            self.counts[user] -= 1
        self._dirty.add(user)
        self._wake.set()

    async def keep(self, redis: Redis | RedisCluster) -> None:
        """Write released sockets as they come, and every count every REFRESH seconds."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.refresh
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_refresh):
                    await self._wake.wait()
            self._wake.clear()
            if loop.time() >= next_refresh:
                users, self._dirty = set(self.counts) | self._dirty, set()
                next_refresh = loop.time() + self.refresh
            else:
                users, self._dirty = self._dirty, set()
            try:
                await self._write(redis, users)
            except UNREACHABLE:
                self._dirty |= users  # the next refresh writes them again

    async def _write(self, redis: Redis | RedisCluster, users: set[str]) -> None:
        expires = int(self.refresh * 3000)
        listed = list(users)
        for start in range(0, len(listed), 500):
            async with redis.pipeline(transaction=False) as pipe:
                for user in listed[start : start + 500]:
                    count = self.counts.get(user, 0)
                    pipe.eval(SET_SCRIPT, 1, self.key(user), self.node, count, expires)
                await pipe.execute()
