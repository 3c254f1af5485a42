"""The Python snippets in docs/ run as written (or, where they need a service this
test does not have, at least compile)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pytest_aiohttp import AiohttpClient

import aiohttp_wsbus

from .conftest import JwksServer, MakeToken
from .support import close_code, next_frame, start_bus

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
