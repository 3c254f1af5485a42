"""A light WebSocket load client on raw asyncio sockets, speaking each server's dialect.

It reads frame headers to count messages and skips their payloads, so one core
can count far more deliveries than one server core can make; only the latency
workload looks inside a payload (for the emit timestamp). It answers pings
(WebSocket and Socket.IO), so connections survive heartbeats.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp_wsbus.protocol import BEARER_PREFIX, PROTOCOL

# The kinds that speak the bus's own protocol (a token, channels, then a welcome).
BUS_KINDS: Final = (
    "wsbus",
    "wsbus_authz",
    "wsbus_presence",
    "wsbus_limits",
    "wsbus_unlimited",
    "wsbus_header",
)
# The kinds whose clients speak it: the bus's, and the hand-written floor.
PROTOCOL_KINDS: Final = (*BUS_KINDS, "floor")
# Its clients offer the token in the handshake (Sec-WebSocket-Protocol), as wsbus.js
# does with tokenInHeader; every other bus kind's clients send a connect frame after
# the upgrade, as the clients do by default.
HEADER_KINDS: Final = ("wsbus_header",)

_MASK: Final = b"\x00\x00\x00\x00"  # a zero mask: frames go out as they are
_MESSAGE: Final = b'{"type":"message"'


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (the mask is zero, which servers accept)."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + _MASK + payload


@dataclass
class Dialect:
    """How one server kind's clients connect, get ready, and receive messages."""

    kind: str

    def path(self, token: str, channels: list[str]) -> str:
        if self.kind in PROTOCOL_KINDS and self.kind not in HEADER_KINDS:
            return "/ws"
        if self.kind in HEADER_KINDS or self.kind == "bare":
            return "/ws?channels=" + ",".join(channels)
        if self.kind == "asgi_ws":
            return "/ws/?token=" + token
        return "/socket.io/?EIO=4&transport=websocket"

    def headers(self, token: str) -> str:
        """Extra handshake header lines."""
        if self.kind in HEADER_KINDS:
            return f"Sec-WebSocket-Protocol: {PROTOCOL}, {BEARER_PREFIX}{token}\r\n"
        return ""

    def first_frame(self, token: str, channels: list[str]) -> bytes | None:
        """What the client sends once upgraded (None: nothing)."""
        if self.kind in PROTOCOL_KINDS and self.kind not in HEADER_KINDS:
            return json.dumps({"type": "connect", "token": token, "channels": channels}).encode()
        return None

    def is_ready_on_upgrade(self) -> bool:
        return self.kind in ("bare", "asgi_ws")


@dataclass
class Stats:
    """What every client of one run adds to: counts and, when asked, latencies."""

    target: int = 0
    received: int = 0
    closed: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    measure_latency: bool = False
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self, target: int, *, measure_latency: bool = False) -> None:
        self.target = target
        self.received = 0
        self.latencies_ns = []
        self.measure_latency = measure_latency
        self.reached = asyncio.Event()
        if target <= 0:
            self.reached.set()


class WsClient(asyncio.Protocol):
    """One WebSocket client connection."""

    def __init__(self, dialect: Dialect, stats: Stats, token: str, channels: list[str]) -> None:
        self.dialect = dialect
        self.stats = stats
        self.token = token
        self.channels = channels
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.is_ready = False
        # The bus's sockets may get other frames too (join and leave, with presence):
        # only messages count. Every kind of the bus's protocol checks, so that the
        # check's cost, which shows where the load generator saturates, is the same
        # for all of them.
        self.counts_every_frame = dialect.kind not in PROTOCOL_KINDS

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.dialect.path(self.token, self.channels)} HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{self.dialect.headers(self.token)}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded and not self._upgrade():
            return
        self._frames(time.monotonic_ns())

    # -- the handshake -----------------------------------------------------

    def _upgrade(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
        del self.buffer[: end + 4]
        if b" 101 " not in status:
            self._fail(f"upgrade refused: {status.decode(errors='replace')}")
            return False
        self.upgraded = True
        first = self.dialect.first_frame(self.token, self.channels)
        if first is not None:
            self.send(first)
        if self.dialect.is_ready_on_upgrade():
            self._set_ready()
        return True

    def _set_ready(self) -> None:
        self.is_ready = True
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self.close()

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(payload, opcode))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- frames --------------------------------------------------------------

    def _frames(self, now_ns: int) -> None:
        buffer = self.buffer
        size = len(buffer)
        position = 0
        messages = 0
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            start = position + 2
            if length == 126:
                if size - position < 4:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == 0x1 and self.is_ready and self.dialect.kind != "socketio":
                if self.counts_every_frame or buffer.startswith(_MESSAGE, start):
                    messages += 1
                if self.stats.measure_latency:
                    self._latency(buffer, start, end, now_ns)
            else:
                messages += self._control(opcode, bytes(buffer[start:end]), now_ns)
            position = end
        if position:
            del buffer[:position]
        if messages:
            stats = self.stats
            stats.received += messages
            if stats.received >= stats.target:
                stats.reached.set()

    def _control(self, opcode: int, payload: bytes, now_ns: int) -> int:
        """Handle a frame other than a counted message; return 1 if it was a message after all."""
        if opcode == 0x9:
            self.send(payload, 0xA)
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            reason = payload[2:].decode(errors="replace")
            self._fail(f"closed by the server before ready: {code} {reason}")
        elif opcode == 0x1 and self.dialect.kind == "socketio":
            return self._socketio(payload, now_ns)
        elif opcode == 0x1:  # wsbus: its welcome makes the client ready
            self._set_ready()
        return 0

    def _socketio(self, payload: bytes, now_ns: int) -> int:
        if payload == b"2":
            self.send(b"3")
        elif payload.startswith(b"0"):
            auth = {"token": self.token, "channels": self.channels}
            self.send(b"40" + json.dumps(auth).encode())
        elif payload.startswith(b"40"):
            self._set_ready()
        elif payload.startswith(b"44"):
            self._fail("socket.io connect refused")
        elif payload.startswith(b"42") and self.is_ready:
            if self.stats.measure_latency:
                self._latency(payload, 0, len(payload), now_ns)
            return 1
        return 0

    def _latency(self, buffer: bytes | bytearray, start: int, end: int, now_ns: int) -> None:
        at = buffer.find(b'"t":', start, end)
        if at < 0:
            return
        at += 4
        while at < end and buffer[at] == 32:  # json.dumps' default separators add a space
            at += 1
        stop = at
        while stop < end and 48 <= buffer[stop] <= 57:
            stop += 1
        sent = int(buffer[at:stop])
        if sent:
            self.stats.latencies_ns.append(now_ns - sent)


async def open_client(
    port: int, dialect: Dialect, stats: Stats, token: str, channels: list[str]
) -> WsClient:
    """Connect one client; it is ready when its `ready` future resolves."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: WsClient(dialect, stats, token, channels), "127.0.0.1", port
    )
    return protocol


async def open_clients(
    port: int,
    dialect: Dialect,
    stats: Stats,
    tokens: list[str],
    channels: list[list[str]],
    *,
    in_flight: int | None,
    timeout: float,
    opened: list[WsClient],
) -> None:
    """Open one client per token into `opened` and wait until all are ready.

    `in_flight` bounds how many handshakes run at once (None: all at once, a storm).
    On failure the clients opened so far stay in `opened`, for the caller to close.
    """
    gate = asyncio.Semaphore(in_flight or len(tokens) or 1)

    async def one(token: str, wanted: list[str]) -> None:
        async with gate:
            client = await open_client(port, dialect, stats, token, wanted)
            opened.append(client)
            await client.ready

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(one(t, c) for t, c in zip(tokens, channels, strict=True)))


def close_all(clients: list[WsClient]) -> None:
    for client in clients:
        client.close()


def payload(sent_ns: int = 0, text: str = "x" * 64) -> dict[str, Any]:
    """The data every benchmark message carries: a send timestamp and some text."""
    return {"t": sent_ns, "text": text}
