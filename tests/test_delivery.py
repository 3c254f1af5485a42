"""Delivery: grants decide it, it is encoded once, and no slow socket holds it up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus.connection
from aiohttp_wsbus import Bus, Claims
from aiohttp_wsbus.authorizers import ChannelPattern
from aiohttp_wsbus.grants import may
from aiohttp_wsbus.protocol import SLOW_CONSUMER

from .conftest import JwksServer, MakeToken
from .support import WAIT, RawClient, close_code, eventually, next_frame, start_bus

CHANNELS = ["chat:a", "chat:b", "user:x", "user:y", "news"]
PATTERNS = ["chat:*", "chat:a", "user:x", "user:*", "news", "*"]
PRESENCE = ["chat:*", "news"]  # the channels that keep presence in the property test


async def frames_until_pong(socket: ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Everything queued for this socket before a ping sent now."""
    await socket.send_json({"type": "ping"})
    frames = []
    while (frame := await next_frame(socket)) != {"type": "pong"}:
        frames.append(frame)
    return frames


users = st.lists(
    st.tuples(
        st.sets(st.sampled_from(PATTERNS), max_size=3),  # grants at connect
        st.sets(st.sampled_from(CHANNELS), max_size=5),  # channels asked for
        st.none() | st.sets(st.sampled_from(PATTERNS), max_size=2),  # grants after a refresh
        st.sets(st.sampled_from(PATTERNS), max_size=2),  # presence it may read
        st.sets(st.sampled_from(PATTERNS), max_size=2),  # channels it may publish to
    ),
    min_size=1,
    max_size=4,
)
# The application's authorizers, most specific first (literal characters: 6, 5, 5, 4),
# each with the users (by index) it allows.
AUTHORIZER_PATTERNS = ["chat:a", "chat:{room}", "user:{name}", "news"]
authorizer_tables = st.dictionaries(
    st.sampled_from(AUTHORIZER_PATTERNS), st.sets(st.integers(0, 3)), max_size=4
)


def authorizer_allows(table: dict[str, set[int]], user: int, channel: str) -> bool:
    """The oracle: the most specific registered pattern that matches decides."""
    for pattern in AUTHORIZER_PATTERNS:
        if pattern in table and ChannelPattern.parse(pattern).match(channel) is not None:
            return user in table[pattern]
    return False


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    people=users,
    table=authorizer_tables,
    published=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=12),
    # Publishes over the sockets: (who, channel); a refused one reaches nobody.
    client_published=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(CHANNELS)), max_size=6),
    # Who offers the token in the handshake instead of a connect frame: both admit alike.
    handshakes=st.lists(st.booleans(), min_size=4, max_size=4),
)
async def test_no_socket_ever_receives_a_channel_its_token_or_the_application_does_not_allow(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    people: list[tuple[set[str], set[str], set[str] | None, set[str], set[str]]],
    table: dict[str, set[int]],
    published: list[str],
    client_published: list[tuple[int, str]],
    handshakes: list[bool],
) -> None:
    def prepare(bus: Bus) -> None:
        for pattern, allowed in table.items():

            async def decide(claims: Claims, allowed: set[int] = allowed, **_: str) -> bool:
                return int(claims.subject.removeprefix("user")) in allowed

            bus.authorizer(pattern)(decide)

    server = await start_bus(
        aiohttp_client, jwks_server.url, prepare=prepare, presence=PRESENCE, client_publish=True
    )
    sockets = []
    # Presence data (snapshots, joins, leaves) each socket received, by channel.
    presence_seen: list[set[str]] = []
    for n, (grants, wanted, _, reads, speaks) in enumerate(people):
        token = make_token(
            sub=f"user{n}", channels=sorted(grants), presence=sorted(reads), publish=sorted(speaks)
        )
        socket, welcome = await server.open(token, sorted(wanted), handshake=handshakes[n])
        sockets.append(socket)
        presence_seen.append(set(welcome.get("presence", {})))
    frames: list[list[dict[str, Any]]] = [[] for _ in people]
    for n, (_, _, later, reads, speaks) in enumerate(people):
        if later is not None:
            token = make_token(
                sub=f"user{n}",
                channels=sorted(later),
                presence=sorted(reads),
                publish=sorted(speaks),
            )
            await sockets[n].send_json({"type": "refresh", "token": token})
            while (frame := await next_frame(sockets[n]))["type"] != "refreshed":
                frames[n].append(frame)
    # A passer-by who reads every channel's presence comes and goes: its join and
    # leave, and its leaving as a reader, must reach only those allowed to read them.
    passer_by = make_token(sub="passer-by", channels=["*"], presence=["*"])
    passing, _ = await server.open(passer_by, CHANNELS)
    await passing.close()
    await eventually(lambda: len(server.bus.connections) == len(people))
    sent = list(published)  # every message that went out, in order
    for channel in published:
        await server.bus.publish(channel, channel)
    for ref, (who, channel) in enumerate(client_published):
        n = who % len(people)
        frame = {"type": "publish", "ref": ref, "channel": channel, "data": channel}
        await sockets[n].send_json(frame)
        while (answer := await next_frame(sockets[n]))["type"] not in ("published", "error"):
            frames[n].append(answer)
        is_allowed = may(people[n][4], channel)
        assert answer["type"] == ("published" if is_allowed else "error"), (answer, people[n])
        if is_allowed:
            sent.append(channel)
    for n, (grants, wanted, later, reads, _) in enumerate(people):
        current = set(later) if later is not None else grants

        def allowed_by(patterns: set[str], channel: str, n: int = n) -> bool:
            return may(patterns, channel) or authorizer_allows(table, n, channel)

        frames[n] += await frames_until_pong(sockets[n])
        presence_seen[n] |= {f["channel"] for f in frames[n] if f["type"] in ("join", "leave")}
        for channel in presence_seen[n]:  # read only where it subscribed and may read
            assert channel in wanted and allowed_by(grants, channel), (channel, grants)
            assert may(reads, channel) and may(PRESENCE, channel), (channel, reads)
        received = [f["channel"] for f in frames[n] if f["type"] == "message"]
        for channel in received:
            assert allowed_by(grants, channel) and allowed_by(current, channel), (
                channel,
                grants,
                later,
                table,
            )
        expected = [
            c for c in sent if c in wanted and allowed_by(grants, c) and allowed_by(current, c)
        ]
        assert received == expected


async def test_a_message_is_encoded_once_for_all_subscribers(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    sockets = [
        (await server.open(make_token(channels=["chat:*"]), ["chat:a"]))[0] for _ in range(5)
    ]
    calls = []
    real = aiohttp_wsbus.protocol.encode_message

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(aiohttp_wsbus.connection, "encode_message", counting)
    await server.bus.publish("chat:a", {"big": "x" * 1000})
    for socket in sockets:
        assert (await next_frame(socket))["data"] == {"big": "x" * 1000}
    assert len(calls) == 1


async def test_frames_queued_in_one_tick_keep_their_order(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    await asyncio.gather(
        *(server.bus.publish("chat:a" if n % 2 else "chat:b", n) for n in range(200))
    )
    frames = await frames_until_pong(socket)
    assert [f["data"] for f in frames] == list(range(200))


async def test_slow_consumer_is_closed_4002_and_others_keep_receiving(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, send_buffer_limit=64 * 1024, close_timeout=0.5
    )
    token = make_token(channels=["chat:*"])
    reader, _ = await server.open(token, ["chat:a"])
    slow = await RawClient.connect(server, make_token(sub="slow", channels=["chat:*"]), ["chat:a"])
    await eventually(lambda: any(c.claims.subject == "slow" for c in server.bus.connections))
    slow_connection = next(c for c in server.bus.connections if c.claims.subject == "slow")
    chunk = "x" * 60_000
    count = 300  # 18 MB: more than any loopback socket buffers hold
    for n in range(count):
        # A healthy reader keeps up: it has each message before the next is published.
        await server.bus.publish("chat:a", {"n": n, "pad": chunk})
        assert (await next_frame(reader))["data"]["n"] == n
    assert slow_connection.is_closing
    assert slow_connection.closed_with == SLOW_CONSUMER
    assert slow_connection not in server.bus.registry.subscribers("chat:a")
    await slow.read_until_closed()  # the server aborted it: this ends
    slow.sock.close()


async def test_shutdown_closes_every_socket_with_1001(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, close_timeout=0.5)
    sockets = [(await server.open(make_token(), []))[0] for _ in range(3)]
    mute = await RawClient.connect(server, make_token(sub="mute"), [])
    silent = await RawClient.connect(server, None, [])  # never authenticates
    await eventually(lambda: len(server.bus.connections) == 4)
    async with asyncio.timeout(WAIT):
        await server.client.server.close()  # mute and silent must not hold this up
    for socket in sockets:
        assert await close_code(socket) == 1001
    assert not server.bus.connections
    for raw in (mute, silent):
        await raw.read_until_closed()
        raw.sock.close()
