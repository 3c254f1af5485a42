"""Options per kind of channel (setup's `channels`): the most specific grant pattern
wins; history size, TTL and recovery per channel, in memory and in real Redis; the
Redis publishers refuse options that differ from the servers'."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import RedisBroker, RedisPublisher, SyncRedisPublisher
from aiohttp_wsbus.brokers import HistoryOptions, Message
from aiohttp_wsbus.namespaces import ChannelOptions, Namespaces

from .conftest import JwksServer, MakeToken
from .redis_server import until
from .support import BusServer, next_frame, start_bus

CHANNELS: dict[str, dict[str, Any]] = {
    "typing:*": {"history_size": 0},
    "chat:*": {"history_size": 500, "history_ttl": 3600},
    "chat:support": {"recovery": False},
}
GLOBAL = HistoryOptions(100, 300.0)


def test_the_most_specific_pattern_wins_and_unmatched_channels_take_the_settings() -> None:
    namespaces = Namespaces({**CHANNELS, "*": {"history_ttl": 60}, "chat:vip:*": {}}, GLOBAL)
    assert namespaces.of("typing:room:1") == ChannelOptions(HistoryOptions(0, 300.0))
    assert namespaces.of("chat:lobby").history == HistoryOptions(500, 3600.0)
    # An exact name beats any prefix; what it leaves out comes from the settings.
    assert namespaces.of("chat:support") == ChannelOptions(GLOBAL, recovery=False)
    assert namespaces.of("chat:vip:1").history == GLOBAL  # longer prefix, nothing set
    assert namespaces.of("news:1").history == HistoryOptions(100, 60.0)  # "*"
    assert Namespaces(CHANNELS, GLOBAL).of("news:1") == ChannelOptions(GLOBAL)
    assert not namespaces.of("typing:x").is_recoverable
    assert not namespaces.of("chat:support").is_recoverable


@pytest.mark.parametrize(
    ("channels", "named"),
    [
        ({"chat:*": {"presents": True}}, "'chat:\\*': presents: Unknown field"),
        ({"chat:*": {"history_size": -1}}, "'chat:\\*': history_size"),
        ({"chat:*": {"history_ttl": 0}}, "'chat:\\*': history_ttl: must be greater than 0"),
        ({"chat:*": {"recovery": "yes"}}, "'chat:\\*': recovery"),
        ({"chat*": {}}, "'chat\\*' is not a grant pattern"),
        ({"chat:*": 0}, "'chat:\\*': give a mapping"),
        (["chat:*"], "give a mapping of grant patterns"),
    ],
)
def test_bad_channel_options_name_the_pattern_and_the_option(channels: Any, named: str) -> None:
    with pytest.raises(aiohttp_wsbus.InvalidSettings, match=f"channels: (.* )?{named}"):
        aiohttp_wsbus.setup(web.Application(), jwt_secret="s" * 32, channels=channels)


async def recovered(
    server: BusServer, make_token: MakeToken, channel: str, offset: int, epoch: str
) -> bool:
    """Whether a socket asking for `channel` from (offset, epoch) is told it recovered."""
    token = make_token(channels=["chat:*", "typing:*", "news:*"])
    socket, welcome = await server.open(
        token, [channel], since={channel: {"offset": offset, "epoch": epoch}}
    )
    await socket.close()
    answer: bool = welcome["recovered"][channel]
    return answer


async def test_in_memory_each_channel_keeps_its_own_history(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, channels=CHANNELS)
    tops = {}
    for number in range(600):
        for channel in ("chat:lobby", "typing:lobby", "news:a"):
            tops[channel] = await server.bus.publish(channel, number, id=f"{channel}-{number}")
    chat, news, typing = tops["chat:lobby"], tops["news:a"], tops["typing:lobby"]
    assert await recovered(server, make_token, "chat:lobby", 100, chat.epoch)  # 500 kept
    assert not await recovered(server, make_token, "chat:lobby", 99, chat.epoch)
    assert await recovered(server, make_token, "news:a", 500, news.epoch)  # the settings' 100
    assert not await recovered(server, make_token, "news:a", 499, news.epoch)
    assert not await recovered(server, make_token, "typing:lobby", typing.offset, typing.epoch)
    # No history, no ids: the same id again is a new message.
    repeat = await server.bus.publish("typing:lobby", 0, id="typing:lobby-599")
    assert (repeat.offset, repeat.is_repeat) == (601, False)
    assert (await server.bus.publish("chat:lobby", 0, id="chat:lobby-599")).is_repeat


@pytest.mark.redis
async def test_in_redis_typing_keeps_no_stream_no_ids_and_never_recovers_while_chat_keeps_500(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    redis_url: str,
    redis_prefix: str,
) -> None:
    broker = RedisBroker(redis_url, prefix=redis_prefix)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker, channels=CHANNELS)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        token = make_token(channels=["chat:*", "typing:*"])
        socket, _ = await server.open(token, ["typing:room"])
        first = await server.bus.publish("typing:room", "alice is typing", id="t-1")
        again = await server.bus.publish("typing:room", "alice is typing", id="t-1")
        assert (again.offset, again.is_repeat) == (first.offset + 1, False)  # no ids kept
        assert [(await next_frame(socket))["offset"] for _ in range(2)] == [1, 2]
        keys = await client.keys(f"{{{redis_prefix}:typing:room}}*")
        assert keys == [f"{{{redis_prefix}:typing:room}}:meta".encode()]  # no stream, no ids
        assert not await recovered(server, make_token, "typing:room", again.offset, again.epoch)

        for number in range(600):
            await server.bus.publish("chat:lobby", number)
        stream = f"{{{redis_prefix}:chat:lobby}}:stream"
        assert await client.xlen(stream) == 500
        assert 3_590_000 < await client.pttl(stream) <= 3_600_000
        top = await server.bus.publish("chat:lobby", "top")
        since = {"offset": top.offset - 500, "epoch": top.epoch}
        chat, welcome = await server.open(token, ["chat:lobby"], since={"chat:lobby": since})
        assert welcome["recovered"] == {"chat:lobby": True}
        replayed = [await next_frame(chat) for _ in range(500)]
        assert replayed[-1]["data"] == "top"
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_publisher_with_other_options_than_the_servers_is_refused(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    redis_url: str,
    redis_prefix: str,
) -> None:
    broker = RedisBroker(redis_url, prefix=redis_prefix)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker, channels=CHANNELS)
    socket, _ = await server.open(make_token(channels=["typing:*"]), ["typing:a"])
    async with RedisPublisher(redis_url, prefix=redis_prefix) as publisher:
        with pytest.raises(ValueError, match="differ from the servers'"):
            await publisher.publish("typing:a", 1)
    other = {**CHANNELS, "typing:*": {"history_size": 10}}
    with (
        SyncRedisPublisher(redis_url, prefix=redis_prefix, channels=other) as sync,
        pytest.raises(ValueError, match="give it the history= and channels= of setup"),
    ):
        sync.publish("typing:a", 2)
    async with RedisPublisher(redis_url, prefix=redis_prefix, channels=CHANNELS) as same:
        published = await same.publish("typing:a", 3)
    assert (await next_frame(socket))["data"] == 3
    assert published.offset == 1
    with pytest.raises(ValueError, match="channels: 'typing:\\*': history_size"):
        RedisPublisher(redis_url, prefix=redis_prefix, channels={"typing:*": {"history_size": -1}})


@pytest.mark.redis
async def test_a_subscribed_channel_is_kept_alive_by_its_own_ttl(
    make_redis_broker: Callable[..., Awaitable[tuple[RedisBroker, list[Message]]]],
    redis_url: str,
    redis_prefix: str,
) -> None:
    broker, _ = await make_redis_broker(size=100, ttl=300.0)
    await broker.publish("chat:a", '"x"', history=HistoryOptions(10, 3600.0))
    await broker.subscribe("chat:a")
    client = redis.asyncio.Redis.from_url(redis_url)
    stream = f"{{{redis_prefix}:chat:a}}:stream"
    try:
        await client.pexpire(stream, 1000)
        # A view whose shortest TTL is 0.3 s: the keep-alive runs every 0.1 s.
        view = {"history": [100, 300.0], "channels": {"fast:*": [1, 0.3]}}
        await broker.share_options(view)
        await until(lambda: _longer_than(client, stream, 3_000_000))
        assert await client.get(f"{redis_prefix}:options") is not None
    finally:
        await client.aclose()


async def _longer_than(client: redis.asyncio.Redis, key: str, milliseconds: int) -> bool:
    ttl: int = await client.pttl(key)
    return ttl > milliseconds


async def _client_publishes_and_reads_by_its_channels_options(
    server: BusServer, make_token: MakeToken
) -> None:
    token = make_token(channels=["chat:*", "typing:*", "news:*"], publish=["chat:*", "typing:*"])
    socket, _ = await server.open(token, [])
    for ref in range(1, 4):
        # typing:* keeps no history, so no ids either: the same id is a new message.
        frame = {"type": "publish", "ref": ref, "channel": "typing:a", "data": ref, "id": "t"}
        await socket.send_json(frame)
        assert (await next_frame(socket))["offset"] == ref
    for number in range(1, 121):  # chat:* keeps 500, beyond the settings' 100
        frame = {"type": "publish", "ref": 10 + number, "channel": "chat:b", "data": number}
        await socket.send_json(frame)
        assert (await next_frame(socket))["type"] == "published"
    await socket.send_json(
        {"type": "publish", "ref": 200, "channel": "chat:b", "data": 0, "id": "x"}
    )
    first = await next_frame(socket)
    await socket.send_json(
        {"type": "publish", "ref": 201, "channel": "chat:b", "data": 0, "id": "x"}
    )
    assert await next_frame(socket) == {**first, "ref": 201}  # ids kept: published once

    await socket.send_json({"type": "history", "ref": 300, "channel": "typing:a"})
    assert (await next_frame(socket))["messages"] == []
    await socket.send_json({"type": "history", "ref": 301, "channel": "chat:b", "limit": 1000})
    assert [m["data"] for m in (await next_frame(socket))["messages"]] == [*range(1, 121), 0]
    page = await server.bus.history("chat:b", limit=1000)
    assert len(page.messages) == 121

    await socket.send_json(
        {"type": "subscribe", "channels": ["typing:a"], "rewind": {"typing:a": 2}}
    )
    subscribed = await next_frame(socket)
    assert subscribed["positions"]["typing:a"]["offset"] == 3
    await socket.send_json({"type": "subscribe", "channels": ["chat:b"], "rewind": {"chat:b": 110}})
    assert (await next_frame(socket))["subscribed"] == ["chat:b"]
    replayed = [await next_frame(socket) for _ in range(110)]
    assert [m["data"] for m in replayed] == [*range(12, 121), 0]
    await socket.send_json({"type": "publish", "ref": 400, "channel": "typing:a", "data": "live"})
    frames = [await next_frame(socket), await next_frame(socket)]
    live = next(f for f in frames if f["type"] == "message")
    assert (live["channel"], live["data"], live["offset"]) == ("typing:a", "live", 4)


async def test_in_memory_client_publish_history_and_rewind_follow_each_channels_options(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, channels=CHANNELS, client_publish=True, client_rate=None
    )
    await _client_publishes_and_reads_by_its_channels_options(server, make_token)


@pytest.mark.redis
async def test_in_redis_client_publish_history_and_rewind_follow_each_channels_options(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    redis_url: str,
    redis_prefix: str,
) -> None:
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        broker=RedisBroker(redis_url, prefix=redis_prefix),
        channels=CHANNELS,
        client_publish=True,
        client_rate=None,
    )
    await _client_publishes_and_reads_by_its_channels_options(server, make_token)
