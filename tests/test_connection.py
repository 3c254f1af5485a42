"""One Connection on a real loopback socket: batching, flush before close, 4002, expiry."""

from __future__ import annotations

import asyncio
import gc
import socket as stdlib_socket
import time
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp.web import WebSocketResponse

from aiohttp_wsbus.brokers.base import Message
from aiohttp_wsbus.connection import Connection, Expiries, WriteScheduler
from aiohttp_wsbus.protocol import (
    CLIENT_GONE,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    encode,
    text_frame,
)

from .support import (
    WAIT,
    WriteRecorder,
    loopback_transport,
    make_claims,
    read_exactly,
    server_close_frame,
    standalone_connection,
)

# A peer that stops reading: with these, the kernel holds a few tens of KB at most.
SMALL_BUFFERS = {"send_buffer": 8192, "peer_receive_buffer": 4096}


def frames(count: int, size: int = 10) -> list[bytes]:
    return [text_frame(str(n).encode().ljust(size, b".")) for n in range(count)]


async def everything_else(transport: asyncio.Transport, peer: stdlib_socket.socket) -> bytes:
    """Close our end (what is buffered still goes) and return all the peer reads until EOF."""
    transport.close()
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(WAIT):
        while chunk := await loop.sock_recv(peer, 1 << 16):
            received += chunk
    return received


async def test_connection_ids_are_unique_within_a_bus_and_across_buses() -> None:
    async with loopback_transport() as (transport, _):
        first, _ = standalone_connection(transport)  # each on a hub of its own, as two
        second, _ = standalone_connection(transport)  # processes' buses are
        hub = first._hub
        also_first = [Connection(WebSocketResponse(), transport, make_claims(), hub) for _ in "ab"]
    ids = [first.id, second.id, *(connection.id for connection in also_first)]
    assert len(set(ids)) == len(ids) and all(ids)
    assert first.id == first.id  # made at each read, always the same


async def test_frames_queued_in_one_tick_leave_in_one_write_in_order() -> None:
    async with loopback_transport() as (transport, peer):
        recorder = WriteRecorder(transport)
        connection, _ = standalone_connection(recorder)
        queued = frames(5)
        connection.send({"type": "pong"})
        for frame in queued:
            connection.enqueue(frame)
        assert recorder.writes == []  # nothing leaves before the tick ends
        expected = text_frame(encode({"type": "pong"})) + b"".join(queued)
        assert await read_exactly(peer, len(expected)) == expected
        assert recorder.writes == [expected]
        connection.enqueue(queued[0])  # a later tick is a later write
        assert await read_exactly(peer, len(queued[0])) == queued[0]
        assert recorder.writes == [expected, queued[0]]


async def test_one_tick_writes_each_connection_once() -> None:
    scheduler = WriteScheduler(asyncio.get_running_loop())
    async with loopback_transport() as (one, one_peer), loopback_transport() as (two, two_peer):
        recorders = [WriteRecorder(one), WriteRecorder(two)]
        connections = [standalone_connection(r, scheduler=scheduler)[0] for r in recorders]
        queued = frames(6)
        for n, frame in enumerate(queued):
            connections[n % 2].enqueue(frame)
        firsts, seconds = b"".join(queued[0::2]), b"".join(queued[1::2])
        assert await read_exactly(one_peer, len(firsts)) == firsts
        assert await read_exactly(two_peer, len(seconds)) == seconds
        assert [r.writes for r in recorders] == [[firsts], [seconds]]


async def test_what_was_queued_before_a_close_still_goes_out_first() -> None:
    async with loopback_transport() as (transport, peer):
        connection, log = standalone_connection(transport)
        queued = frames(3)
        for frame in queued:
            connection.enqueue(frame)
        connection.close(TOKEN_EXPIRED)
        connection.enqueue(b"after the close")
        connection.send({"type": "pong"})
        assert log.closes == [TOKEN_EXPIRED]
        assert log.forgotten == [connection]
        assert connection.closed_with == TOKEN_EXPIRED
        assert await everything_else(transport, peer) == b"".join(queued) + server_close_frame(
            TOKEN_EXPIRED
        )


async def test_a_slow_consumer_close_drops_what_was_queued() -> None:
    async with loopback_transport() as (transport, peer):
        connection, log = standalone_connection(transport)
        for frame in frames(3):
            connection.enqueue(frame)
        connection.close(SLOW_CONSUMER)
        assert log.closes == [SLOW_CONSUMER]
        assert await everything_else(transport, peer) == server_close_frame(SLOW_CONSUMER)


async def test_a_second_close_changes_nothing() -> None:
    async with loopback_transport() as (transport, peer):
        connection, log = standalone_connection(transport)
        connection.close(CLIENT_GONE)
        connection.close(TOKEN_EXPIRED)
        assert log.closes == [CLIENT_GONE]
        assert log.forgotten == [connection]
        assert connection.closed_with == CLIENT_GONE
        assert await everything_else(transport, peer) == server_close_frame(CLIENT_GONE)


async def test_a_peer_that_stops_reading_is_closed_4002_and_sent_nothing_more() -> None:
    async with loopback_transport(**SMALL_BUFFERS) as (transport, peer):
        recorder = WriteRecorder(transport)
        connection, log = standalone_connection(recorder, send_buffer_limit=64 * 1024)
        big = text_frame(b"x" * 500_000)  # far more than the kernel holds for a non-reader
        connection.enqueue(big)
        assert await log.wait() == SLOW_CONSUMER
        assert log.forgotten == [connection]
        assert connection.is_closing
        for frame in frames(3):
            connection.enqueue(frame)
        connection.send({"type": "pong"})
        connection.close(TOKEN_EXPIRED)  # already closing: ignored
        assert await everything_else(transport, peer) == big + server_close_frame(SLOW_CONSUMER)
        assert recorder.writes == [big, server_close_frame(SLOW_CONSUMER)]
        assert log.closes == [SLOW_CONSUMER]


async def test_4002_is_for_a_buffer_over_the_limit_not_at_it() -> None:
    async with loopback_transport(**SMALL_BUFFERS) as (transport, _):
        # Fill the kernel's buffers: from here on, every byte written stays in the
        # transport's own buffer, so its size is exact (no await until the end).
        transport.write(b"\0" * 1_000_000)
        buffered = transport.get_write_buffer_size()
        assert buffered > 0
        frame = text_frame(b"y" * 100)
        connection, log = standalone_connection(
            transport, send_buffer_limit=buffered + len(frame)
        )
        connection.enqueue(frame)
        connection.flush()
        assert transport.get_write_buffer_size() == connection.send_buffer_limit
        assert not connection.is_closing
        connection.enqueue(text_frame(b""))  # two bytes over
        connection.flush()
        assert connection.closed_with == SLOW_CONSUMER
        assert log.closes == [SLOW_CONSUMER]


async def test_expiry_closes_4001_and_leaves() -> None:
    async with loopback_transport() as (transport, _):
        connection, log = standalone_connection(transport)
        connection.expire_at(time.time() + 0.05)
        assert await log.wait() == TOKEN_EXPIRED
        assert log.forgotten == [connection]


async def test_a_refresh_moves_the_expiry() -> None:
    async with loopback_transport() as (transport, _):
        connection, log = standalone_connection(transport)
        connection.expire_at(time.time() + 0.05)
        later = time.time() + 0.3
        connection.expire_at(later)
        assert await log.wait() == TOKEN_EXPIRED
        assert time.time() >= later - 0.01  # the first deadline no longer counts
        assert log.closes == [TOKEN_EXPIRED]


async def test_sockets_share_one_loop_timer_and_expire_in_deadline_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    expiries = Expiries(loop)
    timers: list[float] = []
    call_later = loop.call_later

    def counted(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) is expiries:
            timers.append(delay)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", counted)
    async with AsyncExitStack() as stack:
        transports = [await stack.enter_async_context(loopback_transport()) for _ in range(4)]
        made = [standalone_connection(transport, expiries=expiries) for transport, _ in transports]
        soon, later = time.time() + 0.05, time.time() + 0.15
        for connection, _ in made[:3]:
            connection.expire_at(soon)
        made[3][0].expire_at(later)
        assert len(timers) == 1  # one timer for the earliest deadline, not one per socket
        made[1][0].close(CLIENT_GONE)  # a closed socket leaves the wheel
        assert await made[3][1].wait() == TOKEN_EXPIRED
        assert time.time() >= later - 0.01
        assert [log.closes for _, log in made] == [
            [TOKEN_EXPIRED],
            [CLIENT_GONE],
            [TOKEN_EXPIRED],
            [TOKEN_EXPIRED],
        ]
        assert len(timers) == 2


async def test_a_closed_connection_is_not_kept_alive_until_its_deadline() -> None:
    expiries = Expiries(asyncio.get_running_loop())
    async with loopback_transport() as (transport, _):
        connection, log = standalone_connection(transport, expiries=expiries)
        connection.expire_at(time.time() + 3600)
        connection.close(CLIENT_GONE)
        connection.expire_at(time.time() + 7200)  # a refresh racing the close files nothing
        gone = weakref.ref(connection)
        del connection, log  # the log keeps what it was told
        gc.collect()
        assert gone() is None


async def test_live_messages_wait_while_their_channel_is_held() -> None:
    async with loopback_transport() as (transport, peer):
        recorder = WriteRecorder(transport)
        connection, _ = standalone_connection(recorder)
        held = [Message("chat:a", n, "e", str(n)) for n in (1, 2)]
        live = Message("chat:b", 1, "e", '"b"')
        connection.hold("chat:a")
        for message in held:
            connection.deliver(message, text_frame(message.data.encode()))
        connection.deliver(live, text_frame(b'"b"'))
        assert await read_exactly(peer, len(text_frame(b'"b"'))) == text_frame(b'"b"')
        assert connection.release("chat:a") == held
        assert connection.pending is None  # nothing held: no dict kept
        assert connection.release("chat:a") == []
        connection.deliver(held[0], text_frame(b"again"))
        assert await read_exactly(peer, len(text_frame(b"again"))) == text_frame(b"again")
        assert recorder.writes == [text_frame(b'"b"'), text_frame(b"again")]
