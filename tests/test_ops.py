"""Operations endpoints: GET {base_path}/health for load balancers, /metrics for Prometheus."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus

from .conftest import JwksServer, MakeToken
from .redis_server import RedisServer, until
from .support import (
    BusServer,
    RawClient,
    SwitchableBroker,
    close_code,
    eventually,
    next_frame,
    start_bus,
)

API_KEY = "m" * 32


async def health(server: BusServer) -> tuple[int, dict[str, Any]]:
    response = await server.client.get("/ws/health")
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = await response.json()
    return response.status, body


async def test_health_is_ok_with_fresh_keys_and_counts_connections(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    await server.open(make_token(), [])
    assert await health(server) == (
        200,
        {"status": "ok", "connections": 1, "broker": "ok", "jwks": "fresh"},
    )


async def test_health_is_503_while_no_jwks_key_was_ever_fetched(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    jwks_server.fail = True
    server = await start_bus(aiohttp_client, jwks_server.url)
    assert await health(server) == (
        503,
        {"status": "degraded", "connections": 0, "broker": "ok", "jwks": "unavailable"},
    )


async def test_health_stays_200_but_degraded_on_stale_keys(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, jwks_refetch_interval=0)
    jwks_server.fail = True
    # An unknown kid makes the bus refetch, and that fetch fails: keys are kept, stale.
    socket = await server.client.ws_connect("/ws")
    await socket.send_json({"type": "connect", "token": make_token(kid="rotated"), "channels": []})
    assert await close_code(socket) == aiohttp_wsbus.CloseCode.UNAUTHORIZED
    assert await health(server) == (
        200,
        {"status": "degraded", "connections": 0, "broker": "ok", "jwks": "stale"},
    )


async def test_health_is_503_while_the_broker_is_down(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = SwitchableBroker()
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    broker.is_up = False
    assert await health(server) == (
        503,
        {"status": "degraded", "connections": 0, "broker": "down", "jwks": "fresh"},
    )
    broker.is_up = True
    assert (await health(server))[0] == 200


async def test_health_is_503_within_the_socket_timeout_of_a_frozen_redis(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    own_redis: RedisServer,
    redis_prefix: str,
) -> None:
    broker = aiohttp_wsbus.RedisBroker(own_redis.url, prefix=redis_prefix, socket_timeout=1.0)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)

    async def status_is(status: int) -> bool:
        return (await health(server))[0] == status

    assert await status_is(200)
    with own_redis.frozen():
        await until(lambda: status_is(503), timeout=1.0 + 1.0)
        assert (await health(server))[1]["broker"] == "down"
    await until(lambda: status_is(200))


async def test_health_follows_base_path(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, base_path="/rt")
    assert (await server.client.get("/rt/health")).status == 200


# -- metrics -----------------------------------------------------------------


async def scrape(server: BusServer) -> dict[str, float]:
    """Every sample as 'name{label="value"}' -> value."""
    response = await server.client.get("/ws/metrics", headers={"X-API-Key": API_KEY})
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_what_happened(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, metrics=True, api_keys=[API_KEY])
    readers = [(await server.open(make_token(sub=f"u{n}"), ["chat:a"]))[0] for n in range(2)]
    lone, _ = await server.open(make_token(sub="lone"), ["chat:b", "chat:c"])
    for n in range(3):
        await server.bus.publish("chat:a", n)
    await server.bus.publish("chat:b", "b")
    await server.bus.publish("chat:nobody", "lost")
    for reader in readers:
        assert [(await next_frame(reader))["data"] for _ in range(3)] == [0, 1, 2]
    assert (await next_frame(lone))["data"] == "b"
    expired = await server.client.ws_connect("/ws")
    await expired.send_json({"type": "connect", "token": make_token(exp_in=-600), "channels": []})
    assert await close_code(expired) == aiohttp_wsbus.CloseCode.UNAUTHORIZED
    wrong_key = await server.client.post(
        "/ws/emit", json={"channel": "chat:a", "data": 1}, headers={"X-API-Key": "x" * 32}
    )
    assert wrong_key.status == 401

    samples = await scrape(server)
    assert samples["wsbus_connections"] == 3
    assert samples["wsbus_subscriptions"] == 4
    assert samples["wsbus_channels"] == 3
    assert samples["wsbus_messages_published_total"] == 5
    assert samples["wsbus_messages_delivered_total"] == 7  # 3 x 2 readers + 1
    assert samples['wsbus_auth_failures_total{reason="expired"}'] == 1
    assert samples['wsbus_auth_failures_total{reason="api_key"}'] == 1
    assert samples["wsbus_jwks_fetches_total"] == 1
    assert samples["wsbus_jwks_fetch_failures_total"] == 0
    assert samples["wsbus_broker_available"] == 1
    assert samples["wsbus_broker_reconnects_total"] == 0
    assert samples["wsbus_slow_consumer_closes_total"] == 0


async def test_metrics_count_a_publish_repeated_by_id_once(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, metrics=True, api_keys=[API_KEY])
    first = await server.bus.publish("chat:a", 1, id="order-17")
    again = await server.bus.publish("chat:a", 1, id="order-17")
    assert (again.offset, again.is_repeat) == (first.offset, True)
    await server.bus.publish("chat:a", 2)
    assert (await scrape(server))["wsbus_messages_published_total"] == 2


async def test_metrics_count_slow_consumer_closes(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        metrics=True,
        api_keys=[API_KEY],
        send_buffer_limit=1024,
        close_timeout=0.5,
    )
    reader, _ = await server.open(make_token(), ["chat:a"])
    slow = await RawClient.connect(server, make_token(sub="slow"), ["chat:a"])
    await eventually(lambda: len(server.bus.connections) == 2)
    chunk = "x" * 60_000
    for n in range(300):  # 18 MB at most: more than any loopback socket buffers hold
        await server.bus.publish("chat:a", {"n": n, "pad": chunk})
        assert (await next_frame(reader))["data"]["n"] == n  # a tick passes: writes happen
        if len(server.bus.connections) == 1:
            break
    assert (await scrape(server))["wsbus_slow_consumer_closes_total"] == 1
    await slow.read_until_closed()
    slow.sock.close()


async def test_metrics_count_what_the_limits_refused_by_kind(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(
        aiohttp_client,
        jwks_server.url,
        metrics=True,
        api_keys=[API_KEY],
        emit_rate=(0.001, 1),
        client_rate=(0.001, 1),
    )
    for _ in range(2):
        await server.client.post(
            "/ws/emit", json={"channel": "chat:a", "data": 1}, headers={"X-API-Key": API_KEY}
        )
    socket, _ = await server.open(make_token(), [])
    await socket.send_json({"type": "ping"})
    await socket.send_json({"type": "ping"})
    assert await close_code(socket) == 4429
    samples = await scrape(server)
    assert samples['wsbus_rate_limited_total{kind="emit"}'] == 1
    assert samples['wsbus_rate_limited_total{kind="client"}'] == 1


async def test_metrics_need_the_api_key(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, metrics=True, api_keys=[API_KEY])
    missing = await server.client.get("/ws/metrics")
    assert (missing.status, await missing.json()) == (401, {"error": "unauthorized"})
    wrong = await server.client.get("/ws/metrics", headers={"X-API-Key": "w" * 32})
    assert wrong.status == 401
    bearer = await server.client.get(
        "/ws/metrics", headers={"Authorization": f"Bearer {make_token()}"}
    )
    assert bearer.status == 401  # a client token does not open the metrics


async def test_metrics_are_off_by_default(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY])
    response = await server.client.get("/ws/metrics", headers={"X-API-Key": API_KEY})
    assert response.status == 404


async def test_each_bus_has_its_own_metrics(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    first = await start_bus(aiohttp_client, jwks_server.url, metrics=True, api_keys=[API_KEY])
    second = await start_bus(aiohttp_client, jwks_server.url, metrics=True, api_keys=[API_KEY])
    await first.bus.publish("chat:a", 1)
    assert (await scrape(first))["wsbus_messages_published_total"] == 1
    assert (await scrape(second))["wsbus_messages_published_total"] == 0


def test_metrics_without_prometheus_client_is_a_setting_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(aiohttp_wsbus.InvalidSettings, match=r"metrics: needs prometheus-client"):
        aiohttp_wsbus.setup(
            web.Application(), jwks_url="https://idp.test/jwks", metrics=True, api_keys=[API_KEY]
        )


def test_metrics_without_api_keys_is_a_setting_error() -> None:
    with pytest.raises(aiohttp_wsbus.InvalidSettings, match=r"metrics: .*give api_keys"):
        aiohttp_wsbus.setup(web.Application(), jwks_url="https://idp.test/jwks", metrics=True)
