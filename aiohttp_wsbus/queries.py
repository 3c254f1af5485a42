"""The HTTP read endpoints about one channel: GET {base_path}/channels/{channel}/presence,
/position and /history.

Asked with an API key (the application) or a Bearer token whose grants cover
the channel, with the same 400/401/403/503 answers as emit.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from .bus import Bus
from .emit import Endpoints
from .errors import BrokerUnavailable, http_error
from .grants import is_valid_channel
from .history import DEFAULT_HISTORY_LIMIT
from .tokens import Claims

__all__ = ["Queries"]


class Queries:
    """The channel read endpoints of one bus."""

    def __init__(self, bus: Bus, endpoints: Endpoints) -> None:
        self.bus = bus
        self.endpoints = endpoints  # who is asking: the same checks as emit

    async def position(self, request: web.Request) -> web.Response:
        """GET {base_path}/channels/{channel}/position: its last offset and epoch."""
        channel = await self._readable_channel(request, "position")
        try:
            position = await self.bus.position(channel)
        except BrokerUnavailable:
            raise http_error(web.HTTPServiceUnavailable, "broker_unavailable") from None
        return _no_store({"channel": channel, **position.as_json()})

    async def history(self, request: web.Request) -> web.Response:
        """GET {base_path}/channels/{channel}/history?limit=&before=: its last messages."""
        channel = await self._readable_channel(request, "history")
        limit = _query_integer(request, "limit")
        before = _query_integer(request, "before")
        if limit is None:
            limit = DEFAULT_HISTORY_LIMIT
        try:
            page = await self.bus.history(channel, limit=limit, before=before)
        except ValueError as error:  # the bus names the field: "limit: must be ..."
            field, _, message = str(error).partition(": ")
            raise _invalid(field, message) from None
        except BrokerUnavailable:
            raise http_error(web.HTTPServiceUnavailable, "broker_unavailable") from None
        return _no_store(page.as_json())

    async def _readable_channel(self, request: web.Request, what: str) -> str:
        """The path's channel, once the asker is known and may subscribe to it."""
        _check_get(request)
        channel = request.match_info["channel"]
        _, claims = await self.endpoints.authenticate(request, what)
        _check_channel(channel)
        if claims is not None:
            await self._may_subscribe(claims, channel)
        return channel

    async def presence(self, request: web.Request) -> web.Response:
        """GET {base_path}/channels/{channel}/presence: its members, or their count
        above max_presence_members."""
        _check_get(request)
        channel = request.match_info["channel"]
        _, claims = await self.endpoints.authenticate(request, "presence")
        _check_channel(channel)
        keeper = self.bus.presence_keeper
        if not keeper.keeps(channel):
            raise http_error(web.HTTPNotFound, "no_presence", channel=channel)
        if claims is not None:
            if not keeper.may_read(claims, channel):
                raise http_error(web.HTTPForbidden, "forbidden", channels=[channel])
            await self._may_subscribe(claims, channel)
        try:
            snapshot = await keeper.snapshot(channel)
        except BrokerUnavailable:
            raise http_error(web.HTTPServiceUnavailable, "broker_unavailable") from None
        answer: dict[str, Any] = {"channel": channel, "count": snapshot.count}
        if snapshot.is_listed:
            answer["members"] = snapshot.listed
        return _no_store(answer)

    async def _may_subscribe(self, claims: Claims, channel: str) -> None:
        """Refuse a token that could not subscribe to `channel`: what it holds is private."""
        verdict = await self.bus.subscriptions.may_read(claims, channel)
        if verdict == "forbidden":
            raise http_error(web.HTTPForbidden, "forbidden", channels=[channel])
        if verdict == "unavailable":
            raise http_error(
                web.HTTPServiceUnavailable, "authorizer_unavailable", channels=[channel]
            )


def _check_get(request: web.Request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise http_error(
            functools.partial(web.HTTPMethodNotAllowed, request.method, ["GET"]),
            "method_not_allowed",
        )


def _check_channel(channel: str) -> None:
    if not is_valid_channel(channel):
        raise _invalid("channel", f"invalid channel name: {channel!r}")


def _query_integer(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise _invalid(name, f"{name} must be a positive integer")
    return int(text)


def _invalid(field: str, message: str) -> web.HTTPException:
    return http_error(web.HTTPBadRequest, "invalid_request", fields={field: [message]})


def _no_store(answer: dict[str, Any]) -> web.Response:
    return web.json_response(answer, headers={"Cache-Control": "no-store"})
