"""README's quickstart runs as written, its curl emit is answered 202, and its
settings table says what aiohttp_wsbus.settings says."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp

from aiohttp_wsbus.settings import Settings, setting_help

from .support import WAIT

ROOT = Path(__file__).parent.parent


def readme_blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", readme, flags=re.DOTALL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_quickstart_serves_emit_and_in_process_publish() -> None:
    quickstart = readme_blocks("python")[0]
    assert quickstart.count("web.run_app(app)") == 1
    port = free_port()
    # The one change: a free port instead of 8080, so the test never collides.
    script = quickstart.replace("web.run_app(app)", f"web.run_app(app, port={port})")
    curl = next(block for block in readme_blocks("sh") if "/ws/emit" in block)
    api_key = re.search(r"X-API-Key: ([^']+)'", curl)
    body = re.search(r"-d '(\{.*\})'", curl)
    assert api_key is not None and body is not None

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(WAIT * 2):
            assert process.stdout is not None
            while b"Running on" not in await process.stdout.readline():
                assert process.returncode is None
        async with aiohttp.ClientSession() as session:
            emitted = await session.post(
                f"http://127.0.0.1:{port}/ws/emit",
                data=body.group(1),
                headers={"X-API-Key": api_key.group(1), "Content-Type": "application/json"},
            )
            assert emitted.status == 202
            assert (await emitted.json())["published"][0]["channel"] == "chat:lobby"
            shipped = await session.post(f"http://127.0.0.1:{port}/ship")
            assert shipped.status == 200
    finally:
        process.terminate()
        async with asyncio.timeout(WAIT * 2):
            await process.wait()


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
