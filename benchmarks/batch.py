"""The batch emit workload (bus kinds only): messages/s published by HTTP emit one message
per request against {"messages": [...]} batches, in the same run, and their ratio.

Both send the same messages to a channel nobody reads (the publish's own cost),
IN_FLIGHT requests at a time, each message with its own idempotency id (as
EmitClient sends them); a message counts once its request is answered 202.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

from .client import payload
from .servers import API_KEY, EMIT_PATH
from .workloads import Result, Server

WORKLOAD = "batch emit"
CHANNEL = "bench:batch"  # never subscribed
BATCH_SIZE = 100
BATCHED_PER_SINGLE = 5  # batches go faster: more messages keep their window as long
IN_FLIGHT = 4  # requests at a time, as the fan-out workload's emits


async def batch_emit(server: Server, messages: int) -> list[Result]:
    """`messages` one per request, then BATCHED_PER_SINGLE times as many, BATCH_SIZE a request."""
    ids = (f"m-{n}" for n in itertools.count())
    await _send(server, [[next(ids)] for _ in range(IN_FLIGHT)])  # warm up
    single = messages / await _send(server, [[next(ids)] for _ in range(messages)])
    count = messages * BATCHED_PER_SINGLE // BATCH_SIZE
    batches = [[next(ids) for _ in range(BATCH_SIZE)] for _ in range(count)]
    batched = count * BATCH_SIZE / await _send(server, batches)
    return [
        _rate(server, "one message per request", messages, single),
        _rate(server, f"{BATCH_SIZE} messages per request", messages, batched),
        Result(
            server.kind,
            f"{WORKLOAD}: batch / single",
            messages,
            "messages/s ratio",
            batched / single,
            "\N{MULTIPLICATION SIGN}",
            "higher",
        ),
    ]


def _rate(server: Server, label: str, messages: int, rate: float) -> Result:
    return Result(server.kind, f"{WORKLOAD}: {label}", messages, "messages/s", rate, "/s", "higher")


async def _send(server: Server, requests: list[list[str]]) -> float:
    """Seconds to have every request (a list of message ids) answered, IN_FLIGHT at a time."""
    data = payload()
    pending: Iterator[list[str]] = iter(requests)

    async def worker() -> None:
        for ids in pending:
            await _post(server, _body(ids, data))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - started


def _body(ids: list[str], data: Any) -> dict[str, Any]:
    if len(ids) == 1:
        return {"channel": CHANNEL, "data": data, "id": ids[0]}
    return {"messages": [{"channel": CHANNEL, "data": data, "id": i} for i in ids]}


async def _post(server: Server, body: dict[str, Any]) -> None:
    assert server.http is not None
    headers = {"X-API-Key": API_KEY}
    async with server.http.post(EMIT_PATH[server.kind], json=body, headers=headers) as response:
        if response.status != 202:
            raise RuntimeError(f"emit failed: {response.status} {await response.text()}")
