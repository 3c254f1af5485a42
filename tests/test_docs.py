"""The Python snippets in docs/ run as written (or, where they need a service this
test does not have, at least compile)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp_wsbus

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
