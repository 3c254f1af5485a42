"""The delivery fast path: its frames are aiohttp's own, and a socket keeps no connect frame."""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import json
import os
import socket as stdlib_socket
import time

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus.protocol import BEARER_PREFIX, PROTOCOL, Connect, encode_data, encode_message
from aiohttp_wsbus.websocket import WebSocketHandler

from .conftest import JwksServer, MakeToken
from .support import WAIT, RawClient, eventually, next_frame, read_raw_frame, start_bus


async def open_raw(port: int) -> stdlib_socket.socket:
    """A plain WebSocket upgrade on a raw socket, read exactly up to the headers' end."""
    loop = asyncio.get_running_loop()
    sock = stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    response = b""
    async with asyncio.timeout(WAIT):
        while b"\r\n\r\n" not in response:
            response += await loop.sock_recv(sock, 1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


@pytest.mark.parametrize("size", [10, 200, 70_000])  # 7-bit, 16-bit and 64-bit lengths
async def test_published_frames_are_byte_identical_to_aiohttps_send_str(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken, size: int
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    raw = await RawClient.connect(server, make_token(channels=["chat:*"]), ["chat:a"])
    welcome = await read_raw_frame(raw.sock)
    assert b'"type":"welcome"' in welcome
    published = await server.bus.publish("chat:a", {"text": "é" * size})
    ours = await read_raw_frame(raw.sock)
    raw.sock.close()

    text = encode_message(
        "chat:a", published.offset, published.epoch, encode_data({"text": "é" * size})
    ).decode()
    assert json.loads(text)["data"] == {"text": "é" * size}

    async def send_it(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_str(text)  # the normal path: aiohttp builds the frame itself
        await ws.receive()
        return ws

    plain = web.Application()
    plain.router.add_get("/ws", send_it)
    plain_client = await aiohttp_client(plain)
    assert plain_client.server.port is not None
    sock = await open_raw(plain_client.server.port)
    theirs = await read_raw_frame(sock)
    sock.close()
    assert ours == theirs


async def test_connect_frame_is_not_kept_once_the_socket_is_welcomed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    # The connect frame holds the token (most of a KB): a socket lives for hours.
    server = await start_bus(aiohttp_client, jwks_server.url)
    sockets = [(await server.open(make_token(sub=f"user{n}"), ["chat:a"]))[0] for n in range(3)]
    await eventually(lambda: len(server.bus.connections) == 3)
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Connect)] == []
    for socket in sockets:
        await socket.close()


async def test_a_handshake_token_is_not_kept_in_the_socket_s_handler(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    # The handler's frame runs the receive loop: it lives as long as the socket.
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:a"])
    socket = await server.client.ws_connect(
        "/ws", params={"channels": "chat:a"}, protocols=(PROTOCOL, BEARER_PREFIX + token)
    )
    assert (await next_frame(socket))["type"] == "welcome"
    handlers = [
        o
        for o in gc.get_objects()
        if inspect.iscoroutine(o) and o.cr_code is WebSocketHandler.handle.__code__
    ]
    assert len(handlers) == 1
    frame = handlers[0].cr_frame
    assert frame is not None
    assert token not in frame.f_locals.values()
    assert [o for o in gc.get_objects() if isinstance(o, Connect)] == []
    await socket.close()


async def test_connections_share_the_bus_s_callbacks_and_expiry_timer(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    # A bound method made per socket, or a timer per socket, is memory each one holds.
    server = await start_bus(aiohttp_client, jwks_server.url)
    for n in range(2):
        await server.open(make_token(sub=f"user{n}"), [])
    await eventually(lambda: len(server.bus.connections) == 2)
    one, two = server.bus.connections
    assert one._hub is two._hub


async def test_idle_sockets_of_one_expiry_share_its_deadline_and_keep_no_channel_set(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    # A float per socket is 24 bytes, a set of one channel 216 and a tracked container.
    server = await start_bus(aiohttp_client, jwks_server.url)
    expires = int(time.time()) + 300
    for n in range(2):
        await server.open(make_token(sub=f"user{n}", exp=expires), ["chat:a"])
    await eventually(lambda: len(server.bus.connections) == 2)
    one, two = server.bus.connections
    assert one._expiry is two._expiry
    assert one.channels == two.channels == ("chat:a",)
