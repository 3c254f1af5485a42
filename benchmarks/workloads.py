"""The workloads, each run by this process (the load generator) against one server process."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .client import PROTOCOL_KINDS, Dialect, Stats, WsClient, close_all, open_clients, payload
from .redis_engine import RedisEngine
from .servers import API_KEY, AUDIENCE, EMIT_PATH, REDIS_URL_VARIABLE
from .system import own_cpu_seconds, process_cpu_seconds, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
FANOUT_CHANNEL = "bench:fanout"
SHARED_CHANNEL = "bench:shared"
OWN_PREFIX = "own:"
SATURATED = 0.9  # load generator CPU share of its core above which it may be the bottleneck
# How fan-out's K messages are published: K HTTP emits, K in-process publishes one
# after the other (each awaited before the next), or all K at once (gathered).
VIA = {
    "http": "HTTP emit",
    "publish": "in-process publish",
    "concurrent": "in-process concurrent publish",
}


@dataclass
class Result:
    """One measured figure."""

    server: str
    workload: str
    size: int
    metric: str
    value: float
    unit: str
    better: str  # "higher" or "lower"
    loader_cpu: float | None = None  # share of the load generator's core used
    note: str = ""
    server_busy: float | None = None  # share of the server's core it used

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.workload, self.size, self.metric)


@dataclass
class Keys:
    """Signing material shared by every server of one run: tokens by audience."""

    directory: Path
    shared_token: dict[str | None, str] = field(default_factory=dict)
    storm_tokens: dict[str | None, list[str]] = field(default_factory=dict)

    def audience(self, kind: str) -> str | None:
        return None if kind == "asgi_ws" else AUDIENCE

    def shared(self, kind: str) -> str:
        """The one token every non-storm client of `kind` uses."""
        return self.shared_token[self.audience(kind)]

    def distinct(self, kind: str, count: int) -> list[str]:
        """`count` tokens of different users, for the connect storm."""
        return self.storm_tokens[self.audience(kind)][:count]


class Server:
    """One server, pinned to its own core: one process, or `workers` worker processes
    on one port (and the idle one that started them) whose figures are summed."""

    def __init__(
        self,
        kind: str,
        core: int,
        heartbeat: float,
        keys: Keys,
        redis: RedisEngine | None = None,
        workers: int = 1,
    ) -> None:
        self.kind = kind
        self.dialect = Dialect(kind)
        self.keys = keys
        self.redis = redis  # the bus shares messages through it (--broker redis)
        environment = dict(os.environ)
        if redis is not None:
            environment[REDIS_URL_VARIABLE] = redis.url
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.servers",
                kind,
                str(core),
                str(heartbeat),
                str(keys.directory),
                str(workers),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.port = 0
        self.workers = workers
        self.worker_pids: list[int] = []
        self.worker_ports: list[int] = []  # each worker's own port, beside the shared one
        self.http: aiohttp.ClientSession | None = None

    @property
    def pids(self) -> list[int]:
        """Every process of this server."""
        return [self.process.pid, *self.worker_pids]

    async def start(self, timeout: float = 60) -> None:
        assert self.process.stdout is not None
        announced = self.workers if self.workers > 1 else 0
        async with asyncio.timeout(timeout):
            # READY once every worker listens, each worker's WORKER line once it serves.
            while not self.port or len(self.worker_ports) < announced:
                line = await asyncio.to_thread(self.process.stdout.readline)
                word, *values = line.split() or [""]
                if word == "READY":
                    self.port = int(values[0])
                elif word == "WORKER":
                    self.worker_pids.append(int(values[0]))
                    self.worker_ports.append(int(values[1]))
                else:
                    raise RuntimeError(f"{self.kind} server did not start (said {line!r})")
        self.http = aiohttp.ClientSession(
            f"http://127.0.0.1:{self.port}", timeout=aiohttp.ClientTimeout(total=300)
        )

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, 20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        if self.process.stdout is not None:
            self.process.stdout.close()

    async def connections(self) -> int:
        """Open sockets: every worker's, each asked on its own port."""
        assert self.http is not None
        urls = [f"http://127.0.0.1:{port}/bench/stats" for port in self.worker_ports]
        total = 0
        for url in urls or ["/bench/stats"]:
            async with self.http.get(url) as response:
                total += int((await response.json())["connections"])
        return total

    async def wait_for_connections(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while await self.connections() != count:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.05)

    async def emit(self, channel: str, data: Any) -> None:
        assert self.http is not None
        field_name = "payload" if self.kind == "asgi_ws" else "data"
        headers = {"X-API-Key": API_KEY} if self.kind in PROTOCOL_KINDS else {}
        body = {"channel": channel, field_name: data}
        async with self.http.post(EMIT_PATH[self.kind], json=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"emit failed: {response.status} {await response.text()}")

    async def control(self, path: str, body: dict[str, Any]) -> None:
        assert self.http is not None
        async with self.http.post(path, json=body) as response:
            response.raise_for_status()

    def cpu(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    """The server, started, and stopped after."""
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


class Meter:
    """Wall time, server CPU and load generator CPU over one measured window."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.wall = time.perf_counter()
        self.server_cpu = server.cpu()
        self.redis_cpu = server.redis.cpu() if server.redis is not None else 0.0
        self.own_cpu = own_cpu_seconds()

    def redis_cpu_used(self) -> float | None:
        """Redis's CPU seconds since the meter started (None without Redis)."""
        redis = self.server.redis
        return None if redis is None else redis.cpu() - self.redis_cpu

    def stop(self) -> tuple[float, float, float]:
        """(seconds, server CPU seconds, load generator CPU share)."""
        wall = time.perf_counter() - self.wall
        server_cpu = self.server.cpu() - self.server_cpu
        loader = (own_cpu_seconds() - self.own_cpu) / wall if wall > 0 else 0.0
        return wall, server_cpu, loader


def throughput(
    server: Server, label: str, size: int, deliveries: int, meter: Meter, note: str = ""
) -> list[Result]:
    """Deliveries/s and server CPU per delivery over the meter's window."""
    redis_cpu = meter.redis_cpu_used()
    wall, server_cpu, loader = meter.stop()
    note = note or loader_note(loader)
    busy = server_cpu / wall
    results = [
        Result(
            server.kind,
            label,
            size,
            "deliveries/s",
            deliveries / wall,
            "/s",
            "higher",
            loader,
            note,
            busy,
        ),
        Result(
            server.kind,
            label,
            size,
            "server CPU per delivery",
            server_cpu / max(deliveries, 1) * 1e6,
            "µs",
            "lower",
            loader,
            note,
            busy,
        ),
    ]
    if redis_cpu is not None:  # --broker redis: what Redis spent on top
        per_delivery = redis_cpu / max(deliveries, 1)
        results.append(redis_cost(server, label, size, "delivery", per_delivery, loader, note))
    return results


def redis_cost(
    server: Server, label: str, size: int, per: str, seconds: float, loader: float, note: str
) -> Result:
    """Redis's CPU seconds per delivery or connection (--broker redis), as a figure."""
    cost = f"Redis CPU per {per}"
    return Result(server.kind, label, size, cost, seconds * 1e6, "µs", "lower", loader, note)


def loader_note(share: float) -> str:
    return "LOAD GENERATOR SATURATED" if share > SATURATED else ""


class Clients:
    """The clients one server's workloads hold open."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stats = Stats()
        self.open: list[WsClient] = []

    async def add(
        self, tokens: list[str], channels: list[list[str]], *, in_flight: int | None = 256
    ) -> None:
        await open_clients(
            self.server.port,
            self.server.dialect,
            self.stats,
            tokens,
            channels,
            in_flight=in_flight,
            timeout=300,
            opened=self.open,
        )

    async def close(self) -> None:
        close_all(self.open)
        self.open = []
        await self.server.wait_for_connections(0)


# -- workloads ---------------------------------------------------------------


async def warm_up(server: Server, clients: Clients, settle: float) -> None:
    """Connect and drop a few clients, so lazy imports and caches are not counted."""
    token = server.keys.shared(server.kind)
    await clients.add([token] * 5, [[FANOUT_CHANNEL]] * 5)
    await server.emit(FANOUT_CHANNEL, payload())
    await clients.close()
    await asyncio.sleep(settle)


async def memory(server: Server, sizes: list[int], settle: float) -> list[Result]:
    """RSS per idle subscribed connection, at each size (connected in ascending order)."""
    clients = Clients(server)
    await warm_up(server, clients, settle)
    baseline = server.rss()
    results = []
    token = server.keys.shared(server.kind)
    for size in sorted(sizes):
        more = size - len(clients.open)
        await clients.add([token] * more, [[FANOUT_CHANNEL]] * more)
        await server.wait_for_connections(size)
        await asyncio.sleep(settle)  # let the server settle (handshake buffers freed)
        per_connection = (server.rss() - baseline) / size
        results.append(
            Result(
                server.kind,
                "memory",
                size,
                "memory per idle connection",
                per_connection / 1024,
                "KB",
                "lower",
            )
        )
    await clients.close()
    return results


OUTSIDE_READS = (0.5, 5.0)  # seconds after the last connection is ready


async def memory_outside(server: Server, size: int) -> list[Result]:
    """RSS per connection as an outsider sees it: read before the first connection (no
    warm-up) and OUTSIDE_READS seconds after the last of `size` idle clients, each with a
    token of its own (a connect frame, for the bus) and one channel."""
    clients = Clients(server)
    baseline = server.rss()
    tokens = server.keys.distinct(server.kind, size)
    await clients.add(tokens, [[FANOUT_CHANNEL]] * size)
    await server.wait_for_connections(size)
    results = []
    waited = 0.0
    for after in OUTSIDE_READS:
        await asyncio.sleep(after - waited)
        waited = after
        results.append(
            Result(
                server.kind,
                f"memory from outside, {after:g} s after",
                size,
                "memory per idle connection",
                (server.rss() - baseline) / size / 1024,
                "KB",
                "lower",
            )
        )
    await clients.close()
    return results


async def hold(
    server: Server, settle: float, size: int, seconds: float, heartbeat: float
) -> list[Result]:
    """`size` connections held through several heartbeats: all still open, and the RSS."""
    clients = Clients(server)
    await warm_up(server, clients, settle)
    baseline = server.rss()
    token = server.keys.shared(server.kind)
    await clients.add([token] * size, [[FANOUT_CHANNEL]] * size)
    await asyncio.sleep(seconds)
    still_open = await server.connections()
    rss = server.rss()
    note = f"held {seconds:.0f} s with heartbeat {heartbeat:g} s; {clients.stats.closed} dropped"
    results = [
        Result(
            server.kind,
            "concurrent",
            size,
            "connections still open",
            still_open,
            "",
            "higher",
            note=note,
        ),
        Result(server.kind, "concurrent", size, "server RSS", rss / 2**20, "MB", "lower"),
        Result(
            server.kind,
            "concurrent",
            size,
            "memory per connection",
            (rss - baseline) / size / 1024,
            "KB",
            "lower",
        ),
    ]
    await clients.close()
    return results


async def _emit_all(server: Server, channel: str, count: int, concurrency: int = 4) -> None:
    gate = asyncio.Semaphore(concurrency)
    data = payload()

    async def one() -> None:
        async with gate:
            await server.emit(channel, data)

    await asyncio.gather(*(one() for _ in range(count)))


async def fanout_once(
    server: Server,
    clients: Clients,
    subscribers: int,
    messages: int,
    via: str,
    workload: str,
    channel: str,
) -> list[Result]:
    deliveries = subscribers * messages
    clients.stats.reset(deliveries)
    meter = Meter(server)
    if via == "http":
        await _emit_all(server, channel, messages)
    else:
        body = {"channel": channel, "count": messages, "data": payload()}
        await server.control("/bench/publish", {**body, "concurrent": via == "concurrent"})
    note = ""
    try:
        await asyncio.wait_for(clients.stats.reached.wait(), timeout=120)
    except TimeoutError:
        note = f"timed out: {clients.stats.received} of {deliveries} delivered"
    label = f"{workload} via {VIA[via]}"
    return throughput(server, label, subscribers, clients.stats.received, meter, note)


def messages_for(subscribers: int) -> int:
    """K messages for N subscribers: about 200k deliveries per run, at least 10 messages."""
    return max(10, 200_000 // max(subscribers, 1))


async def fanout_and_latency(
    server: Server,
    settle: float,
    sizes: list[int],
    latency_sizes: list[int],
    rate: float,
    seconds: float,
    messages: int | None,
) -> list[Result]:
    clients = Clients(server)
    await warm_up(server, clients, settle)
    token = server.keys.shared(server.kind)
    results: list[Result] = []
    for size in sorted(set(sizes) | set(latency_sizes)):
        more = size - len(clients.open)
        await clients.add([token] * more, [[FANOUT_CHANNEL]] * more)
        await server.wait_for_connections(size)
        if size in sizes:
            count = messages or messages_for(size)
            for via in VIA:
                results += await fanout_once(
                    server, clients, size, count, via, "fan-out", FANOUT_CHANNEL
                )
        if size in latency_sizes:
            results += await latency(server, clients, size, rate, seconds)
    await clients.close()
    return results


async def latency(
    server: Server, clients: Clients, subscribers: int, rate: float, seconds: float
) -> list[Result]:
    """Emit over HTTP at `rate` messages/s; time each delivery from emit to receipt."""
    count = max(1, round(rate * seconds))
    clients.stats.reset(subscribers * count, measure_latency=True)
    meter = Meter(server)
    tasks = []
    start = time.perf_counter()
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(server.emit(FANOUT_CHANNEL, payload(time.monotonic_ns()))))
    await asyncio.gather(*tasks)
    note = ""
    try:
        await asyncio.wait_for(clients.stats.reached.wait(), timeout=60)
    except TimeoutError:
        note = f"timed out: {clients.stats.received} of {subscribers * count} delivered"
    _, server_cpu, loader = meter.stop()
    samples = sorted(clients.stats.latencies_ns)
    note = note or loader_note(loader)
    label = f"latency at {rate:g} msg/s"
    # A fan-out at a fixed rate that saturates neither process: each message goes
    # out to each socket on its own, so this is what one delivery costs the server,
    # free of how many frames a busy server packs into one write.
    per_delivery = server_cpu / max(clients.stats.received, 1) * 1e6
    cost = Result(
        server.kind,
        label,
        subscribers,
        "server CPU per delivery",
        per_delivery,
        "µs",
        "lower",
        loader,
        note,
    )
    if not samples:
        return [
            Result(
                server.kind,
                label,
                subscribers,
                "p99",
                float("nan"),
                "ms",
                "lower",
                loader,
                "no samples",
            )
        ]
    return [
        *(
            Result(server.kind, label, subscribers, name, value / 1e6, "ms", "lower", loader, note)
            for name, value in (
                ("p50", statistics.median(samples)),
                ("p99", samples[min(len(samples) - 1, int(len(samples) * 0.99))]),
                ("max", samples[-1]),
            )
        ),
        cost,
    ]


async def storm(server: Server, size: int, settle: float) -> list[Result]:
    """`size` clients with distinct RS256 tokens connect at once; twice (cold, then again)."""
    clients = Clients(server)
    await warm_up(server, clients, settle)
    tokens = server.keys.distinct(server.kind, size)
    results = []
    for label in ("connect storm, new tokens", "reconnect storm, same tokens"):
        meter = Meter(server)
        await clients.add(tokens, [[FANOUT_CHANNEL]] * size, in_flight=None)
        redis_cpu = meter.redis_cpu_used()
        wall, server_cpu, loader = meter.stop()
        note = loader_note(loader)
        results.append(
            Result(
                server.kind, label, size, "connections/s", size / wall, "/s", "higher", loader, note
            )
        )
        # Steadier than the rate on a shared machine: what each connect cost the server.
        per_connection = server_cpu / size * 1e6
        results.append(
            Result(
                server.kind,
                label,
                size,
                "server CPU per connection",
                per_connection,
                "µs",
                "lower",
                loader,
                note,
            )
        )
        if redis_cpu is not None:  # --broker redis: what Redis spent on top
            spent = redis_cpu / size
            results.append(redis_cost(server, label, size, "connection", spent, loader, note))
        await clients.close()
    return results


async def many_channels(
    server: Server, size: int, settle: float, messages: int | None
) -> list[Result]:
    """`size` connections, each on its own channel plus one shared channel."""
    clients = Clients(server)
    await warm_up(server, clients, settle)
    baseline = server.rss()
    token = server.keys.shared(server.kind)
    workload = "many channels"
    meter = Meter(server)
    await clients.add([token] * size, [[f"{OWN_PREFIX}{n}", SHARED_CHANNEL] for n in range(size)])
    wall, _, loader = meter.stop()
    await server.wait_for_connections(size)
    await asyncio.sleep(settle)
    results = [
        Result(
            server.kind,
            workload,
            size,
            "connections/s",
            size / wall,
            "/s",
            "higher",
            loader,
            loader_note(loader),
        ),
        Result(
            server.kind,
            workload,
            size,
            "memory per connection",
            (server.rss() - baseline) / size / 1024,
            "KB",
            "lower",
        ),
    ]
    results += await fanout_once(
        server,
        clients,
        size,
        messages or max(5, 100_000 // size),
        "http",
        workload + ", shared channel",
        SHARED_CHANNEL,
    )
    own = workload + ", one message per own channel"
    # HTTP first: each emit is its channel's first message (it makes the channel's history).
    clients.stats.reset(size)
    meter = Meter(server)
    await _emit_each(server, [f"{OWN_PREFIX}{n}" for n in range(size)])
    await asyncio.wait_for(clients.stats.reached.wait(), timeout=120)
    results += throughput(server, own + " via HTTP emit", size, size, meter)
    clients.stats.reset(size)
    meter = Meter(server)
    await server.control(
        "/bench/publish_each", {"prefix": OWN_PREFIX, "count": size, "data": payload()}
    )
    await asyncio.wait_for(clients.stats.reached.wait(), timeout=120)
    results += throughput(server, own + " via in-process publish", size, size, meter)
    await clients.close()
    return results


async def _emit_each(server: Server, channels: list[str], concurrency: int = 4) -> None:
    """One HTTP emit to each channel, `concurrency` in flight (as `_emit_all`)."""
    data = payload()
    pending = iter(channels)

    async def worker() -> None:
        for channel in pending:
            await server.emit(channel, data)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def dump(results: list[Result]) -> str:
    return json.dumps([r.__dict__ for r in results], indent=1)
