"""The Redis side of the bus: key names, Lua scripts and their arguments.

Shared by RedisBroker and the publishers, so every process that writes to a
channel counts its offsets and epochs the same way.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..protocol import Position
from .base import EmptyEpoch, HistoryOptions, Message, Published

__all__ = [
    "HISTORY_SCRIPT",
    "KEEP_SCRIPT",
    "PUBLISH_SCRIPT",
    "UNREACHABLE",
    "ChannelKeys",
    "Top",
    "check_prefix",
    "entry_offset",
    "milliseconds",
    "new_epoch",
    "parse_published",
    "parse_top",
    "publish_arguments",
    "text",
]

# Errors that mean "Redis cannot be reached right now"; anything else is a bug.
# A cluster adds its own: down (no majority, a slot without a master), no node
# reachable, a slot not covered.
UNREACHABLE: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    RedisClusterException,
)
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# KEYS: meta hash, stream, id key. ARGV: new epoch, data, history size,
# ttl ms, pub/sub channel, message id ('' for none), publish command.
# Only a publish makes a channel's state. A missing meta hash (never published,
# idle past the TTL, or a Redis that lost its data) is a new epoch, ARGV[1],
# and the stream that counted in the old one goes with it. The meta hash keeps
# the TTL of the last publish, for reads and keep-alives. History size 0 keeps
# no stream and no ids: the meta hash alone counts offsets.
# Returns {epoch, offset, 1 if the id was already published else 0}.
PUBLISH_SCRIPT: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local ttl = tonumber(ARGV[4])
local keeps = tonumber(ARGV[3]) > 0
redis.call('HSET', KEYS[1], 'ttl', ttl)
if ARGV[6] ~= '' and keeps then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local seen_epoch, seen_offset = string.match(seen, '^(%S+) (%d+)$')
    if seen_epoch == epoch then
      redis.call('PEXPIRE', KEYS[1], ttl)
      redis.call('PEXPIRE', KEYS[2], ttl)
      return {epoch, tonumber(seen_offset), 1}
    end
  end
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
if keeps then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[6] ~= '' and keeps then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'PX', ttl)
end
redis.call(ARGV[7], ARGV[5], epoch .. ' ' .. offset .. ' ' .. ARGV[2])
return {epoch, offset, 0}
"""

# KEYS: meta hash, stream. ARGV: ttl ms for a channel whose meta hash has none.
# Extends a subscribed channel's state by its own TTL (if it has state).
KEEP_SCRIPT: Final = """
local ttl = redis.call('HGET', KEYS[1], 'ttl') or ARGV[1]
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 0
"""

# KEYS: meta hash, stream. ARGV: ttl ms (the meta hash's own wins), since
# epoch, since offset, '1' to read the whole stream when the epoch is not the
# one asked for.
# Returns {epoch, top offset, first offset kept, now, entries after since...}.
# It writes nothing but the expiry of keys that exist: a channel with no state
# answers offset 0 of the empty epoch of now (base.EmptyEpoch: Redis's clock,
# and the first 16 digits of its run id, new on every restart or failover; "0"
# where INFO is not allowed). `now` is that empty epoch when the channel has no
# state or since is an empty epoch, else ''.
HISTORY_SCRIPT: Final = """
local function empty_epoch()
  local time = redis.call('TIME')
  local info = redis.pcall('INFO', 'server')
  local generation = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or '0'
  local ms = time[1] .. string.format('%03d', math.floor(tonumber(time[2]) / 1000))
  return '~' .. ms .. '-' .. string.sub(generation, 1, 16)
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local now = empty_epoch()
  return {now, 0, 1, now}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local ttl = redis.call('HGET', KEYS[1], 'ttl') or ARGV[1]
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local first = top + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then
  first = tonumber(string.match(head[1][1], '^(%d+)'))
end
local from_empty = string.sub(ARGV[2], 1, 1) == '~' and ARGV[3] == '0'
local after = -1
if ARGV[2] == epoch then
  after = tonumber(ARGV[3])
elseif ARGV[4] == '1' or (from_empty and first == 1) then
  after = 0
end
local answer = {epoch, top, first, from_empty and empty_epoch() or ''}
if after >= 0 and after < top then
  local entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+')
  for _, entry in ipairs(entries) do
    table.insert(answer, entry)
  end
end
return answer
"""


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """A channel's Redis names, all under one hash tag so they share a cluster slot."""

    tag: str

    @classmethod
    def of(cls, prefix: str, channel: str) -> ChannelKeys:
        return cls(f"{{{prefix}:{channel}}}")

    @property
    def meta(self) -> str:
        return self.tag + ":meta"

    @property
    def stream(self) -> str:
        return self.tag + ":stream"

    @property
    def pubsub(self) -> str:
        return self.tag

    def message_id(self, message_id: str | None) -> str:
        return f"{self.tag}:id:{message_id or ''}"


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError("prefix: 1 to 64 characters from A-Z a-z 0-9 _ . : -")
    return prefix


def publish_arguments(
    keys: ChannelKeys,
    data: str,
    message_id: str | None,
    history: HistoryOptions,
    *,
    sharded: bool,
) -> tuple[list[str], list[str | int]]:
    """The KEYS and ARGV of PUBLISH_SCRIPT, shared by RedisBroker and RedisPublisher."""
    return (
        [keys.meta, keys.stream, keys.message_id(message_id)],
        [
            new_epoch(),
            data,
            history.size,
            milliseconds(history.ttl),
            keys.pubsub,
            message_id or "",
            "SPUBLISH" if sharded else "PUBLISH",
        ],
    )


@dataclass(slots=True)
class Top:
    """A channel's stream as HISTORY_SCRIPT saw it (`now`: the empty epoch of the read)."""

    position: Position
    first: int
    now: EmptyEpoch | None
    messages: list[Message] = field(default_factory=list)


def parse_top(channel: str, answer: list[Any]) -> Top:
    """HISTORY_SCRIPT's answer for `channel`."""
    epoch = text(answer[0])
    now = EmptyEpoch.parse(text(answer[3]))
    top = Top(Position(int(answer[1]), epoch), int(answer[2]), now)
    for entry_id, fields in answer[4:]:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        top.messages.append(Message(channel, entry_offset(entry_id), epoch, text(values[b"d"])))
    return top


def parse_published(channel: str, answer: Sequence[Any]) -> Published:
    return Published(channel, int(answer[1]), text(answer[0]), is_repeat=answer[2] == 1)


def new_epoch() -> str:
    return secrets.token_hex(8)


def milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_offset(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
