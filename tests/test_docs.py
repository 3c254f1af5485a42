"""The Python snippets in docs/ run as written (or, where they need a service this
test does not have, at least compile)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus
from aiohttp_wsbus.emit import MAX_EMIT_CHANNELS
from aiohttp_wsbus.emit_batch import MAX_BATCH_MESSAGES
from aiohttp_wsbus.grants import MAX_CHANNEL_LENGTH
from aiohttp_wsbus.presence import MAX_INFO_SIZE
from aiohttp_wsbus.sessions import MAX_CONTROL_CHANNELS
from aiohttp_wsbus.settings import Settings
from aiohttp_wsbus.testing import IdentityProvider
from aiohttp_wsbus.tokens import MAX_TOKEN_LENGTH

from .conftest import JwksServer, MakeToken
from .support import WAIT, close_code, eventually, next_frame, start_bus

ROOT = Path(__file__).parent.parent


def python_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_authorization_snippets_register_what_they_say() -> None:
    authorizer, hooks, database = python_blocks("authorization.md")
    namespace: dict[str, Any] = {}
    exec(compile(authorizer, "authorization.md", "exec"), namespace)  # noqa: S102
    exec(compile(hooks, "authorization.md", "exec"), namespace)  # noqa: S102
    bus: aiohttp_wsbus.Bus = namespace["bus"]
    assert bus.authorizers["subscribe"].find("order:42") is not None
    assert len(bus.on_connect) == len(bus.on_disconnect) == 1
    # The worked example needs asyncpg and a database: it must at least be valid Python.
    compile(database, "authorization.md", "exec")


async def test_readme_session_snippet_runs_against_a_bus(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Ending sessions", 1)[1]
    (snippet,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    server = await start_bus(aiohttp_client, jwks_server.url)
    socket, _ = await server.open(make_token(sub="bob"), [])
    body = "".join("    " + line + "\n" for line in snippet.splitlines())
    namespace: dict[str, Any] = {}
    exec(f"async def snippet(bus, time):\n{body}", namespace)  # noqa: S102
    await namespace["snippet"](server.bus, time)
    assert await close_code(socket) == 4410
    assert len(server.bus.sessions.revocations) == 1


def test_limits_page_shows_each_limits_default_as_settings_declares_it() -> None:
    text = (ROOT / "docs" / "limits.md").read_text(encoding="utf-8")
    section = text.split("## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[:2] for line in section.splitlines() if line.startswith("| `")]
    defaults = {field.name: field.default for field in fields(Settings)}
    shown = {name.strip("| `"): default for name, default in rows}
    for name, default in shown.items():
        assert default == f"`{defaults[name]!r}`", name
    limits = {"max_connections_per_user", "client_rate", "subscribe_rate", "emit_rate"}
    assert limits | {"max_channels", "max_message_size", "max_connections"} <= set(shown)
    fixed = text.split("## Fixed bounds\n", 1)[1]
    assert f"| channels in one emit | {MAX_EMIT_CHANNELS} |" in fixed
    assert f"| messages in one batch emit | {MAX_BATCH_MESSAGES} |" in fixed
    assert f"| token | {MAX_TOKEN_LENGTH} characters |" in fixed
    assert f"| channels in one control request | {MAX_CONTROL_CHANNELS} |" in fixed
    assert f"1 to {MAX_CHANNEL_LENGTH} of" in fixed
    assert f"| {MAX_INFO_SIZE} bytes of JSON |" in fixed


async def test_presence_snippet_serves_who_is_online(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    (snippet,) = python_blocks("presence.md")
    snippet = snippet.replace("https://idp.example.com/.well-known/jwks.json", jwks_server.url)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "presence.md", "exec"), namespace)  # noqa: S102
    client = await aiohttp_client(namespace["app"])
    socket = await client.ws_connect("/ws")
    token = make_token(sub="alice", channels=["chat:*"], iss=None, aud=None)
    await socket.send_json({"type": "connect", "token": token, "channels": ["chat:lobby"]})
    assert (await socket.receive_json())["type"] == "welcome"
    response = await client.get("/rooms/lobby/online")
    assert await response.json() == {"online": ["alice"]}


async def test_readme_two_way_snippet_stamps_and_answers(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two-way sockets", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)

    def prepare(bus: aiohttp_wsbus.Bus) -> None:
        exec(compile(snippet, "README.md", "exec"), {"bus": bus})  # noqa: S102

    server = await start_bus(aiohttp_client, jwks_server.url, prepare=prepare, client_publish=True)
    socket, _ = await server.open(make_token(sub="alice"), ["chat:lobby"])
    spoofed = {
        "type": "publish",
        "ref": 1,
        "channel": "chat:lobby",
        "data": {"text": "hi", "from": "bob"},
    }
    await socket.send_json(spoofed)
    frames = [await next_frame(socket), await next_frame(socket)]
    assert frames[0]["data"] == {"text": "hi", "from": "alice"}
    assert frames[1]["type"] == "published"
    await socket.send_json({"type": "publish", "ref": 2, "channel": "chat:lobby", "data": 5})
    assert (await next_frame(socket))["error"] == "invalid"
    await socket.send_json({"type": "rpc", "ref": 3, "method": "whoami"})
    answer = await next_frame(socket)
    assert answer["data"] == {"user": "alice", "channels": ["chat:lobby"]}
async def test_readme_worker_resumes_from_its_saved_position_after_a_restart(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, tmp_path: Path
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (worker,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if b.startswith("# worker.py:")
    ]
    server = await start_bus(
        aiohttp_client, wsbus_idp.jwks_url, issuer=wsbus_idp.issuer, audience=wsbus_idp.audience
    )
    url = str(server.client.make_url("/ws"))
    for old, new in [
        ('"wss://bus.example.com/ws"', repr(url)),
        ('Path("positions.json")', f"Path({str(tmp_path / 'positions.json')!r})"),
        ("    ...  # ask your identity provider", "    return TOKEN  # ask your identity provider"),
        ("asyncio.run(main())", ""),
    ]:
        assert old in worker, f"README's worker no longer has {old!r}"
        worker = worker.replace(old, new)
    printed: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    namespace: dict[str, Any] = {
        "TOKEN": wsbus_idp.issue("worker", channels=["orders:*"]),
        "print": lambda *args: printed.put_nowait(args),
    }
    exec(compile(worker, "README.md", "exec"), namespace)  # noqa: S102

    async def run_until_printed(count: int) -> list[tuple[Any, ...]]:
        """Run the worker until it printed `count` lines, then stop it (a process ending)."""
        worker_task = asyncio.create_task(namespace["main"]())
        try:
            await eventually(lambda: bool(server.bus.registry.subscribers("orders:42")))
            if count == 2:
                await server.bus.publish("orders:42", "paid")
                await server.bus.publish("orders:42", "packed")
            async with asyncio.timeout(WAIT):
                return [await printed.get() for _ in range(count)]
        finally:
            worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker_task

    assert await run_until_printed(2) == [(1, "paid"), (2, "packed")]
    await server.bus.publish("orders:42", "shipped")  # while the worker is down
    await eventually(lambda: not server.bus.registry.subscribers("orders:42"))
    assert await run_until_printed(1) == [(3, "shipped")]
    assert printed.empty()


async def test_deploy_freeze_snippet_freezes_start_up_once_the_bus_has_started(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    (snippet,) = [block for block in python_blocks("deploy.md") if "gc.freeze" in block]
    app = web.Application()
    aiohttp_wsbus.setup(app, jwks_url=jwks_server.url)
    namespace: dict[str, Any] = {"app": app}
    exec(compile(snippet, "deploy.md", "exec"), namespace)  # noqa: S102
    assert app.on_startup[-1] is namespace["freeze"]  # after the bus's own start-up
    gc.unfreeze()
    try:
        await aiohttp_client(app)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
