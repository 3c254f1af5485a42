"""Real Redis servers for the tests: WSBUS_TEST_REDIS_URL, or redis-server started here.

Loaded by conftest.py as a pytest plugin. Without the redis-server binary and
without WSBUS_TEST_REDIS_URL (WSBUS_TEST_REDIS_CLUSTER_URL for the cluster
tests) the Redis tests skip, unless WSBUS_REQUIRE_REDIS=1,
which makes that a failure (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import RedisBroker
from aiohttp_wsbus.brokers import HistoryOptions, Message
from aiohttp_wsbus.brokers.base import OnControl
from aiohttp_wsbus.testing import JwksServer

from .support import BusServer, start_bus

# make_redis_broker: start a RedisBroker (options as RedisBroker takes them); it and
# the messages it delivers.
RedisMaker = Callable[..., Awaitable[tuple[RedisBroker, list[Message]]]]
START_TIMEOUT = 10.0
SLOTS = 16384


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until an asynchronous check of Redis holds, polling, at most `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed and WSBUS_TEST_REDIS_URL is not set"
        if os.environ.get("WSBUS_REQUIRE_REDIS") == "1":
            pytest.fail(message + " (WSBUS_REQUIRE_REDIS=1)")
        pytest.skip(message)
    return binary


class RedisServer:
    """A redis-server process on a loopback port that the test may kill and restart."""

    def __init__(self, directory: Path, *, durable: bool = False, cluster: bool = False) -> None:
        self.binary = _binary()
        self.port = free_port()
        self.directory = directory
        self.durable = durable
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else 0  # the nodes' own bus
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the same port; wait until it answers PING (and has loaded its AOF)."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.durable
            else ["--appendonly", "no"]
        )
        if self.cluster:
            persistence += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-port",
                str(self.cluster_port),
            ]
        self.process = subprocess.Popen(  # noqa: S603
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:  # refused, or still loading its data
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                time.sleep(0.02)  # bounded by START_TIMEOUT
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; what was not fsynced is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(START_TIMEOUT)
        self.process = None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: its connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)


class Cluster:
    """Three redis-server masters (no replicas) on loopback ports, joined in one cluster."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.servers = [RedisServer(directory, cluster=True) for _ in range(size)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}"

    def start(self) -> None:
        """Start the servers, give each a third of the slots, join them; wait for state ok."""
        for server in self.servers:
            server.start()
        clients = [redis.Redis.from_url(s.url, socket_timeout=1) for s in self.servers]
        try:
            step = math.ceil(SLOTS / len(clients))
            for n, client in enumerate(clients):
                first = n * step
                command(client, "CLUSTER ADDSLOTSRANGE", first, min(first + step, SLOTS) - 1)
            for server in self.servers[1:]:
                command(clients[0], "CLUSTER MEET", "127.0.0.1", server.port, server.cluster_port)
            deadline = time.monotonic() + START_TIMEOUT
            while not all(_cluster_is_ok(client, len(clients)) for client in clients):
                if time.monotonic() > deadline:
                    raise TimeoutError("the test cluster did not reach cluster_state:ok")
                time.sleep(0.05)  # bounded by START_TIMEOUT
        finally:
            for client in clients:
                client.close()

    def kill(self) -> None:
        for server in self.servers:
            server.kill()


def command(client: redis.Redis, *args: Any) -> Any:
    """Any Redis command (redis-py leaves execute_command untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_is_ok(client: redis.Redis, size: int) -> bool:
    info = command(client, "CLUSTER INFO")  # parsed into a dict of str
    return bool(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == size)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Redis Cluster for the session (WSBUS_TEST_REDIS_CLUSTER_URL, or started here)."""
    url = os.environ.get("WSBUS_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    cluster = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.kill()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Redis for the session; tests keep apart by prefix (see `redis_prefix`)."""
    url = os.environ.get("WSBUS_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def redis_prefix() -> str:
    """A prefix of this test's own, so tests never see each other's keys."""
    return "test-" + secrets.token_hex(4)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test started and may kill (no persistence)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test started and may kill, with AOF and appendfsync always."""
    server = RedisServer(tmp_path, durable=True)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def make_redis_broker(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisMaker]:
    """Start RedisBrokers (on the session's Redis unless `url` says otherwise); stop them after.

    Ephemeral messages are recorded with the others, as Messages at offset 0.
    """
    brokers: list[RedisBroker] = []

    async def make(
        size: int = 100,
        ttl: float = 300.0,
        url: str = redis_url,
        on_control: OnControl | None = None,
        **options: object,
    ) -> tuple[RedisBroker, list[Message]]:
        broker = RedisBroker(url, prefix=redis_prefix, **options)  # type: ignore[arg-type]
        delivered: list[Message] = []
        await broker.start(
            delivered.append,
            HistoryOptions(size, ttl),
            on_control=on_control,
            on_ephemeral=lambda channel, data: delivered.append(Message(channel, 0, "", data)),
        )
        brokers.append(broker)
        return broker, delivered

    yield make
    for broker in brokers:
        await broker.stop()


class PubSubProxy:
    """A loopback TCP proxy to a Redis that holds what Redis sends on pub/sub connections
    (those that sent a SUBSCRIBE), the node's other connections (reads, publishes)
    served as usual: from `hold()` until `release()` (a message still on its way,
    passed on in order), or for good on a connection whose SUBSCRIBE named `never`
    (a pub/sub connection Redis never answers again)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.never: bytes | None = None
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._flowing.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((writer, up_writer))
        pubsub, stuck = asyncio.Event(), asyncio.Event()

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if upstream and b"SUBSCRIBE" in data:
                        pubsub.set()
                        if self.never is not None and self.never in data:
                            stuck.set()
                    if not upstream and stuck.is_set():
                        continue  # Redis's answer never arrives
                    if not upstream and pubsub.is_set():
                        await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(
            pipe(reader, up_writer, upstream=True), pipe(up_reader, writer, upstream=False)
        )


@pytest.fixture
async def pubsub_proxy(own_redis: RedisServer) -> AsyncIterator[PubSubProxy]:
    """A PubSubProxy in front of the test's own Redis."""
    proxy = PubSubProxy(own_redis.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def stats(own_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the test's own Redis, to read its command counts."""
    client = redis.asyncio.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def bus_on_own_redis(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    own_redis: RedisServer,
    redis_prefix: str,
) -> Callable[..., Awaitable[BusServer]]:
    """Start a bus whose RedisBroker (options as it takes them) uses the test's own Redis;
    `settings` are the bus's."""

    def start(settings: dict[str, Any] | None = None, **options: Any) -> Awaitable[BusServer]:
        broker = RedisBroker(own_redis.url, prefix=redis_prefix, **options)
        return start_bus(aiohttp_client, jwks_server.url, broker=broker, **(settings or {}))

    return start
