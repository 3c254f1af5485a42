"""Process plumbing shared by the server and the load generator: cores, fds, CPU, RSS."""

from __future__ import annotations

import os
import resource

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pin_to_core(core: int) -> None:
    """Run this process on one core only (when the machine has it)."""
    if core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; return the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds a process has used so far, to the nanosecond where the kernel says.

    /proc/PID/stat counts in clock ticks (10 ms): a fan-out that costs the server
    0.1 s would be read to 10%. Each thread's schedstat holds its time on a CPU
    in nanoseconds; their sum is the process's (a thread that has exited is no
    longer counted, and the servers measured keep theirs). Without schedstat
    (a kernel built without it), the ticks.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
        total_ns = 0
        for thread in threads:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as schedstat:
                total_ns += int(schedstat.read().split()[0])
        return total_ns / 1e9
    except (FileNotFoundError, ValueError, IndexError):  # no schedstat, or a thread just left
        return tick_cpu_seconds(pid)


def tick_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process from /proc/PID/stat, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces: fields are counted after its ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
