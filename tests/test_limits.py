"""Abuse limits: sockets per user (4408), a socket's frame and channel rates (4429) and
the emit rate (429 with Retry-After), over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import EmitClient, EmitError, SyncEmitClient
from aiohttp_wsbus.limits import PublisherLimits, SocketLimits, TokenBucket
from aiohttp_wsbus.protocol import Ping, Subscribe

from .conftest import JwksServer, MakeToken
from .support import close_frame, eventually, next_frame, nothing_more, start_bus

API_KEY = "l" * 32


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the buckets ---------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(2, 3, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(1) == pytest.approx(0.5)
    assert bucket.take(1, 0.5)
    assert not bucket.take(1, 0.5)
    assert bucket.take(3, 10.0)  # refills up to the burst, no further
    assert not bucket.take(1, 10.0)


def test_socket_limits_count_frames_and_channels_apart() -> None:
    clock = Clock()
    limits = SocketLimits((1, 2), (1, 3), clock)
    assert limits.channels(Ping()) is None  # pings cost no channel
    assert limits.channels(Subscribe(["a", "b", "c"], {})) is None
    assert limits.channels(Subscribe(["d"], {})) == "subscribe"
    assert [limits.frame(), limits.frame(), limits.frame()] == [None, None, "client"]
    clock.now += 1
    assert limits.frame() is None
    assert SocketLimits.of(None, None) is None


def test_publisher_limits_are_per_publisher_and_say_how_long_to_wait() -> None:
    clock = Clock()
    limits = PublisherLimits(0.5, 1, clock)
    assert limits.retry_after("key:a") is None
    assert limits.retry_after("key:a") == 2
    assert limits.retry_after("user:b") is None
    clock.now += 2
    assert limits.retry_after("key:a") is None


# -- sockets per user ------------------------------------------------------------


async def test_a_users_sixth_socket_is_closed_4408_while_another_user_connects(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, max_connections_per_user=5)
    alice = [(await server.open(make_token(sub="alice"), ["chat:a"]))[0] for _ in range(5)]
    sixth = await server.client.ws_connect("/ws")
    await sixth.send_json({"type": "connect", "token": make_token(sub="alice"), "channels": []})
    assert await close_frame(sixth) == (4408, "too many connections")
    bob, welcome = await server.open(make_token(sub="bob"), ["chat:a"])
    assert welcome["user"] == "bob"
    assert server.bus.rate_limited["user_connections"] == 1
    # A socket that closes gives its place back.
    await alice[0].close()
    await eventually(lambda: len(server.bus.connections.of("alice")) == 4)
    again, _ = await server.open(make_token(sub="alice"), [])
    await nothing_more(again)
    for socket in [*alice[1:], bob, again]:
        await nothing_more(socket)


# -- a socket's rates ----------------------------------------------------------------


async def test_a_thousand_subscribe_frames_close_4429_while_another_socket_receives(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    listener, _ = await server.open(make_token(sub="bob"), ["chat:lobby"])
    flooder, _ = await server.open(make_token(), [])
    for number in range(1000):
        await flooder.send_json({"type": "subscribe", "channels": [f"chat:{number}"]})
    code, reason = await close_frame(flooder)
    assert (code, reason) == (4429, "too many requests")
    assert sum(server.bus.rate_limited.values()) == 1
    await server.bus.publish("chat:lobby", "still here")
    assert (await next_frame(listener))["data"] == "still here"


async def test_channels_beyond_subscribe_rate_close_4429(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, client_rate=None, subscribe_rate=(1, 4)
    )
    socket, _ = await server.open(make_token(), [])
    await socket.send_json({"type": "subscribe", "channels": ["chat:a", "chat:b"]})
    assert (await next_frame(socket))["subscribed"] == ["chat:a", "chat:b"]
    await socket.send_json({"type": "unsubscribe", "channels": ["chat:a", "chat:b"]})
    assert (await next_frame(socket))["type"] == "unsubscribed"
    await socket.send_json({"type": "subscribe", "channels": ["chat:c"]})
    assert (await close_frame(socket))[0] == 4429
    assert server.bus.rate_limited == {"subscribe": 1}


async def test_pings_count_toward_client_rate(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, client_rate=(0.001, 3))
    socket, _ = await server.open(make_token(), [])
    for _ in range(4):
        await socket.send_json({"type": "ping"})
    assert [await next_frame(socket) for _ in range(3)] == [{"type": "pong"}] * 3
    assert (await close_frame(socket))[0] == 4429
    assert server.bus.rate_limited == {"client": 1}


async def test_publish_rpc_and_history_frames_count_toward_client_rate(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: aiohttp_wsbus.Bus) -> None:
        @bus.rpc("echo")
        async def echo(info: aiohttp_wsbus.ConnectionInfo, data: Any) -> Any:
            return data

    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        prepare=prepare,
        client_publish=True,
        client_rate=(0.001, 3),
    )
    socket, _ = await server.open(make_token(publish=["chat:*"]), [])
    requests: list[dict[str, Any]] = [
        {"type": "publish", "ref": 1, "channel": "chat:a", "data": 1},
        {"type": "rpc", "ref": 2, "method": "echo", "data": 2},
        {"type": "history", "ref": 3, "channel": "chat:a"},
        {"type": "publish", "ref": 4, "channel": "chat:a", "data": 4},
    ]
    answers = []
    for request in requests[:3]:  # one at a time: a request is answered in the background
        await socket.send_json(request)
        answers.append(await next_frame(socket))
    assert [(a["ref"], a["type"]) for a in answers] == [
        (1, "published"),
        (2, "rpc_result"),
        (3, "history_result"),
    ]
    await socket.send_json(requests[3])
    assert (await close_frame(socket))[0] == 4429
    assert server.bus.rate_limited == {"client": 1}
    assert (await server.bus.position("chat:a")).offset == 1  # the fourth was not published


async def test_the_connect_frames_channels_are_free(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, subscribe_rate=(0.001, 1))
    channels = [f"chat:{number}" for number in range(128)]
    socket, welcome = await server.open(make_token(), channels)
    assert welcome["subscribed"] == channels
    await nothing_more(socket)


async def test_none_switches_the_socket_limits_off(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, client_rate=None, subscribe_rate=None
    )
    socket, _ = await server.open(make_token(), [])
    for number in range(300):
        await socket.send_json({"type": "subscribe", "channels": [f"chat:{number}"]})
        await socket.send_json({"type": "unsubscribe", "channels": [f"chat:{number}"]})
    for _ in range(600):
        assert (await next_frame(socket))["type"] in ("subscribed", "unsubscribed")
    await nothing_more(socket)
    assert not server.bus.rate_limited


# -- the emit rate ---------------------------------------------------------------------


async def test_an_emit_burst_gets_429_with_retry_after_and_emit_client_then_succeeds(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_rate=(1, 2)
    )
    socket, _ = await server.open(make_token(), ["chat:lobby"])
    headers = {"X-API-Key": API_KEY}
    body: dict[str, Any] = {"channel": "chat:lobby", "data": 1}
    statuses = []
    for _ in range(3):
        response = await server.client.post("/ws/emit", json=body, headers=headers)
        statuses.append(response.status)
    assert statuses == [202, 202, 429]
    assert await response.json() == {"error": "rate_limited", "retry_after": 1}
    assert response.headers["Retry-After"] == "1"
    # Another publisher (a token's subject) has a bucket of its own.
    token = make_token(sub="carol", publish=["chat:lobby"])
    bearer = {"Authorization": f"Bearer {token}"}
    response = await server.client.post("/ws/emit", json=body, headers=bearer)
    assert response.status == 202
    async with EmitClient(str(server.client.make_url("/")), api_key=API_KEY) as client:
        (published,) = await client.emit("chat:lobby", "after the wait")
    assert published.offset == 4
    frames = [await next_frame(socket) for _ in range(4)]
    assert frames[-1]["data"] == "after the wait"
    assert server.bus.rate_limited["emit"] >= 1


async def test_emit_clients_give_up_on_a_retry_after_beyond_their_timeout(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_rate=(0.01, 1)
    )
    url = str(server.client.make_url("/"))
    async with EmitClient(url, api_key=API_KEY, timeout=5) as client:
        await client.emit("chat:lobby", 1)
        with pytest.raises(EmitError) as refused:
            await client.emit("chat:lobby", 2)
    assert refused.value.status == 429
    assert refused.value.body == {"error": "rate_limited", "retry_after": 100}
    sync_client = SyncEmitClient(url, api_key=API_KEY, timeout=5)
    with pytest.raises(EmitError) as refused_sync:
        await asyncio.to_thread(sync_client.emit, "chat:lobby", 3)
    assert refused_sync.value.status == 429


async def test_sync_emit_client_waits_out_retry_after(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_rate=(1, 1)
    )
    client = SyncEmitClient(str(server.client.make_url("/")), api_key=API_KEY)
    first = await asyncio.to_thread(client.emit, "chat:lobby", 1)
    second = await asyncio.to_thread(client.emit, "chat:lobby", 2)
    assert [first[0].offset, second[0].offset] == [1, 2]
    assert server.bus.rate_limited["emit"] == 1


@pytest.mark.parametrize(
    ("name", "value"), [("client_rate", (0, 10)), ("emit_rate", (1, 0)), ("subscribe_rate", 5)]
)
def test_a_bad_rate_is_refused_naming_it(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        aiohttp_wsbus.setup(web.Application(), jwt_secret="s" * 32, **{name: value})
