"""Server CPU per emitted message, a figure a busy machine does not move much.

`python -m benchmarks.emit_cost [--servers bare,wsbus] [--subscribers 2000]`: one
server at a time, `--subscribers` clients each on a channel of its own
(`own:N`, the per-user notification pattern of the many-channels workload);
then messages to those channels, one per subscriber in turn, each form until
the server has spent at least `--cpu` seconds: one message per HTTP emit
(4 in flight), and for the bus batch emits of 100 and of 1000 messages. Each
figure is the server's CPU time (user + system, from /proc) per message from
the first request to the last frame received, the lowest of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .client import BUS_KINDS, payload
from .run import LOADER_CORE, SERVER_CORE, make_keys
from .servers import API_KEY, EMIT_PATH
from .system import pin_to_core, raise_fd_limit
from .workloads import OWN_PREFIX, Clients, Keys, Server, running, warm_up

IN_FLIGHT = 4
STEP = 2000  # messages between two readings of the server's CPU (at least IN_FLIGHT batches)


async def cost(
    server: Server, clients: Clients, channels: Iterator[str], batch: int, cpu: float
) -> float:
    """Server CPU µs per message, sending `batch` messages a request until `cpu` s is spent."""
    data = payload()
    started = server.cpu()
    sent = 0
    while server.cpu() - started < cpu:
        rounds = max(1, STEP // (batch * IN_FLIGHT))
        clients.stats.reset(rounds * batch * IN_FLIGHT)
        await asyncio.gather(
            *(_send(server, channels, batch, rounds, data) for _ in range(IN_FLIGHT))
        )
        await asyncio.wait_for(clients.stats.reached.wait(), timeout=120)
        sent += rounds * batch * IN_FLIGHT
    return (server.cpu() - started) / sent * 1e6


async def _send(
    server: Server, channels: Iterator[str], batch: int, rounds: int, data: Any
) -> None:
    assert server.http is not None
    headers = {"X-API-Key": API_KEY} if server.kind in BUS_KINDS else {}
    for _ in range(rounds):
        if batch == 1:
            body: dict[str, Any] = {"channel": next(channels), "data": data}
        else:
            body = {"messages": [{"channel": next(channels), "data": data} for _ in range(batch)]}
        async with server.http.post(EMIT_PATH[server.kind], json=body, headers=headers) as answer:
            if answer.status != 202:
                raise RuntimeError(f"emit failed: {answer.status} {await answer.text()}")


async def measure(
    kind: str, keys: Keys, subscribers: int, cpu: float, repeats: int, only: int | None
) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with running(Server(kind, SERVER_CORE, 25, keys)) as server:
        clients = Clients(server)
        await warm_up(server, clients, 0.5)
        names = [f"{OWN_PREFIX}{n}" for n in range(subscribers)]
        token = keys.shared(kind)
        await clients.add([token] * subscribers, [[name] for name in names])
        await server.wait_for_connections(subscribers)
        channels = itertools.cycle(names)
        batches = [1, 100, 1000] if kind in BUS_KINDS else [1]
        if only is not None:
            batches = [only]
        await cost(server, clients, channels, 1, 0.2)  # every channel's first message
        print(f"subscribers ready: server pid {server.process.pid}", flush=True)
        for batch in batches:
            runs = [await cost(server, clients, channels, batch, cpu) for _ in range(repeats)]
            figures[f"{kind} batch {batch}" if batch > 1 else f"{kind} single"] = min(runs)
            print(f"{kind} {batch}: {', '.join(f'{r:.1f}' for r in runs)} µs", flush=True)
        await clients.close()
    return figures


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        keys = make_keys(Path(directory), 0)
        for kind in args.servers.split(","):
            for name, value in (
                await measure(kind, keys, args.subscribers, args.cpu, args.repeats, args.only)
            ).items():
                print(f"{name}: {value:.1f} µs server CPU per message (min of {args.repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.emit_cost", description=__doc__)
    parser.add_argument("--servers", default="bare,wsbus")
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--cpu", type=float, default=2.0, help="server CPU seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", type=int, help="one batch size (1: single emits), e.g. to profile with py-spy"
    )
    args = parser.parse_args()
    pin_to_core(LOADER_CORE)
    raise_fd_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
