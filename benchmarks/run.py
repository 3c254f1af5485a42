"""The command line: run every workload against every server, print the table, plot it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from aiohttp_wsbus.workers import MAX_WORKERS

from . import batch, two_way, workloads
from .client import BUS_KINDS
from .redis_engine import RedisEngine, redis_engine
from .servers import AUDIENCE, DEFAULT_KINDS, ISSUER, KEY_ID, KINDS, is_available
from .system import pin_to_core, raise_fd_limit
from .workloads import Keys, Result

BASELINE = "bare"
TIMES = "\N{MULTIPLICATION SIGN}"
SERVER_CORE = 0
LOADER_CORE = 1


@dataclass(frozen=True)
class Sizes:
    """How big each workload is in one mode (--quick, default, --full)."""

    fanout: list[int]
    messages: int | None  # per fan-out run; None: about 200k deliveries per run
    latency: list[int]
    latency_rate: float
    latency_seconds: float
    memory: list[int]
    memory_outside: list[int]  # each on a server of its own, tokens of their own
    storm: int
    channels: int
    concurrent: int | None  # connections held through heartbeats (wsbus and bare only)
    settle: float = 1.0  # seconds the server gets to settle before its RSS is read
    concurrent_seconds: float = 12.0
    concurrent_heartbeat: float = 5.0
    round_trips: int = 200  # two-way: messages timed one at a time, each way


MODES = {
    "quick": Sizes(
        fanout=[20],
        messages=5,
        latency=[20],
        latency_rate=5,
        latency_seconds=1,
        memory=[20],
        memory_outside=[20],
        storm=20,
        channels=20,
        concurrent=None,
        settle=0.1,
        round_trips=120,  # past client_rate's default burst (100): the server must allow it
    ),
    "default": Sizes(
        fanout=[2000],
        messages=None,
        latency=[2000],
        latency_rate=5,
        latency_seconds=6,
        memory=[1000],
        memory_outside=[2000, 5000],
        storm=3000,
        channels=2000,
        concurrent=None,
    ),
    "full": Sizes(
        fanout=[1000, 2000, 5000, 10000],
        messages=None,
        latency=[2000, 10000],
        latency_rate=5,
        latency_seconds=6,
        memory=[1000, 10000],
        memory_outside=[2000, 5000],
        storm=3000,
        channels=10000,
        concurrent=15000,
    ),
}
WORKLOADS = ("fanout", "memory", "storm", "channels", "twoway", "batch", "concurrent")


def make_keys(directory: Path, distinct: int) -> Keys:
    """An RSA key, its JWKS and public PEM on disk, and the tokens the workloads use."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (directory / "public.pem").write_bytes(public_pem)
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update(kid=KEY_ID, alg="RS256", use="sig")
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    expires = int(time.time()) + 3600

    def sign(subject: str, audience: str | None) -> str:
        claims: dict[str, Any] = {
            "sub": subject,
            "iss": ISSUER,
            "exp": expires,
            "channels": ["bench:*", "own:*"],
            "publish": ["bench:*"],  # the two-way workload publishes on its socket
        }
        if audience is not None:
            claims["aud"] = audience
        return jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": KEY_ID})

    keys = Keys(directory)
    # asgi_ws checks no audience, and PyJWT refuses a token with one it was not told of.
    for audience in (AUDIENCE, None):
        keys.shared_token[audience] = sign("shared", audience)
        keys.storm_tokens[audience] = [sign(f"user{n}", audience) for n in range(distinct)]
    return keys


async def run_server(
    kind: str,
    sizes: Sizes,
    keys: Keys,
    chosen: set[str],
    log: Callable[[str], None],
    redis: RedisEngine | None = None,
    workers: int = 1,
) -> list[Result]:
    results: list[Result] = []

    async def group(name: str, heartbeat: float, work: Any) -> None:
        log(f"  {column(kind, redis is not None, workers)}: {name}")
        try:
            started = workloads.Server(kind, SERVER_CORE, heartbeat, keys, redis, workers)
            async with workloads.running(started) as server:
                results.extend(await work(server))
        except Exception as error:  # one broken group must not lose the others' figures
            log(f"  {column(kind, redis is not None, workers)}: {name} FAILED: {error!r}")
            results.append(failure(kind, f"{name}: {type(error).__name__}: {error}"))

    if "memory" in chosen:
        await group("memory", 25, lambda s: workloads.memory(s, sizes.memory, sizes.settle))
        for size in sizes.memory_outside:
            await group(
                f"memory from outside, {size}",
                25,
                lambda s, size=size: workloads.memory_outside(s, size),
            )
    if "fanout" in chosen:
        await group(
            "fan-out and latency",
            25,
            lambda s: workloads.fanout_and_latency(
                s,
                sizes.settle,
                sizes.fanout,
                sizes.latency,
                sizes.latency_rate,
                sizes.latency_seconds,
                sizes.messages,
            ),
        )
    if "storm" in chosen:
        await group("connect storm", 25, lambda s: workloads.storm(s, sizes.storm, sizes.settle))
    if "channels" in chosen and kind != "asgi_ws":  # asgi_ws has no channels
        await group(
            "many channels",
            25,
            lambda s: workloads.many_channels(s, sizes.channels, sizes.settle, sizes.messages),
        )
    # The others cannot publish from a client; wsbus_limits keeps the default
    # client_rate, which the two-way publisher passes by design (closed 4429).
    if "twoway" in chosen and kind in BUS_KINDS and kind != "wsbus_limits":
        await group(
            "two-way",
            25,
            lambda s: two_way.two_way(
                s, sizes.settle, sizes.fanout[0], sizes.messages, sizes.round_trips
            ),
        )
    if "batch" in chosen and kind in BUS_KINDS:
        await group("batch emit", 25, lambda s: batch.batch_emit(s, sizes.round_trips * 20))
    if "concurrent" in chosen and sizes.concurrent and kind in ("wsbus", "bare"):
        await group(
            f"{sizes.concurrent} concurrent",
            sizes.concurrent_heartbeat,
            lambda s: workloads.hold(
                s,
                sizes.settle,
                sizes.concurrent or 0,
                sizes.concurrent_seconds,
                sizes.concurrent_heartbeat,
            ),
        )
    return results


def column(kind: str, on_redis: bool, workers: int = 1) -> str:
    """A server's name in the results: `wsbus+redis` for a bus kind on Redis, and
    TIMES and the count after it in more than one worker process (`wsbus+redis` x2)."""
    name = kind + "+redis" if on_redis else kind
    return name + f"{TIMES}{workers}" if workers > 1 else name


def runs(
    kinds: list[str], brokers: list[str], workers: list[int] | None = None
) -> list[tuple[str, bool, int]]:
    """(kind, on Redis, workers) for every server to run: each bus kind on each broker,
    and on Redis once per worker count; the peers once (no broker to choose, no workers)."""
    chosen = []
    for kind in kinds:
        if kind not in BUS_KINDS:
            chosen.append((kind, False, 1))
            continue
        for broker in brokers:
            counts = (workers or [1]) if broker == "redis" else [1]
            chosen += [(kind, broker == "redis", count) for count in counts]
    return chosen


async def run_all(
    kinds: list[str],
    sizes: Sizes,
    chosen: set[str],
    log: Callable[[str], None],
    brokers: list[str] | None = None,
    workers: list[int] | None = None,
) -> list[Result]:
    results: list[Result] = []
    planned = runs(kinds, brokers or ["memory"], workers)
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="wsbus-bench-") as directory,
    ):
        log("making keys and RS256 tokens")
        distinct = [sizes.storm] if "storm" in chosen else []
        if "memory" in chosen:
            distinct += sizes.memory_outside
        keys = make_keys(Path(directory), max(distinct, default=0))
        redis = None
        if any(on_redis for _, on_redis, _ in planned):
            redis = stack.enter_context(redis_engine(SERVER_CORE))
            log(f"redis-server on {redis.url}, core {SERVER_CORE}")
        for kind, on_redis, count in planned:
            found = await run_server(
                kind, sizes, keys, chosen, log, redis if on_redis else None, count
            )
            for result in found:
                result.server = column(kind, on_redis, count)
            results += found
    return results


def failure(server: str, note: str) -> Result:
    """What a group of workloads that failed leaves in the results: its error."""
    return Result(server, "error", 0, "failed", math.nan, "", "higher", note=note)


# -- reporting ---------------------------------------------------------------


def _format(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "/s" or (unit == "" and value >= 100):
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.2f} {unit}".strip() if abs(value) < 10 else f"{value:.1f} {unit}".strip()


def table(results: list[Result], kinds: list[str]) -> str:
    """A Markdown table: one row per figure, one column per server, ratios vs the bare loop."""
    rows: dict[tuple[str, int, str], dict[str, Result]] = {}
    for result in results:
        if result.workload != "error":
            rows.setdefault(result.key, {})[result.server] = result
    header = ["workload", "N", "metric", *kinds, "load generator CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (workload, size, metric), by_server in rows.items():
        base = by_server.get(BASELINE)
        cells = []
        for kind in kinds:
            found = by_server.get(kind)
            if found is None:
                cells.append("")
                continue
            cell = _format(found.value, found.unit)
            if base is not None and kind != BASELINE and base.value and not math.isnan(base.value):
                cell += f" ({found.value / base.value:.2f}{TIMES})"
            if "SATURATED" in found.note or "timed out" in found.note:
                cell += " (!)"
            cells.append(cell)
        loads = [r.loader_cpu for r in by_server.values() if r.loader_cpu is not None]
        load = f"{max(loads) * 100:.0f}% max" if loads else ""
        if loads and max(loads) > workloads.SATURATED:
            load += " (saturated)"
        better = next(iter(by_server.values())).better
        lines.append(
            "| "
            + " | ".join([workload, str(size), f"{metric} ({better} is better)", *cells, load])
            + " |"
        )
    busy = [
        f"- {r.server}, {r.workload} N={r.size}: server core only {r.server_busy * 100:.0f}% busy"
        for r in results
        if r.metric == "deliveries/s" and r.server_busy is not None and r.server_busy < 0.7
    ]
    notes = [f"- {r.server}, {r.workload} N={r.size}: {r.note}" for r in results if r.note]
    if notes or busy:
        lines += ["", "Notes:", *dict.fromkeys(notes), *busy]
    return "\n".join(lines)


# Kinds compared with each other rather than with the bare loop: (this, against it).
PAIRS: Final = {
    "limits on / off": ("wsbus_limits", "wsbus_unlimited"),
    "Redis / memory": ("wsbus+redis", "wsbus"),
    "2 workers / 1 worker": (f"wsbus+redis{TIMES}2", "wsbus+redis"),
}


def paired(results: list[Result], kinds: list[str]) -> str:
    """Each pair of kinds that ran, as one ratio per figure ("limits on / off")."""
    lines = []
    for title, (this, other) in PAIRS.items():
        if this not in kinds or other not in kinds:
            continue
        values = {(r.key, r.server): r for r in results if r.workload != "error"}
        lines += ["", f"| workload | N | metric | {title} |", "|---|---|---|---|"]
        for key in dict.fromkeys(r.key for r in results if r.workload != "error"):
            mine, theirs = values.get((key, this)), values.get((key, other))
            if mine is None or theirs is None or not theirs.value:
                continue
            workload, size, metric = key
            ratio = mine.value / theirs.value
            lines.append(f"| {workload} | {size} | {metric} | {ratio:.2f}{TIMES} |")
    return "\n".join(lines)


def times_better(result: Result, base: Result) -> float:
    """How many times better than the bare loop: value / base, or base / value for a
    cost (lower is better), so that above 1 is always better."""
    if result.better == "higher":
        return result.value / base.value
    return base.value / result.value


def family(workload: str) -> str:
    """The chart panel a workload goes in: its name before a comma or "via", storms together."""
    name = workload.split(",")[0].split(" via ")[0]
    return "connect storms" if "storm" in name else name


def _minor_label(value: float, _: object) -> str:
    """Label 0.2, 0.5, 2, 5, 20...: every minor tick labelled ran into its neighbours."""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


def plot(results: list[Result], kinds: list[str], path: Path) -> None:
    """One panel per workload family, every figure as times better than the bare loop."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    ticker: Any = importlib.import_module("matplotlib.ticker")
    rows: dict[tuple[str, int, str], dict[str, Result]] = {}
    for result in results:
        if result.workload != "error" and not math.isnan(result.value) and result.value:
            rows.setdefault(result.key, {})[result.server] = result
    rows = {key: row for key, row in rows.items() if BASELINE in row}
    panels: dict[str, list[tuple[str, dict[str, Result]]]] = {}
    for (workload, size, metric), row in rows.items():
        label = f"{workload} N={size}\n{metric}"
        panels.setdefault(family(workload), []).append((label, row))
    others = [kind for kind in kinds if kind != BASELINE]
    if not panels or not others:
        return
    heights = [max(1.5, 0.35 * len(entries) * len(others)) for entries in panels.values()]
    figure, all_axes = pyplot.subplots(
        len(panels),
        1,
        figsize=(12, sum(heights) + 1),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    bar = 0.8 / len(others)
    for axes, (name, entries) in zip(all_axes[:, 0], panels.items(), strict=True):
        for index, kind in enumerate(others):
            ratios = [
                times_better(row[kind], row[BASELINE]) if kind in row else math.nan
                for _, row in entries
            ]
            positions = [n + index * bar for n in range(len(entries))]
            axes.barh(positions, ratios, height=bar, label=kind)
        axes.set_xscale("log")  # 0.5x and 2x sit equally far from the floor
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}{TIMES}"))
        axes.xaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
        axes.axvline(1.0, color="black", linewidth=1)
        axes.set_yticks([n + 0.4 - bar / 2 for n in range(len(entries))])
        axes.set_yticklabels([label for label, _ in entries], fontsize=7)
        axes.invert_yaxis()
        axes.set_title(name, fontsize=9, loc="left")
    all_axes[-1, 0].set_xlabel(
        "times better than the bare aiohttp loop, same run (right is better; costs as bare / bus)"
    )
    all_axes[0, 0].legend(fontsize=8)
    figure.suptitle("aiohttp-wsbus benchmarks against the bare aiohttp loop")
    figure.tight_layout(rect=(0, 0, 1, 0.99))  # the title above the first panel's
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="mode",
        help="tiny sizes, seconds (the smoke test's mode)",
    )
    size.add_argument(
        "--full",
        action="store_const",
        const="full",
        dest="mode",
        help="up to 10000 subscribers and 15000 concurrent connections",
    )
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_KINDS),
        help=f"comma-separated, from {','.join(KINDS)} "
        f"(default: those of {','.join(DEFAULT_KINDS)} that are importable)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--broker",
        default="memory",
        help="comma-separated, from memory,redis: the brokers every bus kind runs on "
        "(redis: a redis-server of the run's own, on the servers' core)",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="comma-separated worker counts, e.g. 1,2: each bus kind on Redis runs once "
        "per count, as `wsbus --workers N` does (N processes on one port, sharing the "
        "servers' core); more than 1 needs --broker redis",
    )
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write a chart of the ratios")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    args = parser.parse_args(argv)
    sizes = MODES[args.mode or "default"]
    chosen = set(args.workloads.split(","))
    unknown = chosen - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {sorted(unknown)}")
    kinds = []
    for kind in args.servers.split(","):
        if kind not in KINDS:
            parser.error(f"unknown server {kind!r}")
        if is_available(kind):
            kinds.append(kind)
        else:
            print(f"skipping {kind}: not installed (pip install -e '.[bench]')", flush=True)
    brokers = list(dict.fromkeys(args.broker.split(",")))
    if set(brokers) - {"memory", "redis"}:
        parser.error(f"unknown brokers: {sorted(set(brokers) - {'memory', 'redis'})}")
    workers = _worker_counts(parser, args.workers, brokers)
    if BASELINE in kinds:  # the baseline first, so its figures exist if a peer breaks later
        kinds.remove(BASELINE)
        kinds.insert(0, BASELINE)

    started = time.perf_counter()
    raise_fd_limit()
    pin_to_core(LOADER_CORE)
    cores = os.sched_getaffinity(0)
    print(
        f"load generator on core(s) {sorted(cores)}, servers on core {SERVER_CORE}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    results = asyncio.run(run_all(kinds, sizes, chosen, log, brokers, workers))
    kinds = [column(*planned) for planned in runs(kinds, brokers, workers)]
    print(
        f"\nmode {args.mode or 'default'}, {time.perf_counter() - started:.0f} s, "
        f"load average after {os.getloadavg()[0]:.2f}\n"
    )
    print(table(results, kinds))
    print(paired(results, kinds))
    if args.json:
        args.json.write_text(workloads.dump(results))
    if args.plot:
        plot(results, kinds, args.plot)
        print(f"\nchart written to {args.plot}")


def _worker_counts(parser: argparse.ArgumentParser, raw: str, brokers: list[str]) -> list[int]:
    """--workers as a list of counts; more than one worker only with a Redis broker."""
    try:
        counts = list(dict.fromkeys(int(count) for count in raw.split(",")))
    except ValueError:
        parser.error(f"--workers: comma-separated whole numbers, not {raw!r}")
    if not all(1 <= count <= MAX_WORKERS for count in counts):
        parser.error(f"--workers: each count from 1 to {MAX_WORKERS}, not {raw!r}")
    if max(counts) > 1 and "redis" not in brokers:
        parser.error(
            "--workers above 1 needs --broker redis: the workers share one bus through Redis"
        )
    return counts
