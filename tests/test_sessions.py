"""The application ends sessions: disconnect, unsubscribe a user, revoke tokens (one process)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import MemoryBroker

from .conftest import JwksServer, MakeToken
from .support import (
    WAIT,
    BusServer,
    SwitchableBroker,
    close_frame,
    next_frame,
    nothing_more,
    start_bus,
)

API_KEY = "k" * 32


async def bus_server(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> BusServer:
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], **settings)


async def test_disconnect_closes_every_socket_of_the_user_4410_and_no_one_else(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    first, _ = await server.open(make_token(sub="alice"), [])
    second, _ = await server.open(make_token(sub="alice"), [])
    bob, _ = await server.open(make_token(sub="bob"), [])
    await server.bus.disconnect("alice", reason="signed out everywhere")
    assert await close_frame(first) == (4410, "signed out everywhere")
    assert await close_frame(second) == (4410, "signed out everywhere")
    await nothing_more(bob)
    third, _ = await server.open(make_token(sub="alice"), [])
    await server.bus.disconnect("alice", reconnect=True)
    assert await close_frame(third) == (4012, "reconnect with a fresh token")


async def test_unsubscribe_user_stops_delivery_on_every_socket_of_the_user(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    alice, _ = await server.open(make_token(sub="alice"), ["chat:a", "chat:b"])
    bob, _ = await server.open(make_token(sub="bob"), ["chat:a"])
    await server.bus.unsubscribe_user("alice", ["chat:a", "chat:never"])
    assert await next_frame(alice) == {
        "type": "unsubscribed",
        "channels": ["chat:a"],
        "reason": "server",
    }
    await server.bus.publish("chat:a", "after")
    await server.bus.publish("chat:b", "still")
    assert (await next_frame(alice))["data"] == "still"
    assert (await next_frame(bob))["data"] == "after"
    await nothing_more(alice)


async def test_a_revoked_user_is_refused_everywhere_while_a_fresh_token_works(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    old = make_token(sub="alice", publish=["chat:*"], iat=int(time.time()) - 60)
    live, _ = await server.open(old, ["chat:a"])  # its claims are now in the cache
    refreshing, _ = await server.open(make_token(sub="alice", iat=int(time.time()) - 60), [])
    await server.bus.revoke(user="alice", issued_before=time.time() - 1, until=time.time() + 60)
    assert await close_frame(live) == (4410, "token revoked")
    assert await close_frame(refreshing) == (4410, "token revoked")
    again = await server.client.ws_connect("/ws")
    await again.send_json({"type": "connect", "token": old, "channels": []})
    assert await close_frame(again) == (4401, "token revoked")
    emitted = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:a", "data": 1},
        headers={"Authorization": f"Bearer {old}"},
    )
    assert emitted.status == 401
    fresh = make_token(sub="alice", iat=int(time.time()) + 1)
    socket, _ = await server.open(fresh, [])
    await socket.send_json({"type": "refresh", "token": old})
    assert await close_frame(socket) == (4401, "token revoked")
    assert server.bus.auth_failures["revoked"] == 3


async def test_revoking_one_token_id_leaves_the_users_other_tokens(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    stolen, _ = await server.open(make_token(sub="alice", jti="stolen"), [])
    other, _ = await server.open(make_token(sub="alice", jti="other"), [])
    await server.bus.revoke(token_id="stolen", until=time.time() + 60)
    assert await close_frame(stolen) == (4410, "token revoked")
    await nothing_more(other)


async def test_revocations_outlive_a_restart_of_the_bus_on_the_same_broker(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = MemoryBroker()
    first = await bus_server(aiohttp_client, jwks_server, broker=broker)
    await first.bus.revoke(user="mallory", until=time.time() + 60)
    await first.client.close()
    second = await bus_server(aiohttp_client, jwks_server, broker=broker)
    socket = await second.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(sub="mallory"), "channels": []})
    assert await close_frame(socket) == (4401, "token revoked")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"user": ""}, "user"),
        ({"user": "x" * 257}, "user"),
        ({"user": "alice", "reason": "é" * 62}, "reason"),  # 124 bytes
    ],
)
async def test_bad_disconnects_are_value_errors_naming_the_field(
    call: dict[str, Any], field: str
) -> None:
    bus = aiohttp_wsbus.setup(aiohttp_wsbus_app(), jwt_secret="s" * 32)
    with pytest.raises(ValueError, match=f"^{field}:"):
        await bus.disconnect(**call)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"until": time.time() + 60}, "user"),
        ({"user": "a", "token_id": "b", "until": time.time() + 60}, "user"),
        ({"user": "a", "until": time.time() - 1}, "until"),
        ({"user": "a", "until": time.time() + 31 * 24 * 3600}, "until"),
        ({"token_id": "b", "issued_before": 1.0, "until": time.time() + 60}, "issued_before"),
    ],
)
async def test_bad_revocations_are_value_errors_naming_the_field(
    call: dict[str, Any], field: str
) -> None:
    bus = aiohttp_wsbus.setup(aiohttp_wsbus_app(), jwt_secret="s" * 32)
    with pytest.raises(ValueError, match=f"^{field}:"):
        await bus.revoke(**call)


async def test_the_control_api_takes_an_api_key_only_and_names_bad_fields(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = SwitchableBroker()
    server = await bus_server(aiohttp_client, jwks_server, broker=broker)
    alice, _ = await server.open(make_token(sub="alice"), ["chat:a"])
    key = {"X-API-Key": API_KEY}

    async def post(path: str, body: Any, headers: dict[str, str] = key) -> tuple[int, Any]:
        response = await server.client.post("/ws" + path, json=body, headers=headers)
        return response.status, await response.json()

    bearer = {"Authorization": "Bearer " + make_token(sub="admin", publish=["*"])}
    assert (await post("/users/alice/disconnect", {}, bearer))[0] == 401
    assert (await post("/users/alice/disconnect", {}, {}))[0] == 401
    status, answer = await post("/users/alice/unsubscribe", {"channels": ["bad name"]})
    assert (status, list(answer["fields"])) == (400, ["channels"])
    status, answer = await post("/revocations", {"user": "alice", "until": time.time() - 5})
    assert (status, list(answer["fields"])) == (400, ["until"])
    status, answer = await post("/revocations", {"user": "alice"})
    assert (status, list(answer["fields"])) == (400, ["until"])
    status, answer = await post("/users/" + "x" * 257 + "/disconnect", {})
    assert (status, list(answer["fields"])) == (400, ["user"])
    broker.is_up = False
    assert await post("/users/alice/disconnect", {}) == (503, {"error": "broker_unavailable"})
    assert await post("/revocations", {"user": "alice", "until": time.time() + 60}) == (
        503,
        {"error": "broker_unavailable"},
    )
    await nothing_more(alice)  # nothing was applied halfway
    assert not server.bus.sessions.revocations
    broker.is_up = True
    assert (await post("/users/alice/unsubscribe", {"channels": ["chat:a"]}))[0] == 202
    assert (await next_frame(alice))["reason"] == "server"
    assert (await post("/users/alice/disconnect", {"reason": "banned"}))[0] == 202
    assert await close_frame(alice) == (4410, "banned")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    removed=st.lists(
        st.tuples(st.sampled_from(["u0", "u1"]), st.sets(st.sampled_from(["a", "b", "c"]))),
        max_size=4,
    ),
    published=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=8),
)
async def test_no_socket_receives_a_channel_it_was_unsubscribed_from(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    removed: list[tuple[str, set[str]]],
    published: list[str],
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    sockets = {
        user: (await server.open(make_token(sub=user, channels=["*"]), ["a", "b", "c"]))[0]
        for user in ("u0", "u1")
    }
    kept = {user: {"a", "b", "c"} for user in sockets}
    for user, channels in removed:
        if channels:
            await server.bus.unsubscribe_user(user, sorted(channels))
            if kept[user] & channels:
                assert (await next_frame(sockets[user]))["reason"] == "server"
            kept[user] -= channels
    for channel in published:
        await server.bus.publish(channel, channel)
    for user, socket in sockets.items():
        await socket.send_json({"type": "ping"})
        received = []
        while (frame := await next_frame(socket)) != {"type": "pong"}:
            received.append(frame["channel"])
        assert received == [c for c in published if c in kept[user]]


def aiohttp_wsbus_app() -> Any:
    from aiohttp import web

    return web.Application()


async def test_a_token_revoked_while_its_refresh_waits_on_an_authorizer_is_refused(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    asked = asyncio.Event()
    answer = asyncio.Event()

    def prepare(bus: aiohttp_wsbus.Bus) -> None:
        @bus.authorizer("room:{name}")
        async def slow(claims: aiohttp_wsbus.Claims, name: str) -> bool:
            if claims.token_id == "second":
                asked.set()
                await answer.wait()
            return True

        @bus.authorizer("room:{name}", action="publish")
        async def slow_publish(claims: aiohttp_wsbus.Claims, name: str) -> bool:
            asked.set()
            await answer.wait()
            return True

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare, api_keys=[API_KEY])
    socket, _ = await server.open(make_token(channels=[], jti="first"), ["room:a"])
    await socket.send_json({"type": "refresh", "token": make_token(channels=[], jti="second")})
    await asyncio.wait_for(asked.wait(), WAIT)
    await server.bus.revoke(token_id="second", until=time.time() + 60)
    answer.set()
    assert await close_frame(socket) == (4401, "token revoked")
    # The same on a Bearer emit whose publish authorizer was still answering.
    asked.clear()
    answer.clear()
    token = make_token(sub="bob", publish=[], jti="emitter")
    emitting = asyncio.create_task(
        server.client.post(
            "/ws/emit",
            json={"channel": "room:a", "data": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
    )
    await asyncio.wait_for(asked.wait(), WAIT)
    await server.bus.revoke(token_id="emitter", until=time.time() + 60)
    answer.set()
    response = await emitting
    assert (response.status, await response.json()) == (
        401,
        {"error": "unauthorized", "reason": "revoked"},
    )


async def test_control_without_an_api_key_is_401_whatever_its_body(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await bus_server(aiohttp_client, jwks_server)
    response = await server.client.post("/ws/users/alice/disconnect", data=b"x")
    assert response.status == 401
