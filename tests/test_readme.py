"""README's quickstart runs as written, and its curl emit is answered 202."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from pathlib import Path

import aiohttp

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
