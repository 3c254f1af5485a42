"""The benchmark suite runs end to end (--quick, tiny sizes) and reports well-formed figures.

No timing is asserted: speed is the benchmark's business, not the tests'.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import workloads
from benchmarks.client import payload
from benchmarks.redis_engine import redis_engine
from benchmarks.run import MODES, SERVER_CORE, make_keys, paired, run_server
from benchmarks.system import process_cpu_seconds, rss_bytes, tick_cpu_seconds
from benchmarks.workloads import FANOUT_CHANNEL, Result

from .support import WAIT
from .test_workers import children_of

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_WORKLOADS = {
    "memory",
    "memory from outside, 0.5 s after",
    "memory from outside, 5 s after",
    "fan-out via HTTP emit",
    "fan-out via in-process publish",
    "fan-out via in-process concurrent publish",
    "latency at 5 msg/s",
    "connect storm, new tokens",
    "reconnect storm, same tokens",
    "many channels",
    "many channels, shared channel via HTTP emit",
    "many channels, one message per own channel via HTTP emit",
    "many channels, one message per own channel via in-process publish",
}
# Only the bus publishes from a client: the two-way workload, as ratios to HTTP emit.
TWO_WAY_WORKLOADS = {
    "two-way: round trip via HTTP emit",
    "two-way: round trip via client publish",
    "two-way: client publish round trip / HTTP emit's",
    "two-way: fan-out via HTTP emit",
    "two-way: fan-out via client publish",
    "two-way: client publish fan-out / HTTP emit's",
    # and a batch emit's messages/s against one message per request
    "batch emit: one message per request",
    "batch emit: 100 messages per request",
    "batch emit: batch / single",
}


def run_tool(module: str, *arguments: str) -> str:
    """`python -m MODULE ARGUMENTS`: its output, once it exited 0."""
    run = subprocess.run(  # noqa: S603 (a fixed command line)
        [sys.executable, "-m", module, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def run_quick(tmp_path: Path, *arguments: str) -> tuple[str, list[dict[str, Any]]]:
    """`python -m benchmarks --quick ARGUMENTS`: its output and its figures, once it
    exited 0 with no figure reporting an error."""
    output = tmp_path / "results.json"
    stdout = run_tool("benchmarks", "--quick", *arguments, "--json", str(output))
    results: list[dict[str, Any]] = json.loads(output.read_text())
    assert not [r for r in results if r["workload"] == "error"], results
    return stdout, results


def test_quick_suite_reports_every_workload_for_the_bus_and_the_bare_loop(
    tmp_path: Path,
) -> None:
    stdout, results = run_quick(tmp_path, "--servers", "wsbus,bare")
    assert {r["server"] for r in results} == {"wsbus", "bare"}
    for server, expected in (
        ("wsbus", EXPECTED_WORKLOADS | TWO_WAY_WORKLOADS),
        ("bare", EXPECTED_WORKLOADS),
    ):
        workloads = {r["workload"] for r in results if r["server"] == server}
        assert workloads == expected, (server, workloads)
    for result in results:
        assert result["better"] in ("higher", "lower")
        assert isinstance(result["value"], float | int) and math.isfinite(result["value"]), result
        assert result["size"] > 0
        assert "timed out" not in result["note"], result
        if result["metric"] in ("deliveries/s", "connections/s"):
            assert result["value"] > 0, result
    # The latency workload is also a fan-out at a fixed rate: what one delivery cost.
    latency_metrics = {
        (r["server"], r["metric"]) for r in results if r["workload"].startswith("latency")
    }
    for server in ("wsbus", "bare"):
        assert (server, "server CPU per delivery") in latency_metrics, latency_metrics

    assert "| workload | N | metric | bare | wsbus | load generator CPU |" in stdout
    assert re.search(r"\(\d+\.\d\d\N{MULTIPLICATION SIGN}\)", stdout), stdout  # ratios vs bare


def test_limits_on_and_off_are_reported_as_one_ratio_per_figure() -> None:
    def result(server: str, value: float) -> Result:
        storm = "connect storm, new tokens"
        return Result(server, storm, 3000, "connections/s", value, "/s", "higher")

    results = [result("bare", 4000), result("wsbus_unlimited", 2000), result("wsbus_limits", 1900)]
    report = paired(results, ["bare", "wsbus_unlimited", "wsbus_limits"])
    row = "| connect storm, new tokens | 3000 | connections/s | 0.95\N{MULTIPLICATION SIGN} |"
    assert row in report
    assert paired(results, ["bare", "wsbus_limits"]) == ""


def test_broker_redis_runs_the_bus_on_a_redis_of_its_own_and_reports_its_cpu(
    tmp_path: Path,
) -> None:
    stdout, results = run_quick(
        tmp_path, "--servers", "wsbus", "--broker", "memory,redis", "--workloads", "fanout"
    )
    assert {r["server"] for r in results} == {"wsbus", "wsbus+redis"}
    redis_cpu = [r for r in results if r["metric"] == "Redis CPU per delivery"]
    assert redis_cpu and {r["server"] for r in redis_cpu} == {"wsbus+redis"}
    # CPU time is read in clock ticks: a quick run's few messages may read 0.
    assert all(math.isfinite(r["value"]) and r["value"] >= 0 for r in redis_cpu), redis_cpu
    assert "| workload | N | metric | Redis / memory |" in stdout


def test_workers_run_the_bus_once_per_count_and_report_two_against_one(
    tmp_path: Path,
) -> None:
    stdout, results = run_quick(
        tmp_path,
        *("--servers", "wsbus", "--broker", "redis", "--workers", "1,2"),
        *("--workloads", "fanout,storm"),
    )
    two = "wsbus+redis\N{MULTIPLICATION SIGN}2"
    assert {r["server"] for r in results} == {"wsbus+redis", two}
    for server in ("wsbus+redis", two):
        figures = {(r["workload"], r["metric"]) for r in results if r["server"] == server}
        for via in ("HTTP emit", "in-process publish"):
            assert (f"fan-out via {via}", "server CPU per delivery") in figures, figures
        assert ("connect storm, new tokens", "connections/s") in figures, figures
    # Every delivery arrived: a publish on one worker reached the other's subscribers.
    assert not [r for r in results if "timed out" in r["note"]], results
    assert "| workload | N | metric | 2 workers / 1 worker |" in stdout


def test_emit_cost_reports_cpu_per_message_for_each_form() -> None:
    tiny = ["--subscribers", "20", "--cpu", "0.01", "--repeats", "1"]
    stdout = run_tool("benchmarks.emit_cost", *tiny)
    figures = dict(re.findall(r"^(.+): ([0-9.]+) µs server CPU per message", stdout, re.M))
    assert set(figures) == {
        "bare single",
        "wsbus single",
        "wsbus batch 100",
        "wsbus batch 1000",
    }, stdout
    assert all(float(value) > 0 for value in figures.values()), figures


def test_more_than_one_worker_without_a_redis_broker_is_refused() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--servers", "wsbus", "--workers", "1,2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "--workers above 1 needs --broker redis" in run.stderr


async def test_two_workers_are_measured_as_one_server(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, 0)
    with redis_engine(SERVER_CORE) as redis:
        two = workloads.Server("wsbus", SERVER_CORE, 25, keys, redis, workers=2)
        async with workloads.running(two) as server:
            workers = children_of(server.process.pid)
            assert len(workers) == 2
            assert sorted(server.pids) == sorted([server.process.pid, *workers])
            clients = workloads.Clients(server)
            await clients.add([keys.shared("wsbus")] * 16, [[FANOUT_CHANNEL]] * 16)
            # Both workers' sockets count (the kernel put all 16 on one: 2 in 65536).
            await server.wait_for_connections(16, timeout=WAIT)
            assert server.http is not None
            own = []
            for port in server.worker_ports:
                async with server.http.get(f"http://127.0.0.1:{port}/bench/stats") as response:
                    own.append((await response.json())["connections"])
            assert sum(own) == 16 and all(0 < count < 16 for count in own), own

            # A publish in one worker reaches every subscriber, the other worker's
            # through Redis.
            clients.stats.reset(16 * 3)
            body = {"channel": FANOUT_CHANNEL, "count": 3, "data": payload()}
            await server.control("/bench/publish", body)
            await asyncio.wait_for(clients.stats.reached.wait(), WAIT)

            # CPU and memory are every process's: each worker has run its own bus.
            cpu = [process_cpu_seconds(pid) for pid in server.pids]
            assert all(cpu[1:]), cpu
            assert server.cpu() >= sum(cpu)
            assert server.rss() > 1.5 * max(rss_bytes(pid) for pid in server.pids)
            await clients.close()


# A child that spends 0.3 s of CPU in its main thread and 0.2 s in a second one,
# measured by each thread's own clock, then waits to be read (both threads alive).
_BURNER = """
import sys, threading, time
def burn(seconds):
    while time.thread_time() < seconds:
        pass
done, read = threading.Event(), threading.Event()
def second():
    burn(0.2)
    done.set()
    read.wait(30)
thread = threading.Thread(target=second)
thread.start()
burn(0.3)
done.wait(30)
print("BURNT", flush=True)
sys.stdin.readline()
read.set()
"""


def test_process_cpu_is_read_below_the_clock_tick_and_counts_every_thread() -> None:
    with subprocess.Popen(  # noqa: S603 (a fixed command line)
        [sys.executable, "-c", _BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline() == "BURNT\n"
            precise, ticks = process_cpu_seconds(child.pid), tick_cpu_seconds(child.pid)
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    assert precise >= 0.5, precise  # both threads
    assert abs(precise - ticks) < 0.03, (precise, ticks)  # the same clock, finer
    # Nanoseconds, not 10 ms ticks: a whole number of ticks would be a 1 in 10^7 chance.
    assert round(precise * 100) != precise * 100, precise


async def test_a_group_that_fails_keeps_the_figures_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*arguments: object) -> list[Result]:
        raise ConnectionError("closed before ready")

    monkeypatch.setattr(workloads, "storm", broken)
    keys = make_keys(tmp_path, MODES["quick"].storm)
    results = await run_server("wsbus", MODES["quick"], keys, {"fanout", "storm"}, print)
    assert "fan-out via HTTP emit" in {r.workload for r in results}
    failed = [r for r in results if r.workload == "error"]
    assert [r.note for r in failed] == ["connect storm: ConnectionError: closed before ready"]


@pytest.mark.parametrize("mode", ["timed", "off", "frozen"])
def test_connect_cost_prints_each_storms_cost_per_connection(mode: str) -> None:
    stdout = run_tool(
        "benchmarks.connect_cost", "wsbus", "--size", "5", "--repeats", "2", "--collector", mode
    )
    cost = r"^wsbus (.+): server CPU µs per connection \d+ \d+, least \d+$"
    costs = re.findall(cost, stdout, re.M)
    assert costs == ["new tokens", "reconnect"]
    closes = r"^wsbus (.+), then closed: server CPU µs per close \d+ \d+, least \d+$"
    assert re.findall(closes, stdout, re.M) == ["new tokens", "reconnect"]
    collected = re.findall(r"^wsbus (.+): of which the collector \d+ \d+$", stdout, re.M)
    assert collected == (["new tokens", "reconnect"] if mode == "timed" else [])
    each = r"^wsbus (.+): of which each generation \(collections:µs\)( \d+:\d+/\d+:\d+/\d+:\d+){2}$"
    generations = re.findall(each, stdout, re.M)
    assert [storm for storm, _ in generations] == collected


def test_connect_cost_runs_a_bus_kind_on_redis_as_kind_plus_redis() -> None:
    stdout = run_tool("benchmarks.connect_cost", "wsbus+redis", "--size", "5", "--repeats", "1")
    cost = r"^wsbus\+redis (.+): server CPU µs per connection \d+, least \d+$"
    assert re.findall(cost, stdout, re.M) == ["new tokens", "reconnect"], stdout


def test_fanout_cost_prints_each_repeats_cost_per_delivery() -> None:
    kinds = ["wsbus", "wsbus_presence", "--size", "5", "--repeats", "2"]
    stdout = run_tool("benchmarks.fanout_cost", *kinds, "--rate", "20", "--seconds", "0.2")
    cost = r"^(\S+): server CPU µs per delivery \d+\.\d\d \d+\.\d\d, least \d+\.\d\d$"
    assert re.findall(cost, stdout, re.M) == ["wsbus", "wsbus_presence"], stdout
    assert len(re.findall(r"^\S+: p99 ms [\d.]+ [\d.]+$", stdout, re.M)) == 2, stdout


async def test_the_floor_speaks_the_protocol_and_checks_tokens_and_the_api_key(
    tmp_path: Path,
) -> None:
    keys = make_keys(tmp_path, 0)
    async with workloads.running(workloads.Server("floor", SERVER_CORE, 25, keys)) as server:
        clients = workloads.Clients(server)
        await clients.add([keys.shared("floor")] * 3, [[FANOUT_CHANNEL, "not:granted"]] * 3)
        await server.wait_for_connections(3, timeout=WAIT)
        clients.stats.reset(3)
        await server.emit(FANOUT_CHANNEL, payload())  # with the API key
        await asyncio.wait_for(clients.stats.reached.wait(), WAIT)
        with pytest.raises(ConnectionError, match="4401"):
            await clients.add(["not-a-token"], [[FANOUT_CHANNEL]])
        assert server.http is not None
        body = {"channel": FANOUT_CHANNEL, "data": payload()}
        async with server.http.post("/emit", json=body) as response:
            assert response.status == 401
