"""`wsbus --workers N`: N processes on one port with SO_REUSEPORT, one bus through
Redis, one graceful shutdown for all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from .conftest import JwksServer, MakeToken
from .support import WAIT, close_code, next_frame
from .test_cli import API_KEY, StartCli, connect, run_to_exit, start_cli, token_settings

__all__ = ["start_cli"]  # the fixture, shared with test_cli.py


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


async def test_two_workers_share_the_port_and_the_bus_and_stop_together(
    start_cli: StartCli,
    jwks_server: JwksServer,
    make_token: MakeToken,
    redis_url: str,
    redis_prefix: str,
) -> None:
    server = await start_cli(
        "--port",
        "0",
        "--workers",
        "2",
        "--redis-url",
        redis_url,
        "--api-key",
        API_KEY,
        **token_settings(jwks_server),
    )
    workers = children_of(server.process.pid)
    assert len(workers) == 2
    token = make_token(channels=["news"])
    no_reuse = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(server.url, connector=no_reuse) as session:
        sockets = [await connect(session, "/ws", token, ["news"]) for _ in range(16)]
        for socket in sockets:
            assert (await next_frame(socket))["type"] == "welcome"
        # Each worker counts its own sockets: neither holds all 16 nor none (the kernel
        # put all 16 on one: 2 in 65536), whichever worker answers.
        for _ in range(10):
            async with session.get("/ws/health") as response:
                assert 0 < (await response.json())["connections"] < 16
        emitted = await session.post(
            "/ws/emit", json={"channel": "news", "data": "hi"}, headers={"X-API-Key": API_KEY}
        )
        assert emitted.status == 202
        for socket in sockets:  # whichever worker holds it
            assert (await next_frame(socket))["data"] == "hi"
        server.process.send_signal(signal.SIGTERM)
        for socket in sockets:
            assert await close_code(socket) == 1001
    async with asyncio.timeout(WAIT * 2):
        assert await server.process.wait() == 0
    for worker in workers:  # reaped by the parent before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)


async def test_more_than_one_worker_needs_redis_and_a_port(jwks_server: JwksServer) -> None:
    cli = (sys.executable, "-m", "aiohttp_wsbus")
    settings = token_settings(jwks_server)
    status, lines = await run_to_exit(*cli, "--workers", "2", **settings)
    assert (status, len(lines)) == (2, 1)
    assert "--workers / WSBUS_WORKERS: 2 processes need --redis-url" in lines[0]
    for bad in ("0", "257", "two"):
        status, lines = await run_to_exit(*cli, "--workers", bad, **settings)
        assert (status, len(lines)) == (2, 1)
        assert "--workers / WSBUS_WORKERS" in lines[0]
    status, lines = await run_to_exit(
        *cli,
        "--workers",
        "2",
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--path",
        "wsbus.sock",  # refused before anything is created
        **settings,
    )
    assert (status, len(lines)) == (2, 1)
    assert "not on --path" in lines[0]
