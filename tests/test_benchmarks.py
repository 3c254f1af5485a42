"""The benchmark suite runs end to end (--quick, tiny sizes) and reports well-formed figures.

No timing is asserted: speed is the benchmark's business, not the tests'.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.run import paired
from benchmarks.workloads import Result

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_WORKLOADS = {
    "memory",
    "memory from outside, 0.5 s after",
    "memory from outside, 5 s after",
    "fan-out via HTTP emit",
    "fan-out via in-process publish",
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


def run_quick(tmp_path: Path, *arguments: str) -> tuple[str, list[dict[str, Any]]]:
    """`python -m benchmarks --quick ARGUMENTS`: its output and its figures, once it
    exited 0 with no figure reporting an error."""
    output = tmp_path / "results.json"
    run = subprocess.run(  # noqa: S603 (a fixed command line)
        [sys.executable, "-m", "benchmarks", "--quick", *arguments, "--json", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(output.read_text())
    assert not [r for r in results if r["workload"] == "error"], results
    return run.stdout, results


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
