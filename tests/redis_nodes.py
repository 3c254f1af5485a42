"""Bus server processes on one Redis, for the multi-node tests: `nodes` and friends.

Loaded by conftest.py as a pytest plugin (the `nodes` fixture); each node is
`python -m tests.redis_node` (its own process, its own RedisBroker).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import ClientWebSocketResponse

from .redis_node import API_KEY
from .support import WAIT, next_frame

if TYPE_CHECKING:
    from .conftest import MakeToken

SECRET = "a-secret-only-these-tests-know-0123456789"
ROOT = Path(__file__).parent.parent


@dataclass
class Node:
    """A server process started with `python -m tests.redis_node`."""

    process: asyncio.subprocess.Process
    url: str

    async def emit(self, session: aiohttp.ClientSession, channel: str, data: Any) -> int:
        async with session.post(
            self.url + "/ws/emit",
            json={"channel": channel, "data": data},
            headers={"X-API-Key": API_KEY},
        ) as response:
            assert response.status == 202, await response.text()
            offset: int = (await response.json())["published"][0]["offset"]
            return offset

    async def open_raw(
        self, session: aiohttp.ClientSession, token: str, channels: list[str] | None = None
    ) -> ClientWebSocketResponse:
        """A socket that has sent its connect frame; what the node answers is the test's."""
        socket = await session.ws_connect(self.url + "/ws")
        frame = {"type": "connect", "token": token, "channels": channels or []}
        await socket.send_json(frame)
        return socket

    async def open(
        self, session: aiohttp.ClientSession, token: str, channels: list[str]
    ) -> tuple[ClientWebSocketResponse, dict[str, Any]]:
        socket = await self.open_raw(session, token, channels)
        welcome = await next_frame(socket)
        assert welcome["type"] == "welcome", welcome
        return socket, welcome


async def start_node(redis_url: str, prefix: str, **settings: Any) -> Node:
    """A node process; `settings` go to its setup() (JSON values)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.redis_node",
        redis_url,
        prefix,
        SECRET,
        json.dumps(settings),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT * 2):
            port = int(await process.stdout.readline())
    except (TimeoutError, ValueError):
        process.kill()
        await process.wait()
        raise
    return Node(process, f"http://127.0.0.1:{port}")


async def stop_node(node: Node) -> None:
    assert node.process.stdin is not None
    node.process.stdin.close()
    try:
        async with asyncio.timeout(WAIT):
            await node.process.wait()
    except TimeoutError:
        node.process.kill()
        await node.process.wait()


@pytest.fixture
async def nodes(redis_url: str, redis_prefix: str) -> AsyncIterator[list[Node]]:
    started = await asyncio.gather(*(start_node(redis_url, redis_prefix) for _ in range(2)))
    try:
        yield list(started)
    finally:
        await asyncio.gather(*(stop_node(node) for node in started))


def hs256(make_token: MakeToken, **claims: Any) -> str:
    return make_token(alg="HS256", key=SECRET, kid=None, **claims)


