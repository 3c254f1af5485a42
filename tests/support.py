"""Helpers for talking to a bus over real sockets in tests, and the tests' one set of fakes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus.brokers.base import History, HistoryOptions, Published
from aiohttp_wsbus.connection import Connection, ConnectionHub, Expiries, WriteScheduler
from aiohttp_wsbus.errors import BrokerUnavailable
from aiohttp_wsbus.protocol import BEARER_PREFIX, PROTOCOL, Close, Position
from aiohttp_wsbus.revocations import Revocation
from aiohttp_wsbus.tokens import Claims

WAIT = 5.0  # seconds any single network wait in a test may take


@dataclass
class BusServer:
    """A running app with the bus set up, and a client for it."""

    app: web.Application
    bus: aiohttp_wsbus.Bus
    client: TestClient[web.Request, web.Application]

    async def open(
        self,
        token: str,
        channels: list[str],
        *,
        since: dict[str, Any] | None = None,
        path: str = "/ws",
        handshake: bool = False,
        **frame: Any,
    ) -> tuple[ClientWebSocketResponse, dict[str, Any]]:
        """Connect, send the connect frame (or, with `handshake`, offer the token in
        Sec-WebSocket-Protocol and the rest in the query) and return the socket and
        its welcome."""
        connect: dict[str, Any] = {"type": "connect", "token": token, "channels": channels}
        if since is not None:
            connect["since"] = since
        connect.update(frame)
        if handshake:
            query = {"channels": ",".join(channels)}
            query |= {k: json.dumps(v) for k, v in connect.items() if k in ("since", "rewind")}
            protocols = (PROTOCOL, BEARER_PREFIX + token)
            socket = await self.client.ws_connect(path, params=query, protocols=protocols)
        else:
            socket = await self.client.ws_connect(path)
            await socket.send_json(connect)
        welcome = await next_frame(socket)
        assert welcome["type"] == "welcome", welcome
        return socket, welcome


async def start_bus(
    aiohttp_client: AiohttpClient,
    jwks_url: str,
    *,
    prepare: Callable[[aiohttp_wsbus.Bus], None] | None = None,
    **settings: Any,
) -> BusServer:
    """Set up a bus on a new app and start it; `prepare` registers hooks first."""
    app = web.Application()
    settings.setdefault("issuer", "https://idp.test/")
    settings.setdefault("audience", "wsbus")
    bus = aiohttp_wsbus.setup(app, jwks_url=jwks_url, **settings)
    if prepare is not None:
        prepare(bus)
    client = await aiohttp_client(app)
    return BusServer(app, bus, client)


async def next_frame(socket: ClientWebSocketResponse, timeout: float = WAIT) -> dict[str, Any]:
    """The next text frame, parsed; fails on a close or after `timeout`."""
    message = await socket.receive(timeout=timeout)
    assert message.type == WSMsgType.TEXT, (message.type, message.data, message.extra)
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def next_frames(socket: ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await next_frame(socket) for _ in range(count)]


async def close_code(socket: ClientWebSocketResponse, timeout: float = WAIT) -> int | None:
    """Read until the server closes the socket; return its close code."""
    async with asyncio.timeout(timeout):
        while True:
            message = await socket.receive()
            if message.type == WSMsgType.CLOSE:
                # The code the server sent, even if our reply then found the socket gone.
                code: int = message.data
                return code
            if message.type in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                return socket.close_code
            if message.type == WSMsgType.ERROR:
                return socket.close_code


async def close_frame(socket: ClientWebSocketResponse, timeout: float = WAIT) -> tuple[int, str]:
    """Read until the server's close frame; return its code and reason."""
    async with asyncio.timeout(timeout):
        while True:
            message = await socket.receive()
            if message.type == WSMsgType.CLOSE:
                return message.data, message.extra or ""
            assert message.type in (WSMsgType.TEXT, WSMsgType.BINARY), message


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `condition()` holds, checking every 10 ms, at most `timeout` seconds.

    For server-side state that has no event to wait on; the bound makes a
    missing state change a failure, not a hang.
    """
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def nothing_more(socket: ClientWebSocketResponse) -> None:
    """Prove no frame is waiting: a ping round trip comes back first."""
    await socket.send_json({"type": "ping"})
    assert await next_frame(socket) == {"type": "pong"}


class RawClient:
    """A WebSocket client on a plain socket that reads only when told to."""

    def __init__(self, sock: stdlib_socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, server: BusServer, token: str | None, channels: list[str]) -> RawClient:
        """Open the socket; send a connect frame unless `token` is None."""
        loop = asyncio.get_running_loop()
        sock = stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        port = server.client.server.port
        assert port is not None
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, handshake.encode())
        response = b""
        async with asyncio.timeout(WAIT):
            while b"\r\n\r\n" not in response:
                response += await loop.sock_recv(sock, 1)  # stop exactly at the headers
        assert response.startswith(b"HTTP/1.1 101"), response
        client = cls(sock)
        if token is not None:
            connect = {"type": "connect", "token": token, "channels": channels}
            await loop.sock_sendall(sock, masked_text_frame(json.dumps(connect).encode()))
        return client

    async def read_until_closed(self) -> int:
        """Drain whatever the server sent until it closes the socket; return bytes read."""
        loop = asyncio.get_running_loop()
        total = 0
        async with asyncio.timeout(WAIT * 2):
            while True:
                try:
                    chunk = await loop.sock_recv(self.sock, 1 << 16)
                except ConnectionResetError:
                    return total
                if not chunk:
                    return total
                total += len(chunk)


async def read_exactly(sock: stdlib_socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a non-blocking socket; fails if it closes first."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(WAIT):
        while len(data) < size:
            chunk = await loop.sock_recv(sock, size - len(data))
            assert chunk, "the server closed the socket"
            data += chunk
    return data


async def read_raw_frame(sock: stdlib_socket.socket) -> bytes:
    """One whole server frame, header included, exactly as it came off the wire."""
    header = await read_exactly(sock, 2)
    length = header[1] & 0x7F
    if length == 126:
        extended = await read_exactly(sock, 2)
        header, length = header + extended, int.from_bytes(extended, "big")
    elif length == 127:
        extended = await read_exactly(sock, 8)
        header, length = header + extended, int.from_bytes(extended, "big")
    return header + await read_exactly(sock, length)


def masked_text_frame(payload: bytes) -> bytes:
    assert len(payload) < 65536
    mask = os.urandom(4)
    if len(payload) < 126:
        header = bytes([0x81, 0x80 | len(payload)])
    else:
        header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# -- broker fakes: MemoryBrokers with one engine behaviour a test needs ---------


class SwitchableBroker(aiohttp_wsbus.MemoryBroker):
    """A memory broker whose engine the test can take down and bring back.

    While down it says so (`is_available`), and publishing and subscribing
    fail as unavailable, as with a Redis broker that lost its server.
    """

    def __init__(self) -> None:
        super().__init__()
        self.is_up = True

    @property
    def is_available(self) -> bool:
        return self.is_up

    async def subscribe(self, channel: str) -> None:
        if not self.is_up:
            raise BrokerUnavailable("taken down by the test")
        await super().subscribe(channel)

    async def publish(
        self,
        channel: str,
        data: str,
        *,
        message_id: str | None = None,
        history: HistoryOptions | None = None,
    ) -> Published:
        if not self.is_up:
            raise BrokerUnavailable("taken down by the test")
        return await super().publish(channel, data, message_id=message_id, history=history)

    async def control(self, message: Mapping[str, Any]) -> None:
        if not self.is_up:
            raise BrokerUnavailable("taken down by the test")
        await super().control(message)

    async def history(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        if not self.is_up:
            raise BrokerUnavailable("taken down by the test")
        return await super().history(since, options=options)

    async def revoke(self, revocation: Revocation) -> None:
        if not self.is_up:
            raise BrokerUnavailable("taken down by the test")
        await super().revoke(revocation)


class FlakyBroker(aiohttp_wsbus.MemoryBroker):
    """A memory broker whose engine is down for the next `down_for` publishes to `channel`."""

    def __init__(self, channel: str, down_for: int) -> None:
        super().__init__()
        self.channel = channel
        self.down_for = down_for
        self.attempts = 0

    async def publish(
        self,
        channel: str,
        data: str,
        *,
        message_id: str | None = None,
        history: HistoryOptions | None = None,
    ) -> Published:
        if channel == self.channel:
            self.attempts += 1
            if self.down_for > 0:
                self.down_for -= 1
                raise BrokerUnavailable("down for now")
        return await super().publish(channel, data, message_id=message_id, history=history)


class PublishingDuringHistory(aiohttp_wsbus.MemoryBroker):
    """A memory broker whose history read lets other publishers in, before and after it reads.

    Stands in for a networked broker, where other nodes publish to `channel`
    while the read is in flight.
    """

    def __init__(self, channel: str) -> None:
        super().__init__()
        self.channel = channel
        self.before_read: list[str] = []
        self.after_read: list[str] = []

    async def history(
        self,
        since: Mapping[str, Position | None],
        *,
        options: Mapping[str, HistoryOptions] | None = None,
    ) -> dict[str, History]:
        for data in self.before_read:
            await self.publish(self.channel, f'"{data}"')
        answer = await super().history(since, options=options)
        for data in self.after_read:
            await self.publish(self.channel, f'"{data}"')
        self.before_read, self.after_read = [], []
        return answer


class GatedBroker(aiohttp_wsbus.MemoryBroker):
    """A memory broker whose subscribe() waits while its gate is shut (a frozen engine).

    `subscribed` is what the engine holds once the calls are done, as a Redis
    server would: a subscribe counts when it completes, an unsubscribe at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting: set[str] = set()  # subscribes held at the gate
        self.subscribed: set[str] = set()
        self.subscribes = 0  # completed subscribe calls

    async def subscribe(self, channel: str) -> None:
        self.waiting.add(channel)
        try:
            await self.gate.wait()
        finally:
            self.waiting.discard(channel)
        await super().subscribe(channel)
        self.subscribed.add(channel)
        self.subscribes += 1

    async def unsubscribe(self, channel: str) -> None:
        await super().unsubscribe(channel)
        self.subscribed.discard(channel)


# -- one Connection on a real loopback socket, outside any server ---------------


@contextlib.asynccontextmanager
async def loopback_transport(
    *, send_buffer: int | None = None, peer_receive_buffer: int | None = None
) -> AsyncIterator[tuple[asyncio.Transport, stdlib_socket.socket]]:
    """A real asyncio transport on 127.0.0.1, and the plain socket at its other end.

    The peer reads only when the test does; small buffers (bytes) make a peer
    that stops reading fill the transport's own buffer quickly.
    """
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as sockets:
        listener = sockets.enter_context(stdlib_socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        peer = sockets.enter_context(stdlib_socket.socket())
        peer.setblocking(False)
        if peer_receive_buffer is not None:  # before connecting: it sets the TCP window
            peer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, peer_receive_buffer)
        await loop.sock_connect(peer, listener.getsockname())
        accepted, _ = await loop.sock_accept(listener)
        if send_buffer is not None:
            accepted.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, send_buffer)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
        assert isinstance(transport, asyncio.Transport)
        try:
            yield transport, peer
        finally:
            if not transport.is_closing():  # a closing one finishes by itself
                transport.abort()


class WriteRecorder(asyncio.Transport):
    """A real transport, with a record of each write it was given.

    Only for counting writes, which no transport tells; the bytes still go
    through the real one underneath.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


class CloseLog:
    """The bus's two close callbacks for a Connection, recording what they were told."""

    def __init__(self) -> None:
        self.forgotten: list[Connection] = []  # on_close: leave the registry
        self.closes: list[Close] = []  # closer: send the close frame
        self.closed = asyncio.Event()

    def on_close(self, connection: Connection) -> None:
        self.forgotten.append(connection)

    def closer(self, connection: Connection, close: Close) -> None:
        # As aiohttp would, the close frame goes out on the same transport.
        if not connection.transport.is_closing():
            connection.transport.write(server_close_frame(close))
        self.closes.append(close)
        self.closed.set()

    async def wait(self) -> Close:
        """The close, once the connection has asked for one."""
        async with asyncio.timeout(WAIT):
            await self.closed.wait()
        return self.closes[0]


def server_close_frame(close: Close) -> bytes:
    """The unmasked close frame a server sends for `close`."""
    payload = close.code.to_bytes(2, "big") + close.reason.encode()
    return bytes([0x88, len(payload)]) + payload


def make_claims(
    subject: str = "alice", grants: tuple[str, ...] = ("chat:*",), expires_in: int = 300
) -> Claims:
    return Claims(subject, int(time.time()) + expires_in, grants, (), subject.encode())


def standalone_connection(
    transport: asyncio.Transport,
    claims: Claims | None = None,
    *,
    scheduler: WriteScheduler | None = None,
    expiries: Expiries | None = None,
    send_buffer_limit: int = 1 << 20,
) -> tuple[Connection, CloseLog]:
    """A Connection on `transport` with no bus around it, and the log of its closes."""
    log = CloseLog()
    hub = ConnectionHub(
        scheduler=scheduler or WriteScheduler(asyncio.get_running_loop()),
        expiries=expiries or Expiries(asyncio.get_running_loop()),
        send_buffer_limit=send_buffer_limit,
        on_close=log.on_close,
        closer=log.closer,
    )
    connection = Connection(
        web.WebSocketResponse(),  # never used: the CloseLog sends the close frame
        transport,
        claims if claims is not None else make_claims(),
        hub,
    )
    return connection, log
