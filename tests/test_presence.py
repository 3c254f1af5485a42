"""Presence over real sockets in one process: snapshots in welcome and subscribed,
join and leave once per user, who may read it, the HTTP endpoint and the Bus API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import InvalidSettings

from .conftest import JwksServer, MakeToken
from .support import WAIT, BusServer, next_frame, nothing_more, start_bus

API_KEY = "k" * 32
ROOM = "chat:room"


async def presence_bus(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> BusServer:
    settings.setdefault("presence", ["chat:*"])
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], **settings)


def member(make_token: MakeToken, sub: str, **claims: Any) -> str:
    """A token that may subscribe to and read the presence of every chat channel."""
    claims.setdefault("channels", ["chat:*"])
    claims.setdefault("presence", ["chat:*"])
    claims.setdefault("info", {"name": sub.title()})
    return make_token(sub=sub, **claims)


async def test_users_see_each_other_join_and_leave_once_however_many_tabs(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, welcome = await server.open(member(make_token, "alice"), [ROOM])
    assert welcome["presence"] == {ROOM: {"alice": {"info": {"name": "Alice"}, "connections": 1}}}
    assert await next_frame(alice) == {
        "type": "join",
        "channel": ROOM,
        "user": "alice",
        "info": {"name": "Alice"},
    }  # her own: the client applies it idempotently
    bob, welcome = await server.open(member(make_token, "bob"), [ROOM])
    assert welcome["presence"][ROOM] == {
        "alice": {"info": {"name": "Alice"}, "connections": 1},
        "bob": {"info": {"name": "Bob"}, "connections": 1},
    }
    join = {"type": "join", "channel": ROOM, "user": "bob", "info": {"name": "Bob"}}
    assert await next_frame(alice) == join
    assert await next_frame(bob) == join
    second_tab, welcome = await server.open(member(make_token, "bob"), [ROOM])
    assert welcome["presence"][ROOM]["bob"]["connections"] == 2
    await second_tab.close()
    await bob.close()
    assert await next_frame(alice) == {"type": "leave", "channel": ROOM, "user": "bob"}
    await nothing_more(alice)  # one join and one leave for bob's two tabs
    assert await server.bus.presence(ROOM) == {"alice": aiohttp_wsbus.Member({"name": "Alice"}, 1)}
    assert await server.bus.presence_count(ROOM) == 1


async def test_a_token_without_the_presence_grant_gets_no_presence_data(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    reader, _ = await server.open(member(make_token, "alice"), [ROOM])
    assert (await next_frame(reader))["type"] == "join"
    blind, welcome = await server.open(make_token(sub="eve", channels=["chat:*"]), [ROOM])
    assert "presence" not in welcome
    assert (await next_frame(reader))["user"] == "eve"  # eve is present all the same
    await server.open(member(make_token, "bob"), [ROOM])
    assert (await next_frame(reader))["user"] == "bob"
    await server.bus.publish(ROOM, "hello")
    assert (await next_frame(blind))["data"] == "hello"  # no join came first
    _, welcome = await server.open(
        member(make_token, "dan", presence=["chat:other"]), [ROOM, "chat:other"]
    )
    assert list(welcome["presence"]) == ["chat:other"]


async def test_joins_decided_in_one_tick_arrive_in_order_and_before_a_later_message(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, _ = await server.open(member(make_token, "alice"), [ROOM])
    assert (await next_frame(alice))["user"] == "alice"
    broker = server.bus.broker
    # One tick, no await that yields: three users join elsewhere (as another node's
    # sockets would), one leaves again, and a message follows on the same channel.
    for user in ("u1", "u2", "u3"):
        await broker.join(f"elsewhere-{user}", user, '{"n":1}', [ROOM])
    await broker.leave("elsewhere-u2", [ROOM])
    await server.bus.publish(ROOM, "after them")
    frames = [await next_frame(alice) for _ in range(5)]
    assert frames[:4] == [
        {"type": "join", "channel": ROOM, "user": "u1", "info": {"n": 1}},
        {"type": "join", "channel": ROOM, "user": "u2", "info": {"n": 1}},
        {"type": "join", "channel": ROOM, "user": "u3", "info": {"n": 1}},
        {"type": "leave", "channel": ROOM, "user": "u2"},
    ]
    assert (frames[4]["type"], frames[4]["data"]) == ("message", "after them")
    await nothing_more(alice)


async def test_a_reader_that_comes_within_the_tick_takes_only_the_later_joins(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, _ = await server.open(member(make_token, "alice"), [ROOM])
    assert (await next_frame(alice))["user"] == "alice"
    bob, _ = await server.open(member(make_token, "bob"), ["chat:other"])
    assert (await next_frame(bob))["channel"] == "chat:other"  # his own join there
    (bob_socket,) = [c for c in server.bus.connections if c.claims.subject == "bob"]
    keeper, broker = server.bus.presence_keeper, server.bus.broker
    # One tick: u1 joins, then bob becomes a reader of the room, then u2 joins.
    await broker.join("elsewhere-u1", "u1", "{}", [ROOM])
    snapshot = await keeper.join(bob_socket, [ROOM])
    await broker.join("elsewhere-u2", "u2", "{}", [ROOM])
    assert {"alice", "u1", "bob"} <= set(json.loads(snapshot[ROOM]))  # u1 is in it
    assert [(await next_frame(alice))["user"] for _ in range(3)] == ["u1", "bob", "u2"]
    assert [(await next_frame(bob))["user"] for _ in range(2)] == ["bob", "u2"]
    await nothing_more(bob)


async def test_a_reader_that_leaves_within_the_tick_takes_the_earlier_joins_alone(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, _ = await server.open(member(make_token, "alice"), [ROOM])
    assert (await next_frame(alice))["user"] == "alice"
    bob, _ = await server.open(member(make_token, "bob"), [ROOM])
    assert [(await next_frame(ws))["user"] for ws in (alice, bob)] == ["bob", "bob"]
    alice_socket, bob_socket = sorted(server.bus.connections, key=lambda c: c.claims.subject)
    keeper, broker = server.bus.presence_keeper, server.bus.broker
    # One tick: u1 joins, bob stops reading the room, u2 joins.
    await broker.join("elsewhere-u1", "u1", "{}", [ROOM])
    keeper.leave(bob_socket, [ROOM])
    # The others' events stay queued for the end of the tick: one hand-out each.
    assert alice_socket._outbox is None
    await broker.join("elsewhere-u2", "u2", "{}", [ROOM])
    assert [(await next_frame(alice))["user"] for _ in range(3)] == ["u1", "bob", "u2"]
    assert (await next_frame(bob))["user"] == "u1"  # decided before he left
    await nothing_more(bob)


async def test_a_reader_joining_again_within_the_tick_still_takes_every_join(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    bob, _ = await server.open(member(make_token, "bob"), [ROOM])
    assert (await next_frame(bob))["user"] == "bob"
    (bob_socket,) = server.bus.connections
    keeper, broker = server.bus.presence_keeper, server.bus.broker
    await broker.join("elsewhere-u1", "u1", "{}", [ROOM])  # queued, and bob reads the room
    await keeper.join(bob_socket, [ROOM])  # the same socket again, within the tick
    assert (await next_frame(bob))["user"] == "u1"
    await nothing_more(bob)


async def test_subscribe_and_unsubscribe_frames_join_and_leave(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, _ = await server.open(member(make_token, "alice"), [ROOM])
    await next_frame(alice)
    bob, welcome = await server.open(member(make_token, "bob"), ["news"])
    assert "presence" not in welcome  # news keeps no presence
    await bob.send_json({"type": "subscribe", "channels": [ROOM]})
    subscribed = await next_frame(bob)
    assert subscribed["type"] == "subscribed"
    assert set(subscribed["presence"][ROOM]) == {"alice", "bob"}
    assert (await next_frame(alice))["type"] == "join"
    await bob.send_json({"type": "unsubscribe", "channels": [ROOM]})
    assert await next_frame(alice) == {"type": "leave", "channel": ROOM, "user": "bob"}


@pytest.mark.parametrize("ending", ["disconnect", "unsubscribe_user", "revoke", "refresh"])
async def test_every_way_a_socket_leaves_a_channel_sends_the_leave(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    ending: str,
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    alice, _ = await server.open(member(make_token, "alice"), [ROOM])
    await next_frame(alice)
    bob, _ = await server.open(member(make_token, "bob"), [ROOM])
    assert (await next_frame(alice))["user"] == "bob"
    if ending == "disconnect":
        await server.bus.disconnect("bob")
    elif ending == "unsubscribe_user":
        await server.bus.unsubscribe_user("bob", [ROOM])
    elif ending == "revoke":
        await server.bus.revoke(user="bob", until=time.time() + 60)
    else:  # a refreshed token that no longer grants the room
        await next_frame(bob)
        await bob.send_json(
            {"type": "refresh", "token": member(make_token, "bob", channels=["news"])}
        )
    assert await next_frame(alice) == {"type": "leave", "channel": ROOM, "user": "bob"}
    assert set(await server.bus.presence(ROOM)) == {"alice"}


async def test_above_max_presence_members_the_snapshot_is_a_count_and_nothing_is_announced(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    await server.bus.broker.join("elsewhere", "someone", "{}", [])  # nothing: no channel
    for n in range(1000):  # 1000 members on another node, as the broker sees them
        await server.bus.broker.join(f"c{n}", f"user{n}", "{}", [ROOM])
    alice, welcome = await server.open(member(make_token, "alice"), [ROOM])
    assert welcome["presence"] == {ROOM: {"count": 1001}}
    await server.open(member(make_token, "bob"), [ROOM])
    await server.bus.publish(ROOM, "after bob")
    assert (await next_frame(alice))["data"] == "after bob"  # no join for bob
    response = await server.client.get(
        f"/ws/channels/{ROOM}/presence", headers={"X-API-Key": API_KEY}
    )
    assert await response.json() == {"channel": ROOM, "count": 1002}
    assert await server.bus.presence_count(ROOM) == 1002
    assert len(await server.bus.presence(ROOM)) == 1002  # the application sees everyone


async def test_http_presence_for_the_api_key_and_for_a_token_that_may_read_it(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    await server.open(member(make_token, "alice"), [ROOM])
    expected = {
        "channel": ROOM,
        "count": 1,
        "members": {"alice": {"info": {"name": "Alice"}, "connections": 1}},
    }
    url = f"/ws/channels/{ROOM}/presence"
    response = await server.client.get(url, headers={"X-API-Key": API_KEY})
    assert (response.status, await response.json()) == (200, expected)
    assert response.headers["Cache-Control"] == "no-store"
    bearer = {"Authorization": "Bearer " + member(make_token, "bob")}
    response = await server.client.get(url, headers=bearer)
    assert (response.status, await response.json()) == (200, expected)


@pytest.mark.parametrize(
    ("path", "headers", "status", "body"),
    [
        ("chat:room", {}, 401, {"error": "unauthorized"}),
        ("chat:room", {"X-API-Key": "wrong" * 8}, 401, {"error": "unauthorized"}),
        ("news", {"X-API-Key": API_KEY}, 404, {"error": "no_presence", "channel": "news"}),
        (
            "chat:a*b",
            {"X-API-Key": API_KEY},
            400,
            {
                "error": "invalid_request",
                "fields": {"channel": ["invalid channel name: 'chat:a*b'"]},
            },
        ),
        ("chat:room", "no presence grant", 403, {"error": "forbidden", "channels": ["chat:room"]}),
        ("chat:room", "no subscribe grant", 403, {"error": "forbidden", "channels": ["chat:room"]}),
    ],
)
async def test_http_presence_refusals_name_the_problem(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    path: str,
    headers: Any,
    status: int,
    body: dict[str, Any],
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    if headers == "no presence grant":
        headers = {"Authorization": "Bearer " + make_token(channels=["chat:*"])}
    elif headers == "no subscribe grant":
        headers = {"Authorization": "Bearer " + make_token(channels=[], presence=["chat:*"])}
    response = await server.client.get(f"/ws/channels/{path}/presence", headers=headers)
    assert (response.status, await response.json()) == (status, body)


async def test_http_presence_answers_only_get(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    response = await server.client.post(
        f"/ws/channels/{ROOM}/presence", headers={"X-API-Key": API_KEY}
    )
    assert (response.status, await response.json()) == (405, {"error": "method_not_allowed"})
    assert response.headers["Allow"] == "GET"


async def test_a_bad_info_claim_leaves_the_info_empty_and_says_why_in_the_log(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    caplog.set_level(logging.WARNING, "aiohttp_wsbus")
    token = member(make_token, "alice", info={"bio": "x" * 2000})
    _, welcome = await server.open(token, [ROOM])
    assert welcome["presence"][ROOM]["alice"]["info"] == {}
    assert "not a JSON object of at most 1024 bytes" in caplog.text
    assert token not in caplog.text
    _, welcome = await server.open(member(make_token, "bob", info=["not", "an", "object"]), [ROOM])
    assert welcome["presence"][ROOM]["bob"]["info"] == {}
    _, welcome = await server.open(member(make_token, "carol", info=None), [ROOM])
    assert welcome["presence"][ROOM]["carol"]["info"] == {}


async def test_the_bus_api_refuses_a_channel_without_presence(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    with pytest.raises(ValueError, match="keeps no presence"):
        await server.bus.presence("news")
    with pytest.raises(aiohttp_wsbus.InvalidChannel):
        await server.bus.presence_count("chat:*")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"presence": ["chat:*", "bad pattern"]}, "presence"),
        ({"presence": "chat:*"}, "presence"),
        ({"presence_ttl": 0}, "presence_ttl"),
        ({"max_presence_members": -1}, "max_presence_members"),
        ({"presence_claim": ""}, "presence_claim"),
    ],
)
def test_presence_settings_are_checked(settings: dict[str, Any], named: str) -> None:
    from aiohttp import web

    with pytest.raises(InvalidSettings, match=named):
        aiohttp_wsbus.setup(web.Application(), jwt_secret="s" * 32, **settings)


async def test_presence_off_adds_nothing_to_the_frames(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server, presence=[])
    socket, welcome = await server.open(member(make_token, "alice"), [ROOM])
    assert "presence" not in welcome
    await server.open(member(make_token, "bob"), [ROOM])
    await nothing_more(socket)
    with pytest.raises(ValueError, match="keeps no presence"):
        await server.bus.presence(ROOM)


async def test_a_refresh_that_drops_the_presence_grant_stops_joins_and_leaves(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(aiohttp_client, jwks_server)
    bob, _ = await server.open(member(make_token, "bob"), [ROOM])
    assert (await next_frame(bob))["user"] == "bob"
    await bob.send_json({"type": "refresh", "token": member(make_token, "bob", presence=None)})
    assert (await next_frame(bob))["type"] == "refreshed"
    await server.open(member(make_token, "carol"), [ROOM])
    await server.bus.publish(ROOM, "after carol")
    assert (await next_frame(bob))["data"] == "after carol"  # and no join before it
    await bob.send_json({"type": "refresh", "token": member(make_token, "bob")})
    assert (await next_frame(bob))["type"] == "refreshed"
    await server.open(member(make_token, "dan"), [ROOM])
    assert (await next_frame(bob))["user"] == "dan"  # the grant is back


class SlowLeaveBroker(aiohttp_wsbus.MemoryBroker):
    """Its leaves take 50 turns of the event loop, as a leave on its way to Redis
    would: long enough for a join that does not wait for it to overtake it."""

    def __init__(self) -> None:
        super().__init__()
        self.left = asyncio.Event()

    async def leave(self, connection_id: str, channels: Collection[str]) -> None:
        for _ in range(50):
            await asyncio.sleep(0)
        await super().leave(connection_id, channels)
        self.left.set()


async def test_subscribing_again_while_the_leave_is_on_its_way_stays_present(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = SlowLeaveBroker()
    server = await presence_bus(aiohttp_client, jwks_server, broker=broker)
    bob, _ = await server.open(member(make_token, "bob"), [ROOM])
    await next_frame(bob)  # his own join
    await bob.send_json({"type": "unsubscribe", "channels": [ROOM]})
    await bob.send_json({"type": "subscribe", "channels": [ROOM]})
    while (await next_frame(bob))["type"] != "subscribed":
        pass
    async with asyncio.timeout(WAIT):
        await broker.left.wait()
    assert set(await server.bus.presence(ROOM)) == {"bob"}


async def test_a_namespace_switches_presence_on_or_off_for_its_channels(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await presence_bus(
        aiohttp_client,
        jwks_server,
        channels={"room:*": {"presence": True}, "chat:big": {"presence": False}},
    )
    token = member(make_token, "alice", channels=["*"], presence=["*"])
    _, welcome = await server.open(token, ["room:a", "chat:big", ROOM])
    assert set(welcome["presence"]) == {"room:a", ROOM}  # chat:big opted out of chat:*
    assert set(await server.bus.presence("room:a")) == {"alice"}
    with pytest.raises(ValueError, match="keeps no presence"):
        await server.bus.presence("chat:big")


def test_a_namespace_presence_option_must_be_a_boolean() -> None:
    from aiohttp import web

    with pytest.raises(InvalidSettings, match=r"room:\*.*presence"):
        aiohttp_wsbus.setup(
            web.Application(), jwt_secret="s" * 32, channels={"room:*": {"presence": "yes"}}
        )
