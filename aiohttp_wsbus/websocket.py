"""The WebSocket endpoint: admission (Origin, limits, token) and the frame loop."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WSMsgType, hdrs, web

from .bus import Bus, SubscribeResult
from .connection import Connection
from .errors import (
    BrokerUnavailable,
    Forbidden,
    InvalidRequest,
    InvalidToken,
    KeysUnavailable,
    http_error,
)
from .limits import SocketLimits
from .protocol import (
    ANOTHER_USER,
    BROKER_UNAVAILABLE,
    CLIENT_GONE,
    CONNECTION_LIMIT,
    INTERNAL_ERROR,
    KEYS_UNAVAILABLE,
    NO_CONNECT_FRAME,
    PROTOCOL,
    RATE_LIMITED,
    REFUSED,
    SHUTTING_DOWN,
    USER_CONNECTION_LIMIT,
    BadFrame,
    ClientPublish,
    Close,
    Connect,
    HistoryRead,
    Ping,
    Refresh,
    RpcCall,
    Subscribe,
    Unsubscribe,
    bad_request,
    bearer_token,
    parse_client_frame,
    query_connect,
    unauthorized,
)
from .requests import error_frame
from .tokens import Claims

__all__ = ["WebSocketHandler"]

_ENDED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})


class WebSocketHandler:
    """Admits sockets to the bus and serves their frames."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self._rates = (self.settings.client_rate, self.settings.subscribe_rate)
        # Made once: every socket keeps what its WebSocketResponse was given, and a
        # tuple or a large int built per handshake is one more object per socket.
        self._protocols = (PROTOCOL,)
        # aiohttp refuses a frame of max_msg_size bytes; ours allows exactly that.
        self._max_msg_size = self.settings.max_message_size + 1
        # Upgraded sockets that have not authenticated yet: the bus does not know them.
        self._unauthenticated: dict[web.WebSocketResponse, asyncio.Transport] = {}
        # Sockets waiting for their connect frame and their deadlines (loop time), in
        # the order they came: one timer for all of them, not a timeout per socket.
        self._awaiting_connect: dict[web.WebSocketResponse, float] = {}
        self._connect_timer: asyncio.TimerHandle | None = None
        # Sockets past their deadline, each being closed by a task of its own.
        self._late: dict[web.WebSocketResponse, asyncio.Task[None]] = {}

    async def shutdown(self) -> None:
        """Close the sockets still authenticating (the bus closes the others)."""
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        await asyncio.gather(
            *(
                self._refuse(socket, transport, SHUTTING_DOWN)
                for socket, transport in list(self._unauthenticated.items())
            )
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET {base_path}: the WebSocket."""
        settings = self.settings
        if settings.allowed_origins is not None:
            origin = request.headers.get("Origin")
            # Browsers always send Origin; non-browser clients cannot be forged into one.
            if origin is not None and origin not in settings.allowed_origins:
                raise http_error(web.HTTPForbidden, "origin_not_allowed")
        try:
            # Read before aiohttp's handshake, which logs the offered protocols
            # (the token among them) when none is PROTOCOL.
            token = bearer_token(request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL))
        except BadFrame as error:
            raise http_error(
                web.HTTPBadRequest, "bad_websocket_protocol", reason=str(error)
            ) from None
        socket = web.WebSocketResponse(
            protocols=self._protocols,
            heartbeat=settings.heartbeat,
            max_msg_size=self._max_msg_size,
            compress=False,  # frames are built once and written as they are
            timeout=settings.close_timeout,
        )
        try:
            await socket.prepare(request)  # validates the handshake once
        except web.HTTPException:
            raise http_error(web.HTTPUpgradeRequired, "websocket_upgrade_required") from None
        connection: Connection | None = None
        # Whatever ends this handler (a dropped peer, a failed close, cancellation)
        # gives the socket's slot back.
        self.bus.open_sockets += 1
        try:
            transport = request.transport
            if not isinstance(transport, asyncio.Transport):
                return socket  # the peer left during the handshake
            self._unauthenticated[socket] = transport
            try:
                connection = await self._admit(request, socket, transport, token)
            finally:
                self._unauthenticated.pop(socket, None)
                token = None  # this frame lives as long as the socket: no token kept in it
            # The receive loop lives in this frame on purpose: one coroutine per idle
            # socket, not a stack of them, is memory every connection pays.
            if connection is not None:
                limits: SocketLimits | None = None
                async for message in socket:
                    if connection.is_closing:
                        break
                    try:
                        # Made at the first frame, so an idle socket holds no buckets; they
                        # start full, as buckets made at the connect would be by now.
                        limits = limits or SocketLimits.of(*self._rates)
                        if limits is not None and (broken := limits.frame()):
                            self._rate_limited(connection, broken)
                            continue
                        if message.type != WSMsgType.TEXT:
                            raise BadFrame("frames must be text")
                        frame = parse_client_frame(message.data)
                        if limits is not None and (broken := limits.channels(frame)):
                            self._rate_limited(connection, broken)
                            continue
                        await self._handle(connection, frame)
                    except BadFrame as error:
                        connection.close(bad_request(error))
                    except InvalidRequest as error:
                        connection.send(error_frame(error.ref, error))
        finally:
            self.bus.open_sockets -= 1
            if connection is not None:
                connection.close(CLIENT_GONE)
                # The close the bus decided (4400, 4401, ...) must leave before this
                # handler returns, or aiohttp closes the socket with 1000 first.
                if connection.closing is not None:
                    await asyncio.wait({connection.closing})
        return socket

    async def _admit(
        self,
        request: web.Request,
        socket: web.WebSocketResponse,
        transport: asyncio.Transport,
        token: str | None,
    ) -> Connection | None:
        """Limits, connect (`token` from the handshake, or the connect frame), welcome:
        the Connection, or None if refused."""
        limit = self.settings.max_connections
        if limit is not None and self.bus.open_sockets > limit:
            await self._refuse(socket, transport, CONNECTION_LIMIT)
            return None
        if not self.bus.broker.is_available:
            await self._refuse(socket, transport, BROKER_UNAVAILABLE)
            return None
        connect = await self._receive_connect(request, socket, token)
        if isinstance(connect, Close):
            await self._refuse(socket, transport, connect)
            return None
        if connect is None:
            return None  # the peer left
        try:
            claims = await self.bus.verify(connect.token or "")
        except InvalidToken as error:
            self.bus.refused("websocket", error.reason)
            await self._refuse(socket, transport, unauthorized(error.reason))
            return None
        except KeysUnavailable:
            await self._refuse(socket, transport, KEYS_UNAVAILABLE)
            return None
        if transport.is_closing():
            return None
        try:
            if not await self._take_user_slot(claims.subject):
                await self._refuse(socket, transport, USER_CONNECTION_LIMIT)
                return None
        except BrokerUnavailable:
            await self._refuse(socket, transport, BROKER_UNAVAILABLE)
            return None
        # From here the bus gives the slot back when the connection closes.
        connection = self.bus.connect(socket, transport, claims)
        if transport.is_closing():  # the peer left while the slot was taken
            connection.close(CLIENT_GONE)
            return None
        try:
            if self.bus.on_connect:  # no coroutine per socket when nobody listens
                await self.bus.announce(connection)
            else:
                connection.is_announced = True
        except Exception as error:  # a failure is logged and counted where it happened
            refusal = REFUSED if isinstance(error, Forbidden) else INTERNAL_ERROR
            connection.close(refusal)
            # Closed here, not in the background: this handler is about to return.
            await self._refuse(socket, transport, refusal)
            return None
        try:
            await self.bus.subscribe(
                connection,
                connect.channels,
                connect.since,
                lambda result: _welcome(connection, claims, result),
                connect.rewind,
            )
        except BaseException:
            connection.close(INTERNAL_ERROR)
            raise
        return connection

    async def _take_user_slot(self, user: str) -> bool:
        """Take one of the user's max_connections_per_user sockets (on every node with
        Redis); False when they are all taken. Raises BrokerUnavailable."""
        limit = self.settings.max_connections_per_user
        if limit is None:
            return True
        here = len(self.bus.connections.of(user))
        if await self.bus.broker.admit_connection(user, limit, here):
            return True
        self.bus.rate_limited["user_connections"] += 1
        return False

    def _rate_limited(self, connection: Connection, kind: str) -> None:
        self.bus.rate_limited[kind] += 1
        connection.close(RATE_LIMITED)

    async def _receive_connect(
        self, request: web.Request, socket: web.WebSocketResponse, token: str | None
    ) -> Connect | Close | None:
        """The connect (from the handshake, else the first frame), a Close refusing
        the socket, or None if the peer left."""
        query = request.query
        if token is None and self.settings.allow_query_token and "token" in query:
            token = query["token"]
        if token is not None:  # no frame to wait for: the welcome can leave at once
            try:
                return query_connect(token, query)
            except BadFrame as error:
                return bad_request(error)
        self._await_connect(socket)
        try:
            message = await socket.receive()
        finally:
            self._awaiting_connect.pop(socket, None)
            late = self._late.pop(socket, None)
        if late is not None:  # being closed NO_CONNECT_FRAME by _close_late
            await late
            return None
        if message.type in _ENDED:
            return None  # aiohttp has answered it (1009 for an oversized frame)
        try:
            if message.type != WSMsgType.TEXT:
                raise BadFrame("frames must be text")
            frame = parse_client_frame(message.data)
            if not isinstance(frame, Connect):
                raise BadFrame("the first frame must be connect")
        except BadFrame as error:
            return bad_request(error)
        except InvalidRequest:  # a request frame: answerable, but not before connect
            return bad_request(BadFrame("the first frame must be connect"))
        return frame

    def _await_connect(self, socket: web.WebSocketResponse) -> None:
        """Give `socket` auth_timeout seconds to send its connect frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.auth_timeout
        self._awaiting_connect[socket] = deadline
        if self._connect_timer is None:
            self._connect_timer = loop.call_at(deadline, self._close_late, loop)

    def _close_late(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the sockets whose connect frame is late; wake again for the next one.

        Deadlines grow in arrival order (auth_timeout is one for all), so the
        first socket still waiting is the next to be late.
        """
        self._connect_timer = None
        now = loop.time()
        late = []
        for socket, deadline in self._awaiting_connect.items():
            if deadline > now:
                self._connect_timer = loop.call_at(deadline, self._close_late, loop)
                break
            late.append(socket)
        for socket in late:
            del self._awaiting_connect[socket]
            transport = self._unauthenticated.get(socket)
            # Closing wakes the socket's receive(); its handler then awaits this task.
            self._late[socket] = self.bus.track(self._refuse(socket, transport, NO_CONNECT_FRAME))

    async def _refuse(
        self, socket: web.WebSocketResponse, transport: asyncio.Transport | None, close: Close
    ) -> None:
        """Close an unauthenticated socket; abort it if the peer does not answer in time."""
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                await socket.close(code=close.code, message=close.reason.encode())
        except Exception:  # timed out, or the peer is gone: nothing left to tell it
            if transport is not None:
                transport.abort()

    async def _handle(self, connection: Connection, frame: object) -> None:
        bus = self.bus
        if isinstance(frame, Ping):
            connection.send({"type": "pong"})
        elif isinstance(frame, ClientPublish | RpcCall | HistoryRead):
            bus.requests.start(connection, frame)
        elif isinstance(frame, Subscribe):
            await bus.subscribe(
                connection,
                frame.channels,
                frame.since,
                lambda result: {"type": "subscribed", **result.as_json()},
                frame.rewind,
            )
        elif isinstance(frame, Unsubscribe):
            left = bus.unsubscribe(connection, frame.channels)
            connection.send({"type": "unsubscribed", "channels": left, "reason": "client"})
        elif isinstance(frame, Refresh):
            await self._refresh(connection, frame.token)
        else:
            raise BadFrame("connect was already received")

    async def _refresh(self, connection: Connection, token: str) -> None:
        try:
            claims = await self.bus.verify(token)
            if claims.subject != connection.claims.subject:
                connection.close(ANOTHER_USER)
                return
            revoked = await self.bus.refresh(connection, claims)
        except InvalidToken as error:
            self.bus.refused("refresh", error.reason)
            connection.close(unauthorized(error.reason))
            return
        except KeysUnavailable:
            return  # keep the current token until its own expiry; the client may retry
        if revoked:
            connection.send({"type": "unsubscribed", "channels": revoked, "reason": "revoked"})
        connection.send({"type": "refreshed", "expires_at": claims.expires_at, "revoked": revoked})


def _welcome(connection: Connection, claims: Claims, result: SubscribeResult) -> dict[str, Any]:
    return {
        "type": "welcome",
        "client": connection.id,
        "user": claims.subject,
        "expires_at": claims.expires_at,
        **result.as_json(),
    }
