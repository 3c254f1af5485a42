"""The example app over plain HTTP: the demo identity provider, /send, /api/notify, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

import aiohttp_wsbus
from example_app.__main__ import parse_arguments

from .example_server import ExampleServer, free_port, login, open_socket, post, running_example
from .support import WAIT, eventually, next_frame

ROOT = Path(__file__).parent.parent


@pytest.fixture
async def example() -> AsyncIterator[ExampleServer]:
    async with running_example() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


# -- the identity provider ---------------------------------------------------


async def test_login_token_is_rs256_signed_by_the_served_jwks(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    answer = await login(http, example, "bob")
    async with http.get(example.url + "/.well-known/jwks.json") as response:
        (jwk,) = (await response.json())["keys"]
    assert jwt.get_unverified_header(answer["token"])["kid"] == jwk["kid"]
    claims = jwt.decode(
        answer["token"],
        RSAAlgorithm.from_jwk(jwk),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="wsbus",
        issuer=example.url + "/",
    )
    assert claims["sub"] == "bob"
    assert claims["exp"] - claims["iat"] == 120
    assert claims["exp"] == answer["expires_at"]
    assert claims["channels"] == answer["channels"] == ["chat:lobby", "user:bob"]
    assert claims["publish"] == []


async def test_staff_tokens_also_grant_the_staff_room(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    answer = await login(http, example, "alice")
    assert answer["is_staff"] is True
    assert answer["channels"] == ["chat:lobby", "user:alice", "chat:staff"]
    assert [room["channel"] for room in answer["rooms"]] == ["chat:lobby", "chat:staff"]


@pytest.mark.parametrize(
    "body",
    [
        {"user": ""},
        {"user": "Alice"},
        {"user": "a" * 33},
        {"user": "bob smith"},
        {"user": "user:bob"},
        {"user": "chat:*"},
        {"user": 7},
        {},
    ],
)
async def test_login_refuses_names_that_cannot_be_channel_names(
    example: ExampleServer, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    status, answer = await post(http, example.url + "/login", body)
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert list(answer["fields"]) == ["user"]


async def test_login_wants_a_json_body(example: ExampleServer, http: aiohttp.ClientSession) -> None:
    async with http.post(example.url + "/login", data="user=bob") as response:
        assert response.status == 415
        assert await response.json() == {
            "error": "unsupported_media_type",
            "expected": "application/json",
        }
    async with http.post(
        example.url + "/login", data="{", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["fields"] == {"_body": ["body is not valid JSON"]}


async def test_bus_gets_the_apps_own_keys_soon_after_it_listens(
    example: ExampleServer,
) -> None:
    assert example.app is not None
    verifier = aiohttp_wsbus.get_bus(example.app).verifier
    # The first fetch ran before the app listened; the startup retry finds it.
    await eventually(lambda: verifier.key_status == "fresh")


# -- /send -------------------------------------------------------------------


@pytest.mark.parametrize(("room", "recipient"), [("chat:lobby", None), ("user:alice", "alice")])
async def test_send_publishes_the_verified_sender_to_the_room_or_user(
    example: ExampleServer, http: aiohttp.ClientSession, room: str, recipient: str | None
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    socket, welcome = await open_socket(http, example, alice["token"], [room])
    assert welcome["subscribed"] == [room]
    status, answer = await post(
        http, example.url + "/send", {"room": room, "text": "hi"}, bob["token"]
    )
    assert status == 202
    assert answer["published"] == {"channel": room, "offset": 1}
    frame = await next_frame(socket)
    assert frame["channel"] == room
    assert frame["data"] == answer["message"]
    assert (frame["data"]["from"], frame["data"]["text"]) == ("bob", "hi")
    assert frame["data"].get("to") == recipient


async def test_send_to_a_room_the_token_does_not_grant_is_forbidden(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    bob = await login(http, example, "bob")
    status, answer = await post(
        http, example.url + "/send", {"room": "chat:staff", "text": "let me in"}, bob["token"]
    )
    assert (status, answer) == (403, {"error": "forbidden", "room": "chat:staff"})


async def test_send_without_a_valid_token_is_unauthorized(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    body = {"room": "chat:lobby", "text": "hi"}
    async with running_example() as other_server:
        foreign = await login(http, other_server, "bob")  # signed by another key
    for token in (None, "not-a-jwt", foreign["token"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.post(example.url + "/send", json=body, headers=headers) as response:
            assert response.status == 401, token
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert await response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"text": "hi"}, ["room"]),
        ({"room": "chat:lobby"}, ["text"]),
        ({"room": "chat:nowhere", "text": "hi"}, ["room"]),
        ({"room": "user:Bob", "text": "hi"}, ["room"]),
        ({"room": "user:", "text": "hi"}, ["room"]),
        ({"room": "chat:lobby", "text": "   "}, ["text"]),
        ({"room": "chat:lobby", "text": "x" * 2001}, ["text"]),
        ({"room": "chat:lobby", "text": 5}, ["text"]),
        ({"room": "chat:lobby", "text": "hi", "from": "carol"}, ["from"]),
        (["chat:lobby", "hi"], ["_schema"]),
    ],
)
async def test_send_refuses_bad_input_with_the_fields_named(
    example: ExampleServer, http: aiohttp.ClientSession, body: object, fields: list[str]
) -> None:
    bob = await login(http, example, "bob")
    status, answer = await post(http, example.url + "/send", body, bob["token"])
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert sorted(answer["fields"]) == fields


# -- /api/notify ---------------------------------------------------------------


async def test_notify_emits_through_the_emit_endpoint(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    socket, welcome = await open_socket(http, example, alice["token"], ["chat:staff"])
    assert welcome["subscribed"] == ["chat:staff"]
    status, answer = await post(
        http, example.url + "/api/notify", {"channel": "chat:staff", "text": "deployed"}
    )
    assert status == 202
    # The emit endpoint's own answer, relayed: channel, offset and epoch.
    (published,) = answer["published"]
    frame = await next_frame(socket)
    assert (frame["channel"], frame["offset"], frame["epoch"]) == (
        published["channel"],
        published["offset"],
        published["epoch"],
    )
    assert frame["data"]["from"] == "backend"
    assert frame["data"]["kind"] == "notice"
    assert frame["data"]["text"] == "deployed"


async def test_notify_goes_to_the_lobby_by_default(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    status, answer = await post(http, example.url + "/api/notify", {"text": "hello"})
    assert status == 202
    assert answer["published"][0]["channel"] == "chat:lobby"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["text"]),
        ({"text": ""}, ["text"]),
        ({"text": "hi", "channel": "chat:*"}, ["channel"]),
        ({"text": "hi", "channel": "user:no body"}, ["channel"]),
    ],
)
async def test_notify_refuses_bad_input(
    example: ExampleServer, http: aiohttp.ClientSession, body: object, fields: list[str]
) -> None:
    status, answer = await post(http, example.url + "/api/notify", body)
    assert status == 400
    assert sorted(answer["fields"]) == fields


# -- the command line ----------------------------------------------------------


def test_command_line_defaults() -> None:
    settings = parse_arguments([])
    assert (settings.host, settings.port, settings.staff, settings.token_lifetime) == (
        "127.0.0.1",
        8080,
        ("alice", "carol"),
        120,
    )
    assert parse_arguments(["--staff", "dave, erin"]).staff == ("dave", "erin")


@pytest.mark.parametrize(
    "arguments",
    [["--port", "0"], ["--port", "http"], ["--staff", "Dave"], ["--token-lifetime", "1"]],
)
def test_command_line_refuses_bad_values(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(arguments)
    assert exit_info.value.code == 2
    assert f"argument {arguments[0]}: '" in capsys.readouterr().err


async def read_line(process: asyncio.subprocess.Process) -> str:
    """The process's next output line; fails if the output has ended."""
    assert process.stdout is not None
    line = await process.stdout.readline()
    assert line, "the process's output ended"
    return line.decode()


def test_command_line_help_says_to_run_from_the_repository_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    assert "Run it from the repository root" in " ".join(capsys.readouterr().out.split())


def test_ci_install_skips_pip_when_setup_py_is_unchanged() -> None:
    """`bash .ci/example` starts at once: the install it runs first is a no-op the second time."""
    stamp = ROOT / ".venv" / ".installed-test"
    setup_hash = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    assert stamp.read_text().strip() == setup_hash, "run bash .ci/install first"
    bash = shutil.which("bash")
    assert bash is not None
    for arguments in (["--runtime"], []):
        traced = subprocess.run(  # noqa: S603 (a fixed command line)
            [bash, "-x", ".ci/install", *arguments],
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=60,
            env={**os.environ, "CI": "true"},
        )
        assert "-m pip" not in traced.stderr, traced.stderr


async def test_python_dash_m_serves_the_page_and_the_client(http: aiohttp.ClientSession) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "example_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        before_banner: list[str] = []
        async with asyncio.timeout(15):  # an interpreter start and an RSA key
            while f"on http://127.0.0.1:{port}" not in (line := await read_line(process)):
                before_banner.append(line)
        # The bus's first key fetch comes before the app listens: the app says that is fine.
        fetch_line = next(at for at, line in enumerate(before_banner) if "JWKS" in line)
        assert "aiohttp_wsbus.jwks: JWKS not reachable at startup" in before_banner[fetch_line]
        assert "example_app: the JWKS line above is expected" in before_banner[fetch_line + 1]
        base = f"http://127.0.0.1:{port}"
        async with http.get(base + "/") as response:
            assert response.status == 200
            assert 'src="/static/chat.js"' in await response.text()
        async with http.get(base + "/static/chat.js") as response:
            assert 'from "/ws/wsbus.js"' in await response.text()
        async with http.get(base + "/ws/wsbus.js") as response:
            assert response.status == 200
        status, answer = await post(http, base + "/login", {"user": "carol"})
        assert status == 200
        assert "chat:staff" in answer["channels"]
    finally:
        process.terminate()
        output, _ = await process.communicate()
    everything = "".join(before_banner) + output.decode()
    assert process.returncode == 0, everything
    assert "Traceback" not in everything and "WARNING" not in everything, everything
