"""RedisBroker: many processes on many machines share one bus through Redis.

Each channel's offset, epoch, history (a Stream) and idempotency ids live in
Redis under one hash tag, `{prefix:channel}`, so they sit on one cluster slot
and one Lua script publishes atomically. Each node subscribes (pub/sub) only
to the channels it has local subscribers for, and after a lost connection
fetches what it missed from the streams before going live again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BrokerUnavailable
from ..protocol import Position
from .base import Broker, Deliver, History, Message, Published, recover

__all__ = ["PUBLISH_SCRIPT", "ChannelKeys", "RedisBroker", "publish_arguments"]

logger = logging.getLogger("aiohttp_wsbus")

# Errors that mean "Redis cannot be reached right now"; anything else is a bug.
UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# Both scripts start here. KEYS[1] is the meta hash, KEYS[2] the stream, ARGV[1]
# an epoch to use if there is none: a missing meta hash (never published, idle
# past the TTL, or a Redis that lost its data) is a new epoch, and the stream
# that counted in the old one goes with it.
_EPOCH: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
"""

# KEYS: meta hash, stream, id key. ARGV: new epoch, data, history size,
# ttl ms, pub/sub channel, message id ('' for none), publish command.
PUBLISH_SCRIPT: Final = (
    _EPOCH
    + """
local ttl = tonumber(ARGV[4])
if ARGV[6] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local seen_epoch, seen_offset = string.match(seen, '^(%S+) (%d+)$')
    if seen_epoch == epoch then
      redis.call('PEXPIRE', KEYS[1], ttl)
      redis.call('PEXPIRE', KEYS[2], ttl)
      return {epoch, tonumber(seen_offset)}
    end
  end
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'PX', ttl)
end
redis.call(ARGV[7], ARGV[5], epoch .. ' ' .. offset .. ' ' .. ARGV[2])
return {epoch, offset}
"""
)

# KEYS: meta hash, stream. ARGV: new epoch, ttl ms, since epoch, since offset,
# '1' to read the whole stream when the epoch is not the one asked for.
# Returns {epoch, top offset, first offset kept, entries after since...}.
HISTORY_SCRIPT: Final = (
    _EPOCH
    + """
local top = tonumber(redis.call('HGET', KEYS[1], 'offset'))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local after = -1
if ARGV[3] == epoch then
  after = tonumber(ARGV[4])
elseif ARGV[5] == '1' then
  after = 0
end
local first = top + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then
  first = tonumber(string.match(head[1][1], '^(%d+)'))
end
local answer = {epoch, top, first}
if after >= 0 and after < top then
  local entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+')
  for _, entry in ipairs(entries) do
    table.insert(answer, entry)
  end
end
return answer
"""
)


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
    *,
    history_size: int,
    history_ttl: float,
    sharded: bool,
) -> tuple[list[str], list[str | int]]:
    """The KEYS and ARGV of PUBLISH_SCRIPT, shared by RedisBroker and RedisPublisher."""
    return (
        [keys.meta, keys.stream, keys.message_id(message_id)],
        [
            new_epoch(),
            data,
            history_size,
            _milliseconds(history_ttl),
            keys.pubsub,
            message_id or "",
            "SPUBLISH" if sharded else "PUBLISH",
        ],
    )


def parse_published(channel: str, answer: Sequence[Any]) -> Published:
    return Published(channel, int(answer[1]), _text(answer[0]))


def new_epoch() -> str:
    return secrets.token_hex(8)


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry_offset(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


@dataclass(slots=True)
class _Subscription:
    """One channel this node listens to, and the last offset it delivered."""

    channel: str
    keys: ChannelKeys
    ready: asyncio.Future[None]
    last: Position | None = None


@dataclass(slots=True)
class _Top:
    """A channel's stream as HISTORY_SCRIPT saw it."""

    position: Position
    first: int
    messages: list[Message] = field(default_factory=list)


class RedisBroker(Broker):
    """Shares offsets, history and messages between every node on one Redis.

    `sharded=True` uses SPUBLISH/SSUBSCRIBE (Redis 7), which a Redis Cluster
    needs to keep pub/sub traffic on the channel's shard. Socket timeouts are
    bounded so that a Redis that is down makes `publish` fail fast with
    BrokerUnavailable; the listener reconnects with backoff by itself.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "wsbus",
        sharded: bool = False,
        socket_timeout: float = 2.0,
        ping_interval: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.05, 5.0),
        max_connections: int = 32,
    ) -> None:
        self.url = url
        self.prefix = check_prefix(prefix)
        self.sharded = sharded
        self._socket_timeout = socket_timeout
        self._ping_interval = ping_interval
        self._reconnect_delay = reconnect_delay
        self._max_connections = max_connections
        self._deliver: Deliver | None = None
        self._history_size = 100
        self._history_ttl = 300.0
        self._redis: Redis | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        self._by_name: dict[bytes, _Subscription] = {}
        self._connection: Connection | None = None
        self._write_lock = asyncio.Lock()
        self._available = False
        self._was_connected = False
        self._first_attempt = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifetime --------------------------------------------------------

    async def start(self, deliver: Deliver, *, history_size: int, history_ttl: float) -> None:
        self._deliver = deliver
        self._history_size = history_size
        self._history_ttl = history_ttl
        # Concurrent publishes wait for one of max_connections, never fail for want of one.
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self._max_connections,
            timeout=self._socket_timeout,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=2,  # the listener reads pub/sub pushes as plain replies
        )
        self._redis = Redis.from_pool(pool)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen_forever()), loop.create_task(self._keep())]
        # Start up connected when Redis is there; a Redis that is down is not fatal.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._socket_timeout * 2):
                await self._first_attempt.wait()

    async def stop(self) -> None:
        self._deliver = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._available = False

    @property
    def is_available(self) -> bool:
        return self._available

    # -- subscriptions ---------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Listen to `channel`; returns once Redis confirmed it, so nothing after is missed."""
        subscription = self._subscriptions.get(channel)
        if subscription is None:
            if not self._available:
                raise BrokerUnavailable("redis is not reachable")
            keys = ChannelKeys.of(self.prefix, channel)
            loop = asyncio.get_running_loop()
            subscription = _Subscription(channel, keys, loop.create_future())
            async with self._write_lock:
                self._subscriptions[channel] = subscription
                self._by_name[keys.pubsub.encode()] = subscription
                await self._send_quietly(self._command("SUBSCRIBE"), keys.pubsub)
        await self._ready(subscription)

    async def unsubscribe(self, channel: str) -> None:
        subscription = self._subscriptions.pop(channel, None)
        if subscription is None:
            return
        self._by_name.pop(subscription.keys.pubsub.encode(), None)
        subscription.ready.cancel()
        async with self._write_lock:
            await self._send_quietly(self._command("UNSUBSCRIBE"), subscription.keys.pubsub)

    async def _ready(self, subscription: _Subscription) -> None:
        await asyncio.wait([subscription.ready], timeout=self._socket_timeout * 2)
        if not subscription.ready.done() or subscription.ready.cancelled():
            if self._subscriptions.get(subscription.channel) is subscription:
                await self.unsubscribe(subscription.channel)
            raise BrokerUnavailable("redis did not confirm the subscription")

    def _command(self, name: str) -> str:
        return "S" + name if self.sharded else name

    async def _send_quietly(self, *args: str) -> None:
        # Losing the connection here is the listener's to notice: it resubscribes.
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(*UNREACHABLE):
                await connection.send_command(*args)

    # -- publishing and history ------------------------------------------

    async def publish(self, channel: str, data: str, *, message_id: str | None = None) -> Published:
        if not self._available or self._redis is None:
            raise BrokerUnavailable("redis is not reachable")
        keys, args = publish_arguments(
            ChannelKeys.of(self.prefix, channel),
            data,
            message_id,
            history_size=self._history_size,
            history_ttl=self._history_ttl,
            sharded=self.sharded,
        )
        try:
            answer = await self._redis.eval(PUBLISH_SCRIPT, len(keys), *keys, *args)
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        return parse_published(channel, answer)

    async def history(self, since: Mapping[str, Position | None]) -> dict[str, History]:
        # A subscribe still waiting for Redis must land first, or this read
        # could miss a message published between it and the subscription.
        waiting = [
            s.ready
            for channel in since
            if (s := self._subscriptions.get(channel)) is not None and not s.ready.done()
        ]
        if waiting:
            await asyncio.wait(waiting, timeout=self._socket_timeout * 2)
        try:
            tops = await self._read({c: (p, False) for c, p in since.items()})
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        return {
            channel: recover(since[channel], top.position, top.first, top.messages)
            for channel, top in tops.items()
        }

    async def _read(self, since: Mapping[str, tuple[Position | None, bool]]) -> dict[str, _Top]:
        """Run HISTORY_SCRIPT for each channel in one round trip."""
        if self._redis is None:
            raise BrokerUnavailable("the broker is not started")
        ttl = _milliseconds(self._history_ttl)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, (position, whole_new_epoch) in since.items():
                keys = ChannelKeys.of(self.prefix, channel)
                pipe.eval(
                    HISTORY_SCRIPT,
                    2,
                    keys.meta,
                    keys.stream,
                    new_epoch(),
                    ttl,
                    position.epoch if position else "",
                    position.offset if position else 0,
                    "1" if whole_new_epoch else "0",
                )
            answers = await pipe.execute()
        pairs = zip(since, answers, strict=True)
        return {channel: _parse_top(channel, answer) for channel, answer in pairs}

    async def _keep(self) -> None:
        """Keep subscribed channels' history and epoch alive past the TTL, like MemoryBroker."""
        while True:
            await asyncio.sleep(self._history_ttl / 3)
            channels = list(self._subscriptions)
            for start in range(0, len(channels), 500):
                with contextlib.suppress(*UNREACHABLE):
                    await self._read(dict.fromkeys(channels[start : start + 500], (None, False)))

    # -- the listener ----------------------------------------------------

    async def _listen_forever(self) -> None:
        low, high = self._reconnect_delay
        delay = low
        while True:
            self._was_connected = False
            try:
                await self._listen()
            except UNREACHABLE as error:
                if self._was_connected:
                    logger.warning("redis connection lost (%s); reconnecting", error)
            except Exception:
                logger.exception("redis broker listener failed; reconnecting")
            self._first_attempt.set()
            if self._was_connected:
                delay = low
            await asyncio.sleep(delay)
            delay = min(delay * 2, high)

    async def _listen(self) -> None:
        assert self._redis is not None
        connection: Connection = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            async with self._write_lock:
                self._connection = connection
                for subscription in self._subscriptions.values():
                    name = subscription.keys.pubsub
                    await connection.send_command(self._command("SUBSCRIBE"), name)
                if not self._subscriptions:
                    await connection.send_command("PING")
            self._available = self._was_connected = True
            self._first_attempt.set()
            logger.info("redis broker connected")
            await self._read_messages(connection)
        finally:
            self._connection = None
            self._available = False
            await connection.disconnect(nowait=True)

    async def _read_messages(self, connection: Connection) -> None:
        waiting_for_pong = False
        while True:
            reply = await connection.read_response(timeout=self._ping_interval)
            if reply is None:
                if waiting_for_pong:
                    raise RedisTimeoutError("redis did not answer a ping")
                async with self._write_lock:
                    await connection.send_command("PING")
                waiting_for_pong = True
                continue
            waiting_for_pong = False
            if isinstance(reply, list) and len(reply) >= 3:
                await self._on_push(reply[0], reply[1], reply[2])

    async def _on_push(self, kind: bytes, name: bytes, payload: Any) -> None:
        subscription = self._by_name.get(name)
        if subscription is None:
            return
        if kind in (b"message", b"smessage"):
            if subscription.ready.done():  # earlier ones belong to a past subscription
                await self._on_message(subscription, payload)
        elif kind in (b"subscribe", b"ssubscribe"):
            await self._catch_up(subscription)
            if not subscription.ready.done():
                subscription.ready.set_result(None)

    async def _on_message(self, subscription: _Subscription, payload: bytes) -> None:
        epoch_bytes, offset_bytes, data = payload.split(b" ", 2)
        epoch, offset = epoch_bytes.decode(), int(offset_bytes)
        last = subscription.last
        if last is not None and (epoch != last.epoch or offset > last.offset + 1):
            # Something was missed (a new epoch, or a gap): take it from the stream.
            await self._catch_up(subscription)
            last = subscription.last
        if last is not None and epoch == last.epoch and offset <= last.offset:
            return
        self._hand_over(subscription, Message(subscription.channel, offset, epoch, data.decode()))

    async def _catch_up(self, subscription: _Subscription) -> None:
        """Deliver what the stream holds after the last delivered offset (on (re)subscribe)."""
        last = subscription.last
        answer = await self._read({subscription.channel: (last, last is not None)})
        top = answer[subscription.channel]
        if last is None:
            # A new subscription starts at the top: its subscribers read the rest as history.
            subscription.last = top.position
            return
        if top.messages and top.position.epoch == last.epoch and top.first > last.offset + 1:
            logger.warning(
                "redis broker: %s offsets %d to %d fell out of the history while disconnected",
                subscription.channel,
                last.offset + 1,
                top.first - 1,
            )
        for message in top.messages:
            self._hand_over(subscription, message)
        subscription.last = top.position

    def _hand_over(self, subscription: _Subscription, message: Message) -> None:
        subscription.last = Position(message.offset, message.epoch)
        if self._deliver is not None and self._subscriptions.get(message.channel) is subscription:
            self._deliver(message)


def _parse_top(channel: str, answer: list[Any]) -> _Top:
    epoch = _text(answer[0])
    top = _Top(Position(int(answer[1]), epoch), int(answer[2]))
    for entry_id, fields in answer[3:]:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        top.messages.append(Message(channel, _entry_offset(entry_id), epoch, _text(values[b"d"])))
    return top
