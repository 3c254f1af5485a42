"""aiohttp_wsbus.Client against a scripted server (a real socket whose frames the test
writes): what the real bus does rarely or only under faults, such as a repeated message,
a hole in the offsets, a new epoch on a live socket, or a refresh that fails."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import hdrs, web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus.protocol import PROTOCOL, bearer_token, query_connect

from .support import WAIT


class ScriptedServer:
    """One WebSocket at a time; the test reads what the client sent and writes the answers."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.socket: web.WebSocketResponse | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        token = bearer_token(request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL))
        socket = web.WebSocketResponse(protocols=(PROTOCOL,))
        await socket.prepare(request)
        self.socket = socket
        if token is not None:  # the handshake carried the connect: record it as its frame
            connect = query_connect(token, request.query)
            since = {channel: p.as_json() for channel, p in connect.since.items()}
            frame = {"type": "connect", "token": token, "channels": connect.channels}
            await self.received.put(frame | ({"since": since} if since else {}))
        async for message in socket:
            await self.received.put(json.loads(message.data))
        return socket

    async def next(self, kind: str) -> dict[str, Any]:
        """The next frame the client sent, which must be of type `kind`."""
        async with asyncio.timeout(WAIT):
            frame = await self.received.get()
        assert frame["type"] == kind, frame
        return frame

    async def send(self, **frame: Any) -> None:
        assert self.socket is not None
        await self.socket.send_json(frame)

    async def welcome(self, expires_in: float = 3600, **fields: Any) -> dict[str, Any]:
        """Answer the connect frame; return it."""
        connect = await self.next("connect")
        welcome = {
            "type": "welcome",
            "client": "c1",
            "user": "alice",
            "expires_at": time.time() + expires_in,
            "subscribed": connect["channels"],
            "denied": {},
            "recovered": {},
            "positions": {},
        }
        await self.send(**(welcome | fields))
        return connect


@pytest.fixture
async def scripted(aiohttp_client: AiohttpClient) -> ScriptedServer:
    server = ScriptedServer()
    app = web.Application()
    app.router.add_get("/ws", server.handle)
    http = await aiohttp_client(app)
    server.url = str(http.make_url("/ws"))
    return server


def message(offset: int, epoch: str = "e1", data: Any = None) -> dict[str, Any]:
    return {"type": "message", "channel": "feed", "offset": offset, "epoch": epoch, "data": data}


async def test_repeats_are_dropped_and_holes_or_new_epochs_are_flagged(
    scripted: ScriptedServer,
) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    gaps: list[tuple[str, bool]] = []
    client.on("recovered", lambda channel, ok: gaps.append((channel, ok)))
    # Wanted before the client connects: the connect (its handshake) asks for it.
    entering = asyncio.create_task(client.subscribe("feed").__aenter__())
    async with client:
        await scripted.welcome(positions={"feed": {"offset": 0, "epoch": "~1-ab"}})
        async with asyncio.timeout(WAIT):
            feed = await entering
        for frame in [
            message(1, data="first: continues offset 0 of an empty epoch"),
            message(1, data="repeat"),
            message(2, data="next"),
            message(4, data="after a hole"),
            message(1, epoch="e2", data="in a new epoch"),
            message(2, epoch="e2", data="then in order"),
        ]:
            await scripted.send(**frame)
        received = [await feed.receive(WAIT) for _ in range(5)]
    assert [(m.data, m.after_gap) for m in received] == [
        ("first: continues offset 0 of an empty epoch", False),
        ("next", False),
        ("after a hole", True),
        ("in a new epoch", True),
        ("then in order", False),
    ]
    assert gaps == [("feed", False), ("feed", False)]
    assert client.positions == {"feed": aiohttp_wsbus.Position(2, "e2")}


async def test_a_failed_refresh_is_reported_and_tried_again_on_the_same_socket(
    scripted: ScriptedServer,
) -> None:
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("identity provider down")
        return f"token-{calls}"

    client = aiohttp_wsbus.Client(
        scripted.url, get_token=get_token, refresh_before=1.0, min_reconnect_delay=0.05
    )
    errors: list[BaseException] = []
    client.on("error", errors.append)
    async with client:
        await scripted.welcome(expires_in=1.5)  # refresh due in 0.5 s
        refresh = await scripted.next("refresh")
        assert refresh == {"type": "refresh", "token": "token-3"}
        assert [str(error) for error in errors] == ["identity provider down"]
        await scripted.send(type="refreshed", expires_at=time.time() + 3600, revoked=[])
        assert client.state == "connected"


async def test_a_refresh_that_revokes_a_channel_ends_its_subscription(
    scripted: ScriptedServer,
) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    # Wanted before the client connects: the connect (its handshake) asks for it.
    entering = asyncio.create_task(client.subscribe("feed").__aenter__())
    async with client:
        await scripted.welcome()
        async with asyncio.timeout(WAIT):
            feed = await entering
        await scripted.send(type="refreshed", expires_at=time.time() + 3600, revoked=["feed"])
        with pytest.raises(aiohttp_wsbus.SubscriptionDenied, match="revoked"):
            await feed.receive(WAIT)


async def test_reconnect_asks_to_recover_from_the_last_position(scripted: ScriptedServer) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token", min_reconnect_delay=0.01)
    # Wanted before the client connects: the connect (its handshake) asks for it.
    entering = asyncio.create_task(client.subscribe("feed").__aenter__())
    async with client:
        await scripted.welcome()
        async with asyncio.timeout(WAIT):
            feed = await entering
        await scripted.send(**message(7, data="seen"))
        assert (await feed.receive(WAIT)).offset == 7
        assert scripted.socket is not None
        await scripted.socket.close(code=1011, message=b"internal error")
        connect = await scripted.next("connect")
    assert connect["channels"] == ["feed"]
    assert connect["since"] == {"feed": {"offset": 7, "epoch": "e1"}}


async def test_an_ephemeral_message_between_a_failed_recovery_and_the_next_message_keeps_the_flag(
    scripted: ScriptedServer,
) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    since = aiohttp_wsbus.Position(3, "e1")
    # Wanted before the client connects: the connect (its handshake) asks for it.
    entering = asyncio.create_task(client.subscribe("feed", since=since).__aenter__())
    async with client:
        connect = await scripted.welcome(
            recovered={"feed": False}, positions={"feed": {"offset": 9, "epoch": "e2"}}
        )
        assert connect["since"] == {"feed": {"offset": 3, "epoch": "e1"}}
        async with asyncio.timeout(WAIT):
            feed = await entering
        await scripted.send(type="message", channel="feed", ephemeral=True, data="typing")
        await scripted.send(**message(10, epoch="e2", data="stored"))
        received = [await feed.receive(WAIT) for _ in range(2)]
    assert [(m.data, m.offset, m.ephemeral, m.after_gap) for m in received] == [
        ("typing", 0, True, False),
        ("stored", 10, False, True),
    ]
    assert client.positions == {"feed": aiohttp_wsbus.Position(10, "e2")}
