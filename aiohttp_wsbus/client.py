"""Client: the Python subscriber client, the twin of js/wsbus.js.

It holds one WebSocket to the bus, survives drops (full-jitter backoff and the
close-code policy of client_policy.py), keeps its token fresh on the live
socket, and recovers what it missed on reconnect. A gap it cannot recover is
never silent: a "recovered" event with False, and the next message of that
channel carries `after_gap=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import yarl

from .client_channels import Channels, strings
from .client_events import Events, Listener
from .client_policy import (
    MAX_RECONNECT_DELAY,
    MIN_RECONNECT_DELAY,
    CloseAction,
    backoff_delay,
    decide,
    refresh_delay,
)
from .client_requests import ANSWERS, Requests
from .client_subscription import (
    ClientClosed,
    ClosedByServer,
    Message,
    Subscription,
    SubscriptionDenied,
    as_position,
)
from .protocol import BEARER_PREFIX, PROTOCOL, CloseCode, Position

__all__ = [
    "Client",
    "ClientClosed",
    "ClosedByServer",
    "Message",
    "Subscription",
    "SubscriptionDenied",
]

logger = logging.getLogger("aiohttp_wsbus.client")

GetToken = Callable[[], str | Awaitable[str]]

# The token goes in the handshake only when it is a header token of at most 4096
# characters (a JWT: base64url and dots) and the URL stays within 4096 characters,
# as in js/wsbus.js.
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,4096}")
MAX_HANDSHAKE_URL = 4096


def handshake(url: yarl.URL, connect: dict[str, Any]) -> tuple[yarl.URL, tuple[str, str]] | None:
    """The URL and subprotocols of a handshake carrying `connect`, or None when its token
    or the URL would not fit in one (proxies limit a header and a URL to a few KB)."""
    token = connect["token"]
    if not _HEADER_TOKEN.fullmatch(token):
        return None
    query = {"channels": ",".join(connect["channels"])} if connect["channels"] else {}
    if "since" in connect:
        query["since"] = json.dumps(connect["since"], separators=(",", ":"))
    url = url.update_query(query)
    if len(str(url)) > MAX_HANDSHAKE_URL:
        return None
    return url, (PROTOCOL, BEARER_PREFIX + token)


class Client:
    """A connection to the bus that subscribes to channels and never loses a message silently.

    `get_token` (sync or async) is called for every connection attempt and
    before the token expires; `url` is the bus's WebSocket (ws://, wss://, or
    http(s):// switched to ws(s)://). Delays and timeouts are in seconds:
    backoff between `min_reconnect_delay` and `max_reconnect_delay` (as the JS
    client), the refresh `refresh_before` the token's exp, `connect_timeout`
    from the socket to the welcome. A subscription holds at most `max_queued`
    unread messages; then reading the socket waits for the application.
    With `token_in_header` the token travels in the handshake (docs/protocol.md)
    when it fits there, else in a connect frame (the default: see the protocol
    for what each costs).
    """

    def __init__(
        self,
        url: str,
        *,
        get_token: GetToken,
        session: aiohttp.ClientSession | None = None,
        min_reconnect_delay: float = MIN_RECONNECT_DELAY,
        max_reconnect_delay: float = MAX_RECONNECT_DELAY,
        refresh_before: float = 30.0,
        connect_timeout: float = 10.0,
        heartbeat: float | None = 30.0,
        max_queued: int = 1000,
        random_value: Callable[[], float] = random.random,
        token_in_header: bool = False,
    ) -> None:
        if url.startswith("http"):
            url = "ws" + url.removeprefix("http")
        self.url = url
        self._get_token = get_token
        self._given_session = session
        self._session: aiohttp.ClientSession | None = session
        self._min_delay = min_reconnect_delay
        self._max_delay = max(max_reconnect_delay, min_reconnect_delay)
        self._refresh_before = refresh_before
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self.max_queued = max_queued
        self._random = random_value
        self._token_in_header = token_in_header

        self.state = "disconnected"  # connecting | connected | disconnected | closed
        self.retry_delay: float | None = None  # seconds of the current backoff wait
        self.attempt = 0  # backoff attempts since the last welcome
        self.user: str | None = None  # the token's subject, from the last welcome
        self.close_error: ClosedByServer | None = None  # why the server stopped this client
        self._events = Events()
        self._emit = self._events.emit
        self._channels = Channels(self._emit)
        self._requests = Requests()
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._is_welcomed = False
        self._has_retried_unauthorized = False
        self._wait_at_least = 0.0  # seconds the next backoff waits at the least
        self._refresh_attempt = 0
        self._resubscribe_attempt = 0
        self._socket_tasks: set[asyncio.Task[None]] = set()  # refresh, resubscribe
        self._resubscribe: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._state_changed = asyncio.Event()

    # -- the application's side ------------------------------------------

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (`async with` does it)."""
        if self._run_task is None and self.state != "closed":
            self._run_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop for good: close the socket, end every subscription's iteration."""
        self._stopping.set()
        task, self._run_task = self._run_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._finish()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the server welcomed this client; ClientClosed if it stopped first."""
        async with asyncio.timeout(timeout):
            while self.state != "connected":
                if self.state == "closed":
                    raise self.close_error or ClientClosed("the client is closed")
                self._state_changed.clear()
                await self._state_changed.wait()

    def on(self, event: str, listener: Listener) -> Callable[[], None]:
        """Call `listener` on "state", "subscribed", "denied", "recovered", "disconnected",
        "refreshed" or "error"; returns a function that stops it."""
        return self._events.on(event, listener)

    def subscribe(
        self, channel: str, *, since: Position | Mapping[str, Any] | Message | None = None
    ) -> Subscription:
        """A subscription to `channel` (async context manager and async iterator of Messages).

        `since` (a position saved from `positions` or a Message) recovers what
        was published after it, where the server still has it.
        """
        if not isinstance(channel, str):
            raise TypeError("channel must be a string")
        return Subscription(self, channel, as_position(since))

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        id: str | None = None,
        ephemeral: bool = False,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Publish over the socket (the server needs `client_publish=True`); the
        `published` answer ({"offset", "epoch"}, none for an ephemeral message).

        With an `id` a publish lost with its socket is sent again after the
        reconnect (the server publishes it once); without one it fails with
        RequestError("disconnected"). Raises RequestError with the server's code.
        """
        frame: dict[str, Any] = {"type": "publish", "channel": channel, "data": data}
        if id is not None:
            frame["id"] = id
        if ephemeral:
            frame["ephemeral"] = True
        return await self._requests.request(frame, timeout=timeout, is_repeatable=id is not None)

    async def rpc(self, method: str, data: Any = None, *, timeout: float = 10.0) -> Any:
        """Call the application's `bus.rpc(method)` handler; what it returned."""
        frame = {"type": "rpc", "method": method, "data": data}
        answer = await self._requests.request(frame, timeout=timeout, is_repeatable=False)
        return answer.get("data")

    async def history(
        self, channel: str, *, limit: int = 50, before: int | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The channel's last `limit` messages below offset `before`:
        {"channel", "position", "messages": [{"offset", "data"}, ...]}, oldest first."""
        frame: dict[str, Any] = {"type": "history", "channel": channel, "limit": limit}
        if before is not None:
            frame["before"] = before
        return await self._requests.request(frame, timeout=timeout, is_repeatable=True)

    @property
    def positions(self) -> dict[str, Position]:
        """The last position received on each channel: save it, pass it back as `since`."""
        return dict(self._channels.positions)

    # -- subscriptions (called by Subscription) --------------------------

    async def _add(self, subscription: Subscription) -> None:
        if self.state == "closed":
            raise self.close_error or ClientClosed("the client is closed")
        if self._channels.add(subscription, is_welcomed=self._is_welcomed):
            await self._sync()

    async def _remove(self, subscription: Subscription) -> None:
        if self._channels.remove(subscription):
            await self._sync()

    # -- connecting ------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                action = await self._connect_once()
                if action is CloseAction.STOP:
                    break
                if action is CloseAction.BACKOFF:
                    self.attempt += 1
                    self.retry_delay = max(
                        self._wait_at_least,  # 4429: the server asks for a pause
                        backoff_delay(
                            self.attempt, self._random(), self._min_delay, self._max_delay
                        ),
                    )
                self._wait_at_least = 0.0
                self._set_state("disconnected")
                if action is CloseAction.BACKOFF and self.retry_delay is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.retry_delay):
                            await self._stopping.wait()
                self.retry_delay = None
        finally:
            if self._run_task is asyncio.current_task():
                self._run_task = None
            await self._finish()

    async def _connect_once(self) -> CloseAction:
        """One connection, from the token to its close; what to do next."""
        self._set_state("connecting")
        try:
            token = await self._token()
        except Exception as error:
            self._emit("error", error)
            return CloseAction.BACKOFF
        if self._session is None:
            self._session = aiohttp.ClientSession()
        channels = list(self._channels.subscriptions)
        self._channels.requested = set(channels)
        connect: dict[str, Any] = {"type": "connect", "token": token, "channels": channels}
        if since := self._channels.since(channels):
            connect["since"] = since
        url, protocols = yarl.URL(self.url), tuple[str, ...]()
        if self._token_in_header and (offer := handshake(url, connect)) is not None:
            (url, protocols), connect = offer, {}
        # One deadline from the socket to the welcome, as the JS client's connectTimeout.
        deadline = asyncio.get_running_loop().time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                socket = await self._session.ws_connect(
                    url, protocols=protocols, heartbeat=self._heartbeat
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            # The error's type only: its repr holds the request's headers, the token too.
            logger.debug("connect to %s failed: %s", self.url, type(error).__name__)
            return CloseAction.BACKOFF
        self._socket = socket
        try:
            return await self._serve(socket, connect, deadline)
        except (aiohttp.ClientError, ConnectionError) as error:  # gone while we wrote
            logger.debug("connection to %s lost: %r", self.url, error)
            return CloseAction.BACKOFF
        finally:
            self._abandon_socket()
            await socket.close()

    async def _serve(
        self, socket: aiohttp.ClientWebSocketResponse, connect: dict[str, Any], welcome_by: float
    ) -> CloseAction:
        """Send `connect` (none: the handshake carried it), wait for the welcome, then read."""
        if connect:
            await socket.send_str(json.dumps(connect))
        try:
            async with asyncio.timeout_at(welcome_by):
                while not self._is_welcomed:
                    if (action := await self._read(socket)) is not None:
                        return action
        except TimeoutError:
            late = f"no welcome from the server within {self._connect_timeout} s"
            self._emit("error", TimeoutError(late))
            return CloseAction.BACKOFF
        while (action := await self._read(socket)) is None:
            pass
        return action

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> CloseAction | None:
        """Handle the next frame; once the socket closes, what to do next."""
        message = await socket.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await self._receive(message.data)
            return None
        if message.type == aiohttp.WSMsgType.BINARY:
            self._emit("error", ValueError("the server sent a binary frame: ignored"))
            return None
        return self._closed(socket, message)

    def _closed(
        self, socket: aiohttp.ClientWebSocketResponse, message: aiohttp.WSMessage
    ) -> CloseAction:
        """The policy's answer to the server's close (or a socket gone without one: 1006)."""
        code, reason = 1006, ""
        if message.type == aiohttp.WSMsgType.CLOSE:
            code, reason = int(message.data), message.extra or ""
        elif socket.close_code is not None and message.type != aiohttp.WSMsgType.ERROR:
            code = socket.close_code
        decision = decide(
            code,
            was_welcomed=self._is_welcomed,
            has_retried_unauthorized=self._has_retried_unauthorized,
        )
        error = ClosedByServer(code, reason)
        self._wait_at_least = decision.at_least
        if decision.is_error:
            self._emit("error", error)
        if code == CloseCode.UNAUTHORIZED:
            self._has_retried_unauthorized = True
        if decision.action is CloseAction.STOP:
            self.close_error = error if code != CloseCode.NORMAL else None
        return decision.action

    async def _token(self) -> str:
        token = self._get_token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError(f"get_token returned {type(token).__name__}, not a token string")
        return token

    def _abandon_socket(self) -> None:
        self._socket = None
        self._is_welcomed = False
        self._requests.disconnected()
        self._channels.forget_socket()
        for task in self._socket_tasks:
            task.cancel()
        self._socket_tasks.clear()

    async def _finish(self) -> None:
        """Closed for good: end every subscription (with the server's reason, if it stopped us)."""
        if self.state == "closed":
            return
        self._stopping.set()
        socket = self._socket
        self._abandon_socket()
        if socket is not None:
            await socket.close()
        if self._session is not None and self._given_session is None:
            await self._session.close()
        self._session = None
        self._set_state("closed")
        self._requests.close()
        self._channels.end_all(self.close_error)
        error = self.close_error
        if error is not None and error.code == CloseCode.SESSION_ENDED:
            self._emit("disconnected", error.reason)

    # -- receiving -------------------------------------------------------

    async def _receive(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError as error:
            self._emit("error", error)
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "welcome":
            await self._welcome(frame)
        elif kind == "subscribed":
            self._apply_subscription(frame)
        elif kind == "unsubscribed" and frame.get("reason") in ("revoked", "server"):
            for channel in strings(frame.get("channels")):
                self._channels.deny(channel, str(frame["reason"]))
        elif kind == "refreshed":
            self._refresh_attempt = 0
            for channel in strings(frame.get("revoked")):
                self._channels.deny(channel, "revoked")
            self._emit("refreshed", frame.get("expires_at"))
            self._schedule_refresh(frame.get("expires_at"))
        elif kind == "message":
            await self._channels.deliver(frame)
        elif kind in ANSWERS:
            self._requests.answer(frame)
        # "pong", and frame types newer than this client: nothing to do

    async def _welcome(self, frame: dict[str, Any]) -> None:
        self._is_welcomed = True
        self.attempt = 0
        self._has_retried_unauthorized = False
        self.user = frame.get("user") if isinstance(frame.get("user"), str) else None
        self._schedule_refresh(frame.get("expires_at"))
        self._set_state("connected")
        self._apply_subscription(frame)
        await self._sync()
        socket = self._socket
        if socket is not None:
            await self._requests.welcomed(functools.partial(self._send, socket))

    def _apply_subscription(self, frame: dict[str, Any]) -> None:
        if self._channels.apply(frame):
            self._schedule_resubscribe()
        else:
            self._resubscribe_attempt = 0  # the broker answers again

    # -- sending ---------------------------------------------------------

    async def _sync(self) -> None:
        """Bring the server's subscriptions in line with the wanted channels (once welcomed)."""
        socket = self._socket
        if not self._is_welcomed or socket is None:
            return
        added, removed = self._channels.changes()
        if removed:
            await self._send(socket, {"type": "unsubscribe", "channels": removed})
        if added:
            frame: dict[str, Any] = {"type": "subscribe", "channels": added}
            since = self._channels.since(added)
            if since:
                frame["since"] = since
            await self._send(socket, frame)

    async def _send(self, socket: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> None:
        if socket.closed:
            return  # the reader sees the close and decides
        try:
            await socket.send_str(json.dumps(frame))
        except (aiohttp.ClientError, ConnectionError) as error:
            self._emit("error", error)

    # -- timers on the live socket ---------------------------------------

    def _spawn(self, delay: float, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `work` after `delay` seconds, for as long as this socket lives."""

        async def later() -> None:
            await asyncio.sleep(delay)  # a timer, not a wait for a condition
            await work()

        task = asyncio.get_running_loop().create_task(later())
        self._socket_tasks.add(task)
        task.add_done_callback(self._socket_tasks.discard)
        return task

    def _schedule_refresh(self, expires_at: object) -> None:
        if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            self._spawn(refresh_delay(expires_at, time.time(), self._refresh_before), self._refresh)

    async def _refresh(self) -> None:
        socket = self._socket
        try:
            token = await self._token()
        except Exception as error:
            self._emit("error", error)
            self._refresh_attempt += 1
            self._spawn(self._backoff(self._refresh_attempt), self._refresh)
            return
        if socket is not None and socket is self._socket:
            await self._send(socket, {"type": "refresh", "token": token})

    def _schedule_resubscribe(self) -> None:
        """Ask again, after the next backoff delay, for the channels denied "unavailable"."""
        if self._resubscribe is not None and not self._resubscribe.done():
            return
        self._resubscribe_attempt += 1

        async def resubscribe() -> None:
            self._channels.unavailable.clear()
            await self._sync()

        self._resubscribe = self._spawn(self._backoff(self._resubscribe_attempt), resubscribe)

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._random(), self._min_delay, self._max_delay)

    # -- events ----------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if self.state == state:
            return
        self.state = state
        self._state_changed.set()
        self._emit("state", state)
