"""The servers under test, each run alone in a process pinned to one core.

`python -m benchmarks.servers KIND CORE HEARTBEAT KEYDIR WORKERS` binds a free
loopback port, prints `READY <port>` and serves until SIGTERM. With WORKERS > 1 (a
bus kind on Redis only) it runs `wsbus --workers`'s own machinery: that many
processes on the port with SO_REUSEPORT, one bus through Redis, each also on a
port of its own, announced as `WORKER <pid> <port>` (how the load generator
reads every worker's CPU, RSS and sockets). Every kind serves:

- its WebSocket endpoint, in its own protocol (benchmarks/client.py speaks each);
- its HTTP emit endpoint (see `EMIT_PATH`);
- `GET /bench/stats` -> {"connections": n};
- `POST /bench/publish` {"channel", "count", "data"}: publish in-process `count` times,
  one after the other (`"concurrent": true`: all at once, gathered);
- `POST /bench/publish_each` {"prefix", "count", "data"}: publish once to each of
  the channels prefix0 .. prefix(count-1).
- `GET /bench/objects` -> {"tracked", "traced"}: after a full collection, the objects
  the garbage collector tracks and the bytes tracemalloc traces (0 unless the server
  runs with PYTHONTRACEMALLOC, as `python -m benchmarks.objects` starts it);
  `POST /bench/objects` keeps a tracemalloc snapshot, and `GET /bench/objects?top=N`
  adds the N source lines whose retained bytes grew most since then ("top").

KINDS: wsbus (this project), bare (the aiohttp floor), floor (the bus's protocol
by hand: bare plus what it cannot skip), asgi_ws 1.0.0 (FastAPI + uvicorn),
socketio (python-socketio on aiohttp).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import importlib
import json
import os
import signal
import socket
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import WSMsgType, web

from .system import pin_to_core, raise_fd_limit

# wsbus_authz: the bus with every channel decided by an authorizer (the tokens'
# grants are read from a claim they lack), to price authorizers against grants.
# wsbus_presence: the bus with presence kept on every bench: channel and read by
# every token (its `channels` claim doubles as the presence grant).
# wsbus_limits / wsbus_unlimited: the bus with every abuse limit on (the socket
# rates, sockets per user, the emit rate, none of them reached) / every one off,
# to price the limits.
# wsbus_header: the bus, its clients offering the token in the handshake (as
# wsbus.js does with tokenInHeader) instead of a connect frame, to price the two.
# floor: the bus's protocol written by hand in the fewest lines (see ProtocolFloor),
# what any server that verifies the same tokens and answers the same frames pays.
KINDS: Final = (
    "wsbus",
    "bare",
    "floor",
    "asgi_ws",
    "socketio",
    "wsbus_authz",
    "wsbus_presence",
    "wsbus_limits",
    "wsbus_unlimited",
    "wsbus_header",
)
# The comparisons run when asked for by name (--servers).
DEFAULT_KINDS: Final = ("wsbus", "bare", "asgi_ws", "socketio")
# What the limits kinds add to setup(): on, but far above what the workloads do.
LIMITS: Final[dict[str, dict[str, Any]]] = {
    "wsbus_limits": {
        "client_rate": (20, 100),
        "subscribe_rate": (50, 256),
        "max_connections_per_user": 1_000_000,
        "emit_rate": (1e9, 1_000_000_000),
    },
    "wsbus_unlimited": {"client_rate": None, "subscribe_rate": None},
}
# The other bus kinds: the two-way workload's publisher sends hundreds of publish
# frames a second, far past the default client_rate (20/s, burst 100), so the
# bucket stays on (every frame still pays for it) but above what it sends.
TWO_WAY_CLIENT_RATE: Final = (1_000_000.0, 1_000_000)
API_KEY: Final = "benchmark-api-key-0123456789"
ISSUER: Final = "https://idp.bench/"
AUDIENCE: Final = "wsbus"
KEY_ID: Final = "bench"
# Set by the load generator for `--broker redis`: the bus kinds share messages through it.
REDIS_URL_VARIABLE: Final = "WSBUS_BENCH_REDIS_URL"
# Set by benchmarks/connect_cost.py: "off" turns the cyclic garbage collector off in
# the server, "timed" times it (its CPU seconds and collections in /bench/stats),
# "frozen" freezes what start-up made once the server listens (as `wsbus` does).
COLLECTOR_VARIABLE: Final = "WSBUS_BENCH_COLLECTOR"
COLLECTOR: Final[dict[str, Any]] = {
    "seconds": 0.0,
    "collections": [0, 0, 0],
    "by_generation": [0.0, 0.0, 0.0],  # seconds each generation's collections took
}
BACKLOG: Final = 4096
EMIT_PATH: Final = {
    "wsbus": "/ws/emit",
    "wsbus_authz": "/ws/emit",
    "wsbus_limits": "/ws/emit",
    "wsbus_unlimited": "/ws/emit",
    "wsbus_presence": "/ws/emit",
    "wsbus_header": "/ws/emit",
    "bare": "/emit",
    "floor": "/emit",
    "asgi_ws": "/ws/emmit",
    "socketio": "/emit",
}

Publish = Callable[[str, Any], Awaitable[object]]


def is_available(kind: str) -> bool:
    """Whether the packages a server kind needs are importable here."""
    needs = {"asgi_ws": ["asgi_ws", "fastapi", "uvicorn"], "socketio": ["socketio"]}
    for name in needs.get(kind, []):
        try:
            importlib.import_module(name)
        except ImportError:
            return False
    return True


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


# -- control routes shared by the aiohttp-based kinds -----------------------


def add_control_routes(app: web.Application, publish: Publish, count: Callable[[], int]) -> None:
    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"connections": count(), "collector": COLLECTOR})

    async def publish_many(request: web.Request) -> web.Response:
        body = await request.json()
        count, channel, data = body["count"], body["channel"], body["data"]
        if body.get("concurrent"):
            await asyncio.gather(*(publish(channel, data) for _ in range(count)))
        else:
            for _ in range(count):
                await publish(channel, data)
        return web.json_response({"published": count})

    async def publish_each(request: web.Request) -> web.Response:
        body = await request.json()
        prefix = body["prefix"]
        for n in range(body["count"]):
            await publish(f"{prefix}{n}", body["data"])
        return web.json_response({"published": body["count"]})

    app.router.add_get("/bench/stats", stats)
    app.router.add_post("/bench/publish", publish_many)
    app.router.add_post("/bench/publish_each", publish_each)
    add_object_routes(app)


def add_object_routes(app: web.Application) -> None:
    """`/bench/objects`: what the process retains, for `python -m benchmarks.objects`."""
    snapshots: list[tracemalloc.Snapshot] = []

    def retained() -> dict[str, Any]:
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        return {"tracked": len(gc.get_objects()), "traced": traced}

    async def measure(request: web.Request) -> web.Response:
        figures = retained()
        top = int(request.query.get("top", "0"))
        if top and snapshots:
            grown = tracemalloc.take_snapshot().compare_to(snapshots[-1], "lineno")
            figures["top"] = [
                [str(stat.traceback), stat.size_diff, stat.count_diff] for stat in grown[:top]
            ]
        return web.json_response(figures)

    async def keep(request: web.Request) -> web.Response:
        figures = retained()
        if tracemalloc.is_tracing():
            snapshots[:] = [tracemalloc.take_snapshot()]
        return web.json_response(figures)

    app.router.add_get("/bench/objects", measure)
    app.router.add_post("/bench/objects", keep)


# -- the kinds ---------------------------------------------------------------


async def wsbus_app(
    heartbeat: float,
    jwks_url: str,
    prefix: str,
    *,
    authorized: bool = False,
    presence: bool = False,
    **limits: Any,
) -> web.Application:
    import aiohttp_wsbus

    app = web.Application()
    bus = aiohttp_wsbus.setup(
        app,
        jwks_url=jwks_url,
        issuer=ISSUER,
        audience=AUDIENCE,
        api_keys=[API_KEY],
        heartbeat=heartbeat,
        max_channels=4,
        # No token carries this claim: every channel goes to the authorizers below.
        channels_claim="authorized_elsewhere" if authorized else "channels",
        presence=["bench:*"] if presence else [],
        presence_claim="channels",
        client_publish=True,  # the two-way workload
        broker=_broker(prefix),
        **({"client_rate": TWO_WAY_CLIENT_RATE} | limits),
    )
    if authorized:

        @bus.authorizer("bench:{name}")
        @bus.authorizer("own:{name}")
        async def allow(claims: aiohttp_wsbus.Claims, name: str) -> bool:
            return True

    add_control_routes(app, bus.publish, lambda: bus.open_sockets)
    return app


def _broker(prefix: str) -> Any:
    """A RedisBroker on the load generator's redis-server, or None (MemoryBroker)."""
    url = os.environ.get(REDIS_URL_VARIABLE)
    if not url:
        return None
    from aiohttp_wsbus import RedisBroker

    return RedisBroker(url, prefix=prefix)


class BareLoop:
    """The floor: aiohttp's own WebSocket, a dict of channels, `await ws.send_str` per socket.

    No auth and no grants; the same WebSocket settings as the bus.
    """

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.channels: dict[str, set[web.WebSocketResponse]] = {}
        self.count = 0

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat, max_msg_size=65536, compress=False)
        await ws.prepare(request)
        joined = await self.admit(request, ws)
        if joined is None:
            return ws
        self.count += 1
        for channel in joined:
            self.channels.setdefault(channel, set()).add(ws)
        try:
            async for message in ws:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.count -= 1
            for channel in joined:
                self.channels[channel].discard(ws)
        return ws

    async def admit(self, request: web.Request, ws: web.WebSocketResponse) -> list[str] | None:
        """The channels the socket joins (None: refused, and closed)."""
        return [c for c in request.query.get("channels", "").split(",") if c]

    separators: tuple[str, str] | None = None  # json.dumps's own

    async def publish(self, channel: str, data: Any) -> None:
        message = {"type": "message", "channel": channel, "data": data}
        text = json.dumps(message, separators=self.separators)
        for ws in list(self.channels.get(channel, ())):
            await ws.send_str(text)

    async def emit(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self.publish(body["channel"], body["data"])
        return web.json_response({"ok": True}, status=202)


class ProtocolFloor(BareLoop):
    """The bare loop plus the least the bus's protocol asks of any server, by hand.

    A connect frame with an RS256 token (PyJWT's decode: signature, exp, iss, aud),
    verified claims kept by sha256(token) for reconnects, the channels checked
    against the token's `channels` patterns, a welcome, and an API key on emit.
    No history, offsets, limits, hooks, expiry timers or close codes: it prices
    the protocol, so the bus's own cost is what it costs beyond this.
    """

    separators = (",", ":")  # the protocol's compact frames, as its clients read them

    def __init__(self, heartbeat: float, public_key: str) -> None:
        # Imported here: the bare loop's process must not hold them.
        import jwt
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        super().__init__(heartbeat)
        self.jwt = jwt
        key = load_pem_public_key(public_key.encode())
        assert isinstance(key, RSAPublicKey)
        self.key = key  # parsed once, as the bus parses its JWKS once
        self.verified: dict[bytes, dict[str, Any]] = {}

    def claims(self, token: str) -> dict[str, Any]:
        digest = hashlib.sha256(token.encode()).digest()
        claims = self.verified.get(digest)
        if claims is None or claims["exp"] <= time.time():
            claims = self.jwt.decode(
                token,
                self.key,
                algorithms=["RS256"],
                issuer=ISSUER,
                audience=AUDIENCE,
                options={"require": ["exp"]},
            )
            self.verified[digest] = claims
        return claims

    async def admit(self, request: web.Request, ws: web.WebSocketResponse) -> list[str] | None:
        try:
            connect = json.loads(await ws.receive_str(timeout=10))
            grants = self.claims(connect["token"])["channels"]
            joined = [c for c in connect["channels"] if any(_granted(g, c) for g in grants)]
        except (ValueError, TypeError, KeyError, TimeoutError, self.jwt.InvalidTokenError):
            await ws.close(code=4401)
            return None
        await ws.send_str(json.dumps({"type": "welcome", "subscribed": joined}))
        return joined

    async def emit(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("X-API-Key", ""), API_KEY):
            return web.json_response({"error": "unauthorized"}, status=401)
        return await super().emit(request)


def _granted(pattern: str, channel: str) -> bool:
    return channel.startswith(pattern[:-1]) if pattern.endswith("*") else channel == pattern


async def floor_app(heartbeat: float, keydir: Path) -> web.Application:
    floor = ProtocolFloor(heartbeat, (keydir / "public.pem").read_text())
    app = web.Application()
    app.router.add_get("/ws", floor.websocket)
    app.router.add_post("/emit", floor.emit)
    add_control_routes(app, floor.publish, lambda: floor.count)
    return app


async def bare_app(heartbeat: float) -> web.Application:
    bare = BareLoop(heartbeat)
    app = web.Application()
    app.router.add_get("/ws", bare.websocket)
    app.router.add_post("/emit", bare.emit)
    add_control_routes(app, bare.publish, lambda: bare.count)
    return app


async def socketio_app(heartbeat: float, keydir: Path) -> web.Application:
    import jwt

    socketio: Any = importlib.import_module("socketio")
    public_key = (keydir / "public.pem").read_text()
    sio = socketio.AsyncServer(
        async_mode="aiohttp", ping_interval=heartbeat, ping_timeout=heartbeat / 2
    )
    app = web.Application()
    sio.attach(app)
    connected: set[str] = set()

    async def connect(sid: str, environ: object, auth: Any) -> bool:
        try:
            jwt.decode(
                auth["token"], public_key, algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE
            )
        except (jwt.InvalidTokenError, KeyError, TypeError):
            return False
        for channel in auth.get("channels", []):
            await sio.enter_room(sid, channel)
        connected.add(sid)
        return True

    async def disconnect(sid: str, *args: object) -> None:
        connected.discard(sid)

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)

    async def publish(channel: str, data: Any) -> None:
        await sio.emit("message", {"channel": channel, "data": data}, room=channel)

    async def emit(request: web.Request) -> web.Response:
        body = await request.json()
        await publish(body["channel"], body["data"])
        return web.json_response({"ok": True}, status=202)

    app.router.add_post("/emit", emit)
    add_control_routes(app, publish, lambda: len(connected))
    return app


async def serve_asgi_ws(heartbeat: float, keydir: Path, sock: socket.socket) -> None:
    """asgi_ws 1.0.0 on FastAPI + uvicorn, verifying RS256 with the public key as its 'secret'."""
    fastapi: Any = importlib.import_module("fastapi")
    uvicorn: Any = importlib.import_module("uvicorn")
    asgi_ws: Any = importlib.import_module("asgi_ws")
    app = fastapi.FastAPI()
    public_pem = (keydir / "public.pem").read_text()
    asgi_ws.setup_app(app, jwt_secret_key=public_pem, jwt_algorithm="RS256")
    manager = _asgi_ws_manager(app)

    async def stats() -> dict[str, int]:
        return {"connections": len(manager.active_connections)}

    async def publish_many(body: dict[str, Any]) -> dict[str, int]:
        count, channel, data = body["count"], body["channel"], body["data"]
        if body.get("concurrent"):
            await asyncio.gather(*(manager.broadcast(channel, data) for _ in range(count)))
        else:
            for _ in range(count):
                await manager.broadcast(channel, data)
        return {"published": count}

    async def publish_each(body: dict[str, Any]) -> dict[str, int]:
        for n in range(body["count"]):
            await manager.broadcast(f"{body['prefix']}{n}", body["data"])
        return {"published": body["count"]}

    app.add_api_route("/bench/stats", stats, methods=["GET"])
    app.add_api_route("/bench/publish", publish_many, methods=["POST"])
    app.add_api_route("/bench/publish_each", publish_each, methods=["POST"])
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ws_ping_interval=heartbeat,
        ws_ping_timeout=heartbeat / 2,
        backlog=BACKLOG,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    ready(sock)
    await server.serve(sockets=[sock])


def _asgi_ws_manager(app: Any) -> Any:
    """asgi_ws keeps its ConnectionManager in a closure: find it for in-process publishing."""
    for route in app.routes:
        for cell in getattr(getattr(route, "endpoint", None), "__closure__", None) or ():
            if type(cell.cell_contents).__name__ == "ConnectionManager":
                return cell.cell_contents
    raise RuntimeError("asgi_ws ConnectionManager not found")


# -- running ---------------------------------------------------------------


def watch_collector(mode: str) -> None:
    """Turn the cyclic collector off ("off") or time each collection ("timed")."""
    if mode == "off":
        gc.disable()
    elif mode == "timed":
        started = 0.0

        def timed(phase: str, info: dict[str, int]) -> None:
            nonlocal started
            if phase == "start":
                started = time.process_time()
                return
            took = time.process_time() - started
            COLLECTOR["seconds"] += took
            COLLECTOR["collections"][info["generation"]] += 1
            COLLECTOR["by_generation"][info["generation"]] += took

        gc.callbacks.append(timed)


def ready(sock: socket.socket) -> None:
    print("READY", sock.getsockname()[1], flush=True)


async def jwks_site(keydir: Path) -> tuple[web.AppRunner, str]:
    """A JWKS endpoint in this process, started before the bus so its first fetch works."""
    jwks = json.loads((keydir / "jwks.json").read_text())

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"


async def serve(
    kind: str, heartbeat: float, keydir: Path, sock: socket.socket, prefix: str, *, worker: bool
) -> None:
    if kind == "asgi_ws":
        await serve_asgi_ws(heartbeat, keydir, sock)
        return
    extra: list[web.AppRunner] = []
    if kind.startswith("wsbus"):
        jwks_runner, jwks_url = await jwks_site(keydir)
        extra.append(jwks_runner)
        app = await wsbus_app(
            heartbeat,
            jwks_url,
            prefix,
            authorized=kind == "wsbus_authz",
            presence=kind == "wsbus_presence",
            **LIMITS.get(kind, {}),
        )
    elif kind == "bare":
        app = await bare_app(heartbeat)
    elif kind == "floor":
        app = await floor_app(heartbeat, keydir)
    elif kind == "socketio":
        app = await socketio_app(heartbeat, keydir)
    else:
        raise SystemExit(f"unknown server kind {kind!r}; one of {', '.join(KINDS)}")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=BACKLOG).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if os.environ.get(COLLECTOR_VARIABLE) == "frozen":
        gc.collect()
        gc.freeze()
    if worker:
        # The same app on a port of its own: how the load generator asks this worker,
        # not whichever one the kernel picks, for its sockets.
        own = listening_socket()
        await web.SockSite(runner, own, backlog=BACKLOG).start()
        # One write, so that two workers' lines never interleave on the shared pipe.
        os.write(sys.stdout.fileno(), f"WORKER {os.getpid()} {own.getsockname()[1]}\n".encode())
    else:
        ready(sock)
    await stop.wait()
    await runner.cleanup()
    for other in extra:
        await other.cleanup()


def main(argv: list[str]) -> None:
    kind, core, heartbeat, keydir, workers = argv
    count = int(workers)
    if count > 1 and not (kind.startswith("wsbus") and os.environ.get(REDIS_URL_VARIABLE)):
        raise SystemExit("workers > 1: a bus kind on Redis only (the workers share the bus)")
    pin_to_core(int(core))  # before forking: the workers share this core (benchmarks/README.md)
    watch_collector(os.environ.get(COLLECTOR_VARIABLE, ""))
    raise_fd_limit()
    prefix = f"bench-{os.getpid()}"  # one for all workers: one bus

    def run(sock: socket.socket, *, worker: bool) -> int:
        asyncio.run(serve(kind, float(heartbeat), Path(keydir), sock, prefix, worker=worker))
        return 0

    if count == 1:
        run(listening_socket(), worker=False)
        return
    # Imported here: the peers' and the bare loop's RSS must not hold the bus's modules.
    from aiohttp_wsbus.workers import reserve_port, run_workers

    reserved, _ = reserve_port("127.0.0.1", 0)
    sys.exit(
        run_workers(count, reserved, lambda sock: run(sock, worker=True), lambda: ready(reserved))
    )


if __name__ == "__main__":
    main(sys.argv[1:])
