"""The standalone server, `python -m aiohttp_wsbus`, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientWebSocketResponse, web
from pytest_aiohttp import AiohttpServer

from aiohttp_wsbus import CloseCode
from aiohttp_wsbus.cli import (
    BadSetting,
    build_app,
    build_parser,
    make_broker,
    resolve,
    setting_options,
)
from aiohttp_wsbus.settings import Settings, setting_help

from .conftest import AUDIENCE, ISSUER, JwksServer, MakeToken
from .support import WAIT, close_code, next_frame

ROOT = Path(__file__).parent.parent
API_KEY = "c" * 32
LISTENING = re.compile(r"listening on (\S+)")


def clean_environ(**variables: str) -> dict[str, str]:
    """This process's environment without WSBUS_* variables, plus `variables`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WSBUS_")}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(variables)
    return environ


@dataclass
class CliServer:
    """A running `python -m aiohttp_wsbus` and what it wrote to stderr."""

    process: asyncio.subprocess.Process
    address: str = ""
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    is_terminated: bool = False

    @property
    def url(self) -> str:
        return self.address

    def terminate(self) -> None:
        # Once only: a second signal makes aiohttp give up on the graceful shutdown.
        if not self.is_terminated:
            self.is_terminated = True
            self.process.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        """SIGTERM, then the exit status once stderr is drained."""
        self.terminate()
        async with asyncio.timeout(WAIT * 2):
            status = await self.process.wait()
            if self.reader is not None:
                await self.reader
        return status


StartCli = Callable[..., Awaitable[CliServer]]


@pytest.fixture
async def start_cli() -> AsyncIterator[StartCli]:
    started: list[CliServer] = []

    async def start(*args: str, **variables: str) -> CliServer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiohttp_wsbus",
            *args,
            env=clean_environ(**variables),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        server = CliServer(process)
        started.append(server)
        listening = asyncio.get_running_loop().create_future()

        async def read_stderr() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:
                line = raw.decode().rstrip("\n")
                server.lines.append(line)
                found = LISTENING.search(line)
                if found and not listening.done():
                    listening.set_result(found.group(1))
            if not listening.done():
                listening.set_exception(AssertionError("\n".join(server.lines)))

        server.reader = asyncio.create_task(read_stderr())
        async with asyncio.timeout(WAIT * 2):
            server.address = await listening
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()
        if server.reader is not None:
            await server.reader


def token_settings(jwks_server: JwksServer) -> dict[str, str]:
    return {"WSBUS_JWKS_URL": jwks_server.url, "WSBUS_ISSUER": ISSUER, "WSBUS_AUDIENCE": AUDIENCE}


async def connect(
    session: aiohttp.ClientSession, url: str, token: str, channels: list[str]
) -> ClientWebSocketResponse:
    socket = await session.ws_connect(url)
    await socket.send_json({"type": "connect", "token": token, "channels": channels})
    return socket


async def test_flags_and_environment_reach_the_settings(
    start_cli: StartCli, jwks_server: JwksServer, make_token: MakeToken, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# emitters\n{API_KEY}\n\n")
    server = await start_cli(
        "--port",
        "0",
        "--base-path",
        "/bus",  # wins over WSBUS_BASE_PATH
        "--api-key-file",
        str(key_file),
        WSBUS_BASE_PATH="/from-env",
        WSBUS_MAX_CONNECTIONS="1",
        WSBUS_METRICS="true",
        **token_settings(jwks_server),
    )
    assert server.url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession(server.url) as session:
        health = await session.get("/bus/health")
        assert (health.status, await health.json()) == (
            200,
            {"status": "ok", "connections": 0, "broker": "ok", "jwks": "fresh"},
        )
        assert (await session.get("/from-env/health")).status == 404
        first = await connect(session, "/bus", make_token(), ["chat:a"])
        assert (await next_frame(first))["type"] == "welcome"
        second = await connect(session, "/bus", make_token(), ["chat:a"])
        assert await close_code(second) == CloseCode.TRY_AGAIN_LATER  # max_connections=1
        emitted = await session.post(
            "/bus/emit", json={"channel": "chat:a", "data": "hi"}, headers={"X-API-Key": API_KEY}
        )
        assert emitted.status == 202
        assert (await next_frame(first))["data"] == "hi"
        metrics = await session.get("/bus/metrics", headers={"X-API-Key": API_KEY})
        assert "wsbus_messages_published_total 1.0" in await metrics.text()
        await first.close()
    assert await server.stop() == 0


async def test_start_up_objects_are_frozen_out_of_the_collectors_reach(
    start_cli: StartCli, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_cli("--port", "0", "--log-level", "debug", **token_settings(jwks_server))
    frozen = [re.search(r"froze (\d+) start-up objects", line) for line in server.lines]
    counts = [int(found.group(1)) for found in frozen if found]
    # Modules and the app: tens of thousands of objects (aiohttp alone makes more).
    assert len(counts) == 1 and counts[0] > 10_000, server.lines
    async with aiohttp.ClientSession(server.url) as session:  # and it serves as before
        socket = await connect(session, "/ws", make_token(), ["chat:a"])
        assert (await next_frame(socket))["type"] == "welcome"
        await socket.close()
    assert await server.stop() == 0


async def test_sigterm_closes_connected_clients_with_1001(
    start_cli: StartCli, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await start_cli("--port", "0", **token_settings(jwks_server))
    async with aiohttp.ClientSession(server.url) as session:
        socket = await connect(session, "/ws", make_token(), ["chat:a"])
        assert (await next_frame(socket))["type"] == "welcome"
        server.terminate()
        assert await close_code(socket) == CloseCode.GOING_AWAY
    assert await server.stop() == 0, server.lines
    assert server.lines[-1].endswith("aiohttp_wsbus: stopped")


async def test_sigterm_with_an_emit_body_still_arriving_exits_within_close_timeout(
    start_cli: StartCli, jwks_server: JwksServer
) -> None:
    server = await start_cli(
        "--port", "0", "--api-key", API_KEY, "--close-timeout", "1", **token_settings(jwks_server)
    )
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /ws/emit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-API-Key: {API_KEY}\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    async with asyncio.timeout(WAIT):  # the request has reached its handler
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b'{"channel": "a", ')
    await writer.drain()
    server.terminate()
    # aiohttp alone would wait 60 s for this request; the bus cuts it at close_timeout.
    async with asyncio.timeout(1 + 3):
        answer = await reader.read()
        assert await server.process.wait() == 0
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert answer.endswith(b'{"error": "shutting_down"}'), answer
    writer.close()


class ApplicationAuthorizer:
    """The application behind --authorize-url: a small aiohttp app on loopback."""

    def __init__(self) -> None:
        self.requests: list[tuple[str | None, dict[str, Any]]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.headers.get("X-API-Key"), body))
        if self.status != 200:
            return web.json_response({"error": "nope"}, status=self.status)
        owned = {f"order:{n}" for n in range(1, 4)} if body["user"] == "alice" else set()
        return web.json_response({"allow": [c for c in body["channels"] if c in owned]})


async def test_authorize_url_decides_channels_the_token_does_not_grant(
    start_cli: StartCli,
    jwks_server: JwksServer,
    make_token: MakeToken,
    aiohttp_server: AiohttpServer,
) -> None:
    application = ApplicationAuthorizer()
    app = web.Application()
    app.router.add_post("/authorize", application.handle)
    authorize = await aiohttp_server(app)
    server = await start_cli(
        "--port",
        "0",
        "--api-key",
        API_KEY,
        "--authorize-timeout",
        "1",
        WSBUS_AUTHORIZE_URL=str(authorize.make_url("/authorize")),
        **token_settings(jwks_server),
    )
    token = make_token(sub="alice", channels=["chat:*"], plan="pro")
    async with aiohttp.ClientSession(server.url) as session:
        socket = await connect(session, "/ws", token, ["chat:a", "order:1", "order:9"])
        welcome = await next_frame(socket)
        assert welcome["subscribed"] == ["chat:a", "order:1"]
        assert welcome["denied"] == {"order:9": "forbidden"}
        # One request per frame, for the ungranted channels only, with the claims, no token.
        assert len(application.requests) == 1
        api_key, body = application.requests[0]
        assert api_key == API_KEY
        assert body["action"] == "subscribe"
        assert (body["user"], body["channels"]) == ("alice", ["order:1", "order:9"])
        assert body["claims"]["plan"] == "pro"
        assert token not in json.dumps(body)
        # The webhook decides subscriptions only: its allow is no publish grant.
        emitted = await session.post(
            "/ws/emit",
            json={"channel": "order:1", "data": 1},
            headers={"Authorization": "Bearer " + make_token(sub="alice", publish=[])},
        )
        assert emitted.status == 403
        assert len(application.requests) == 1
        for status, verdict in ((403, "forbidden"), (500, "unavailable")):
            application.status = status
            await socket.send_json({"type": "subscribe", "channels": ["order:2", "order:3"]})
            answer = await next_frame(socket)
            assert answer["denied"] == {"order:2": verdict, "order:3": verdict}
        await socket.close()
    assert await server.stop() == 0


async def test_authorize_url_needs_an_http_url_and_an_api_key(jwks_server: JwksServer) -> None:
    settings = token_settings(jwks_server)
    cli = (sys.executable, "-m", "aiohttp_wsbus")
    status, lines = await run_to_exit(
        *cli, "--api-key", API_KEY, "--authorize-url", "ftp://x", **settings
    )
    assert (status, len(lines)) == (2, 1)
    assert "--authorize-url / WSBUS_AUTHORIZE_URL: must be an http" in lines[0]
    status, lines = await run_to_exit(*cli, "--authorize-url", "http://127.0.0.1:1/a", **settings)
    assert (status, len(lines)) == (2, 1)
    assert "needs an API key" in lines[0]


async def test_unix_socket_and_an_access_log_without_query_strings(
    start_cli: StartCli, jwks_server: JwksServer, make_token: MakeToken, tmp_path: Path
) -> None:
    path = tmp_path / "wsbus.sock"
    server = await start_cli(
        "--path", str(path), "--allow-query-token", **token_settings(jwks_server)
    )
    assert server.url == f"unix:{path}"
    token = make_token()
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession("http://wsbus", connector=connector) as session:
        socket = await session.ws_connect(f"/ws?token={token}&channels=chat:a")
        assert (await next_frame(socket))["subscribed"] == ["chat:a"]
        await socket.close()
        assert (await session.get("/ws/health?token=" + token)).status == 200
    assert await server.stop() == 0
    log = "\n".join(server.lines)
    assert '"GET /ws HTTP/1.1" 101' in log
    assert '"GET /ws/health HTTP/1.1" 200' in log
    assert token not in log
    assert "token=" not in log
    assert not path.exists()  # removed on the way out


async def run_to_exit(*command: str, **variables: str) -> tuple[int, list[str]]:
    process = await asyncio.create_subprocess_exec(
        *command,
        env=clean_environ(**variables),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT * 2):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


SECRET = "s" * 32


@pytest.mark.parametrize(
    ("args", "variables", "named"),
    [
        (["--jwt-secret", SECRET, "--max-connections", "0"], {}, "--max-connections"),
        ([], {"WSBUS_JWT_SECRET": SECRET, "WSBUS_HEARTBEAT": "soon"}, "WSBUS_HEARTBEAT"),
        ([], {}, "jwks_url"),
        (["--jwt-secret", SECRET, "--api-key", "short"], {}, "api_keys"),
        (["--jwt-secret", SECRET, "--no-such-flag"], {}, "--no-such-flag"),
    ],
)
async def test_a_bad_setting_exits_2_with_one_line_naming_it(
    args: list[str], variables: dict[str, str], named: str
) -> None:
    status, lines = await run_to_exit(sys.executable, "-m", "aiohttp_wsbus", *args, **variables)
    assert status == 2
    assert len(lines) == 1, lines
    assert named in lines[0]


async def test_redis_url_without_the_redis_broker_exits_2() -> None:
    hide_redis_broker = (
        "import sys; sys.modules['aiohttp_wsbus.brokers.redis'] = None; "
        "from aiohttp_wsbus.cli import main; raise SystemExit(main())"
    )
    status, lines = await run_to_exit(
        sys.executable,
        "-c",
        hide_redis_broker,
        "--jwt-secret",
        SECRET,
        "--redis-url",
        "redis://127.0.0.1:1/0",
    )
    assert status == 2
    assert len(lines) == 1, lines
    assert "--redis-url / WSBUS_REDIS_URL: the Redis broker is not available" in lines[0]


@pytest.mark.parametrize(
    ("args", "variables", "problem"),
    [
        (["--redis-url", "http://127.0.0.1:6379/0"], {}, "must start with redis://"),
        ([], {"WSBUS_REDIS_URL": "redis://:hunter2-secret@127.0.0.1:port/0"}, "Port"),
        (["--redis-url", "redis://127.0.0.1/0?socket_timeout=soon"], {}, "socket_timeout"),
    ],
)
async def test_a_bad_redis_url_exits_2_with_one_line_before_listening(
    args: list[str], variables: dict[str, str], problem: str
) -> None:
    status, lines = await run_to_exit(
        sys.executable, "-m", "aiohttp_wsbus", "--jwt-secret", SECRET, *args, **variables
    )
    assert status == 2
    assert len(lines) == 1, lines
    assert "--redis-url / WSBUS_REDIS_URL: " in lines[0]
    assert problem in lines[0]
    assert "hunter2-secret" not in lines[0]


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://:password@redis.example:6380/1", "unix:///run/r.sock"],
)
def test_redis_urls_of_every_scheme_make_a_redis_broker(url: str) -> None:
    from aiohttp_wsbus import RedisBroker

    broker = make_broker(url)
    assert isinstance(broker, RedisBroker)
    assert broker.url == url


# -- in-process: how flags and variables become settings ----------------------


def test_every_setting_has_a_flag_a_variable_and_its_meaning_from_settings() -> None:
    parser = build_parser()
    help_by_flag = {flag: a.help for a in parser._actions for flag in a.option_strings}
    # `channels` (a mapping) comes from --channels-file instead.
    declared_fields = [f for f in fields(Settings) if f.name != "channels"]
    assert [o.name for o in setting_options()] == [f.name for f in declared_fields]
    for declared, option in zip(declared_fields, setting_options(), strict=True):
        help_text = help_by_flag[option.flag]
        assert help_text is not None
        assert help_text.startswith(setting_help(declared))
        assert f"[env {option.env}" in help_text


def test_flags_win_over_variables() -> None:
    args = build_parser().parse_args(["--leeway", "5", "--algorithms", "RS256,ES256"])
    config = resolve(args, {"WSBUS_LEEWAY": "9", "WSBUS_ISSUER": "https://idp/", "WSBUS_PORT": ""})
    assert config.settings == {
        "leeway": 5.0,
        "algorithms": ["RS256", "ES256"],
        "issuer": "https://idp/",
    }
    assert (config.host, config.port, config.path) == ("127.0.0.1", 8080, None)


def test_list_flags_repeat_and_split_on_commas() -> None:
    args = build_parser().parse_args(
        ["--api-key", "a" * 16, "--api-key", "b" * 16, "--allowed-origins", "https://a,https://b"]
    )
    config = resolve(args, {})
    assert config.settings["api_keys"] == ["a" * 16, "b" * 16]
    assert config.settings["allowed_origins"] == ["https://a", "https://b"]


def test_none_turns_off_an_optional_number() -> None:
    config = resolve(build_parser().parse_args([]), {"WSBUS_HEARTBEAT": "none"})
    assert config.settings == {"heartbeat": None}


def test_channels_come_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text('{"typing:*": {"history_size": 0}}', encoding="utf-8")
    config = resolve(build_parser().parse_args(["--channels-file", str(path)]), {})
    assert config.settings == {"channels": {"typing:*": {"history_size": 0}}}
    path.write_text("{nope", encoding="utf-8")
    with pytest.raises(BadSetting, match=r"--channels-file / WSBUS_CHANNELS_FILE: .* not JSON"):
        resolve(build_parser().parse_args([]), {"WSBUS_CHANNELS_FILE": str(path)})
    path.write_text('{"typing:*": {"history_size": -1}}', encoding="utf-8")
    secret = {"WSBUS_JWT_SECRET": "s" * 32}
    config = resolve(build_parser().parse_args(["--channels-file", str(path)]), secret)
    with pytest.raises(BadSetting, match=r"'typing:\*': history_size: .*--channels-file"):
        build_app(config)


def test_a_rate_is_two_numbers_or_none() -> None:
    args = build_parser().parse_args(["--emit-rate", "2.5,10"])
    config = resolve(args, {"WSBUS_CLIENT_RATE": "none"})
    assert config.settings == {"client_rate": None, "emit_rate": [2.5, 10]}
    with pytest.raises(BadSetting, match="--subscribe-rate / WSBUS_SUBSCRIBE_RATE"):
        resolve(build_parser().parse_args(["--subscribe-rate", "50"]), {})


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("off", False), ("Yes", True)])
def test_boolean_variables(raw: str, expected: bool) -> None:
    config = resolve(build_parser().parse_args([]), {"WSBUS_ALLOW_QUERY_TOKEN": raw})
    assert config.settings == {"allow_query_token": expected}


def test_a_boolean_flag_wins_over_its_variable() -> None:
    args = build_parser().parse_args(["--no-metrics"])
    assert resolve(args, {"WSBUS_METRICS": "true"}).settings == {"metrics": False}


def test_bad_boolean_names_the_variable() -> None:
    with pytest.raises(BadSetting, match="WSBUS_METRICS: 'maybe' is not a boolean"):
        resolve(build_parser().parse_args([]), {"WSBUS_METRICS": "maybe"})


def test_api_key_file_adds_to_the_flag(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one per line\n  " + "f" * 16 + "  \n\n")
    args = build_parser().parse_args(["--api-key", "a" * 16, "--api-key-file", str(key_file)])
    assert resolve(args, {}).settings["api_keys"] == ["a" * 16, "f" * 16]


def test_help_exits_0() -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
