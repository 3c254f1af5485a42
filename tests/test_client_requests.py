"""aiohttp_wsbus.Client's requests (publish, rpc, history) against a scripted server:
answers matched by ref, waiting for the welcome, what a lost socket does to each."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus import RequestError
from aiohttp_wsbus.testing import ClientFactory, IdentityProvider

from .support import WAIT, start_bus
from .test_client_frames import ScriptedServer, scripted

__all__ = ["scripted"]  # the fixture, shared with test_client_frames.py


async def test_answers_are_matched_by_ref_whatever_their_order(scripted: ScriptedServer) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    async with client:
        await scripted.welcome()
        publish = asyncio.create_task(client.publish("chat:a", {"text": "hi"}, id="m1"))
        rpc = asyncio.create_task(client.rpc("add", [1, 2]))
        history = asyncio.create_task(client.history("chat:a", limit=2, before=9))
        failing = asyncio.create_task(client.publish("chat:b", "x", ephemeral=True))
        frames = {}
        for kind in ("publish", "rpc", "history", "publish"):
            frame = await scripted.next(kind)
            frames[frame.get("method") or frame["type"] + ":" + frame["channel"]] = frame
        assert frames["publish:chat:a"] == {
            "type": "publish",
            "channel": "chat:a",
            "data": {"text": "hi"},
            "id": "m1",
            "ref": frames["publish:chat:a"]["ref"],
        }
        assert (
            frames["publish:chat:b"]["ephemeral"] is True and "id" not in frames["publish:chat:b"]
        )
        assert frames["add"]["data"] == [1, 2]
        history_frame = frames["history:chat:a"]
        assert (history_frame["limit"], history_frame["before"]) == (2, 9)
        await scripted.send(type="error", ref=frames["publish:chat:b"]["ref"], error="forbidden")
        await scripted.send(type="rpc_result", ref=frames["add"]["ref"], data=3)
        await scripted.send(
            type="history_result",
            ref=history_frame["ref"],
            channel="chat:a",
            position={"offset": 8, "epoch": "e"},
            messages=[{"offset": 8, "data": "m"}],
        )
        await scripted.send(
            type="published", ref=frames["publish:chat:a"]["ref"], offset=5, epoch="e"
        )
        async with asyncio.timeout(WAIT):
            assert (await publish)["offset"] == 5
            assert await rpc == 3
            assert (await history)["messages"] == [{"offset": 8, "data": "m"}]
            with pytest.raises(RequestError) as refused:
                await failing
    assert refused.value.code == "forbidden"


async def test_a_request_made_before_the_welcome_waits_for_it(scripted: ScriptedServer) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    async with client:
        rpc = asyncio.create_task(client.rpc("ping"))
        await scripted.welcome()  # the connect frame came first
        frame = await scripted.next("rpc")
        await scripted.send(type="rpc_result", ref=frame["ref"], data="pong")
        async with asyncio.timeout(WAIT):
            assert await rpc == "pong"


async def test_a_lost_socket_resends_what_may_be_repeated_and_fails_the_rest(
    scripted: ScriptedServer,
) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token", min_reconnect_delay=0.01)
    async with client:
        await scripted.welcome()
        publish = asyncio.create_task(client.publish("chat:a", "once", id="m1"))
        rpc = asyncio.create_task(client.rpc("charge"))
        sent = await scripted.next("publish")
        await scripted.next("rpc")
        assert scripted.socket is not None
        await scripted.socket.close(code=1001)  # before any answer: reconnect
        with pytest.raises(RequestError) as lost:
            async with asyncio.timeout(WAIT):
                await rpc  # it may have run: never silently again
        assert lost.value.code == "disconnected"
        await scripted.welcome()
        assert await scripted.next("publish") == sent  # the same ref and id
        await scripted.send(type="published", ref=sent["ref"], offset=1, epoch="e")
        async with asyncio.timeout(WAIT):
            assert (await publish)["offset"] == 1


async def test_a_request_times_out_and_a_closed_client_refuses(scripted: ScriptedServer) -> None:
    client = aiohttp_wsbus.Client(scripted.url, get_token=lambda: "token")
    async with client:
        await scripted.welcome()
        with pytest.raises(RequestError) as late:
            await client.rpc("slow", timeout=0.2)
        assert late.value.code == "timeout"
    with pytest.raises(RequestError) as closed:
        await client.history("chat:a")
    assert closed.value.code == "closed"


async def test_publish_rpc_and_history_against_a_real_bus(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    def prepare(bus: aiohttp_wsbus.Bus) -> None:
        @bus.rpc("add")
        async def add(info: aiohttp_wsbus.ConnectionInfo, data: Any) -> Any:
            return sum(data)

    server = await start_bus(
        aiohttp_client,
        wsbus_idp.jwks_url,
        issuer=wsbus_idp.issuer,
        audience=wsbus_idp.audience,
        client_publish=True,
        prepare=prepare,
    )
    client = await wsbus_client(server.client, "alice", channels=["chat:*"], publish=["chat:*"])
    async with asyncio.timeout(WAIT):
        published = await client.publish("chat:lobby", {"text": "hi"}, id="m1")
        again = await client.publish("chat:lobby", {"text": "hi"}, id="m1")
        assert (published["offset"], again["offset"]) == (1, 1)  # once, by its id
        assert await client.rpc("add", [1, 2, 3]) == 6
        history = await client.history("chat:lobby", limit=5)
        assert [m["data"] for m in history["messages"]] == [{"text": "hi"}]
        with pytest.raises(RequestError) as refused:
            await client.publish("news", "not granted")
        assert refused.value.code == "forbidden"
        with pytest.raises(RequestError) as unknown:
            await client.rpc("nope")
        assert unknown.value.code == "not_found"
