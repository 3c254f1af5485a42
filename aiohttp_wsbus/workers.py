"""`wsbus --workers N`: N server processes on one port, for every core of a machine.

Each worker binds its own listening socket with SO_REUSEPORT, so the kernel
spreads new connections over them; the workers share one bus through Redis.
The parent reserves the port first (bound, never listening, so it is given no
connection), forks the workers, hands SIGTERM and SIGINT on to them and waits:
one graceful shutdown for all. A worker that dies takes the others down (a
supervisor such as systemd restarts the whole server), and its status is the
server's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Final

__all__ = ["MAX_WORKERS", "reserve_port", "run_workers"]

MAX_WORKERS: Final = 256
_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (not listening yet)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(host: str, port: int) -> tuple[socket.socket, str]:
    """Bind host:port for the workers (port 0 picks one); the socket and its address."""
    sock = reuse_port_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if sock.family == socket.AF_INET6 else bound_host
    return sock, f"http://{shown}:{bound_port}"


def run_workers(
    count: int,
    reserved: socket.socket,
    serve: Callable[[socket.socket], int],
    on_ready: Callable[[], None],
) -> int:
    """Fork `count` workers, each running `serve` on its own SO_REUSEPORT socket on
    the reserved address; call `on_ready` once every one listens. Return once all
    have stopped: 0, or the first failure's status."""
    host, port = reserved.getsockname()[:2]
    parent = os.getpid()
    ready_reader, ready_writer = os.pipe()
    children: dict[int, int] = {}  # pid -> worker number
    for number in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with(parent)
                os.close(ready_reader)
                reserved.close()
                sock = reuse_port_socket(host, port)
                sock.listen(128)
                os.write(ready_writer, b".")  # listening: connections queue from now on
                os.close(ready_writer)
                status = serve(sock)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = number
    os.close(ready_writer)

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        if _count_ready(ready_reader, count) == count:
            on_ready()
        while children:
            pid, wait_status = os.wait()
            if pid not in children:
                continue
            del children[pid]
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0 and status == 0:
                status = code if code > 0 else 1
                forward(signal.SIGTERM, None)  # one worker down: stop them all
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
    return status


def _count_ready(reader: int, count: int) -> int:
    """How many workers said they listen (fewer: the others failed before that)."""
    ready = 0
    with os.fdopen(reader, "rb", buffering=0) as pipe:
        while ready < count:
            chunk = pipe.read(count - ready)
            if not chunk:  # every worker closed its end
                break
            ready += len(chunk)
    return ready


def _die_with(parent: int) -> None:
    """Have the kernel SIGTERM this worker when the parent dies, even by SIGKILL:
    a worker must never outlive its server (and hold the port)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)
