"""A real bus for the JS client's Node integration tests: `python -m tests.js_server`.

Listens on loopback ports and prints one JSON line when ready:
`{"port": P, "api_key": K}`. P is free unless given as `--port P`; tokens are
signed with a key made at start, or the PEM RSA key in `--key-file F` (so a
restarted server on the same port accepts the tokens of the one before). On P:

- `{base_path}` (`/ws`): the bus itself (MemoryBroker, `leeway=0` so short-lived
  tokens really expire, presence kept on `chat:*` with at most
  `--max-presence-members` listed), with `api_key` accepted by `POST /ws/emit`;
- `POST /test/token` `{"sub", "channels", "publish", "exp_in", "presence", "info"}`
  (all optional): mints a token the bus accepts for at least `exp_in` seconds (at
  most one more: `exp` is whole seconds), with the `presence` grant (default none)
  and the member `info` (default none) given, answers `{"token": T, "expires_at": EXP}`;
- `POST /test/kill`: aborts every bus socket's transport (a network drop, no
  close frame), answers `{"killed": N}`;
- `POST /test/broker` `{"available": false}`: subscribing to a channel then
  fails as `unavailable` (as with a Redis broker that is down), until `true`;
- `GET /test/subscribers/{channel}`: `{"count": N}`, the sockets subscribed to it;
- `GET /test/rate_limited`: `{kind: N}`, the sockets and emits a limit refused.

`--settings JSON` adds setup() settings (limits, for instance).

Clients may publish over the socket (`client_publish`, with a `publish` claim);
a publish to `stamped:{room}` gets `"from"` set to the token's subject. RPC
methods: `echo` answers `{"user": SUB, "data": DATA}`, `invalid` refuses with
`invalid` ("always invalid").

The JWKS the bus verifies with is served on a second port. The process stops
on SIGTERM or SIGINT, or when its standard input closes (so it never outlives
the test run that started it). Test-only: it mints tokens for anyone who asks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import time
from typing import Any, Final

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import RSAAlgorithm

import aiohttp_wsbus

from .support import SwitchableBroker

HOST: Final = "127.0.0.1"
ISSUER: Final = "https://idp.test/"
AUDIENCE: Final = "wsbus"
KEY_ID: Final = "js-test-key"


class TokenMinter:
    """Signs tokens for the bus with the given key, or one made at start."""

    def __init__(self, key: rsa.RSAPrivateKey | None = None) -> None:
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk["kid"] = KEY_ID
        return {"keys": [jwk]}

    def mint(
        self,
        sub: str,
        channels: list[str],
        publish: list[str],
        exp_in: int,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        now = int(time.time())
        # Rounded up: int() alone could leave a 2 s token barely 1 s to live.
        exp = now + 1 + exp_in
        claims: dict[str, Any] = {
            **(extra or {}),
            "sub": sub,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": exp,
            "channels": channels,
            "publish": publish,
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KEY_ID})
        return token, exp


def jwks_app(minter: TokenMinter) -> web.Application:
    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(minter.jwks())

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    return app


def bus_app(
    minter: TokenMinter, jwks_url: str, api_key: str, settings: dict[str, Any]
) -> web.Application:
    app = web.Application()
    broker = SwitchableBroker()
    bus = aiohttp_wsbus.setup(
        app,
        broker=broker,
        jwks_url=jwks_url,
        issuer=ISSUER,
        audience=AUDIENCE,
        api_keys=[api_key],
        leeway=0,
        close_timeout=1.0,
        client_publish=True,
        presence=["chat:*"],
        **settings,
    )

    @bus.on_publish("stamped:{room}")
    async def stamp(claims: aiohttp_wsbus.Claims, data: Any, room: str) -> Any:
        return {"from": claims.subject, "data": data}

    @bus.rpc("echo")
    async def echo(info: aiohttp_wsbus.ConnectionInfo, data: Any) -> Any:
        return {"user": info.user, "data": data}

    @bus.rpc("invalid")
    async def invalid(info: aiohttp_wsbus.ConnectionInfo, data: Any) -> Any:
        raise ValueError("always invalid")

    async def token(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json() if request.can_read_body else {}
        extra: dict[str, Any] = {c: body[c] for c in ("presence", "info") if c in body}
        minted, expires_at = minter.mint(
            str(body.get("sub", "alice")),
            list(body.get("channels", ["chat:*"])),
            list(body.get("publish", [])),
            int(body.get("exp_in", 300)),
            extra,
        )
        return web.json_response({"token": minted, "expires_at": expires_at})

    async def kill(request: web.Request) -> web.Response:
        connections = list(bus.connections)
        for connection in connections:
            connection.transport.abort()
        return web.json_response({"killed": len(connections)})

    async def subscribers(request: web.Request) -> web.Response:
        count = len(bus.registry.subscribers(request.match_info["channel"]))
        return web.json_response({"count": count})

    async def broker_state(request: web.Request) -> web.Response:
        broker.is_up = bool((await request.json())["available"])
        return web.json_response({"available": broker.is_available})

    app.router.add_post("/test/token", token)
    app.router.add_post("/test/broker", broker_state)
    app.router.add_post("/test/kill", kill)
    app.router.add_get("/test/subscribers/{channel}", subscribers)
    app.router.add_get("/test/rate_limited", lambda _: _json_response(dict(bus.rate_limited)))
    return app


async def _json_response(body: dict[str, Any]) -> web.Response:
    return web.json_response(body)


async def start(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    bound: int = runner.addresses[0][1]
    return runner, bound


async def wait_for_stdin_eof() -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


def load_key(path: str) -> rsa.RSAPrivateKey:
    with open(path, "rb") as pem:
        key = load_pem_private_key(pem.read(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit(f"{path}: not an RSA private key")
    return key


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.js_server")
    parser.add_argument("--port", type=int, default=0, help="the bus's port (default: a free one)")
    parser.add_argument("--key-file", help="PEM RSA private key to sign tokens with")
    parser.add_argument(
        "--max-presence-members",
        type=int,
        default=1000,
        help="users a channel lists before its snapshot is a count (default 1000)",
    )
    parser.add_argument("--settings", default="{}", help="JSON: more setup() settings")
    arguments = parser.parse_args()
    minter = TokenMinter(load_key(arguments.key_file) if arguments.key_file else None)
    api_key = secrets.token_urlsafe(24)
    jwks_runner, jwks_port = await start(jwks_app(minter))
    jwks_url = f"http://{HOST}:{jwks_port}/jwks.json"
    settings = {"max_presence_members": arguments.max_presence_members}
    settings.update(json.loads(arguments.settings))
    bus_runner, port = await start(bus_app(minter, jwks_url, api_key, settings), arguments.port)
    print(json.dumps({"port": port, "api_key": api_key}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stdin_closed = asyncio.create_task(wait_for_stdin_eof())
    stdin_closed.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
    finally:
        stdin_closed.cancel()
        await bus_runner.cleanup()
        await jwks_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
