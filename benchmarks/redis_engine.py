"""A redis-server of the benchmark's own (`--broker redis`): a free loopback port, no
persistence, pinned to the servers' core, its CPU read like theirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

from .system import process_cpu_seconds

__all__ = ["RedisEngine", "redis_engine"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisEngine:
    """One running redis-server."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.url = f"redis://127.0.0.1:{port}/0"
        self._port = port

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self._port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)  # polling a starting process, bounded by the deadline


@contextlib.contextmanager
def redis_engine(core: int) -> Iterator[RedisEngine]:
    """Start redis-server on a free port, pinned to `core`; stop it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("--broker redis needs redis-server on PATH")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = RedisEngine(process, port)
    try:
        os.sched_setaffinity(process.pid, {core})
        engine.wait_ready()
        yield engine
    finally:
        process.kill()
        process.wait()
