"""README's quickstart runs as written (the app, the development identity, the listener,
curl), and its settings table says what aiohttp_wsbus.settings says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp

from aiohttp_wsbus.settings import Settings, setting_help

from .example_server import free_port
from .support import WAIT

ROOT = Path(__file__).parent.parent
STARTUP = WAIT * 3  # an interpreter start, imports and an RSA key


def readme_blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", readme, flags=re.DOTALL)


def readme_script(name: str) -> str:
    """The README's Python block that starts with the comment `# NAME: ...`."""
    (script,) = [block for block in readme_blocks("python") if block.startswith(f"# {name}:")]
    return script


def replaced(script: str, old: str, new: str) -> str:
    """`script` with each `old` made `new`; fails if `old` is not there."""
    assert old in script, f"README's snippet no longer has {old!r}"
    return script.replace(old, new)


@asynccontextmanager
async def running(script: str, **environment: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -c script` in the repository root (as `python FILE` there), stopped on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=ROOT,
        env={**os.environ, **environment},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(WAIT * 2):
            await process.wait()


async def line_where(
    process: asyncio.subprocess.Process, is_wanted: Callable[[str], bool], timeout: float = WAIT
) -> str:
    """The process's next output line for which `is_wanted` holds."""
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "the process's output ended"
            if is_wanted(line):
                return line.strip()


def frame_of_type(kind: str) -> Callable[[str], bool]:
    def is_wanted(line: str) -> bool:
        try:
            frame: Any = json.loads(line)
        except ValueError:
            return False
        return isinstance(frame, dict) and frame.get("type") == kind

    return is_wanted


async def test_quickstart_with_the_development_identity_delivers_emit_and_publish() -> None:
    identity_port, app_port = free_port(), free_port()
    # The one change to each snippet: free ports instead of 9000 and 8080, so the test
    # never collides with anything else on the machine.
    identity_script = replaced(readme_script("dev_identity.py"), "9000", str(identity_port))
    app_script = replaced(readme_script("app.py"), "9000", str(identity_port))
    app_script = replaced(app_script, "web.run_app(app)", f"web.run_app(app, port={app_port})")
    listen_script = replaced(readme_script("listen.py"), "8080", str(app_port))
    curl = next(block for block in readme_blocks("sh") if "/ws/emit" in block)
    api_key = re.search(r"X-API-Key: ([^']+)'", curl)
    body = re.search(r"-d '(\{.*\})'", curl)
    assert api_key is not None and body is not None

    async with AsyncExitStack() as processes:
        identity = await processes.enter_async_context(running(identity_script))
        export = await line_where(identity, lambda line: line.startswith("export TOKEN="), STARTUP)
        token = export.removeprefix("export TOKEN=")
        await line_where(identity, lambda line: "Running on" in line)
        app = await processes.enter_async_context(running(app_script))
        await line_where(app, lambda line: "Running on" in line, STARTUP)

        listener = await processes.enter_async_context(running(listen_script, TOKEN=token))
        welcome = json.loads(await line_where(listener, frame_of_type("welcome"), STARTUP))
        assert (welcome["user"], welcome["subscribed"]) == ("alice", ["chat:lobby", "user:alice"])

        async with aiohttp.ClientSession() as session:
            emitted = await session.post(
                f"http://127.0.0.1:{app_port}/ws/emit",
                data=body.group(1),
                headers={"X-API-Key": api_key.group(1), "Content-Type": "application/json"},
            )
            assert emitted.status == 202
            message = json.loads(await line_where(listener, frame_of_type("message")))
            assert (message["channel"], message["data"]) == ("chat:lobby", {"text": "hello"})

            shipped = await session.post(f"http://127.0.0.1:{app_port}/ship")
            assert shipped.status == 200
            message = json.loads(await line_where(listener, frame_of_type("message")))
            assert (message["channel"], message["data"]) == ("user:alice", {"event": "shipped"})


# setup() takes a broker too, though it is no Settings field.
BROKER_ROW = (
    "| `broker` | `MemoryBroker()` | how processes share messages "
    "(`aiohttp_wsbus.RedisBroker` for several) |"
)


def python_literal(value: Any) -> str:
    """A default as README shows it: `"/ws"`, `("RS256",)`, `1048576` (1 MiB)."""
    if isinstance(value, str):
        return f"`{json.dumps(value)}`"
    if isinstance(value, tuple):
        items = ", ".join(json.dumps(item) for item in value)
        return f"`({items},)`" if len(value) == 1 else f"`({items})`"
    if type(value) is int and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 20} MiB)"
    return f"`{value!r}`"


def settings_table() -> list[str]:
    """README's settings table, one row per Settings field, in its order."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for field in fields(Settings):
        rows.append(f"| `{field.name}` | {python_literal(field.default)} | {setting_help(field)} |")
    return [*rows, BROKER_ROW]


def test_settings_table_lists_every_setting_with_its_default_and_meaning() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    expected = settings_table()
    # On failure, the message is the table to paste.
    assert table == expected, "README's settings table should be:\n" + "\n".join(expected)
