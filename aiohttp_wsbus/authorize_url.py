"""The standalone server's `--authorize-url`: the application's authorizer, over HTTP.

For each subscribe frame (subscriptions only, never publishing), the channels the token does not
grant are POSTed in one request:

    {"action": "subscribe", "user": SUB, "channels": [...], "claims": {...}}

with the server's first API key as `X-API-Key` (the claims are the verified
ones; the raw token is never sent). A 2xx answer `{"allow": [...]}` allows
those channels, a 4xx denies them all, and a 5xx, a timeout or an answer that
is not that JSON denies them as `unavailable` (the client retries later).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection

import aiohttp
from aiohttp import web

from .authorizers import Action, BatchAuthorizer
from .tokens import Claims

__all__ = ["UrlAuthorizer"]


class AuthorizerUnavailable(Exception):
    """The authorize URL did not give a usable answer."""


class UrlAuthorizer:
    """Asks the application at `url` which channels a token's holder may have."""

    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        self.url = url
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: one client session for the app's lifetime."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            self._session = session
            try:
                yield
            finally:
                self._session = None

    def for_action(self, action: Action) -> BatchAuthorizer:
        """The batch authorizer for `action`, as Bus.batch_authorizer takes it."""

        async def decide(claims: Claims, channels: list[str]) -> Collection[str]:
            return await self.ask(action, claims, channels)

        return decide

    async def ask(self, action: Action, claims: Claims, channels: list[str]) -> set[str]:
        if self._session is None:
            raise AuthorizerUnavailable("the server is not running")
        body = {
            "action": action,
            "user": claims.subject,
            "channels": channels,
            "claims": dict(claims.extra),
        }
        async with self._session.post(
            self.url, json=body, headers={"X-API-Key": self._api_key}
        ) as response:
            if 400 <= response.status < 500:
                return set()
            if response.status >= 300:
                raise AuthorizerUnavailable(f"the authorize URL answered {response.status}")
            try:
                answer = json.loads(await response.read())
                allowed = answer["allow"]
            except (ValueError, TypeError, KeyError):
                raise AuthorizerUnavailable(
                    "the authorize URL's answer is not {allow: [...]}"
                ) from None
        if not isinstance(allowed, list) or not all(isinstance(c, str) for c in allowed):
            raise AuthorizerUnavailable("the authorize URL's allow is not a list")
        return set(channels).intersection(allowed)
