"""EmitClient and SyncEmitClient against a real bus over real sockets."""

from __future__ import annotations

import asyncio
import socket as stdlib_socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import EmitClient, EmitError, Published, SyncEmitClient

from .conftest import JwksServer, MakeToken
from .support import BusServer, FlakyBroker, close_frame, next_frame, nothing_more, start_bus

API_KEY = "e" * 32


async def emit_server(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> tuple[BusServer, str]:
    server = await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], **settings)
    return server, str(server.client.make_url("/"))


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with stdlib_socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_emit_publishes_and_returns_where_it_landed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server, url = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(), ["chat:a", "chat:b"])
    async with EmitClient(url, api_key=API_KEY) as client:
        one = await client.emit("chat:a", {"text": "hi"})
        both = await client.emit(["chat:a", "chat:b"], [1, 2])
    epoch = one[0].epoch
    assert one == [Published("chat:a", 1, epoch)]
    assert [(p.channel, p.offset) for p in both] == [("chat:a", 2), ("chat:b", 1)]
    frames = [await next_frame(socket) for _ in range(3)]
    assert [(f["channel"], f["data"]) for f in frames] == [
        ("chat:a", {"text": "hi"}),
        ("chat:a", [1, 2]),
        ("chat:b", [1, 2]),
    ]


async def test_emit_with_a_publisher_token(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    _, url = await emit_server(aiohttp_client, jwks_server)
    async with EmitClient(url, token=make_token(publish=["chat:lobby"])) as client:
        assert (await client.emit("chat:lobby", 1))[0].offset == 1
        with pytest.raises(EmitError) as refused:
            await client.emit("chat:other", 1)
    assert refused.value.status == 403
    assert refused.value.body == {"error": "forbidden", "channels": ["chat:other"]}


async def test_emit_errors_carry_the_status_and_the_json_error(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    _, url = await emit_server(aiohttp_client, jwks_server)
    async with EmitClient(url, api_key="w" * 32) as wrong_key:
        with pytest.raises(EmitError, match=r"HTTP 401.*unauthorized") as unauthorized:
            await wrong_key.emit("chat:a", 1)
    assert (unauthorized.value.status, unauthorized.value.error) == (401, "unauthorized")
    async with EmitClient(url, api_key=API_KEY) as client:
        with pytest.raises(EmitError) as invalid:
            await client.emit("bad channel!", 1)
    assert (invalid.value.status, invalid.value.error) == (400, "invalid_request")
    assert "channels" in invalid.value.body["fields"]


async def test_emit_retries_503_and_publishes_each_channel_once(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = FlakyBroker("chat:b", down_for=2)
    server, url = await emit_server(aiohttp_client, jwks_server, broker=broker)
    socket, _ = await server.open(make_token(), ["chat:a", "chat:b"])
    async with EmitClient(url, api_key=API_KEY, backoff=0.01) as client:
        published = await client.emit(["chat:a", "chat:b"], "once")
    assert broker.attempts == 3
    # chat:a went out on the first attempt; the retries' shared id kept it from repeating.
    assert [(p.channel, p.offset) for p in published] == [("chat:a", 1), ("chat:b", 1)]
    frames = [await next_frame(socket) for _ in range(2)]
    assert [f["channel"] for f in frames] == ["chat:a", "chat:b"]
    await nothing_more(socket)


async def test_emit_many_publishes_in_order_and_retries_without_repeating(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = FlakyBroker("chat:b", down_for=1)
    server, url = await emit_server(aiohttp_client, jwks_server, broker=broker)
    socket, _ = await server.open(make_token(), ["chat:a", "chat:b"])
    batch: list[tuple[str, Any] | tuple[str, Any, str | None]] = [
        ("chat:a", 1),
        ("chat:b", 2),
        ("chat:a", 3, "given-id"),
    ]
    async with EmitClient(url, api_key=API_KEY, backoff=0.01) as client:
        published = await client.emit_many(batch)
        with pytest.raises(EmitError) as refused:
            await client.emit_many([("chat:a", 4), ("bad name", 5)])
    # chat:a went out before chat:b failed; the retry's ids kept it from repeating.
    assert [(p.channel, p.offset) for p in published] == [
        ("chat:a", 1),
        ("chat:b", 1),
        ("chat:a", 2),
    ]
    assert (refused.value.status, refused.value.error) == (400, "invalid_request")
    assert list(refused.value.body["fields"]["messages"]) == ["1"]
    frames = [await next_frame(socket) for _ in range(3)]
    assert [(f["channel"], f["data"]) for f in frames] == [
        ("chat:a", 1),
        ("chat:b", 2),
        ("chat:a", 3),
    ]
    await nothing_more(socket)


async def test_sync_emit_many_publishes_in_order(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server, url = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(), ["chat:a"])
    client = SyncEmitClient(url, token=make_token(publish=["chat:a"]))
    published = await asyncio.to_thread(client.emit_many, [("chat:a", "x"), ("chat:a", "y")])
    assert [p.offset for p in published] == [1, 2]
    with pytest.raises(EmitError) as forbidden:
        await asyncio.to_thread(client.emit_many, [("chat:a", "z"), ("chat:b", "no")])
    assert (forbidden.value.status, forbidden.value.body) == (
        403,
        {"error": "forbidden", "channels": ["chat:b"]},
    )
    frames = [await next_frame(socket) for _ in range(2)]
    assert [f["data"] for f in frames] == ["x", "y"]
    await nothing_more(socket)


async def test_emit_gives_up_after_its_retries(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = FlakyBroker("chat:a", down_for=100)
    _, url = await emit_server(aiohttp_client, jwks_server, broker=broker)
    async with EmitClient(url, api_key=API_KEY, retries=2, backoff=0.01) as client:
        with pytest.raises(EmitError) as unavailable:
            await client.emit("chat:a", 1)
    assert (unavailable.value.status, unavailable.value.error) == (503, "broker_unavailable")
    assert broker.attempts == 3


async def test_emit_to_nothing_listening_is_an_emit_error() -> None:
    async with EmitClient(
        f"http://127.0.0.1:{free_port()}", api_key=API_KEY, retries=1, backoff=0.01
    ) as client:
        with pytest.raises(EmitError, match="no answer") as unreachable:
            await client.emit("chat:a", 1)
    assert unreachable.value.status is None


async def test_emit_honours_base_path(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    _, url = await emit_server(aiohttp_client, jwks_server, base_path="/rt/v1")
    async with EmitClient(url, api_key=API_KEY, base_path="/rt/v1") as client:
        assert (await client.emit("chat:a", 1))[0].offset == 1


def test_a_client_needs_exactly_one_credential() -> None:
    with pytest.raises(ValueError, match="api_key or token"):
        SyncEmitClient("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="api_key or token"):
        SyncEmitClient("http://127.0.0.1:1", api_key=API_KEY, token="t")
    with pytest.raises(ValueError, match="http:// or https://"):
        SyncEmitClient("file:///etc", api_key=API_KEY)


# -- the standard-library client, in a thread ---------------------------------


async def test_sync_client_publishes_and_raises_like_the_async_one(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server, url = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(), ["chat:a"])
    client = SyncEmitClient(url, api_key=API_KEY)
    published = await asyncio.to_thread(client.emit, "chat:a", {"n": 1}, id="order-1")
    again = await asyncio.to_thread(client.emit, "chat:a", {"n": 1}, id="order-1")
    assert published == again  # the same id: published once
    assert (await next_frame(socket))["data"] == {"n": 1}
    await nothing_more(socket)
    with pytest.raises(EmitError) as invalid:
        await asyncio.to_thread(client.emit, "bad channel!", 1)
    assert (invalid.value.status, invalid.value.error) == (400, "invalid_request")
    wrong_key = SyncEmitClient(url, api_key="w" * 32)
    with pytest.raises(EmitError) as unauthorized:
        await asyncio.to_thread(wrong_key.emit, "chat:a", 1)
    assert unauthorized.value.status == 401


async def test_sync_client_retries_503(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = FlakyBroker("chat:a", down_for=1)
    _, url = await emit_server(aiohttp_client, jwks_server, broker=broker)
    client = SyncEmitClient(url, api_key=API_KEY, backoff=0.01)
    published = await asyncio.to_thread(client.emit, ["chat:a"], "x")
    assert [(p.channel, p.offset) for p in published] == [("chat:a", 1)]
    assert broker.attempts == 2
    gives_up = SyncEmitClient(url, api_key=API_KEY, retries=0)
    broker.down_for = 1
    with pytest.raises(EmitError) as unavailable:
        await asyncio.to_thread(gives_up.emit, "chat:a", "x")
    assert unavailable.value.status == 503


async def test_sync_client_to_nothing_listening_is_an_emit_error() -> None:
    client = SyncEmitClient(f"http://127.0.0.1:{free_port()}", api_key=API_KEY, retries=0)
    with pytest.raises(EmitError, match="no answer"):
        await asyncio.to_thread(client.emit, "chat:a", 1)


async def test_control_calls_disconnect_unsubscribe_and_revoke(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server, url = await emit_server(aiohttp_client, jwks_server)
    alice, _ = await server.open(make_token(sub="alice", channels=["chat:*"]), ["chat:a"])
    spaced, _ = await server.open(make_token(sub="bob smith/1"), [])
    async with EmitClient(url, api_key=API_KEY) as client:
        await client.unsubscribe_user("alice", ["chat:a"])
        assert (await next_frame(alice))["reason"] == "server"
        await client.disconnect("bob smith/1", reason="bye")  # quoted into the path
        assert await close_frame(spaced) == (4410, "bye")
        await client.revoke(user="alice", until=datetime.now(UTC) + timedelta(minutes=1))
        assert await close_frame(alice) == (4410, "token revoked")
        with pytest.raises(EmitError) as raised:
            await client.revoke(user="alice", until=time.time() - 1)
        assert (raised.value.status, raised.value.error) == (400, "invalid_request")
        assert list(raised.value.body["fields"]) == ["until"]
    token_client = EmitClient(url, token=make_token(publish=["*"]))
    with pytest.raises(ValueError, match="api_key"):
        await token_client.disconnect("alice")
    await token_client.close()


async def test_sync_control_calls(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server, url = await emit_server(aiohttp_client, jwks_server)
    alice, _ = await server.open(make_token(sub="alice", channels=["chat:*"]), ["chat:a"])
    client = SyncEmitClient(url, api_key=API_KEY)
    await asyncio.to_thread(client.unsubscribe_user, "alice", ["chat:a"])
    assert (await next_frame(alice))["reason"] == "server"
    await asyncio.to_thread(lambda: client.disconnect("alice", reconnect=True))
    assert (await close_frame(alice))[0] == 4012
    await asyncio.to_thread(lambda: client.revoke(token_id="t-1", until=time.time() + 60))
    assert len(server.bus.sessions.revocations) == 1
