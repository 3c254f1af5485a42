"""Emit clients for back ends that publish over HTTP: async on aiohttp, sync on urllib.

Both send `POST {base_url}{base_path}/emit` (and, with an API key, the control
endpoints: disconnect, unsubscribe a user, revoke), retry a bounded number of
times when the bus (or a proxy before it) answers 502/503/504 or cannot be
reached, and after a 429 once its `Retry-After` has passed (when that is at most
their `timeout`), and raise EmitError for anything else. Every emit carries an
idempotency id (a random one unless given), so a retry never publishes a
message twice; the control calls are safe to repeat as they are.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from .brokers.base import Published
from .errors import WsBusError

__all__ = ["EmitClient", "EmitError", "SyncEmitClient"]

RETRY_STATUSES: Final = frozenset({502, 503, 504})
TOO_MANY_REQUESTS: Final = 429


class EmitError(WsBusError):
    """The bus refused an emit, or stayed unavailable through every retry.

    `status` is the HTTP status (None when no answer came at all), `error` the
    bus's error word (`unauthorized`, `forbidden`, `invalid_request`, ...) and
    `body` its whole JSON answer.
    """

    def __init__(self, status: int | None, error: str, body: dict[str, Any]) -> None:
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"emit failed ({where}): {error}")
        self.status = status
        self.error = error
        self.body = body


class _Emitter:
    """What both clients share: the request they send and how they read answers."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        token: str | None,
        base_path: str,
        retries: int,
        backoff: float,
        max_backoff: float,
        timeout: float,
    ) -> None:
        if (api_key is None) == (token is None):
            raise ValueError("give api_key or token (a JWT with a publish claim), exactly one")
        if retries < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0, timeout > 0")
        self.root = base_url.rstrip("/") + "/" + base_path.strip("/")
        self.url = self.root + "/emit"
        self.has_api_key = api_key is not None
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key is not None:
            self.headers["X-API-Key"] = api_key
        else:
            self.headers["Authorization"] = f"Bearer {token}"

    def body(self, channels: str | Sequence[str], data: Any, message_id: str | None) -> bytes:
        target: dict[str, Any] = (
            {"channel": channels} if isinstance(channels, str) else {"channels": list(channels)}
        )
        # Every attempt of one emit carries the same id: the bus publishes it once.
        message_id = message_id if message_id is not None else secrets.token_urlsafe(16)
        return json.dumps({**target, "data": data, "id": message_id}).encode()

    @staticmethod
    def batch_body(messages: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]) -> bytes:
        batch = []
        for channel, data, *rest in messages:
            # As for one emit: every message carries an id, so a retry publishes it once.
            message_id = rest[0] if rest and rest[0] is not None else secrets.token_urlsafe(16)
            batch.append({"channel": channel, "data": data, "id": message_id})
        return json.dumps({"messages": batch}).encode()

    def control(self, call: str, **arguments: Any) -> tuple[str, bytes]:
        """The URL and body of a control call (API key only: the bus refuses tokens)."""
        if not self.has_api_key:
            raise ValueError("control calls need an api_key, not a token")
        if call == "revoke":
            return self.root + "/revocations", _control_body(arguments)
        user = arguments.pop("user")
        if not isinstance(user, str) or not user:
            raise ValueError("user: must be 1 to 256 characters")
        path = urllib.parse.quote(user, safe="")
        return f"{self.root}/users/{path}/{call}", _control_body(arguments)

    @staticmethod
    def accepted(status: int, raw: bytes) -> None:
        if status != 202:
            answer = _json(raw)
            raise EmitError(status, str(answer.get("error", "unexpected_response")), answer)

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.backoff * 2**attempt))

    def retry_delay(self, attempt: int, status: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retrying an answer, or None to keep the answer.

        A 429 waits its Retry-After (seconds), if that is within `timeout`:
        a longer wait is the caller's to decide, with the EmitError it gets.
        """
        if status in RETRY_STATUSES:
            return self.delay(attempt)
        if status != TOO_MANY_REQUESTS:
            return None
        try:
            wait = float(retry_after) if retry_after is not None else self.delay(attempt)
        except ValueError:  # an HTTP date: not something the bus sends
            return None
        if not 0 <= wait <= self.timeout:
            return None
        return max(wait, self.delay(attempt))

    @staticmethod
    def published(status: int, raw: bytes) -> list[Published]:
        answer = _json(raw)
        if status != 202 or not isinstance(answer.get("published"), list):
            raise EmitError(status, str(answer.get("error", "unexpected_response")), answer)
        return [Published(p["channel"], p["offset"], p["epoch"]) for p in answer["published"]]


def _control_body(arguments: dict[str, Any]) -> bytes:
    body = {}
    for name, value in arguments.items():
        if isinstance(value, datetime):
            value = value.timestamp()
        if value is not None:
            body[name] = list(value) if name == "channels" else value
    return json.dumps(body).encode()


def _json(raw: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(raw)
    except ValueError:
        return {"error": "not_json", "text": raw[:200].decode("utf-8", "replace")}
    return answer if isinstance(answer, dict) else {"error": "not_json"}


class EmitClient:
    """Publishes to a bus over HTTP from async code.

    `await client.emit("chat:lobby", {"text": "hi"})` returns where each
    channel's message landed. Use as `async with EmitClient(...) as client:`
    or call `close()`; pass `session` to share an aiohttp ClientSession.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        base_path: str = "/ws",
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 2.0,
        timeout: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._emitter = _Emitter(
            base_url,
            api_key=api_key,
            token=token,
            base_path=base_path,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            timeout=timeout,
        )
        self._session = session
        self._owns_session = session is None

    async def emit(
        self, channels: str | Sequence[str], data: Any, *, id: str | None = None
    ) -> list[Published]:
        """Publish `data` (any JSON value) to one channel or several; raise EmitError."""
        emitter = self._emitter
        status, raw = await self._post(emitter.url, emitter.body(channels, data, id))
        return emitter.published(status, raw)

    async def emit_many(
        self, messages: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[Published]:
        """Publish each `(channel, data)` or `(channel, data, id)` (1 to 1000) in one request;
        where each landed, in order. Raise EmitError: nothing is published when the bus
        refuses one of them."""
        emitter = self._emitter
        status, raw = await self._post(emitter.url, emitter.batch_body(messages))
        return emitter.published(status, raw)

    async def disconnect(self, user: str, *, reconnect: bool = False, reason: str = "") -> None:
        """Close every socket of `user` (4410, or 4012 with reconnect=True); raise EmitError."""
        url, body = self._emitter.control(
            "disconnect", user=user, reconnect=reconnect, reason=reason
        )
        self._emitter.accepted(*await self._post(url, body))

    async def unsubscribe_user(self, user: str, channels: Sequence[str]) -> None:
        """Unsubscribe every socket of `user` from `channels`; raise EmitError."""
        url, body = self._emitter.control("unsubscribe", user=user, channels=channels)
        self._emitter.accepted(*await self._post(url, body))

    async def revoke(
        self,
        *,
        until: float | datetime,
        user: str | None = None,
        token_id: str | None = None,
        issued_before: float | datetime | None = None,
    ) -> None:
        """Refuse tokens until `until` (see Bus.revoke); raise EmitError."""
        url, body = self._emitter.control(
            "revoke", user=user, token_id=token_id, issued_before=issued_before, until=until
        )
        self._emitter.accepted(*await self._post(url, body))

    async def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST with the bounded retries; the last answer's status and body."""
        emitter = self._emitter
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=emitter.timeout)
        for attempt in range(emitter.retries + 1):
            is_last = attempt == emitter.retries
            try:
                async with session.post(
                    url, data=body, headers=emitter.headers, timeout=timeout
                ) as response:
                    raw = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                if is_last:
                    raise EmitError(None, "unreachable", {"detail": str(error)}) from error
                await asyncio.sleep(emitter.delay(attempt))
            else:
                wait = emitter.retry_delay(attempt, status, retry_after)
                if wait is None or is_last:
                    return status, raw
                await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        """Close the session this client made (not one it was given)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class SyncEmitClient:
    """Publishes to a bus over HTTP from blocking code, on the standard library only."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        base_path: str = "/ws",
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 2.0,
        timeout: float = 10.0,
    ) -> None:
        self._emitter = _Emitter(
            base_url,
            api_key=api_key,
            token=token,
            base_path=base_path,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            timeout=timeout,
        )
        if not self._emitter.url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")

    def emit(
        self, channels: str | Sequence[str], data: Any, *, id: str | None = None
    ) -> list[Published]:
        """Publish `data` (any JSON value) to one channel or several; raise EmitError."""
        emitter = self._emitter
        return emitter.published(*self._post(emitter.url, emitter.body(channels, data, id)))

    def emit_many(
        self, messages: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[Published]:
        """Publish each `(channel, data)` or `(channel, data, id)` (1 to 1000) in one request;
        where each landed, in order. Raise EmitError (see EmitClient.emit_many)."""
        emitter = self._emitter
        return emitter.published(*self._post(emitter.url, emitter.batch_body(messages)))

    def disconnect(self, user: str, *, reconnect: bool = False, reason: str = "") -> None:
        """Close every socket of `user` (4410, or 4012 with reconnect=True); raise EmitError."""
        url, body = self._emitter.control(
            "disconnect", user=user, reconnect=reconnect, reason=reason
        )
        self._emitter.accepted(*self._post(url, body))

    def unsubscribe_user(self, user: str, channels: Sequence[str]) -> None:
        """Unsubscribe every socket of `user` from `channels`; raise EmitError."""
        url, body = self._emitter.control("unsubscribe", user=user, channels=channels)
        self._emitter.accepted(*self._post(url, body))

    def revoke(
        self,
        *,
        until: float | datetime,
        user: str | None = None,
        token_id: str | None = None,
        issued_before: float | datetime | None = None,
    ) -> None:
        """Refuse tokens until `until` (see Bus.revoke); raise EmitError."""
        url, body = self._emitter.control(
            "revoke", user=user, token_id=token_id, issued_before=issued_before, until=until
        )
        self._emitter.accepted(*self._post(url, body))

    def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST with the bounded retries; the last answer's status and body."""
        emitter = self._emitter
        request = urllib.request.Request(url, data=body, headers=emitter.headers)  # noqa: S310
        for attempt in range(emitter.retries + 1):
            is_last = attempt == emitter.retries
            try:
                with urllib.request.urlopen(request, timeout=emitter.timeout) as response:  # noqa: S310
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                with error:
                    retry_after = error.headers.get("Retry-After")
                    wait = emitter.retry_delay(attempt, error.code, retry_after)
                    if wait is None or is_last:
                        return error.code, error.read()
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if is_last:
                    raise EmitError(None, "unreachable", {"detail": str(error)}) from error
                wait = emitter.delay(attempt)
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")
