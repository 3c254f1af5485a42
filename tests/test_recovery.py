"""Recovery: a client back within the window misses nothing, and is told when it might have."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import ClientWebSocketResponse
from pytest_aiohttp import AiohttpClient

from .conftest import JwksServer, MakeToken
from .support import BusServer, PublishingDuringHistory, next_frame, nothing_more, start_bus

CHANNEL = "chat:lobby"


async def receive_messages(socket: ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        frame = await next_frame(socket)
        assert frame["type"] == "message", frame
        frames.append(frame)
    return frames


async def cut_off_after(
    server: BusServer, token: str, published: int
) -> tuple[dict[str, Any], ClientWebSocketResponse]:
    """Connect, see `published` messages, then lose the socket; return the last position."""
    socket, _ = await server.open(token, [CHANNEL])
    for n in range(published):
        await server.bus.publish(CHANNEL, n)
    last = (await receive_messages(socket, published))[-1]
    await socket.close()
    return {"offset": last["offset"], "epoch": last["epoch"]}, socket


async def test_reconnect_within_the_window_gets_exactly_what_it_missed_then_live(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    position, _ = await cut_off_after(server, token, 5)
    for n in range(5, 55):  # 50 published while away
        await server.bus.publish(CHANNEL, n)

    # A publisher that keeps going through the reconnect.
    keep_publishing = asyncio.Event()
    keep_publishing.set()

    async def publisher() -> int:
        n = 55
        while keep_publishing.is_set():
            await server.bus.publish(CHANNEL, n)
            n += 1
            await asyncio.sleep(0)
        return n

    running = asyncio.create_task(publisher())
    socket, welcome = await server.open(token, [CHANNEL], since={CHANNEL: position})
    assert welcome["recovered"] == {CHANNEL: True}
    first = await receive_messages(socket, 50)
    keep_publishing.clear()
    last_published = await running
    frames = first + await receive_messages(socket, last_published - 55)
    await nothing_more(socket)

    # Every message once, in order: the 50 missed, then all the publisher's.
    assert [f["data"] for f in frames] == list(range(5, last_published))
    offsets = [f["offset"] for f in frames]
    assert offsets == list(range(position["offset"] + 1, position["offset"] + 1 + len(frames)))
    # Replayed frames (those published before the history was read) come first.
    flags = [f.get("recovered", False) for f in frames]
    assert flags == sorted(flags, reverse=True)
    assert all(flags[:50])
    assert not all(flags)  # and some arrived live, after the replay


async def test_beyond_the_window_is_not_recovered_and_gives_the_new_position(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url, history_size=10)
    token = make_token(channels=["chat:*"])
    position, _ = await cut_off_after(server, token, 2)
    for n in range(30):
        await server.bus.publish(CHANNEL, n)
    socket, welcome = await server.open(token, [CHANNEL], since={CHANNEL: position})
    assert welcome["recovered"] == {CHANNEL: False}
    assert welcome["positions"][CHANNEL] == {"offset": 32, "epoch": position["epoch"]}
    await nothing_more(socket)  # no replay
    await server.bus.publish(CHANNEL, "next")
    assert (await next_frame(socket))["offset"] == 33


async def test_after_a_broker_restart_the_epoch_differs_and_nothing_is_replayed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    token = make_token(channels=["chat:*"])
    before = await start_bus(aiohttp_client, jwks_server.url)
    position, _ = await cut_off_after(before, token, 3)
    after = await start_bus(aiohttp_client, jwks_server.url)  # a new process, a new MemoryBroker
    for n in range(5):
        await after.bus.publish(CHANNEL, n)
    socket, welcome = await after.open(token, [CHANNEL], since={CHANNEL: position})
    assert welcome["recovered"] == {CHANNEL: False}
    assert welcome["positions"][CHANNEL]["epoch"] != position["epoch"]
    assert welcome["positions"][CHANNEL]["offset"] == 5
    await nothing_more(socket)


async def test_a_position_ahead_of_the_stream_is_not_recovered(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    position, _ = await cut_off_after(server, token, 2)
    ahead = {"offset": position["offset"] + 10, "epoch": position["epoch"]}
    socket, welcome = await server.open(token, [CHANNEL], since={CHANNEL: ahead})
    assert welcome["recovered"] == {CHANNEL: False}
    assert welcome["positions"][CHANNEL]["offset"] == 2
    await nothing_more(socket)


async def test_a_since_for_a_channel_no_longer_granted_replays_nothing(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    position, _ = await cut_off_after(server, make_token(channels=["chat:*"]), 2)
    for n in range(5):
        await server.bus.publish(CHANNEL, n)
    demoted = make_token(channels=["user:alice"])
    socket, welcome = await server.open(demoted, [CHANNEL], since={CHANNEL: position})
    assert welcome["denied"] == {CHANNEL: "forbidden"}
    assert welcome["recovered"] == {}
    assert welcome["subscribed"] == []
    await nothing_more(socket)


async def test_subscribe_frame_recovers_too(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    position, _ = await cut_off_after(server, token, 1)
    await server.bus.publish(CHANNEL, "missed")
    socket, _ = await server.open(token, [])
    await socket.send_json(
        {"type": "subscribe", "channels": [CHANNEL], "since": {CHANNEL: position}}
    )
    subscribed = await next_frame(socket)
    assert subscribed["type"] == "subscribed"
    assert subscribed["recovered"] == {CHANNEL: True}
    replay = await next_frame(socket)
    assert replay["data"] == "missed"
    assert replay["recovered"] is True


async def test_a_fresh_subscriber_learns_the_position_to_recover_from_later(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    token = make_token(channels=["chat:*"])
    socket, welcome = await server.open(token, ["chat:quiet"])
    position = welcome["positions"]["chat:quiet"]
    assert position["offset"] == 0
    await socket.close()
    await server.bus.publish("chat:quiet", "first ever")
    again, welcome = await server.open(token, ["chat:quiet"], since={"chat:quiet": position})
    assert welcome["recovered"] == {"chat:quiet": True}
    assert (await next_frame(again))["data"] == "first ever"


async def test_messages_published_during_the_history_read_are_neither_lost_nor_doubled(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = PublishingDuringHistory(CHANNEL)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    token = make_token(channels=["chat:*"])
    position, _ = await cut_off_after(server, token, 1)
    await server.bus.publish(CHANNEL, "missed")
    broker.before_read = ["raced-1", "raced-2"]  # in the history and held as live
    broker.after_read = ["held-1", "held-2"]  # only held as live
    socket, welcome = await server.open(token, [CHANNEL], since={CHANNEL: position})
    assert welcome["recovered"] == {CHANNEL: True}
    frames = await receive_messages(socket, 5)
    await nothing_more(socket)
    assert [f["data"] for f in frames] == ["missed", "raced-1", "raced-2", "held-1", "held-2"]
    assert [f.get("recovered", False) for f in frames] == [True, True, True, False, False]
    assert [f["offset"] for f in frames] == [2, 3, 4, 5, 6]


async def test_a_fresh_subscriber_gets_what_was_published_during_its_subscribe(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = PublishingDuringHistory(CHANNEL)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    await server.bus.publish(CHANNEL, "old")
    broker.before_read = ["before"]  # already counted in the position it is given
    broker.after_read = ["after"]
    socket, welcome = await server.open(make_token(channels=["chat:*"]), [CHANNEL])
    assert welcome["positions"][CHANNEL]["offset"] == 2
    frames = await receive_messages(socket, 1)
    await nothing_more(socket)
    assert [(f["offset"], f["data"]) for f in frames] == [(3, "after")]


async def test_a_fresh_subscriber_follows_an_epoch_born_during_its_subscribe(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = PublishingDuringHistory(CHANNEL)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    broker.after_read = ["first", "second"]  # the channel's epoch is born after the read
    socket, welcome = await server.open(make_token(channels=["chat:*"]), [CHANNEL])
    position = welcome["positions"][CHANNEL]
    assert position["offset"] == 0
    frames = await receive_messages(socket, 2)
    await nothing_more(socket)
    assert [(f["offset"], f["data"]) for f in frames] == [(1, "first"), (2, "second")]
    assert frames[0]["epoch"] != position["epoch"]  # followed into the new epoch


async def test_a_since_at_an_empty_epoch_recovers_what_was_published_during_subscribe(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    broker = PublishingDuringHistory(CHANNEL)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker)
    token = make_token(channels=["chat:*"])
    socket, welcome = await server.open(token, [CHANNEL])
    position = welcome["positions"][CHANNEL]
    await socket.close()
    broker.before_read = ["missed"]
    broker.after_read = ["live"]
    socket, welcome = await server.open(token, [CHANNEL], since={CHANNEL: position})
    assert welcome["recovered"] == {CHANNEL: True}
    frames = await receive_messages(socket, 2)
    await nothing_more(socket)
    assert [(f["offset"], f["data"], f.get("recovered", False)) for f in frames] == [
        (1, "missed", True),
        (2, "live", False),
    ]
