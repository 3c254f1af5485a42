"""Runs the example app in-process on a free loopback port, and stops and starts it again;
and talks to it over HTTP and raw bus sockets."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

import aiohttp_wsbus
from example_app import ExampleSettings, make_app

from .support import next_frame

# The example's rooms keep presence: a raw socket on one also gets joins and leaves.
PRESENCE_FRAMES = frozenset({"join", "leave"})

API_KEY = "example-test-key-" + "k" * 16


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class _ListHandler(logging.Handler):
    """Keeps each log line it is given in a list."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ExampleServer:
    """The example app on 127.0.0.1:port; stop() and start() keep the port."""

    def __init__(
        self, port: int, *, token_lifetime: int = 120, broker: aiohttp_wsbus.Broker | None = None
    ) -> None:
        self.settings = ExampleSettings(port=port, api_key=API_KEY, token_lifetime=token_lifetime)
        self.broker = broker
        self.url = f"http://127.0.0.1:{port}"
        self.app: web.Application | None = None
        self.access_log: list[str] = []
        """One `METHOD PATH HTTP/1.1 STATUS` line per answered request, across restarts."""
        # A logger of its own, outside logging's registry: nothing else writes to it.
        self._access_logger = logging.Logger(f"example-server-{port}", logging.INFO)
        self._access_logger.addHandler(_ListHandler(self.access_log))
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Start a fresh app (a new identity provider, so new signing keys)."""
        self.app = make_app(self.settings, broker=self.broker)
        runner = web.AppRunner(self.app, access_log=self._access_logger, access_log_format="%r %s")
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self.settings.host, self.settings.port).start()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@asynccontextmanager
async def running_example(
    *, token_lifetime: int = 120, broker: aiohttp_wsbus.Broker | None = None
) -> AsyncIterator[ExampleServer]:
    server = ExampleServer(free_port(), token_lifetime=token_lifetime, broker=broker)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def login(http: aiohttp.ClientSession, example: ExampleServer, user: str) -> dict[str, Any]:
    """The demo identity provider's answer for `user`: a token and what it grants."""
    async with http.post(example.url + "/login", json={"user": user}) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def post(
    http: aiohttp.ClientSession, url: str, body: object, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.post(url, json=body, headers=headers) as response:
        answer: dict[str, Any] = await response.json()
        return response.status, answer


async def open_socket(
    http: aiohttp.ClientSession, example: ExampleServer, token: str, channels: list[str]
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A raw bus socket with `token` asking for `channels`; returns it and its welcome."""
    socket = await http.ws_connect(example.url.replace("http", "ws") + "/ws")
    await socket.send_json({"type": "connect", "token": token, "channels": channels})
    welcome = await next_frame(socket)
    assert welcome["type"] == "welcome", welcome
    return socket, welcome


async def next_frame_skipping_presence(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next frame that is not a join or leave."""
    while (frame := await next_frame(socket))["type"] in PRESENCE_FRAMES:
        pass
    return frame


async def nothing_more_but_presence(socket: aiohttp.ClientWebSocketResponse) -> None:
    """Prove no frame but joins and leaves is waiting: a ping round trip comes back first."""
    await socket.send_json({"type": "ping"})
    assert await next_frame_skipping_presence(socket) == {"type": "pong"}
