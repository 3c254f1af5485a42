"""Channel authorizers: patterns, specificity, and the application deciding over real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import Bus, Claims, InvalidSettings
from aiohttp_wsbus.authorizers import MAX_AUTHORIZERS, ChannelPattern

from .conftest import JwksServer, MakeToken
from .support import WAIT, next_frame, nothing_more, start_bus

API_KEY = "k" * 32


@pytest.mark.parametrize(
    ("pattern", "channel", "parameters"),
    [
        ("order:{order_id}", "order:42", {"order_id": "42"}),
        ("order:{order_id}", "order:42:items", None),  # one segment: no ':'
        ("order:{order_id}", "order:a/b", None),  # nor '/'
        ("order:{order_id}", "order:", None),  # at least one character
        ("org:{org}:doc:{doc}", "org:acme:doc:7", {"org": "acme", "doc": "7"}),
        ("room.{name}@eu", "room.lobby@eu", {"name": "lobby"}),
        ("news", "news", {}),
        ("news", "news:x", None),  # the whole name
    ],
)
def test_a_pattern_matches_whole_names_with_one_segment_per_parameter(
    pattern: str, channel: str, parameters: dict[str, str] | None
) -> None:
    assert ChannelPattern.parse(pattern).match(channel) == parameters


@pytest.mark.parametrize(
    "pattern", ["", "{a}{b}", "order:{x}:{x}", "order:{1x}", "ord er:{x}", "chat:*", "x" * 201]
)
def test_a_bad_pattern_is_an_invalid_setting_naming_it(pattern: str) -> None:
    bus = _bus()
    with pytest.raises(InvalidSettings, match="authorizer pattern") as raised:
        bus.authorizer(pattern)(_allow)
    assert repr(pattern)[:40] in str(raised.value)


def test_at_most_1000_patterns() -> None:
    bus = _bus()
    for n in range(MAX_AUTHORIZERS):
        bus.authorizer(f"c{n}:{{x}}")(_allow)
    with pytest.raises(InvalidSettings, match="at most 1000"):
        bus.authorizer("one:{more}")(_allow)


async def test_registering_after_startup_is_a_runtime_error(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    with pytest.raises(RuntimeError, match="before the application starts"):
        server.bus.authorizer("order:{id}")(_allow)


async def test_the_most_specific_pattern_decides_and_registration_order_breaks_ties(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    asked: list[str] = []

    def prepare(bus: Bus) -> None:
        def recording(name: str, answer: bool) -> Callable[..., Awaitable[bool]]:
            async def authorizer(claims: Claims, **_: str) -> bool:
                asked.append(name)
                return answer

            return authorizer

        bus.authorizer("order:{id}")(recording("any order", False))
        bus.authorizer("order:vip-{id}")(recording("vip", True))
        bus.authorizer("order:{x}-7")(recording("first of a tie", True))
        bus.authorizer("order:vip-{y}")(recording("second of a tie", False))

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    token = make_token(channels=[])
    _, welcome = await server.open(token, ["order:1", "order:vip-1", "order:9-7"])
    assert welcome["subscribed"] == ["order:vip-1", "order:9-7"]
    assert welcome["denied"] == {"order:1": "forbidden"}
    assert sorted(asked) == ["any order", "first of a tie", "vip"]


def owners_of_orders(owners: dict[str, str]) -> tuple[list[str], Callable[[Bus], None]]:
    calls: list[str] = []

    def prepare(bus: Bus) -> None:
        @bus.authorizer("order:{order_id}")
        async def may_see_order(claims: Claims, order_id: str) -> bool:
            calls.append(order_id)
            return owners.get(order_id) == claims.subject

    return calls, prepare


async def test_an_authorizer_allows_its_owner_and_the_others_never_get_a_frame(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    calls, prepare = owners_of_orders({"42": "alice"})
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    alice, welcome = await server.open(make_token(sub="alice", channels=[]), ["order:42"])
    assert welcome["subscribed"] == ["order:42"]
    mallory, welcome = await server.open(make_token(sub="mallory", channels=[]), ["order:42"])
    assert welcome["denied"] == {"order:42": "forbidden"}
    await mallory.send_json({"type": "subscribe", "channels": ["order:42"]})
    assert (await next_frame(mallory))["denied"] == {"order:42": "forbidden"}
    await server.bus.publish("order:42", "shipped")
    assert (await next_frame(alice))["data"] == "shipped"
    await nothing_more(mallory)
    assert calls == ["42", "42", "42"]


async def test_channels_the_token_grants_never_reach_an_authorizer(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    calls, prepare = owners_of_orders({})
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    _, welcome = await server.open(make_token(channels=["order:*"]), ["order:1", "order:2"])
    assert welcome["subscribed"] == ["order:1", "order:2"]
    assert calls == []


async def test_authorizers_of_one_request_run_concurrently(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    started: set[str] = set()
    both = asyncio.Event()

    def prepare(bus: Bus) -> None:
        @bus.authorizer("room:{name}")
        async def waits_for_the_other(claims: Claims, name: str) -> bool:
            started.add(name)
            if len(started) == 2:
                both.set()
            await both.wait()  # one at a time, this would never return
            return True

    server = await start_bus(
        aiohttp_client, jwks_server.url, prepare=prepare, authorize_timeout=WAIT
    )
    _, welcome = await server.open(make_token(channels=[]), ["room:a", "room:b"])
    assert welcome["subscribed"] == ["room:a", "room:b"]


async def test_a_failing_or_slow_authorizer_denies_unavailable_and_is_counted(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.authorizer("broken:{x}")
        async def broken(claims: Claims, x: str) -> bool:
            raise ConnectionError("the database is down")

        @bus.authorizer("slow:{x}")
        async def slow(claims: Claims, x: str) -> bool:
            await asyncio.Event().wait()
            return True

        @bus.authorizer("vague:{x}")
        async def vague(claims: Claims, x: str) -> bool:
            return "yes"  # type: ignore[return-value]

    server = await start_bus(
        aiohttp_client, jwks_server.url, prepare=prepare, authorize_timeout=0.2
    )
    token = make_token(channels=["ok"])
    socket, welcome = await server.open(token, ["broken:1", "slow:1", "vague:1", "ok"])
    assert welcome["denied"] == {
        "broken:1": "unavailable",
        "slow:1": "unavailable",
        "vague:1": "unavailable",
    }
    assert welcome["subscribed"] == ["ok"]
    assert server.bus.hook_errors["authorize_subscribe"] == 3
    assert token not in caplog.text
    await server.bus.publish("broken:1", "never")
    await nothing_more(socket)


async def test_a_refresh_reruns_the_authorizers_and_revokes_what_they_now_refuse(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    owners = {"1": "alice", "2": "alice"}
    calls, prepare = owners_of_orders(owners)
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket, welcome = await server.open(make_token(channels=[]), ["order:1", "order:2"])
    assert welcome["subscribed"] == ["order:1", "order:2"]
    del owners["2"]  # alice lost order 2 in the application's database
    await socket.send_json({"type": "refresh", "token": make_token(channels=[])})
    assert await next_frame(socket) == {
        "type": "unsubscribed",
        "channels": ["order:2"],
        "reason": "revoked",
    }
    assert (await next_frame(socket))["revoked"] == ["order:2"]
    await server.bus.publish("order:2", "not for alice any more")
    await server.bus.publish("order:1", "still hers")
    assert (await next_frame(socket))["data"] == "still hers"
    await nothing_more(socket)
    # A refresh whose token grants the channel needs no authorizer for it.
    asked = len(calls)
    await socket.send_json({"type": "refresh", "token": make_token(channels=["order:1"])})
    assert (await next_frame(socket))["revoked"] == []
    assert len(calls) == asked


async def test_unsubscribing_forgets_the_allowance(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    owners = {"1": "alice"}
    _, prepare = owners_of_orders(owners)
    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    socket, _ = await server.open(make_token(channels=[]), ["order:1"])
    await socket.send_json({"type": "unsubscribe", "channels": ["order:1"]})
    assert (await next_frame(socket))["channels"] == ["order:1"]
    del owners["1"]
    await socket.send_json({"type": "subscribe", "channels": ["order:1"]})
    assert (await next_frame(socket))["denied"] == {"order:1": "forbidden"}


async def test_a_batch_authorizer_gets_one_call_per_request(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    batches: list[list[str]] = []

    async def decide(claims: Claims, channels: list[str]) -> Collection[str]:
        batches.append(channels)
        return {c for c in channels if c.endswith("ok")}

    def prepare(bus: Bus) -> None:
        bus.batch_authorizer(decide)

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    _, welcome = await server.open(make_token(channels=["granted"]), ["a:ok", "b:no", "granted"])
    assert welcome["subscribed"] == ["a:ok", "granted"]
    assert welcome["denied"] == {"b:no": "forbidden"}
    assert batches == [["a:ok", "b:no"]]


async def test_publish_authorizers_decide_bearer_emits(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.authorizer("room:{name}", action="publish")
        async def may_speak(claims: Claims, name: str) -> bool:
            if name == "broken":
                raise RuntimeError("no answer")
            return name == claims.subject

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare)
    listener, _ = await server.open(make_token(channels=["room:*"]), ["room:alice"])
    bearer = {"Authorization": "Bearer " + make_token(sub="alice", publish=[])}

    async def emit(channel: str) -> tuple[int, dict[str, object]]:
        response = await server.client.post(
            "/ws/emit", json={"channel": channel, "data": channel}, headers=bearer
        )
        return response.status, await response.json()

    assert (await emit("room:alice"))[0] == 202
    assert await emit("room:bob") == (403, {"error": "forbidden", "channels": ["room:bob"]})
    assert await emit("room:broken") == (
        503,
        {"error": "authorizer_unavailable", "channels": ["room:broken"]},
    )
    assert (await next_frame(listener))["data"] == "room:alice"
    await nothing_more(listener)


def _bus() -> Bus:
    return aiohttp_wsbus.setup(web.Application(), jwt_secret="s" * 32)


async def _allow(claims: Claims, **parameters: str) -> bool:
    return True


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="action"):
        _bus().authorizer("a:{b}", action="read")  # type: ignore[arg-type]


def test_logging_is_quiet_at_import() -> None:
    # The package configures no handlers of its own (the application does).
    assert not logging.getLogger("aiohttp_wsbus").handlers
