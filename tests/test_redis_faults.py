"""A frozen Redis (SIGSTOP) while sockets subscribe and close: nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import RedisBroker
from aiohttp_wsbus.brokers.redis_control import CONTROL_CHANNEL
from aiohttp_wsbus.brokers.redis_scripts import ChannelKeys

from .conftest import JwksServer, MakeToken
from .redis_server import RedisServer
from .support import WAIT, close_frame, eventually, start_bus


async def test_a_socket_closed_during_a_frozen_subscribe_leaves_no_subscription(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    own_redis: RedisServer,
    redis_prefix: str,
) -> None:
    broker = RedisBroker(own_redis.url, prefix=redis_prefix, socket_timeout=1.0)
    server = await start_bus(aiohttp_client, jwks_server.url, broker=broker, leeway=0)
    socket, _ = await server.open(make_token(channels=["chat:*"], exp_in=2), [])
    assert own_redis.process is not None
    pid = own_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await socket.send_json({"type": "subscribe", "channels": ["chat:a", "chat:b", "chat:c"]})
        # The token expires while the subscribe waits on the frozen Redis.
        assert (await close_frame(socket, timeout=WAIT))[0] == 4001
    finally:
        os.kill(pid, signal.SIGCONT)
    control = ChannelKeys.of(redis_prefix, CONTROL_CHANNEL).pubsub
    client = redis.asyncio.Redis.from_url(own_redis.url, socket_timeout=WAIT)
    try:

        async def node_listens_nowhere() -> bool:
            # Only to the control channel, which every node holds for good.
            channels = await client.pubsub_channels()
            return channels == [control.encode()] and list(broker._subscriptions) == [
                CONTROL_CHANNEL
            ]

        async with asyncio.timeout(WAIT * 2):
            while not await node_listens_nowhere():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    await eventually(lambda: not server.bus.registry.channel_count)
