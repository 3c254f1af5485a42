"""Server CPU per delivery of a fan-out at a fixed rate, steadier than deliveries/s.

`python -m benchmarks.fanout_cost wsbus wsbus_presence`: for each kind, one server
with SIZE subscribers of one channel (one token: one user); REPEATS times, HTTP
emits at RATE messages/s for SECONDS (the latency workload). Neither process
saturates, so each message goes to each socket in a write of its own and the
figure is what one delivery costs the server, not how fast the load generator
reads (the fan-out workload's deliveries/s, on two cores). Prints each repeat's
server CPU per delivery and p99, and the least of the repeats: a full collection
of the cyclic collector lands in some windows and not in others.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from .run import SERVER_CORE, make_keys
from .workloads import FANOUT_CHANNEL, Clients, Server, latency, running, warm_up


async def measure(kind: str, size: int, repeats: int, rate: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as directory:
        keys = make_keys(Path(directory), 1)
        costs: list[float] = []
        p99s: list[float] = []
        async with running(Server(kind, SERVER_CORE, 25, keys)) as server:
            clients = Clients(server)
            await warm_up(server, clients, 1.0)
            token = keys.shared(kind)
            await clients.add([token] * size, [[FANOUT_CHANNEL]] * size)
            await server.wait_for_connections(size)
            for _ in range(repeats):
                figures = {r.metric: r for r in await latency(server, clients, size, rate, seconds)}
                cost = figures["server CPU per delivery"]
                if cost.note:  # timed out: not a figure
                    raise RuntimeError(f"{kind}: {cost.note}")
                costs.append(cost.value)
                p99s.append(figures["p99"].value)
            await clients.close()
    line = " ".join(f"{value:.2f}" for value in costs)
    print(f"{kind}: server CPU µs per delivery {line}, least {min(costs):.2f}")
    print(f"{kind}: p99 ms {' '.join(f'{value:.1f}' for value in p99s)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="+", help="server kinds, e.g. wsbus wsbus_presence")
    parser.add_argument("--size", type=int, default=2000, help="subscribers of the channel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=25.0, help="HTTP emits per second")
    parser.add_argument("--seconds", type=float, default=3.0, help="of emits, each repeat")
    arguments = parser.parse_args()
    for kind in arguments.kinds:
        asyncio.run(
            measure(kind, arguments.size, arguments.repeats, arguments.rate, arguments.seconds)
        )


if __name__ == "__main__":
    main()
