"""aiohttp_wsbus.Client against a real server over real sockets: delivery, recovery across
drops and restarts, the close-code policy, token refresh."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus.testing import ClientFactory, IdentityProvider, drop_sockets, expire_tokens

from .support import WAIT, BusServer, eventually, start_bus

POLICY: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "js" / "test-support" / "policy-vectors.json").read_text()
)


async def bus_for(
    aiohttp_client: AiohttpClient, idp: IdentityProvider, **settings: Any
) -> BusServer:
    return await start_bus(
        aiohttp_client, idp.jwks_url, issuer=idp.issuer, audience=idp.audience, **settings
    )


class Recorder:
    """A client's events, with a way to wait for one."""

    def __init__(self, client: aiohttp_wsbus.Client) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()
        for event in ("state", "denied", "recovered", "disconnected", "refreshed", "error"):
            client.on(event, lambda *args, event=event: self._add(event, *args))

    def _add(self, *event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [event[1:] for event in self.events if event[0] == kind]

    async def wait_for(self, kind: str, *args: Any, count: int = 1, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while sum(1 for e in self.of(kind) if e[: len(args)] == args) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_subscriber_receives_what_is_published_in_order(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    async with client.subscribe("chat:lobby") as lobby:
        for n in range(3):
            await server.bus.publish("chat:lobby", {"n": n})
        received = [await lobby.receive(WAIT) for _ in range(3)]
    assert [m.data for m in received] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [m.offset for m in received] == [1, 2, 3]
    assert not any(m.recovered or m.after_gap for m in received)
    assert client.positions["chat:lobby"] == received[-1].position


async def test_an_ephemeral_message_arrives_flagged_and_leaves_the_position_alone(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    recorder = Recorder(client)
    async with client.subscribe("chat:lobby") as lobby:
        stored = await server.bus.publish("chat:lobby", "stored")
        await server.bus.publish("chat:lobby", "typing", ephemeral=True)
        await server.bus.publish("chat:lobby", "next")
        received = [await lobby.receive(WAIT) for _ in range(3)]
    assert [(m.data, m.offset, m.epoch, m.ephemeral) for m in received] == [
        ("stored", 1, stored.epoch, False),
        ("typing", 0, "", True),
        ("next", 2, stored.epoch, False),
    ]
    assert not any(m.recovered or m.after_gap for m in received)
    assert client.positions["chat:lobby"] == received[-1].position
    assert recorder.of("recovered") == []


async def test_socket_killed_mid_stream_every_one_of_50_arrives_once_in_order(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["feed"], min_reconnect_delay=0.05)
    events = Recorder(client)
    async with client.subscribe("feed") as feed:
        received: list[aiohttp_wsbus.Message] = []
        tenth = asyncio.Event()

        async def publish_all() -> None:
            for n in range(50):
                await server.bus.publish("feed", n)
                if n == 25:
                    await tenth.wait()  # the socket dies with messages still on the way
                    assert drop_sockets(server.bus, "alice") == 1
                await asyncio.sleep(0)

        publisher = asyncio.create_task(publish_all())
        while len(received) < 50:
            received.append(await feed.receive(WAIT))
            if len(received) == 10:
                tenth.set()
        await publisher
    assert [m.data for m in received] == list(range(50))
    assert not any(m.after_gap for m in received)
    assert any(m.recovered for m in received), "some arrived through recovery"
    assert ("disconnected",) in events.of("state")
    assert events.of("recovered") == [("feed", True)]


def ws_url(server: BusServer) -> str:
    return str(server.client.make_url("/ws"))


async def test_4401_twice_stops_after_one_retry_with_a_fresh_token(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    tokens: list[str] = []

    def get_token() -> str:
        tokens.append(wsbus_idp.issue("alice", aud="another-service"))
        return tokens[-1]

    async with aiohttp_wsbus.Client(ws_url(server), get_token=get_token) as client:
        events = Recorder(client)
        with pytest.raises(aiohttp_wsbus.ClosedByServer) as stopped:
            async with asyncio.timeout(WAIT), client.subscribe("chat:lobby"):
                pass
        assert (stopped.value.code, stopped.value.reason) == (4401, "token audience")
        assert client.state == "closed"
        assert len(tokens) == 2, "one retry at once, with a fresh token, then stop"
        (error,) = events.of("error")
        assert isinstance(error[0], aiohttp_wsbus.ClosedByServer)


async def test_4401_once_then_a_good_token_connects(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    tokens = iter([wsbus_idp.issue("alice", aud="another-service"), wsbus_idp.issue("alice")])
    async with aiohttp_wsbus.Client(ws_url(server), get_token=lambda: next(tokens)) as client:
        events = Recorder(client)
        await client.wait_connected(WAIT)
        assert client.attempt == 0
        assert events.of("error") == []


async def test_token_is_refreshed_on_the_live_socket_before_it_expires(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    # No leeway: a token not refreshed by its exp closes the socket (4001).
    server = await bus_for(aiohttp_client, wsbus_idp, leeway=0)
    client = await wsbus_client(
        server.client, "alice", channels=["chat:*"], ttl=2.5, refresh_before=2.0
    )
    events = Recorder(client)
    async with client.subscribe("chat:lobby") as lobby:
        # A refresh every 0.5 s, 2 s before each exp: the sixth is past the first token's.
        await events.wait_for("refreshed", count=6, timeout=WAIT * 2)
        await server.bus.publish("chat:lobby", "still here")
        assert (await lobby.receive(WAIT)).data == "still here"
    assert events.of("state") == [], "the socket was never lost"
    assert len(server.bus.connections) == 1


async def test_1013_backs_off_within_the_shared_bounds_then_connects(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp, max_connections=1)
    occupant, _ = await server.open(wsbus_idp.issue("bob"), [])
    bounds = {v["attempt"]: v for v in POLICY["backoff"]["attempts"]}
    randoms = itertools.chain([1.0, 0.25], itertools.repeat(0.0))
    client = aiohttp_wsbus.Client(
        ws_url(server),
        get_token=lambda: wsbus_idp.issue("alice"),
        random_value=lambda: next(randoms),
    )
    waits: list[tuple[int, float | None]] = []

    def on_state(state: str) -> None:
        if state == "disconnected":
            waits.append((client.attempt, client.retry_delay))

    client.on("state", on_state)
    events = Recorder(client)
    async with client:
        await events.wait_for("state", "disconnected", count=2, timeout=WAIT)
        await occupant.close()
        await client.wait_connected(WAIT)
    assert [attempt for attempt, _ in waits][:2] == [1, 2]
    for attempt, delay in waits:
        assert delay is not None
        assert bounds[attempt]["min_ms"] / 1000 <= delay <= bounds[attempt]["max_ms"] / 1000
    assert waits[0][1] == bounds[1]["max_ms"] / 1000, "random 1: the ceiling"
    assert events.of("error") == [], "1013 is no error: the client waits and retries"


async def test_since_from_a_saved_position_recovers_after_a_restart(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    first = await wsbus_client(server.client, "alice", channels=["orders:*"])
    async with first.subscribe("orders:7") as orders:
        for n in range(3):
            await server.bus.publish("orders:7", n)
        assert [(await orders.receive(WAIT)).data for _ in range(3)] == [0, 1, 2]
    saved = json.dumps({c: p.as_json() for c, p in first.positions.items()})
    await first.close()  # the process ends

    for n in range(3, 6):
        await server.bus.publish("orders:7", n)
    second = await wsbus_client(server.client, "alice", channels=["orders:*"])
    async with second.subscribe("orders:7", since=json.loads(saved)["orders:7"]) as orders:
        await server.bus.publish("orders:7", 6)
        received = [await orders.receive(WAIT) for _ in range(4)]
    assert [(m.data, m.recovered) for m in received] == [
        (3, True),
        (4, True),
        (5, True),
        (6, False),
    ]


async def test_a_gap_that_cannot_be_recovered_is_reported_not_silent(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp, history_size=2)
    await server.bus.publish("orders:7", 0)
    published = await server.bus.publish("orders:7", 1)
    saved = {"offset": published.offset - 1, "epoch": published.epoch}  # missed "1"
    for n in range(2, 6):
        await server.bus.publish("orders:7", n)  # "1" falls out of the history
    client = await wsbus_client(server.client, "alice", channels=["orders:*"])
    events = Recorder(client)
    async with client.subscribe("orders:7", since=saved) as orders:
        assert events.of("recovered") == [("orders:7", False)]
        await server.bus.publish("orders:7", 6)
        message = await orders.receive(WAIT)
        await server.bus.publish("orders:7", 7)
        following = await orders.receive(WAIT)
    assert (message.data, message.after_gap) == (6, True)
    assert (following.data, following.after_gap) == (7, False)


async def test_4410_stops_and_tells_why(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    events = Recorder(client)
    async with client.subscribe("chat:lobby") as lobby:
        await server.bus.disconnect("alice", reason="banned")
        with pytest.raises(aiohttp_wsbus.ClosedByServer) as stopped:
            await lobby.receive(WAIT)
    assert stopped.value.code == 4410
    assert client.state == "closed"
    assert events.of("disconnected") == [("banned",)]
    assert events.of("error") == [], "the application's decision, not a failure"


async def test_4012_and_an_expired_token_reconnect_at_once_with_a_fresh_token(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    # A backoff would take minutes: only an immediate reconnect passes in time.
    client = await wsbus_client(server.client, "alice", min_reconnect_delay=600)
    events = Recorder(client)
    await server.bus.disconnect("alice", reconnect=True)
    await events.wait_for("state", "connected", count=1)
    assert expire_tokens(server.bus, "alice") == 1
    await events.wait_for("state", "connected", count=2)
    assert client.retry_delay is None and client.attempt == 0


async def test_a_denied_channel_raises_on_subscribe(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    with pytest.raises(aiohttp_wsbus.SubscriptionDenied) as denied:
        async with asyncio.timeout(WAIT), client.subscribe("staff:room"):
            pass
    assert (denied.value.channel, denied.value.reason) == ("staff:room", "forbidden")
    async with client.subscribe("chat:lobby") as lobby:  # the client carries on
        await server.bus.publish("chat:lobby", "hi")
        assert (await lobby.receive(WAIT)).data == "hi"


async def test_leaving_a_subscription_unsubscribes_and_two_on_one_channel_both_receive(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    async with client.subscribe("chat:lobby") as first:
        async with client.subscribe("chat:lobby") as second:
            await server.bus.publish("chat:lobby", "both")
            assert (await first.receive(WAIT)).data == (await second.receive(WAIT)).data == "both"
        await server.bus.publish("chat:lobby", "first only")
        assert (await first.receive(WAIT)).data == "first only"
        assert len(server.bus.registry.subscribers("chat:lobby")) == 1
    await eventually(lambda: not server.bus.registry.subscribers("chat:lobby"))


async def test_a_channel_the_application_takes_away_ends_its_iteration_with_the_reason(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", channels=["chat:*"])
    async with client.subscribe("chat:staff") as staff:
        await server.bus.publish("chat:staff", "before")
        await server.bus.unsubscribe_user("alice", ["chat:staff"])
        assert (await staff.receive(WAIT)).data == "before"
        with pytest.raises(aiohttp_wsbus.SubscriptionDenied) as denied:
            await staff.receive(WAIT)
    assert denied.value.reason == "server"
    assert client.state == "connected"


async def test_closing_the_client_ends_iteration_quietly() -> None:
    client = aiohttp_wsbus.Client("ws://127.0.0.1:9/ws", get_token=lambda: "unused")
    async with client:
        entering = asyncio.create_task(client.subscribe("chat:lobby").__aenter__())
        await asyncio.sleep(0)  # let it register
    async with asyncio.timeout(WAIT):
        subscription = await entering
    assert [message async for message in subscription] == []
    assert client.state == "closed"


async def test_a_subscription_the_application_does_not_read_holds_the_reader_back() -> None:
    client = aiohttp_wsbus.Client("ws://127.0.0.1:9/ws", get_token=lambda: "unused", max_queued=2)
    subscription = client.subscribe("feed")
    messages = [aiohttp_wsbus.Message("feed", n, "e", n) for n in range(1, 4)]
    await subscription.put(messages[0])
    await subscription.put(messages[1])
    third = asyncio.create_task(subscription.put(messages[2]))
    await asyncio.sleep(0)
    assert not third.done(), "a full queue makes the reader wait (the server's buffer fills)"
    assert await subscription.receive(WAIT) == messages[0]
    async with asyncio.timeout(WAIT):
        await third
    stuck = asyncio.create_task(subscription.put(aiohttp_wsbus.Message("feed", 4, "e", 4)))
    await asyncio.sleep(0)
    subscription.end(None)  # the application left: the reader is let go
    async with asyncio.timeout(WAIT):
        await stuck
    assert [m.offset async for m in subscription] == [2, 3]


async def test_no_welcome_within_connect_timeout_is_an_error_and_a_backoff(
    aiohttp_client: AiohttpClient,
) -> None:
    async def silent(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for _ in socket:  # reads the connect frame, never answers
            pass
        return socket

    app = web.Application()
    app.router.add_get("/ws", silent)
    http = await aiohttp_client(app)
    client = aiohttp_wsbus.Client(
        str(http.make_url("/ws")),
        get_token=lambda: "token",
        connect_timeout=0.2,
        min_reconnect_delay=600,
    )
    events = Recorder(client)
    async with client:
        await events.wait_for("state", "disconnected")
        (error,) = events.of("error")
        assert isinstance(error[0], TimeoutError)
        assert "no welcome from the server within 0.2 s" in str(error[0])
        assert (client.attempt, client.state) == (1, "disconnected")


async def test_4408_too_many_connections_stops_with_an_error(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp, max_connections_per_user=1)
    occupant, _ = await server.open(wsbus_idp.issue("alice"), [])
    client = aiohttp_wsbus.Client(ws_url(server), get_token=lambda: wsbus_idp.issue("alice"))
    events = Recorder(client)
    async with client:
        await events.wait_for("state", "closed")
    assert client.close_error is not None and client.close_error.code == 4408
    assert [error.code for (error,) in events.of("error")] == [4408]
    await occupant.close()


async def test_4429_too_many_requests_waits_at_least_the_shared_pause(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await bus_for(aiohttp_client, wsbus_idp, client_rate=(0.001, 2))
    client = aiohttp_wsbus.Client(
        ws_url(server),
        get_token=lambda: wsbus_idp.issue("alice", channels=["chat:*"]),
        random_value=lambda: 0.0,
    )
    waits: list[float | None] = []

    def on_state(state: str) -> None:
        if state == "disconnected":
            waits.append(client.retry_delay)

    client.on("state", on_state)
    events = Recorder(client)
    async with client:
        await client.wait_connected(WAIT)
        async with client.subscribe("chat:a"), client.subscribe("chat:b"):  # the burst: 2
            third = asyncio.create_task(client.subscribe("chat:c").__aenter__())
            await events.wait_for("state", "disconnected")
            third.cancel()
            await asyncio.wait({third})
    assert waits == [POLICY["rate_limited"]["min_wait_ms"] / 1000]
    assert events.of("error") == [], "a pause, not a failure"


class HandshakeRecorder:
    """An app with the bus that records each WebSocket handshake's query and protocols."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], str | None]] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/ws":
            offered = request.headers.get("Sec-WebSocket-Protocol")
            self.seen.append((dict(request.query), offered))
        response: web.StreamResponse = await handler(request)
        return response


@pytest.mark.parametrize("token_in_header", [True, False])
async def test_the_token_travels_in_the_handshake_unless_told_otherwise(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, token_in_header: bool
) -> None:
    recorder = HandshakeRecorder()
    app = web.Application(middlewares=[recorder.middleware])
    bus = aiohttp_wsbus.setup(app, **wsbus_idp.settings)
    http = await aiohttp_client(app)
    token = wsbus_idp.issue("alice", channels=["chat:*"])
    client = aiohttp_wsbus.Client(
        str(http.make_url("/ws")), get_token=lambda: token, token_in_header=token_in_header
    )
    async with client, client.subscribe("chat:a") as chat:
        await bus.publish("chat:a", "one")
        assert (await chat.receive(WAIT)).data == "one"
        assert drop_sockets(bus, "alice") == 1
        await bus.publish("chat:a", "two")
        second = await chat.receive(WAIT)
        assert (second.data, second.recovered) == ("two", True)
    first, again = recorder.seen
    if token_in_header:
        assert first == ({"channels": "chat:a"}, f"wsbus.v1,wsbus.bearer.{token}")
        since = json.loads(again[0]["since"])  # recovery rides in the query too
        assert since == {"chat:a": {"offset": 1, "epoch": second.epoch}}
    else:
        assert recorder.seen == [({}, None), ({}, None)]


async def test_a_token_no_header_can_carry_goes_in_the_connect_frame_and_never_in_a_log(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    frames: list[tuple[str | None, str]] = []

    async def silent(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:  # reads the connect frame, never answers
            frames.append((request.headers.get("Sec-WebSocket-Protocol"), message.data))
        return socket

    async def refuse(request: web.Request) -> web.Response:
        raise web.HTTPBadRequest()

    app = web.Application()
    app.router.add_get("/ws", silent)
    app.router.add_get("/refusing", refuse)
    http = await aiohttp_client(app)
    caplog.set_level(logging.DEBUG)
    for path, token in [("/ws", "not a header token"), ("/refusing", "secret.header.token")]:
        client = aiohttp_wsbus.Client(
            str(http.make_url(path)), get_token=functools.partial(str, token), connect_timeout=0.2
        )
        events = Recorder(client)
        async with client:
            await events.wait_for("state", "disconnected")
    assert frames == [(None, '{"type": "connect", "token": "not a header token", "channels": []}')]
    assert "secret.header.token" not in caplog.text
    assert "connect to" in caplog.text  # the refused handshake was logged, without its headers
