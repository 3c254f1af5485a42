"""The served JS client in headless Chromium: delivery, a server restart, recovery,
and sessions the application ends, renews or narrows."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, hdrs, web
from playwright.async_api import Browser, Page

import aiohttp_wsbus
from aiohttp_wsbus.protocol import PROTOCOL, bearer_token, query_connect

from .conftest import AUDIENCE, ISSUER, JwksServer, MakeToken
from .redis_node import API_KEY as NODE_API_KEY
from .redis_nodes import start_node, stop_node
from .support import eventually

WAIT_MS = 5000  # any single wait in the page
# The page's states from its first welcome through one reconnect to the second.
RECONNECTED_ONCE = ["connecting", "connected", "disconnected", "connecting", "connected"]

# The page imports the client the bus serves, and records everything it sees.
# While the test holds tokens, getToken waits: the client stays disconnected.
# With `reuseToken` set, getToken answers the last token without asking the server.
# `sockets` counts the WebSockets made, `backoffs` the backoff delays drawn; `window.bus`
# is the client itself, for tests that subscribe more.
# `?bus=PATH&connectTimeout=MS` points it elsewhere (the scripted socket); `?user=NAME`
# asks for NAME's token, which may read presence (on a PageServer that keeps it);
# `?tokenInHeader=true` offers the token in the handshake. `window.opened` holds
# every WebSocket made.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>wsbus browser test</title>
<script type="module">
  import { WsBus } from "/ws/wsbus.js";

  let gate = null;
  let token = null;
  Object.assign(window, {
    received: [], states: [], subscribed: [], recovered: [], errors: [], denied: [],
    disconnected: [], presence: [], joins: [], leaves: [], sockets: 0, backoffs: 0,
    reuseToken: false, opened: [],
  });
  window.holdTokens = () => {
    let release;
    gate = { promise: new Promise((resolve) => (release = resolve)), release };
  };
  window.releaseTokens = () => {
    const held = gate;
    gate = null;
    held?.release();
  };

  class CountedWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      window.sockets += 1;
      window.opened.push(this);
    }
  }

  const params = new URLSearchParams(location.search);
  const options = {
    getToken: async () => {
      if (gate) await gate.promise;
      if (window.reuseToken && token) return token;
      const user = params.get("user");
      const response = await fetch(user ? `/token?user=${encodeURIComponent(user)}` : "/token");
      if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
      return (token = await response.text());
    },
    minReconnectDelay: 20,
    maxReconnectDelay: 200,
    autoConnect: false,
    WebSocket: CountedWebSocket,
    random: () => {
      window.backoffs += 1;
      return Math.random();
    },
  };
  if (params.has("connectTimeout")) options.connectTimeout = Number(params.get("connectTimeout"));
  if (params.has("tokenInHeader")) options.tokenInHeader = params.get("tokenInHeader") === "true";
  const bus = (window.bus = new WsBus(params.get("bus") ?? "/ws", options));
  bus.on("state", (state) => window.states.push(state));
  bus.on("subscribed", (channel, meta) => window.subscribed.push([channel, meta]));
  bus.on("recovered", (channel, ok) => window.recovered.push([channel, ok]));
  bus.on("denied", (channel, reason) => window.denied.push([channel, reason]));
  bus.on("disconnected", (reason) => window.disconnected.push([reason, bus.state]));
  bus.on("error", (error) => window.errors.push(String(error)));
  const users = (members) => members && [...members.keys()].sort();
  bus.on("presence", (channel, members, count) => {
    window.presence.push([channel, users(members), count]);
  });
  bus.on("join", (channel, user, info) => window.joins.push([channel, user, info]));
  bus.on("leave", (channel, user) => window.leaves.push([channel, user]));
  bus.subscribe("chat:lobby", (data, meta) => window.received.push({ data, ...meta }));
  bus.connect();
</script>
"""


@dataclass
class ScriptedConnection:
    """One socket on the scripted endpoint: the client's connect frame and how it ended."""

    connect: dict[str, Any] | None = None
    opened_at: float = 0.0
    closed_at: float | None = None
    close_code: int | None = None


class ScriptedSockets:
    """A WebSocket endpoint that stands in for the bus: it answers each connect (the
    frame, or a handshake carrying the token) with the frames in `script` (none: it
    never answers) and records every socket."""

    def __init__(self) -> None:
        self.script: list[dict[str, Any]] = []
        self.connections: list[ScriptedConnection] = []
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        token = bearer_token(request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL))
        socket = web.WebSocketResponse(protocols=(PROTOCOL,))
        await socket.prepare(request)
        loop = asyncio.get_running_loop()
        connection = ScriptedConnection(opened_at=loop.time())
        if token is not None:
            connect = query_connect(token, request.query)
            connection.connect = {"type": "connect", "token": token, "channels": connect.channels}
            for frame in self.script:
                await socket.send_json(frame)
        await self._record(lambda: self.connections.append(connection))
        async for message in socket:
            if message.type is WSMsgType.TEXT and connection.connect is None:
                connection.connect = json.loads(message.data)
                for frame in self.script:
                    await socket.send_json(frame)

        def closed() -> None:
            connection.closed_at = loop.time()
            connection.close_code = socket.close_code

        await self._record(closed)
        return socket

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait (at most WAIT_MS) until `condition()` holds after some socket's change."""
        async with asyncio.timeout(WAIT_MS / 1000), self._changed:
            await self._changed.wait_for(condition)

    async def _record(self, change: Callable[[], None]) -> None:
        async with self._changed:
            change()
            self._changed.notify_all()


class PageServer:
    """The test's own app on one loopback port: the page, a token endpoint, the bus,
    and a scripted stand-in for the bus at `/scripted`.

    Each token it hands out has `jti` "page-N", N counting from 1 (`tokens_issued`);
    asked for `?user=NAME`, it is NAME's, may read presence and names them in its info.
    `presence` is the bus's setting (default: no channel keeps presence).

    `restart()` stops it and starts a new app (a new MemoryBroker, as after a
    process restart) on the same port; the JWKS server lives on.
    """

    def __init__(
        self,
        jwks_url: str,
        make_token: MakeToken,
        broker: aiohttp_wsbus.Broker | None = None,
        presence: tuple[str, ...] = (),
    ) -> None:
        self.jwks_url = jwks_url
        self.make_token = make_token
        self.broker = broker
        self.presence = presence
        self.port = 0
        self.bus: aiohttp_wsbus.Bus | None = None
        self.scripted = ScriptedSockets()
        self.tokens_issued = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def scripted_url(self, **query: str) -> str:
        """The page, its client pointed at the scripted endpoint, with these options."""
        parameters = "".join(f"&{name}={value}" for name, value in query.items())
        return f"{self.url}?bus=/scripted{parameters}"

    async def start(self) -> None:
        app = web.Application()
        self.bus = aiohttp_wsbus.setup(
            app,
            jwks_url=self.jwks_url,
            issuer=ISSUER,
            audience=AUDIENCE,
            close_timeout=1.0,
            broker=self.broker,
            client_publish=True,
            presence=self.presence,
        )
        self.bus.rpc("echo")(_echo)
        app.router.add_get("/", self._page)
        app.router.add_get("/token", self._token)
        app.router.add_get("/scripted", self.scripted.handle)
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
        self.tokens_issued += 1
        claims: dict[str, Any] = {"channels": ["chat:*"], "jti": f"page-{self.tokens_issued}"}
        user = request.query.get("user")
        if user is not None:
            claims.update(sub=user, presence=["chat:*"], info={"name": user.title()})
        return web.Response(text=self.make_token(**claims))


async def _echo(info: aiohttp_wsbus.ConnectionInfo, data: Any) -> Any:
    return {"user": info.user, "data": data}


@pytest.fixture
async def page_server(jwks_server: JwksServer, make_token: MakeToken) -> AsyncIterator[PageServer]:
    server = PageServer(jwks_server.url, make_token)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def presence_page_server(
    jwks_server: JwksServer, make_token: MakeToken
) -> AsyncIterator[PageServer]:
    """A PageServer whose chat channels keep presence."""
    server = PageServer(jwks_server.url, make_token, presence=("chat:*",))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def load_page(browser: Browser, url: str) -> AsyncIterator[Page]:
    """The test page at `url`, loaded; fails on any uncaught error in it."""
    opened = await browser.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await opened.goto(url)
        yield opened
        assert errors == []  # no uncaught exception, no unhandled rejection
    finally:
        await opened.close()


@pytest.fixture
async def page(browser: Browser, page_server: PageServer) -> AsyncIterator[Page]:
    """The test page, loaded and connected."""
    async with load_page(browser, page_server.url) as opened:
        await wait_until(opened, "window.states.includes('connected')")
        yield opened


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


@pytest.mark.parametrize(
    ("query", "protocol", "url_query"),
    [("?tokenInHeader=true", PROTOCOL, "?channels=chat%3Alobby"), ("", "", "")],
)
async def test_page_sends_a_connect_frame_unless_told_to_offer_its_token_in_the_handshake(
    browser: Browser, page_server: PageServer, query: str, protocol: str, url_query: str
) -> None:
    async with load_page(browser, page_server.url + query) as page:
        await wait_until(page, "window.states.includes('connected')")
        await page_server.publish("hello")
        await wait_until(page, "window.received.length === 1")
        opened = await page.evaluate("window.opened.map((s) => [s.protocol, s.url])")
        assert opened == [[protocol, f"ws://127.0.0.1:{page_server.port}/ws{url_query}"]]
        assert await page.evaluate("window.errors") == []


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
    assert await page.evaluate("window.states") == RECONNECTED_ONCE


async def test_page_is_told_of_each_channel_the_server_subscribed_and_again_after_a_drop(
    page: Page, page_server: PageServer
) -> None:
    bus = page_server.bus
    assert bus is not None
    await wait_until(page, "window.subscribed.length === 1")
    [[channel, meta]] = await page.evaluate("window.subscribed")
    assert (channel, meta["position"]["offset"], list(meta)) == ("chat:lobby", 0, ["position"])

    later = await bus.publish("chat:later", "before the page joined")
    await page.evaluate("window.bus.subscribe('chat:later')")  # a subscribe frame, live
    await wait_until(page, "window.subscribed.length === 2")
    assert (await page.evaluate("window.subscribed"))[1] == [
        "chat:later",
        {"position": {"offset": later.offset, "epoch": later.epoch}},
    ]

    await page.evaluate("window.holdTokens()")
    assert page_server.drop_sockets() == 1
    await wait_until(page, "window.states.includes('disconnected')")
    await page_server.publish("missed")
    await page.evaluate("window.releaseTokens()")
    await wait_until(page, "window.subscribed.length === 4")
    again = dict(map(tuple, (await page.evaluate("window.subscribed"))[2:]))
    assert again["chat:lobby"]["recovered"] is True
    assert again["chat:lobby"]["position"]["offset"] == 1
    assert again["chat:later"] == {
        "position": {"offset": later.offset, "epoch": later.epoch},
        "recovered": True,
    }
    await wait_until(page, "window.received.length === 1")
    assert [(m["data"], m["recovered"]) for m in await received(page)] == [("missed", True)]
    assert await page.evaluate("window.errors") == []


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


async def test_page_reconnects_after_refused_connects_once_the_server_is_back(
    page: Page, page_server: PageServer
) -> None:
    # The token endpoint is down with the server: only the socket can fail.
    await page.evaluate("window.reuseToken = true")
    await page_server.stop()
    await wait_until(page, "window.sockets >= 4")  # three connects refused, at least
    await page_server.start()
    await wait_until(page, connected_count(2))
    await page_server.publish("back")
    await wait_until(page, "window.received.length === 1")

    states: list[str] = await page.evaluate("window.states")
    steps = states[2:-1]  # between the first welcome and the last
    assert steps == ["disconnected", "connecting"] * (len(steps) // 2), states
    # Chromium fires error then close on a refused socket: one failed attempt, one backoff.
    assert await page.evaluate("window.sockets") == states.count("connecting")
    assert await page.evaluate("window.backoffs") == states.count("disconnected")
    assert await page.evaluate("window.errors") == []


async def test_page_gives_up_on_a_socket_that_is_never_welcomed(
    browser: Browser, page_server: PageServer
) -> None:
    scripted = page_server.scripted  # answers nothing
    async with load_page(browser, page_server.scripted_url(connectTimeout="500")) as page:
        await scripted.wait_for(lambda: len(scripted.connections) >= 2)
        first = scripted.connections[0]
        await scripted.wait_for(lambda: first.closed_at is not None)

        assert first.connect is not None and first.connect["type"] == "connect"
        assert first.close_code == 1000
        # The client's timer starts before the upgrade this server sees: leave room for it.
        assert first.closed_at is not None and first.closed_at - first.opened_at >= 0.2
        states = await page.evaluate("window.states")
        assert states[:3] == ["connecting", "disconnected", "connecting"]
        errors = await page.evaluate("window.errors")
        assert errors[0] == "Error: WsBus: no welcome from the server within 500 ms"


async def test_page_continues_a_channel_at_offset_0_with_offset_1_in_another_epoch(
    browser: Browser, page_server: PageServer
) -> None:
    # A channel never published to is at offset 0 in an epoch of its own: its first
    # message continues it whatever its epoch. A hole after that is still a gap.
    page_server.scripted.script = [
        {
            "type": "welcome",
            "client": "c1",
            "user": "alice",
            "expires_at": int(time.time()) + 3600,
            "subscribed": ["chat:lobby"],
            "denied": {},
            "recovered": {},
            "positions": {"chat:lobby": {"offset": 0, "epoch": "unpublished"}},
        },
        {"type": "message", "channel": "chat:lobby", "offset": 1, "epoch": "e1", "data": "first"},
        {"type": "message", "channel": "chat:lobby", "offset": 3, "epoch": "e1", "data": "hole"},
    ]
    async with load_page(browser, page_server.scripted_url()) as page:
        await wait_until(page, "window.received.length === 2")

        messages = await received(page)
        assert [(m["data"], m["offset"], m["epoch"]) for m in messages] == [
            ("first", 1, "e1"),
            ("hole", 3, "e1"),
        ]
        assert await page.evaluate("window.recovered") == [["chat:lobby", False]]  # the hole only
        assert await page.evaluate("window.errors") == []


async def test_page_stops_when_the_application_ends_the_session(
    page: Page, page_server: PageServer
) -> None:
    assert page_server.bus is not None
    await page_server.bus.disconnect("alice", reason="signed out everywhere")
    await wait_until(page, "window.states.at(-1) === 'closed'")

    assert await page.evaluate("window.disconnected") == [["signed out everywhere", "closed"]]
    assert await page.evaluate("window.states") == ["connecting", "connected", "closed"]
    assert await page.evaluate("window.errors") == []
    await page.evaluate("window.bus.connect()")  # closed is final
    assert await page.evaluate("[window.bus.state, window.sockets, window.backoffs]") == [
        "closed",
        1,
        0,
    ]
    assert page_server.tokens_issued == 1
    assert not page_server.bus.connections


async def test_page_reconnects_at_once_with_a_fresh_token_when_asked(
    page: Page, page_server: PageServer
) -> None:
    bus = page_server.bus
    assert bus is not None
    await page_server.publish("before")
    await wait_until(page, "window.received.length === 1")

    await bus.disconnect("alice", reconnect=True)
    await wait_until(page, connected_count(2))
    await page_server.publish("after")
    await wait_until(page, "window.received.length === 2")

    assert [connection.claims.token_id for connection in bus.connections] == ["page-2"]
    assert [message["data"] for message in await received(page)] == ["before", "after"]
    assert await page.evaluate("[window.sockets, window.backoffs]") == [2, 0]  # no backoff delay
    assert await page.evaluate("window.states") == RECONNECTED_ONCE
    assert await page.evaluate("window.disconnected") == []
    assert await page.evaluate("window.errors") == []


async def test_page_drops_a_channel_the_application_unsubscribed_it_from(
    page: Page, page_server: PageServer
) -> None:
    bus = page_server.bus
    assert bus is not None
    await page.evaluate(
        "() => { window.markers = [];"
        " window.bus.subscribe('chat:marker', (data) => window.markers.push(data)); }"
    )
    await eventually(lambda: len(bus.registry.subscribers("chat:marker")) == 1)

    await bus.unsubscribe_user("alice", ["chat:lobby"])
    await wait_until(page, "window.denied.length === 1")
    await page_server.publish("never delivered")
    await bus.publish("chat:marker", "after it")
    await wait_until(page, "window.markers.length === 1")

    assert await page.evaluate("window.denied") == [["chat:lobby", "server"]]
    assert await received(page) == []
    assert await page.evaluate("window.bus.state") == "connected"
    assert await page.evaluate("window.errors") == []


async def test_a_disconnect_on_another_node_stops_the_page_within_a_second(
    browser: Browser,
    jwks_server: JwksServer,
    make_token: MakeToken,
    redis_url: str,
    redis_prefix: str,
) -> None:
    # The page's bus and a second server process share one Redis.
    broker = aiohttp_wsbus.RedisBroker(redis_url, prefix=redis_prefix)
    server = PageServer(jwks_server.url, make_token, broker=broker)
    await server.start()
    other_node = await start_node(redis_url, redis_prefix)
    try:
        async with load_page(browser, server.url) as opened, aiohttp.ClientSession() as session:
            await wait_until(opened, "window.states.includes('connected')")

            async def end_session(body: dict[str, Any]) -> None:
                async with session.post(
                    other_node.url + "/ws/users/alice/disconnect",
                    json=body,
                    headers={"X-API-Key": NODE_API_KEY},
                ) as answer:
                    assert answer.status == 202

            await end_session({"reconnect": True})
            await opened.wait_for_function(f"() => {connected_count(2)}", timeout=1000)
            assert server.tokens_issued == 2  # back with a fresh token
            await end_session({"reason": "banned"})
            await opened.wait_for_function("() => window.states.at(-1) === 'closed'", timeout=1000)
            assert await opened.evaluate("window.disconnected") == [["banned", "closed"]]
            assert await opened.evaluate("window.bus.state") == "closed"
    finally:
        await stop_node(other_node)
        await server.stop()


async def test_page_publishes_and_calls_rpc_over_its_socket(
    page: Page, page_server: PageServer
) -> None:
    answers = await page.evaluate(
        """async () => {
            const landed = await bus.publish("chat:lobby", { text: "from the page" });
            const typing = await bus.publish("chat:lobby", "typing", { ephemeral: true });
            const echoed = await bus.rpc("echo", [1, 2]);
            const refusals = [];
            for (const attempt of [() => bus.publish("news", 1), () => bus.rpc("nope")]) {
              try {
                await attempt();
              } catch (error) {
                refusals.push([error.name, error.code]);
              }
            }
            return { landed, typing: typing ?? null, echoed, refusals };
        }"""
    )
    assert answers["landed"]["offset"] == 1
    assert answers["typing"] is None
    assert answers["echoed"] == {"user": "alice", "data": [1, 2]}
    assert answers["refusals"] == [
        ["WsBusRequestError", "forbidden"],
        ["WsBusRequestError", "not_found"],
    ]
    await wait_until(page, "window.received.length === 2")
    first, second = await received(page)
    assert (first["data"], first["offset"]) == ({"text": "from the page"}, 1)
    assert (second["data"], second["ephemeral"], second["offset"]) == ("typing", True, 0)
    assert await page.evaluate("window.recovered") == []


async def test_page_loads_state_then_subscribes_and_misses_nothing_published_meanwhile(
    page: Page, page_server: PageServer
) -> None:
    bus = page_server.bus
    assert bus is not None
    for n in (1, 2):
        await bus.publish("chat:loaded", f"before {n}")
    await page.evaluate(
        """() => {
            window.loadedState = null;
            window.arrived = [];
            let release;
            window.releaseState = new Promise((resolve) => (release = resolve));
            window.release = release;
            bus.subscribe("chat:loaded", (data) => window.arrived.push(data), {
              getState: async () => {
                const page = await bus.history("chat:loaded");
                window.loadedState = page.messages.map((message) => message.data);
                await window.releaseState; // the app renders meanwhile: others publish
                return page.position;
              },
            });
        }"""
    )
    await wait_until(page, "window.loadedState !== null")
    for n in (1, 2, 3):
        await bus.publish("chat:loaded", f"during {n}")
    await page.evaluate("window.release()")
    await wait_until(page, "window.arrived.length === 3")
    await bus.publish("chat:loaded", "after")
    await wait_until(page, "window.arrived.length === 4")
    assert await page.evaluate("window.loadedState") == ["before 1", "before 2"]
    assert await page.evaluate("window.arrived") == ["during 1", "during 2", "during 3", "after"]


async def test_page_rewinds_the_last_messages_on_its_first_subscribe(
    page: Page, page_server: PageServer
) -> None:
    bus = page_server.bus
    assert bus is not None
    for n in range(1, 6):
        await bus.publish("chat:rewound", n)
    await page.evaluate(
        """() => {
            window.rewound = [];
            const record = (data, meta) => window.rewound.push([data, meta.recovered]);
            bus.subscribe("chat:rewound", record, { rewind: 3 });
        }"""
    )
    await wait_until(page, "window.rewound.length === 3")
    await bus.publish("chat:rewound", 6)
    await wait_until(page, "window.rewound.length === 4")
    assert await page.evaluate("window.rewound") == [[3, True], [4, True], [5, True], [6, False]]
async def test_page_lists_who_is_in_the_lobby_follows_joins_and_leaves_and_relists_after_a_drop(
    browser: Browser, presence_page_server: PageServer
) -> None:
    bus = presence_page_server.bus
    assert bus is not None
    url = presence_page_server.url
    async with load_page(browser, url + "?user=alice") as alice:
        await wait_until(alice, "window.presence.length === 1")
        assert await alice.evaluate("window.presence") == [["chat:lobby", ["alice"], 1]]

        async with load_page(browser, url + "?user=bob") as bob:
            await wait_until(alice, "window.joins.length === 1")
            # Her own join, sent after her snapshot, was applied quietly.
            assert await alice.evaluate("window.joins") == [["chat:lobby", "bob", {"name": "Bob"}]]
            members = await alice.evaluate("Object.fromEntries(window.bus.members('chat:lobby'))")
            server_members = await bus.presence("chat:lobby")
            assert members == {user: m.as_json() for user, m in server_members.items()}
            assert await bob.evaluate("window.presence") == [["chat:lobby", ["alice", "bob"], 2]]
        await wait_until(alice, "window.leaves.length === 1")  # bob's page closed
        assert await alice.evaluate("window.leaves") == [["chat:lobby", "bob"]]
        assert await alice.evaluate("[...window.bus.members('chat:lobby').keys()]") == ["alice"]

        await alice.evaluate("window.holdTokens()")
        assert presence_page_server.drop_sockets() == 1
        await wait_until(alice, "window.states.includes('disconnected')")
        assert await alice.evaluate("window.bus.members('chat:lobby')") is None
        async with load_page(browser, url + "?user=carol") as carol:
            await wait_until(carol, "window.presence.length === 1")
            await alice.evaluate("window.releaseTokens()")
            await wait_until(alice, "window.presence.length === 2")
            assert (await alice.evaluate("window.presence"))[1] == [
                "chat:lobby",
                ["alice", "carol"],
                2,
            ]
        # carol came while alice was away: her fresh snapshot said so, no join did.
        assert len(await alice.evaluate("window.joins")) == 1
        assert await alice.evaluate("window.errors") == []
