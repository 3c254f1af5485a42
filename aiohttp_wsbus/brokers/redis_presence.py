"""Presence in Redis: one set of keys per channel, joins and leaves decided in Lua.

Under the channel's hash tag (so one cluster slot holds them, with its pub/sub
channel): `:presence` maps connection id -> user, `:presence:info` connection
id -> info JSON, `:presence:users` user -> live connections cluster-wide, and
`:presence:expiry` (a sorted set) connection id -> when it expires (Redis's
clock, ms). A script adds or removes one connection and, when that makes the
user's first or last, publishes `!["join", user, info]` or `!["leave", user]`
on the channel's pub/sub channel (`!` starts no message payload).

Each node refreshes its own entries every `ttl / 3` (re-adding any that were
lost) and sweeps the channels it has members in: expired entries, a crashed
node's, are removed with their leaves. A lock per channel lets one node sweep
it at a time; every read of a channel's presence sweeps it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Collection
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster

from .presence import PresenceEvent, PresenceOptions, PresenceSnapshot
from .redis_scripts import UNREACHABLE, ChannelKeys, milliseconds, text

__all__ = ["RedisPresence"]

PRESENCE_MARK: Final = b"!"

# KEYS: 1 entries, 2 infos, 3 users, 4 expiry.
_COMMON: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function leave(conn, pubsub, command, max)
  redis.call('ZREM', KEYS[4], conn)
  local user = redis.call('HGET', KEYS[1], conn)
  if not user then return end
  redis.call('HDEL', KEYS[1], conn)
  redis.call('HDEL', KEYS[2], conn)
  if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
    if redis.call('HLEN', KEYS[3]) < max then
      redis.call(command, pubsub, '!' .. cjson.encode({'leave', user}))
    end
  end
end
local function sweep(pubsub, command, max)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms(), 'LIMIT', 0, 1000)
  for _, conn in ipairs(expired) do leave(conn, pubsub, command, max) end
  return #expired
end
"""

# ARGV: connection, user, info, ttl (ms), pub/sub channel, publish command, max members.
# Also the refresh: an entry still there only gets its new expiry.
JOIN_SCRIPT: Final = (
    _COMMON
    + """
local conn, user, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], now_ms() + ttl, conn)
if redis.call('HSETNX', KEYS[1], conn, user) == 1 then
  redis.call('HSET', KEYS[2], conn, ARGV[3])
  if redis.call('HINCRBY', KEYS[3], user, 1) == 1
      and redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[7]) then
    redis.call(ARGV[6], ARGV[5], '!' .. cjson.encode({'join', user, ARGV[3]}))
  end
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl * 2) end
return 1
"""
)

# ARGV: connection, pub/sub channel, publish command, max members.
LEAVE_SCRIPT: Final = _COMMON + "leave(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))\nreturn 1\n"

# KEYS[5] the sweep lock; ARGV: pub/sub channel, publish command, max members, lock (ms).
SWEEP_SCRIPT: Final = (
    _COMMON
    + """
if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[4]) then return -1 end
return sweep(ARGV[1], ARGV[2], tonumber(ARGV[3]))
"""
)

# ARGV: pub/sub channel, publish command, max members, limit (-1: none).
# {count} above the limit, else {count, entries, infos} (flat HGETALL replies).
READ_SCRIPT: Final = (
    _COMMON
    + """
sweep(ARGV[1], ARGV[2], tonumber(ARGV[3]))
local count = redis.call('HLEN', KEYS[3])
local limit = tonumber(ARGV[4])
if limit >= 0 and count > limit then return {count} end
return {count, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""
)


def _keys(prefix: str, channel: str) -> list[str]:
    tag = ChannelKeys.of(prefix, channel).tag
    return [
        tag + ":presence",
        tag + ":presence:info",
        tag + ":presence:users",
        tag + ":presence:expiry",
    ]


class RedisPresence:
    """One RedisBroker's presence: its scripts, and this node's own entries."""

    def __init__(
        self,
        prefix: str,
        options: PresenceOptions,
        *,
        sharded: bool,
        slots: asyncio.Semaphore,
    ) -> None:
        self.prefix = prefix
        self.options = options
        self._publish_command = "SPUBLISH" if sharded else "PUBLISH"
        self._slots = slots  # the broker's: presence shares its connections
        # This node's members: channel -> connection id -> (user, info).
        self.local: dict[str, dict[str, tuple[str, str]]] = {}

    def _announce(self, channel: str) -> list[Any]:
        """The pub/sub channel, command and limit every script that announces takes."""
        return [
            ChannelKeys.of(self.prefix, channel).pubsub,
            self._publish_command,
            self.options.max_members,
        ]

    async def join(
        self,
        redis: Redis | RedisCluster,
        connection_id: str,
        user: str,
        info: str,
        channels: Collection[str],
        *,
        snapshot: Collection[str] = (),
        limit: int | None = None,
    ) -> dict[str, PresenceSnapshot]:
        for channel in channels:  # before the round trip: a leave meanwhile undoes it
            self.local.setdefault(channel, {})[connection_id] = (user, info)
        entries = [(c, connection_id, user, info) for c in channels]
        return await self._join(redis, entries, snapshot, limit)

    async def _join(
        self,
        redis: Redis | RedisCluster,
        entries: Collection[tuple[str, str, str, str]],
        snapshot: Collection[str] = (),
        limit: int | None = None,
    ) -> dict[str, PresenceSnapshot]:
        """Run JOIN_SCRIPT for each entry, then READ_SCRIPT for each `snapshot` channel,
        in one round trip (a channel's scripts run in order on its node)."""
        ttl = milliseconds(self.options.ttl)
        async with self._slots, redis.pipeline(transaction=False) as pipe:
            for channel, connection_id, user, info in entries:
                pubsub, command, max_members = self._announce(channel)
                pipe.eval(
                    JOIN_SCRIPT,
                    4,
                    *_keys(self.prefix, channel),
                    connection_id,
                    user,
                    info,
                    ttl,
                    pubsub,
                    command,
                    max_members,
                )
            self._queue_reads(pipe, snapshot, limit)
            answers = await pipe.execute()
        reads = answers[len(entries) :]
        return {
            channel: _snapshot(answer, limit)
            for channel, answer in zip(snapshot, reads, strict=True)
        }

    async def leave(
        self, redis: Redis | RedisCluster, connection_id: str, channels: Collection[str]
    ) -> None:
        for channel in channels:
            held = self.local.get(channel)
            if held is not None:
                held.pop(connection_id, None)
                if not held:
                    del self.local[channel]
        async with self._slots, redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.eval(
                    LEAVE_SCRIPT,
                    4,
                    *_keys(self.prefix, channel),
                    connection_id,
                    *self._announce(channel),
                )
            await pipe.execute()

    async def read(
        self, redis: Redis | RedisCluster, channels: Collection[str], limit: int | None
    ) -> dict[str, PresenceSnapshot]:
        return await self._join(redis, (), channels, limit)

    def _queue_reads(self, pipe: Any, channels: Collection[str], limit: int | None) -> None:
        for channel in channels:
            pipe.eval(
                READ_SCRIPT,
                4,
                *_keys(self.prefix, channel),
                *self._announce(channel),
                -1 if limit is None else limit,
            )

    async def keep(self, redis: Callable[[], Redis | RedisCluster | None]) -> None:
        """Every ttl / 3: refresh this node's entries, then sweep its channels."""
        interval = self.options.refresh_interval
        while True:
            await asyncio.sleep(interval)
            client = redis()
            if client is None:
                continue
            with contextlib.suppress(*UNREACHABLE):
                await self._refresh(client)
            with contextlib.suppress(*UNREACHABLE):
                await self._sweep(client, milliseconds(interval * 0.9))

    async def _refresh(self, redis: Redis | RedisCluster) -> None:
        entries = [
            (channel, connection_id, user, info)
            for channel, held in list(self.local.items())
            for connection_id, (user, info) in list(held.items())
        ]
        for start in range(0, len(entries), 500):
            await self._join(redis, entries[start : start + 500])

    async def _sweep(self, redis: Redis | RedisCluster, lock: int) -> None:
        channels = list(self.local)
        for start in range(0, len(channels), 500):
            async with self._slots, redis.pipeline(transaction=False) as pipe:
                for channel in channels[start : start + 500]:
                    keys = _keys(self.prefix, channel)
                    pipe.eval(
                        SWEEP_SCRIPT,
                        5,
                        *keys,
                        keys[0] + ":sweep",
                        *self._announce(channel),
                        lock,
                    )
                await pipe.execute()

    @staticmethod
    def parse(channel: str, payload: bytes) -> PresenceEvent | None:
        """The join or leave a `!` payload announces (None if unreadable: never raises)."""
        try:
            event = json.loads(payload[1:])
        except ValueError:
            return None
        if not isinstance(event, list) or len(event) < 2 or not isinstance(event[1], str):
            return None
        if event[0] == "join" and len(event) == 3 and isinstance(event[2], str):
            return PresenceEvent(channel, event[1], event[2])
        if event[0] == "leave":
            return PresenceEvent(channel, event[1])
        return None


def _snapshot(answer: list[Any], limit: int | None) -> PresenceSnapshot:
    count = int(answer[0])
    if len(answer) == 1:
        return PresenceSnapshot(count)
    entries, infos = answer[1], answer[2]
    info_by_connection = {text(infos[i]): text(infos[i + 1]) for i in range(0, len(infos), 2)}
    users = [
        (text(entries[i + 1]), info_by_connection.get(text(entries[i]), "{}"))
        for i in range(0, len(entries), 2)
    ]
    return PresenceSnapshot.of(users, limit)
