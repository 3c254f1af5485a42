"""GET {base_path}/channels/{channel}/position and /history over HTTP, and the Python
calls behind them (`bus.position`, `bus.positions`, `bus.history`)."""

from __future__ import annotations

from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import Bus, Claims, InvalidChannel

from .conftest import JwksServer, MakeToken
from .support import BusServer, PublishingDuringHistory, SwitchableBroker, start_bus

API_KEY = "a-key-for-the-tests"


async def channel_bus(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> BusServer:
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], **settings)


async def get(server: BusServer, path: str, **headers: str) -> tuple[int, Any]:
    response = await server.client.get(f"/ws/channels/{path}", headers=headers)
    return response.status, await response.json()


async def test_position_and_history_with_the_api_key(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await channel_bus(aiohttp_client, jwks_server)
    empty_status, empty = await get(server, "chat:lobby/position", **{"X-API-Key": API_KEY})
    assert empty_status == 200
    assert empty["offset"] == 0
    assert empty["epoch"].startswith("~")
    for n in range(1, 61):
        published = await server.bus.publish("chat:lobby", {"n": n})
    status, position = await get(server, "chat:lobby/position", **{"X-API-Key": API_KEY})
    assert (status, position) == (
        200,
        {"channel": "chat:lobby", "offset": 60, "epoch": published.epoch},
    )
    status, page = await get(server, "chat:lobby/history", **{"X-API-Key": API_KEY})
    assert status == 200
    assert page["position"] == {"offset": 60, "epoch": published.epoch}
    assert [m["offset"] for m in page["messages"]] == list(range(11, 61))  # 50 by default
    assert page["messages"][-1] == {"offset": 60, "data": {"n": 60}}
    _, older = await get(server, "chat:lobby/history?limit=3&before=11", **{"X-API-Key": API_KEY})
    assert [m["data"]["n"] for m in older["messages"]] == [8, 9, 10]


async def test_a_channel_name_holding_slashes_is_read(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await channel_bus(aiohttp_client, jwks_server)
    for channel in ["doc/7/history", "doc/position/x"]:
        await server.bus.publish(channel, channel)
        status, page = await get(server, f"{channel}/history", **{"X-API-Key": API_KEY})
        assert (status, page["channel"], page["messages"][0]["data"]) == (200, channel, channel)
        status, position = await get(server, f"{channel}/position", **{"X-API-Key": API_KEY})
        assert (status, position["channel"], position["offset"]) == (200, channel, 1)


async def test_a_bearer_token_reads_the_channels_it_may_subscribe_to(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.authorizer("room:{name}")
        async def members(claims: Claims, name: str) -> bool:
            return name == "open"

    server = await channel_bus(aiohttp_client, jwks_server, prepare=prepare)
    bearer = {"Authorization": f"Bearer {make_token(channels=['chat:*'])}"}
    for path in ["chat:lobby/history", "chat:lobby/position", "room:open/history"]:
        status, _ = await get(server, path, **bearer)
        assert status == 200, path
    for path in ["staff:room/history", "staff:room/position", "room:shut/history"]:
        status, body = await get(server, path, **bearer)
        channel = path.rpartition("/")[0]
        assert (status, body) == (403, {"error": "forbidden", "channels": [channel]})


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("bad%20name/history", "channel"),
        ("chat:lobby/history?limit=0", "limit"),
        ("chat:lobby/history?limit=100001", "limit"),
        ("chat:lobby/history?limit=ten", "limit"),
        ("chat:lobby/history?before=0", "before"),
        ("chat:lobby/history?before=-3", "before"),
        ("chat:lobby/history?before=99999999999999999999", "before"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, path: str, field: str
) -> None:
    server = await channel_bus(aiohttp_client, jwks_server)
    status, body = await get(server, path, **{"X-API-Key": API_KEY})
    assert status == 400
    assert body["error"] == "invalid_request"
    assert list(body["fields"]) == [field]


async def test_no_credentials_or_a_wrong_method_are_refused(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await channel_bus(aiohttp_client, jwks_server)
    status, body = await get(server, "chat:lobby/history")
    assert (status, body) == (401, {"error": "unauthorized"})
    status, _ = await get(server, "chat:lobby/position", **{"X-API-Key": "not-a-key-at-all"})
    assert status == 401
    response = await server.client.post("/ws/channels/chat:lobby/history", json={})
    assert response.status == 405
    assert await response.json() == {"error": "method_not_allowed"}


async def test_a_broker_that_is_down_answers_503(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = SwitchableBroker()
    server = await channel_bus(aiohttp_client, jwks_server, broker=broker)
    broker.is_up = False
    for path in ["chat:lobby/history", "chat:lobby/position"]:
        status, body = await get(server, path, **{"X-API-Key": API_KEY})
        assert (status, body) == (503, {"error": "broker_unavailable"})


async def test_positions_for_a_page_to_embed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await channel_bus(aiohttp_client, jwks_server)
    published = await server.bus.publish("chat:a", 1)
    positions = await server.bus.positions(["chat:a", "chat:b"])
    assert positions["chat:a"].as_json() == {"offset": 1, "epoch": published.epoch}
    assert positions["chat:b"].offset == 0
    assert await server.bus.position("chat:a") == positions["chat:a"]
    with pytest.raises(InvalidChannel):
        await server.bus.positions(["chat:a", "no good"])
    with pytest.raises(ValueError, match=r"^limit"):
        await server.bus.history("chat:a", limit=0)


async def test_a_page_read_while_others_publish_ends_at_its_position(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = PublishingDuringHistory("chat:a")
    server = await channel_bus(aiohttp_client, jwks_server, broker=broker, history_size=5)
    for n in range(1, 5):
        await server.bus.publish("chat:a", n)
    broker.before_read = ["x", "y", "z"]  # trims offsets 1 and 2 as the page is read
    page = await server.bus.history("chat:a", limit=4)
    assert page.position.offset == page.messages[-1].offset
    offsets = [m.offset for m in page.messages]
    assert offsets == list(range(offsets[0], page.position.offset + 1))
    assert len(offsets) == 4
