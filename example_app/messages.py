"""Chat messages as the app stamps them: who said it (the verified sender), where and when.

Every message a person sends, over the socket (the bus's `on_publish` hooks) or
through `POST /send`, is built here from its text alone, so nobody speaks for
someone else. A typing indicator (`{"typing": true}`, published ephemeral by the
page) is stamped the same way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp_wsbus

__all__ = [
    "CHAT_PREFIXES",
    "MAX_TEXT_LENGTH",
    "chat_message",
    "check_text",
    "now_ms",
    "stamper",
]

MAX_TEXT_LENGTH: Final = 2000
# The channels people write to: the token's rooms, private rooms and users' own channels.
CHAT_PREFIXES: Final = ("chat:", "room:", "user:")


def check_text(text: object) -> str:
    """Return `text` if it can be sent; raise ValueError saying why not."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must not be blank")
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError(f"text is at most {MAX_TEXT_LENGTH} characters")
    return text


def chat_message(sender: str, channel: str, text: str) -> dict[str, Any]:
    """What is published for `sender` saying `text` on `channel` (text already checked)."""
    message: dict[str, Any] = {"from": sender, "text": text, "room": channel, "sent_at": now_ms()}
    if channel.startswith("user:"):
        message["to"] = channel.removeprefix("user:")
    return message


def stamper(prefix: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """The on_publish hook for `{prefix}{name}` channels: a page's `{"text"}` or
    `{"typing": true}`, stamped with the verified sender; anything else is refused."""

    async def stamp(claims: aiohttp_wsbus.Claims, data: Any, name: str) -> dict[str, Any]:
        channel = prefix + name
        if data == {"typing": True}:
            return {"from": claims.subject, "room": channel, "typing": True}
        if not isinstance(data, dict) or set(data) != {"text"}:
            raise ValueError('send {"text": "..."} or {"typing": true}')
        return chat_message(claims.subject, channel, check_text(data["text"]))

    return stamp


def now_ms() -> int:
    """Milliseconds since the epoch: when a message was sent, as the pages show it."""
    return int(time.time() * 1000)
