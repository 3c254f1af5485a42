"""What one idle socket retains on the server, counted inside it (deterministic).

`python -m benchmarks.objects [--servers bare,wsbus] [--broker memory,redis]
[--size 2000] [--top 15]` starts each server under tracemalloc, connects and drops
a few clients (lazy imports and caches warm), then connects `size` idle clients,
each with an RS256 token of its own and one channel (as the "memory from outside"
workload does), and prints per socket: the bytes tracemalloc traces and the
objects the garbage collector tracks, both after a full collection. Unlike RSS
these do not depend on the allocator or the machine's load. `--top N` prints the
N source lines whose retained bytes grew most. `--cold` skips the warm-up, as the
"memory from outside" workload does: what the first connection builds once (lazy
imports, the broker's connections, caches) is then counted too. `--own-channels`
gives each client a channel of its own instead of one for all (as the many-channels
workload): what each channel costs, in the registry and the broker, is then counted
per socket too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .redis_engine import redis_engine
from .run import SERVER_CORE, column, make_keys
from .system import raise_fd_limit
from .workloads import FANOUT_CHANNEL, OWN_PREFIX, Clients, Keys, Server, running

WARM_UP = 5
SETTLE = 1.0  # seconds for handshake buffers to be freed before counting


async def measure(
    server: Server, size: int, top: int, *, cold: bool, own_channels: bool
) -> dict[str, Any]:
    """Per-socket bytes and tracked objects retained by `size` idle clients."""
    assert server.http is not None
    clients = Clients(server)
    tokens = server.keys.distinct(server.kind, size + WARM_UP)
    if own_channels:
        channels = [[f"{OWN_PREFIX}{n}"] for n in range(size + WARM_UP)]
    else:
        channels = [[FANOUT_CHANNEL]] * (size + WARM_UP)
    if not cold:
        await clients.add(tokens[size:], channels[size:])
        await clients.close()
    await asyncio.sleep(SETTLE)
    async with server.http.post("/bench/objects") as response:
        before = await response.json()
    await clients.add(tokens[:size], channels[:size])
    await server.wait_for_connections(size)
    await asyncio.sleep(SETTLE)
    async with server.http.get("/bench/objects", params={"top": str(top)}) as response:
        after = await response.json()
    await clients.close()
    return {
        "bytes": (after["traced"] - before["traced"]) / size,
        "tracked": (after["tracked"] - before["tracked"]) / size,
        "top": after.get("top", []),
    }


async def run(
    kinds: list[str], brokers: list[str], size: int, top: int, *, cold: bool, own_channels: bool
) -> None:
    os.environ["PYTHONTRACEMALLOC"] = "1"  # the servers inherit it: tracing from their start
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="wsbus-objects-") as directory,
    ):
        keys: Keys = make_keys(Path(directory), size + WARM_UP)
        redis = stack.enter_context(redis_engine(SERVER_CORE)) if "redis" in brokers else None
        print(f"{'server':<16} {'bytes/socket':>13} {'tracked objects/socket':>23}")
        for kind in kinds:
            for broker in brokers if kind.startswith("wsbus") else ["memory"]:
                on_redis = broker == "redis"
                server = Server(kind, SERVER_CORE, 25, keys, redis if on_redis else None)
                async with running(server):
                    found = await measure(
                        server, size, top, cold=cold, own_channels=own_channels
                    )
                name = column(kind, on_redis)
                print(f"{name:<16} {found['bytes']:>13.0f} {found['tracked']:>23.1f}", flush=True)
                for where, grown, count in found["top"]:
                    print(f"    {grown / size:8.1f} B {count / size:6.2f} blocks  {where}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.objects", description=__doc__)
    parser.add_argument("--servers", default="bare,wsbus", help="comma-separated server kinds")
    parser.add_argument("--broker", default="memory", help="comma-separated, from memory,redis")
    parser.add_argument("--size", type=int, default=2000, help="idle clients (default 2000)")
    parser.add_argument("--top", type=int, default=0, help="print the N lines that grew most")
    parser.add_argument("--cold", action="store_true", help="no warm-up connections first")
    parser.add_argument(
        "--own-channels", action="store_true", help="a channel per client, not one for all"
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    kinds, brokers = args.servers.split(","), args.broker.split(",")
    asyncio.run(
        run(kinds, brokers, args.size, args.top, cold=args.cold, own_channels=args.own_channels)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
