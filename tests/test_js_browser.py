"""The served JS client in headless Chromium: delivery, a server restart, recovery."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

import aiohttp_wsbus

from .conftest import AUDIENCE, ISSUER, JwksServer, MakeToken
from .support import eventually

WAIT_MS = 5000  # any single wait in the page

# The page imports the client the bus serves, and records everything it sees.
# While the test holds tokens, getToken waits: the client stays disconnected.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>wsbus browser test</title>
<script type="module">
  import { WsBus } from "/ws/wsbus.js";

  let gate = null;
  Object.assign(window, { received: [], states: [], recovered: [], errors: [] });
  window.holdTokens = () => {
    let release;
    gate = { promise: new Promise((resolve) => (release = resolve)), release };
  };
  window.releaseTokens = () => {
    const held = gate;
    gate = null;
    held?.release();
  };

  const bus = new WsBus("/ws", {
    getToken: async () => {
      if (gate) await gate.promise;
      const response = await fetch("/token");
      if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
      return response.text();
    },
    minReconnectDelay: 20,
    maxReconnectDelay: 200,
    autoConnect: false,
  });
  bus.on("state", (state) => window.states.push(state));
  bus.on("recovered", (channel, ok) => window.recovered.push([channel, ok]));
  bus.on("error", (error) => window.errors.push(String(error)));
  bus.subscribe("chat:lobby", (data, meta) => window.received.push({ data, ...meta }));
  bus.connect();
</script>
"""


class PageServer:
    """The test's own app on one loopback port: the page, a token endpoint and the bus.

    `restart()` stops it and starts a new app (a new MemoryBroker, as after a
    process restart) on the same port; the JWKS server lives on.
    """

    def __init__(self, jwks_url: str, make_token: MakeToken) -> None:
        self.jwks_url = jwks_url
        self.make_token = make_token
        self.port = 0
        self.bus: aiohttp_wsbus.Bus | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        app = web.Application()
        self.bus = aiohttp_wsbus.setup(
            app, jwks_url=self.jwks_url, issuer=ISSUER, audience=AUDIENCE, close_timeout=1.0
        )
        app.router.add_get("/", self._page)
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def publish(self, data: Any) -> None:
        assert self.bus is not None
        await self.bus.publish("chat:lobby", data)

    def drop_sockets(self) -> int:
        """Abort every bus socket's transport: a network drop, no close frame."""
        assert self.bus is not None
        connections = list(self.bus.connections)
        for connection in connections:
            connection.transport.abort()
        return len(connections)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def _token(self, request: web.Request) -> web.Response:
        return web.Response(text=self.make_token(channels=["chat:*"]))


@pytest.fixture
async def page_server(jwks_server: JwksServer, make_token: MakeToken) -> AsyncIterator[PageServer]:
    server = PageServer(jwks_server.url, make_token)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def page(browser: Browser, page_server: PageServer) -> AsyncIterator[Page]:
    """The test page, loaded and connected."""
    opened = await browser.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await opened.goto(page_server.url)
        await wait_until(opened, "window.states.includes('connected')")
        yield opened
        assert errors == []  # no uncaught exception, no unhandled rejection
    finally:
        await opened.close()


async def wait_until(page: Page, condition: str) -> None:
    """Wait (at most WAIT_MS) until the JS expression `condition` holds in the page."""
    await page.wait_for_function(f"() => {condition}", timeout=WAIT_MS)


async def received(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.evaluate("window.received")
    return result


def connected_count(count: int) -> str:
    return f"window.states.filter((s) => s === 'connected').length === {count}"


async def test_page_receives_again_after_a_server_restart(
    page: Page, page_server: PageServer
) -> None:
    await page_server.publish({"text": "before"})
    await wait_until(page, "window.received.length === 1")

    await page_server.restart()
    await wait_until(page, connected_count(2))
    await page_server.publish({"text": "after"})
    await wait_until(page, "window.received.length === 2")

    assert [message["data"] for message in await received(page)] == [
        {"text": "before"},
        {"text": "after"},
    ]
    # A new broker is a new epoch: the client is told it could not recover.
    assert await page.evaluate("window.recovered") == [["chat:lobby", False]]
    states = await page.evaluate("window.states")
    assert states[:3] == ["connecting", "connected", "disconnected"]
    assert states[-1] == "connected"
    # A reconnect attempt may have found the server down while fetching its token.
    assert set(await page.evaluate("window.errors")) <= {"TypeError: Failed to fetch"}


async def test_page_recovers_what_was_published_while_its_socket_was_down(
    page: Page, page_server: PageServer
) -> None:
    await page_server.publish(1)
    await wait_until(page, "window.received.length === 1")

    await page.evaluate("window.holdTokens()")
    assert page_server.drop_sockets() == 1
    await wait_until(page, "window.states.includes('disconnected')")
    for n in range(2, 22):
        await page_server.publish(n)
    await page.evaluate("window.releaseTokens()")
    await wait_until(page, connected_count(2))
    await page_server.publish(22)
    await wait_until(page, "window.received.length >= 22")

    messages = await received(page)
    assert [message["data"] for message in messages] == list(range(1, 23))
    assert [message["offset"] for message in messages] == list(range(1, 23))
    assert [message["data"] for message in messages if message["recovered"]] == list(range(2, 22))
    assert await page.evaluate("window.recovered") == [["chat:lobby", True]]
    assert await page.evaluate("window.errors") == []
    assert await page.evaluate("window.states") == [
        "connecting",
        "connected",
        "disconnected",
        "connecting",
        "connected",
    ]


async def test_offline_drops_the_socket_and_online_reconnects_and_recovers(
    page: Page, page_server: PageServer
) -> None:
    await page_server.publish("online")
    await wait_until(page, "window.received.length === 1")

    await page.context.set_offline(True)  # fires the window's `offline` event
    await wait_until(page, "window.states.at(-1) === 'disconnected'")
    await eventually(lambda: page_server.bus is not None and not page_server.bus.connections)
    await page_server.publish("missed while offline")

    await page.context.set_offline(False)  # `online`: back without waiting for backoff
    await wait_until(page, connected_count(2))
    await page_server.publish("back")
    await wait_until(page, "window.received.length === 3")
    assert [message["data"] for message in await received(page)] == [
        "online",
        "missed while offline",
        "back",
    ]
