"""The exceptions aiohttp_wsbus raises, and the one shape of its HTTP errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .brokers.base import Published


class WsBusError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidSettings(ValueError, WsBusError):
    """A setup() setting is wrong; the message names it."""


class InvalidToken(WsBusError):
    """The token is missing, malformed, badly signed, expired or has the wrong claims.

    `reason` is a short machine-readable word (never the token itself).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(WsBusError):
    """No signing key can be had right now (JWKS unreachable and nothing cached)."""


class Forbidden(WsBusError):
    """The token is valid but does not grant what was asked.

    The application raises it from an on_connect hook to refuse a socket (4403).
    """

    def __init__(self, channels: Sequence[str] = ()) -> None:
        super().__init__(", ".join(channels))
        self.channels = list(channels)


class BrokerUnavailable(WsBusError):
    """The broker cannot publish or subscribe right now; callers may retry later.

    `published` holds what a batch publish got through before the broker failed
    (the first messages, in order; empty when nothing is known to have landed).
    """

    def __init__(self, *args: object, published: list[Published] | None = None) -> None:
        super().__init__(*args)
        self.published: list[Published] = published or []


class InvalidChannel(WsBusError, ValueError):
    """A channel name breaks the naming rules."""


class RequestError(WsBusError):
    """A request frame (publish, rpc, history) that failed: answered with an `error` frame.

    `error` is one of docs/protocol.md's request error codes; `reason`, for
    people, says what was wrong (never a traceback).
    """

    def __init__(self, error: str, reason: str = "") -> None:
        super().__init__(f"{error}: {reason}" if reason else error)
        self.error = error
        self.reason = reason


class InvalidRequest(RequestError):
    """A request frame with a usable `ref` but a bad field: answered `invalid`, not closed."""

    def __init__(self, ref: int, reason: str) -> None:
        super().__init__("invalid", reason)
        self.ref = ref


def http_error(
    status: Callable[..., web.HTTPException], error: str, **details: Any
) -> web.HTTPException:
    """An HTTP error with the JSON body every endpoint answers: {"error": ..., **details}.

    `status` is an aiohttp HTTPException class, or a partial of one that needs
    arguments. Handlers raise the result where they find the problem.
    """
    return status(text=json.dumps({"error": error, **details}), content_type="application/json")
