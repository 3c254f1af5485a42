"""Server CPU per connection of a connect storm, steadier than the connect rate.

`python -m benchmarks.connect_cost wsbus bare`: for each kind, one server; REPEATS
times, SIZE clients with tokens never seen connect at once ("new tokens"), leave,
and connect again with the same tokens ("reconnect", the bus's token cache warm).
Prints each storm's server CPU per connection and the least of the repeats, and
the same per close when every client of the storm closes at once. On a
shared machine the cyclic collector is most of the spread (its full collections
walk every object of every open socket), so `--collector off` gives the rest of
the cost alone, `--collector timed` prints the collector's share and
`--collector frozen` freezes what the server made at start-up (gc.freeze, as the
`wsbus` command does) to price that. A bus kind named with `+redis`
(`wsbus+redis`) runs on a redis-server of its own, as `--broker redis` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from .redis_engine import redis_engine
from .run import SERVER_CORE, make_keys
from .servers import COLLECTOR_VARIABLE
from .workloads import FANOUT_CHANNEL, Clients, Meter, Server, running, warm_up

STORMS = ("new tokens", "reconnect")


async def collector(server: Server) -> dict[str, Any]:
    """The server's collector figures so far (zeros unless timed)."""
    assert server.http is not None
    async with server.http.get("/bench/stats") as response:
        figures: dict[str, Any] = (await response.json())["collector"]
    return figures


def by_generation(before: dict[str, Any], after: dict[str, Any], size: int) -> str:
    """Collections and µs per connection of each generation between two readings,
    e.g. `379:6/35:12/4:105`: full collections (the last) walk every open socket."""
    return "/".join(
        f"{after['collections'][g] - before['collections'][g]}:"
        f"{(after['by_generation'][g] - before['by_generation'][g]) / size * 1e6:.0f}"
        for g in range(3)
    )


async def measure(name: str, size: int, repeats: int, timed: bool) -> None:
    kind, _, broker = name.partition("+")
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory())
        redis = stack.enter_context(redis_engine(SERVER_CORE)) if broker == "redis" else None
        keys = make_keys(Path(directory), size * repeats)
        tokens = keys.distinct(kind, size * repeats)
        cost: dict[str, list[float]] = {storm: [] for storm in STORMS}
        collecting: dict[str, list[float]] = {storm: [] for storm in STORMS}
        generations: dict[str, list[str]] = {storm: [] for storm in STORMS}
        closing: dict[str, list[float]] = {storm: [] for storm in STORMS}
        async with running(Server(kind, SERVER_CORE, 25, keys, redis)) as server:
            clients = Clients(server)
            await warm_up(server, clients, 1.0)
            for repeat in range(repeats):
                these = tokens[repeat * size : (repeat + 1) * size]
                for storm in STORMS:  # the same tokens twice: new, then cached
                    before = await collector(server)
                    meter = Meter(server)
                    await clients.add(these, [[FANOUT_CHANNEL]] * size, in_flight=None)
                    _, server_cpu, _ = meter.stop()
                    after = await collector(server)
                    cost[storm].append(server_cpu / size * 1e6)
                    collecting[storm].append((after["seconds"] - before["seconds"]) / size * 1e6)
                    generations[storm].append(by_generation(before, after, size))
                    meter = Meter(server)
                    await clients.close()  # every client at once: a close storm
                    _, server_cpu, _ = meter.stop()
                    closing[storm].append(server_cpu / size * 1e6)
        for storm in STORMS:
            line = " ".join(f"{value:.0f}" for value in cost[storm])
            least = min(cost[storm])
            print(f"{name} {storm}: server CPU µs per connection {line}, least {least:.0f}")
            line = " ".join(f"{value:.0f}" for value in closing[storm])
            least = min(closing[storm])
            print(f"{name} {storm}, then closed: server CPU µs per close {line}, least {least:.0f}")
            if timed:
                line = " ".join(f"{value:.0f}" for value in collecting[storm])
                print(f"{name} {storm}: of which the collector {line}")
                line = " ".join(generations[storm])
                print(f"{name} {storm}: of which each generation (collections:µs) {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="+", help="server kinds, e.g. wsbus bare")
    parser.add_argument("--size", type=int, default=3000, help="connections per storm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--collector", choices=("on", "off", "timed", "frozen"), default="on")
    arguments = parser.parse_args()
    os.environ[COLLECTOR_VARIABLE] = arguments.collector  # the servers inherit it
    for kind in arguments.kinds:
        timed = arguments.collector == "timed"
        asyncio.run(measure(kind, arguments.size, arguments.repeats, timed))


if __name__ == "__main__":
    main()
