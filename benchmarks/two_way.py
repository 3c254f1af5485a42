"""The two-way workload (bus kinds only): what a client publish costs, as ratios to an
HTTP emit of the same message to the same subscribers, in the same run.

- Round trip: one message at a time to a channel nobody reads (the request's own
  cost: the subscribers' frames would otherwise queue ahead of the answer), from
  just before it is sent to its answer (`published` on the publisher's socket;
  202 for the emit), p50 and p99.
- Fan-out: K messages to N subscribers, deliveries/s; the socket keeps 16
  publishes in flight (the server's limit), the emits 4 (as the fan-out workload).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp

from .client import payload
from .workloads import (
    FANOUT_CHANNEL,
    Clients,
    Meter,
    Result,
    Server,
    fanout_once,
    messages_for,
    throughput,
    warm_up,
)

IN_FLIGHT = 16  # the server's MAX_REQUESTS_IN_FLIGHT
WORKLOAD = "two-way"
ROUND_TRIP_CHANNEL = "bench:round-trip"  # granted, never subscribed


async def two_way(
    server: Server, settle: float, size: int, messages: int | None, round_trips: int
) -> list[Result]:
    """Client publish against HTTP emit: round trips, then fan-out, with `size` subscribers."""
    clients = Clients(server)
    await warm_up(server, clients, settle)
    token = server.keys.shared(server.kind)
    await clients.add([token] * size, [[FANOUT_CHANNEL]] * size)
    await server.wait_for_connections(size)
    assert server.http is not None
    async with server.http.ws_connect("/ws") as publisher:
        await publisher.send_json({"type": "connect", "token": token, "channels": []})
        welcome = await publisher.receive_json(timeout=30)
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"the publisher was not welcomed: {welcome}")
        results = await _round_trips(server, clients, publisher, size, round_trips)
        results += await _fanouts(server, clients, publisher, size, messages or messages_for(size))
    await clients.close()
    return results


async def _round_trips(
    server: Server,
    clients: Clients,
    publisher: aiohttp.ClientWebSocketResponse,
    size: int,
    count: int,
) -> list[Result]:
    emits: list[float] = []
    publishes: list[float] = []
    for ref in range(count):
        started = time.perf_counter()
        await server.emit(ROUND_TRIP_CHANNEL, payload())
        emits.append(time.perf_counter() - started)
        started = time.perf_counter()
        await _publish(publisher, ROUND_TRIP_CHANNEL, ref, 1)
        publishes.append(time.perf_counter() - started)
    results = []
    for label, samples in (
        ("round trip via HTTP emit", emits),
        ("round trip via client publish", publishes),
    ):
        for name, value in _percentiles(samples):
            results.append(
                Result(server.kind, f"{WORKLOAD}: {label}", size, name, value * 1e3, "ms", "lower")
            )
    for name, value in _percentiles(publishes):
        ratio = value / dict(_percentiles(emits))[name]
        results.append(
            Result(
                server.kind,
                f"{WORKLOAD}: client publish round trip / HTTP emit's",
                size,
                f"{name} ratio",
                ratio,
                "\N{MULTIPLICATION SIGN}",
                "lower",
            )
        )
    return results


async def _fanouts(
    server: Server,
    clients: Clients,
    publisher: aiohttp.ClientWebSocketResponse,
    size: int,
    count: int,
) -> list[Result]:
    workload = f"{WORKLOAD}: fan-out"
    by_emit = await fanout_once(server, clients, size, count, "http", workload, FANOUT_CHANNEL)
    clients.stats.reset(size * count)
    meter = Meter(server)
    await _publish(publisher, FANOUT_CHANNEL, 0, count)
    note = ""
    try:
        await asyncio.wait_for(clients.stats.reached.wait(), timeout=120)
    except TimeoutError:
        note = f"timed out: {clients.stats.received} of {size * count} delivered"
    label = f"{workload} via client publish"
    by_publish = throughput(server, label, size, clients.stats.received, meter, note)
    ratio = by_publish[0].value / by_emit[0].value if by_emit[0].value else float("nan")
    return [
        *by_emit,
        *by_publish,
        Result(
            server.kind,
            f"{WORKLOAD}: client publish fan-out / HTTP emit's",
            size,
            "deliveries/s ratio",
            ratio,
            "\N{MULTIPLICATION SIGN}",
            "higher",
        ),
    ]


async def _publish(
    publisher: aiohttp.ClientWebSocketResponse, channel: str, first_ref: int, count: int
) -> None:
    """Publish `count` messages on the socket, IN_FLIGHT at a time; wait for every answer."""
    data = payload()
    sent = answered = 0
    while answered < count:
        while sent < count and sent - answered < IN_FLIGHT:
            frame = {
                "type": "publish",
                "ref": first_ref + sent,
                "channel": channel,
                "data": data,
            }
            await publisher.send_str(json.dumps(frame))
            sent += 1
        answer = json.loads(await publisher.receive_str(timeout=30))
        if answer.get("type") != "published":
            raise RuntimeError(f"client publish refused: {answer}")
        answered += 1


def _percentiles(samples: list[float]) -> list[tuple[str, float]]:
    ordered = sorted(samples)
    return [
        ("p50", statistics.median(ordered)),
        ("p99", ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]),
    ]
