"""Lifecycle hooks over real sockets: who connects, subscribes, unsubscribes and leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import Bus, ConnectionInfo, Forbidden

from .conftest import JwksServer, MakeToken
from .support import (
    WAIT,
    RawClient,
    close_code,
    close_frame,
    eventually,
    next_frame,
    nothing_more,
    start_bus,
)


class Recorder:
    """Records every hook call as (hook, user, extra)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.infos: list[ConnectionInfo] = []

    def prepare(self, bus: Bus) -> None:
        @bus.on_connect
        async def connected(info: ConnectionInfo) -> None:
            self.infos.append(info)
            self.calls.append(("connect", info.user, None))

        @bus.on_disconnect
        async def disconnected(info: ConnectionInfo, code: int) -> None:
            self.calls.append(("disconnect", info.user, code))

        @bus.on_subscribe
        async def subscribed(info: ConnectionInfo, channels: list[str]) -> None:
            self.calls.append(("subscribe", info.user, channels))

        @bus.on_unsubscribe
        async def unsubscribed(info: ConnectionInfo, channels: list[str], reason: str) -> None:
            self.calls.append(("unsubscribe", info.user, (channels, reason)))

    def of(self, hook: str) -> list[tuple[str, Any]]:
        return [(user, extra) for name, user, extra in self.calls if name == hook]


async def test_hooks_hear_connect_subscribe_unsubscribe_and_disconnect(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    hooks = Recorder()
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=hooks.prepare)
    token = make_token(sub="alice", channels=["chat:*"], jti="token-1", plan="pro")
    socket, welcome = await server.open(token, ["chat:a"])
    info = hooks.infos[0]
    assert (info.id, info.user, info.remote, info.channels) == (
        welcome["client"],
        "alice",
        "127.0.0.1",
        frozenset(),
    )
    assert info.claims.token_id == "token-1"
    assert info.claims.extra["plan"] == "pro"
    assert token not in repr(info)
    await socket.send_json({"type": "subscribe", "channels": ["chat:b"]})
    await next_frame(socket)
    await socket.send_json({"type": "unsubscribe", "channels": ["chat:a"]})
    await next_frame(socket)
    await socket.close()
    await eventually(lambda: bool(hooks.of("disconnect")))
    assert hooks.calls == [
        ("connect", "alice", None),
        ("subscribe", "alice", ["chat:a"]),
        ("subscribe", "alice", ["chat:b"]),
        ("unsubscribe", "alice", (["chat:a"], "client")),
        ("disconnect", "alice", 1000),
    ]


async def test_on_connect_refusing_closes_4403_and_no_disconnect_follows(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    hooks = Recorder()

    def prepare(bus: Bus) -> None:
        @bus.on_connect
        async def banned(info: ConnectionInfo) -> None:
            if info.user == "mallory":
                raise Forbidden()

        hooks.prepare(bus)

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(sub="mallory"), "channels": []})
    assert await close_frame(socket) == (4403, "refused by the application")
    welcome_socket, _ = await server.open(make_token(sub="alice"), [])
    await welcome_socket.close()
    await eventually(lambda: bool(hooks.of("disconnect")))
    assert hooks.of("disconnect") == [("alice", 1000)]


async def test_on_connect_failing_closes_1011_and_is_counted(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.on_connect
        async def broken(info: ConnectionInfo) -> None:
            raise ConnectionError("the database is down")

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(), "channels": []})
    assert await close_code(socket) == 1011
    assert server.bus.hook_errors["on_connect"] == 1


def ending_recorder() -> tuple[list[tuple[str, int]], Callable[[Bus], None]]:
    endings: list[tuple[str, int]] = []

    def prepare(bus: Bus) -> None:
        @bus.on_disconnect
        async def ended(info: ConnectionInfo, code: int) -> None:
            endings.append((info.user, code))

    return endings, prepare


async def test_on_disconnect_fires_once_for_expiry_slow_consumers_and_heartbeat_loss(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    endings, prepare = ending_recorder()
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        prepare=prepare,
        leeway=0,
        heartbeat=0.3,
        send_buffer_limit=1024,
    )
    expiring, _ = await server.open(make_token(sub="expiring", exp_in=1), [])
    assert await close_code(expiring, timeout=WAIT) == 4001
    # A raw socket that reads nothing and answers no ping.
    slow = await RawClient.connect(server, make_token(sub="slow", channels=["big"]), ["big"])
    await eventually(lambda: any(c.claims.subject == "slow" for c in server.bus.connections))
    for _ in range(100):
        await server.bus.publish("big", "x" * 60_000)
        if ("slow", 4002) in endings:
            break
        await asyncio.sleep(0)
    silent = await RawClient.connect(server, make_token(sub="silent", channels=[]), [])
    await eventually(lambda: len(endings) == 3, timeout=WAIT * 2)
    assert sorted(endings) == [("expiring", 4001), ("silent", 1006), ("slow", 4002)]
    slow.sock.close()
    silent.sock.close()


async def test_on_disconnect_fires_for_server_shutdown_and_is_awaited(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    endings, prepare = ending_recorder()
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket, _ = await server.open(make_token(sub="alice"), [])
    await server.client.server.close()  # the app shuts down: every socket 1001
    assert endings == [("alice", 1001)]
    assert await close_code(socket) == 1001


async def test_a_slow_hook_never_blocks_delivery(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    release = asyncio.Event()

    def prepare(bus: Bus) -> None:
        @bus.on_subscribe
        async def slow(info: ConnectionInfo, channels: list[str]) -> None:
            await release.wait()

        @bus.on_unsubscribe
        async def failing(info: ConnectionInfo, channels: list[str], reason: str) -> None:
            raise RuntimeError("hook bug")

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    first, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    second, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    await second.send_json({"type": "unsubscribe", "channels": ["chat:b"]})
    assert (await next_frame(second))["type"] == "unsubscribed"
    await server.bus.publish("chat:a", "live")
    assert (await next_frame(first))["data"] == "live"
    assert (await next_frame(second))["data"] == "live"
    await eventually(lambda: server.bus.hook_errors["on_unsubscribe"] == 1)
    release.set()
    await nothing_more(first)


def test_hooks_are_frozen_once_the_app_starts() -> None:
    bus = aiohttp_wsbus.setup(aiohttp_wsbus_app(), jwt_secret="s" * 32)
    bus.hooks.freeze()

    async def late(info: ConnectionInfo) -> None:
        pass

    try:
        bus.on_connect.append(late)
    except RuntimeError:
        return
    raise AssertionError("a frozen signal took a handler")


def aiohttp_wsbus_app() -> Any:
    from aiohttp import web

    return web.Application()


async def test_a_socket_closed_while_on_connect_runs_still_gets_its_on_disconnect(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    entered = asyncio.Event()
    leave = asyncio.Event()
    endings: list[tuple[str, int]] = []

    def prepare(bus: Bus) -> None:
        @bus.on_connect
        async def slow(info: ConnectionInfo) -> None:
            entered.set()
            await leave.wait()

        @bus.on_disconnect
        async def ended(info: ConnectionInfo, code: int) -> None:
            endings.append((info.user, code))

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(sub="alice"), "channels": []})
    await asyncio.wait_for(entered.wait(), WAIT)
    await server.bus.disconnect("alice")
    leave.set()
    assert (await close_frame(socket))[0] == 4410
    await eventually(lambda: bool(endings))
    assert endings == [("alice", 4410)]
