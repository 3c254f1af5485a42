"""The HTTP read endpoints about one channel: GET {base_path}/channels/{channel}/presence.

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
from .grants import is_valid_channel, may
from .tokens import Claims

__all__ = ["Queries"]


class Queries:
    """The channel read endpoints of one bus."""

    def __init__(self, bus: Bus, endpoints: Endpoints) -> None:
        self.bus = bus
        self.endpoints = endpoints  # who is asking: the same checks as emit

    async def presence(self, request: web.Request) -> web.Response:
        """GET {base_path}/channels/{channel}/presence: its members, or their count
        above max_presence_members."""
        _check_get(request)
        channel = request.match_info["channel"]
        _, claims = await self.endpoints.authenticate(request, "presence")
        if not is_valid_channel(channel):
            raise http_error(
                web.HTTPBadRequest,
                "invalid_request",
                fields={"channel": [f"invalid channel name: {channel!r}"]},
            )
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
        if snapshot.listed is not None:
            answer["members"] = snapshot.listed
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def _may_subscribe(self, claims: Claims, channel: str) -> None:
        """Refuse a token that could not subscribe to `channel`: its presence is private."""
        if may(claims.subscribe, channel):
            return
        verdict = (await self.bus.authorize(claims, [channel], "subscribe"))[channel]
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
