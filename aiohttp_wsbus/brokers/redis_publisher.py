"""Publishing into a Redis-backed bus from a process that is not an aiohttp server.

A Django or Flask app, a worker or a cron job publishes with the same Lua
script as RedisBroker, so its messages get the same offsets, history and
idempotency as those emitted on any node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio
import redis.retry
from marshmallow import ValidationError
from redis.backoff import NoBackoff

from ..errors import BrokerUnavailable
from ..namespaces import Namespaces, load_channels
from ..protocol import encode_data
from .base import (
    APPLICATION,
    DEFAULT_HISTORY,
    HistoryOptions,
    Published,
    check_publish,
    scoped_message_id,
)
from .redis_options import check_options, options_key
from .redis_scripts import (
    PUBLISH_SCRIPT,
    UNREACHABLE,
    ChannelKeys,
    check_prefix,
    parse_published,
    publish_arguments,
)

__all__ = ["RedisPublisher", "SyncRedisPublisher"]


class _Publishing:
    """What both publishers share: settings, checks and the script's arguments.

    `prefix`, `history`, `channels`, `sharded` and `cluster` must match the
    servers' RedisBroker and setup() settings (`history=HistoryOptions(
    history_size, history_ttl)`, `channels` as given to setup()). Before its
    first publish a publisher compares its history options with those the
    servers left in Redis, and raises ValueError if they differ. `cluster=True`
    talks to a Redis Cluster through `url`, any of its nodes, and implies
    `sharded`.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "wsbus",
        history: HistoryOptions = DEFAULT_HISTORY,
        channels: Mapping[str, Mapping[str, Any]] | None = None,
        sharded: bool = False,
        cluster: bool = False,
        socket_timeout: float = 2.0,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self.history = history
        try:
            self.namespaces = Namespaces(load_channels(channels or {}), history)
        except ValidationError as error:
            raise ValueError("channels: " + " | ".join(error.messages)) from None
        self.options_key = options_key(self.prefix)
        self.is_checked = False  # against the servers' options, before the first publish
        self.cluster = cluster
        self.sharded = sharded or cluster
        # Bounded timeouts and no retries: a Redis that is down fails fast.
        self.client_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        }

    def arguments(self, channel: str, data: Any, message_id: str | None) -> list[Any]:
        check_publish(channel, message_id)
        keys, args = publish_arguments(
            ChannelKeys.of(self.prefix, channel),
            encode_data(data),
            None if message_id is None else scoped_message_id(APPLICATION, message_id),
            self.namespaces.history_of(channel),
            sharded=self.sharded,
        )
        return [PUBLISH_SCRIPT, len(keys), *keys, *args]

    def check(self, found: bytes | str | None) -> None:
        """Refuse to run with other history options than the servers' (ValueError)."""
        check_options(found, self.namespaces.writers_view())
        self.is_checked = True


class RedisPublisher(_Publishing):
    """Publishes into the bus through Redis, from asyncio code."""

    def __init__(self, url: str = "redis://localhost:6379/0", **options: Any) -> None:
        super().__init__(url, **options)
        client = redis.asyncio.RedisCluster if self.cluster else redis.asyncio.Redis
        self._redis = client.from_url(
            url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **self.client_options
        )

    async def publish(self, channel: str, data: Any, *, id: str | None = None) -> Published:
        """Publish `data` (any JSON value) to `channel`; BrokerUnavailable if Redis is down."""
        arguments = self.arguments(channel, data, id)
        try:
            if not self.is_checked:
                self.check(await self._redis.get(self.options_key))
            answer = await self._redis.eval(*arguments)
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        return parse_published(channel, answer)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> RedisPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SyncRedisPublisher(_Publishing):
    """RedisPublisher for blocking code (Django, Flask, Celery workers)."""

    def __init__(self, url: str = "redis://localhost:6379/0", **options: Any) -> None:
        super().__init__(url, **options)
        self.url = url
        # Made on the first publish: a cluster client connects as it is made.
        self._redis: redis.Redis | redis.RedisCluster | None = None

    def publish(self, channel: str, data: Any, *, id: str | None = None) -> Published:
        """Publish `data` (any JSON value) to `channel`; BrokerUnavailable if Redis is down."""
        arguments = self.arguments(channel, data, id)
        try:
            if not self.is_checked:
                self.check(self._client().get(self.options_key))
            answer = self._client().eval(*arguments)
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"redis: {error}") from None
        return parse_published(channel, answer)

    def _client(self) -> redis.Redis | redis.RedisCluster:
        if self._redis is None:
            client = redis.RedisCluster if self.cluster else redis.Redis
            retry = redis.retry.Retry(NoBackoff(), 0)
            self._redis = client.from_url(self.url, retry=retry, **self.client_options)
        return self._redis

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    def __enter__(self) -> SyncRedisPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
