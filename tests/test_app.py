"""The plugin inside an app: nested apps, the served JS client, heartbeats."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus

from .conftest import JwksServer, MakeToken
from .support import BusServer, RawClient, eventually, next_frame, start_bus

JS_SOURCE = Path(__file__).parent.parent / "js" / "wsbus.js"


async def test_bus_works_in_a_nested_app(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    root = web.Application()
    chat = web.Application()
    bus = aiohttp_wsbus.setup(
        chat, jwks_url=jwks_server.url, issuer="https://idp.test/", audience="wsbus"
    )
    root.add_subapp("/chat", chat)
    server = BusServer(chat, bus, await aiohttp_client(root))
    socket, welcome = await server.open(
        make_token(channels=["chat:*"]), ["chat:a"], path="/chat/ws"
    )
    assert welcome["subscribed"] == ["chat:a"]
    await bus.publish("chat:a", "nested")
    assert (await next_frame(socket))["data"] == "nested"
    assert aiohttp_wsbus.get_bus(chat) is bus


async def test_served_js_is_the_file_in_js(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    response = await server.client.get("/ws/wsbus.js")
    assert response.status == 200
    assert response.content_type == "text/javascript"
    assert await response.read() == JS_SOURCE.read_bytes()
    etag = response.headers["ETag"]
    again = await server.client.get("/ws/wsbus.js", headers={"If-None-Match": etag})
    assert again.status == 304


async def test_custom_base_path(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, base_path="/realtime/v1")
    _, welcome = await server.open(make_token(), [], path="/realtime/v1")
    assert welcome["type"] == "welcome"
    assert (await server.client.get("/realtime/v1/wsbus.js")).status == 200


async def test_heartbeat_drops_a_peer_that_stopped_answering(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, heartbeat=0.2)
    dead = await RawClient.connect(server, make_token(channels=["chat:*"]), ["chat:a"])
    await eventually(lambda: len(server.bus.connections) == 1)
    await dead.read_until_closed()  # pings go unanswered: the server hangs up
    await eventually(lambda: not server.bus.connections)
    assert server.bus.registry.subscribers("chat:a") == ()
    dead.sock.close()
