"""The aiohttp side: setup(), the WebSocket and emit handlers, the served JS client.

This is the one place where errors become HTTP statuses and close codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import WSMsgType, web
from marshmallow import Schema, ValidationError, validate, validates_schema
from marshmallow import fields as mf

from .brokers import Broker, MemoryBroker
from .brokers.base import is_valid_message_id
from .bus import Bus, SubscribeResult
from .connection import Connection
from .errors import BrokerUnavailable, InvalidSettings, InvalidToken, KeysUnavailable
from .grants import is_valid_channel, may
from .protocol import (
    BadFrame,
    CloseCode,
    Connect,
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    encode_data,
    parse_client_frame,
)
from .settings import Settings, load_settings
from .tokens import Claims, JwksVerifier, SecretVerifier, TokenVerifier

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["BUS_KEY", "get_bus", "setup"]

logger = logging.getLogger("aiohttp_wsbus")

BUS_KEY: Final = web.AppKey("aiohttp_wsbus.bus", Bus)
STATIC_DIR: Final = Path(__file__).parent / "static"
MAX_EMIT_CHANNELS: Final = 100


def setup(
    app: web.Application,
    *,
    jwks_url: str | None = None,
    jwt_secret: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    base_path: str = "/ws",
    algorithms: Sequence[str] | None = None,
    channels_claim: str = "channels",
    publish_claim: str = "publish",
    api_keys: Sequence[str] = (),
    broker: Broker | None = None,
    leeway: float = 30,
    heartbeat: float | None = 25.0,
    auth_timeout: float = 10.0,
    close_timeout: float = 5.0,
    max_message_size: int = 65536,
    max_channels: int = 128,
    max_connections: int | None = None,
    send_buffer_limit: int = 1 << 20,
    allowed_origins: Sequence[str] | None = None,
    allow_query_token: bool = False,
    emit_max_size: int = 1 << 20,
    history_size: int = 100,
    history_ttl: float = 300.0,
    jwks_refetch_interval: float = 30.0,
    jwks_refresh_interval: float = 300.0,
    metrics: bool = False,
) -> Bus:
    """Add the bus's WebSocket, emit and JS routes to `app`; return the Bus.

    Raises InvalidSettings (a ValueError) naming any setting that is wrong.
    """
    given = dict(locals())
    del given["app"], given["broker"]
    settings = load_settings(given)
    if broker is None:
        broker = MemoryBroker()
    elif not isinstance(broker, Broker):
        raise InvalidSettings("broker: must be an aiohttp_wsbus.Broker instance")
    if BUS_KEY in app:
        raise InvalidSettings("aiohttp_wsbus.setup() was already called for this app")
    bus = Bus(settings, broker, _make_verifier(settings))
    app[BUS_KEY] = bus
    handlers = _Handlers(bus)
    base = settings.base_path.rstrip("/")
    app.router.add_get(base or "/", handlers.websocket)
    if base:
        app.router.add_get(base + "/", handlers.websocket)
    app.router.add_route("*", base + "/emit", handlers.emit)
    app.router.add_get(base + "/wsbus.js", handlers.javascript)
    app.router.add_get(base + "/health", handlers.health)
    if settings.metrics:
        app.router.add_get(base + "/metrics", handlers.metrics)
    app.cleanup_ctx.append(handlers.lifetime)
    app.on_shutdown.append(handlers.shutdown)
    return bus


def get_bus(app: web.Application) -> Bus:
    """The Bus that setup() stored on `app`."""
    try:
        return app[BUS_KEY]
    except KeyError:
        raise RuntimeError(
            "aiohttp_wsbus is not set up for this app: call aiohttp_wsbus.setup(app, ...) first"
        ) from None


def _make_verifier(settings: Settings) -> TokenVerifier:
    common: dict[str, Any] = {
        "algorithms": settings.algorithms,
        "issuer": settings.issuer,
        "audience": settings.audience,
        "leeway": settings.leeway,
        "channels_claim": settings.channels_claim,
        "publish_claim": settings.publish_claim,
    }
    if settings.jwt_secret is not None:
        return SecretVerifier(settings.jwt_secret, **common)
    assert settings.jwks_url is not None
    return JwksVerifier(
        settings.jwks_url,
        refetch_interval=settings.jwks_refetch_interval,
        refresh_interval=settings.jwks_refresh_interval,
        **common,
    )


def _json_error(status: int, error: str, **details: Any) -> web.Response:
    return web.json_response({"error": error, **details}, status=status)


def _check_message_id(value: str) -> None:
    if not is_valid_message_id(value):
        raise ValidationError("id must be 1 to 128 printable ASCII characters")


class _EmitSchema(Schema):
    """The body of POST {base_path}/emit."""

    channel = mf.String()
    channels = mf.List(mf.String(), validate=validate.Length(min=1, max=MAX_EMIT_CHANNELS))
    data = mf.Raw(allow_none=True)
    payload = mf.Raw(allow_none=True)  # asgi_ws's name for data
    id = mf.String(validate=lambda value: _check_message_id(value))

    @validates_schema
    def _one_target(self, body: dict[str, Any], **_: Any) -> None:
        if ("channel" in body) == ("channels" in body):
            raise ValidationError("give either channel or channels", "channel")
        if "data" in body and "payload" in body:
            raise ValidationError("give data or payload, not both", "data")
        if "data" not in body and "payload" not in body:
            raise ValidationError("data is required", "data")
        for channel in body.get("channels", [body.get("channel")]):
            if not is_valid_channel(channel):
                raise ValidationError(f"invalid channel name: {channel!r}", "channels")


_EMIT_SCHEMA: Final = _EmitSchema()


class _Handlers:
    """The request handlers of one bus."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self._javascript: tuple[bytes, str] | None = None
        # Digests compare in constant time whatever the keys' lengths.
        self._api_key_digests = [
            hashlib.sha256(k.encode()).digest() for k in self.settings.api_keys
        ]
        self._metrics: CollectorRegistry | None = None
        if self.settings.metrics:
            from .metrics import registry_for  # prometheus-client is an optional extra

            self._metrics = registry_for(bus)
        # Upgraded sockets that have not authenticated yet: the bus does not know them.
        self._unauthenticated: dict[web.WebSocketResponse, asyncio.Transport | None] = {}

    # -- lifetime --------------------------------------------------------

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self.bus.start(session)
            try:
                yield
            finally:
                await self.bus.stop()

    async def shutdown(self, app: web.Application) -> None:
        await asyncio.gather(
            self.bus.close_all(CloseCode.GOING_AWAY),
            *(
                _close_within(socket, transport, self.settings.close_timeout)
                for socket, transport in list(self._unauthenticated.items())
            ),
        )

    # -- websocket -------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        if settings.allowed_origins is not None:
            origin = request.headers.get("Origin")
            # Browsers always send Origin; non-browser clients cannot be forged into one.
            if origin is not None and origin not in settings.allowed_origins:
                return _json_error(403, "origin_not_allowed")
        socket = web.WebSocketResponse(
            heartbeat=settings.heartbeat,
            max_msg_size=settings.max_message_size,
            compress=False,  # frames are built once and written as they are
            timeout=settings.close_timeout,
        )
        try:
            await socket.prepare(request)  # validates the handshake once
        except web.HTTPException:
            return _json_error(426, "websocket_upgrade_required")
        self.bus.open_sockets += 1
        transport = request.transport
        self._unauthenticated[socket] = (
            transport if isinstance(transport, asyncio.Transport) else None
        )
        try:
            connection = await self._authenticate(request, socket)
        finally:
            self._unauthenticated.pop(socket, None)
        # The receive loop lives in this frame on purpose: one coroutine per idle
        # socket, not a stack of them, is memory every connection pays.
        try:
            if connection is not None:
                async for message in socket:
                    if connection.is_closing:
                        break
                    try:
                        if message.type != WSMsgType.TEXT:
                            raise BadFrame("frames must be text")
                        await self._handle(connection, parse_client_frame(message.data))
                    except BadFrame:
                        connection.close(CloseCode.BAD_REQUEST)
        finally:
            self.bus.open_sockets -= 1
            if connection is not None:
                connection.close(CloseCode.NORMAL)
        return socket

    async def _authenticate(
        self, request: web.Request, socket: web.WebSocketResponse
    ) -> Connection | None:
        """Admit the socket: limits, connect frame, token, welcome; None if refused."""
        limit = self.settings.max_connections
        if limit is not None and self.bus.open_sockets > limit:
            await socket.close(code=CloseCode.TRY_AGAIN_LATER, message=b"connection limit")
            return None
        if not self.bus.broker.is_available:
            await socket.close(code=CloseCode.TRY_AGAIN_LATER, message=b"broker unavailable")
            return None
        connect = await self._receive_connect(request, socket)
        if connect is None:
            return None
        try:
            claims = await self.bus.verifier.verify(connect.token or "")
        except InvalidToken as error:
            logger.info("websocket refused: token %s", error.reason)
            self.bus.auth_failures[error.reason] += 1
            await socket.close(code=CloseCode.UNAUTHORIZED, message=b"unauthorized")
            return None
        except KeysUnavailable:
            await socket.close(code=CloseCode.TRY_AGAIN_LATER, message=b"keys unavailable")
            return None
        transport = request.transport
        if transport is None or not isinstance(transport, asyncio.Transport):
            return None
        connection = self.bus.connect(socket, transport, claims)
        try:
            await self.bus.subscribe(
                connection,
                connect.channels,
                connect.since,
                lambda result: _welcome(connection, claims, result),
            )
        except BaseException:
            connection.close(CloseCode.INTERNAL_ERROR)
            raise
        return connection

    async def _receive_connect(
        self, request: web.Request, socket: web.WebSocketResponse
    ) -> Connect | None:
        query = request.query
        if self.settings.allow_query_token and "token" in query:
            channels = [c for c in query.get("channels", "").split(",") if c]
            return Connect(query["token"], list(dict.fromkeys(channels)), {})
        try:
            message = await socket.receive(timeout=self.settings.auth_timeout)
        except TimeoutError:
            await socket.close(code=CloseCode.UNAUTHORIZED, message=b"no connect frame")
            return None
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None
        if message.type == WSMsgType.ERROR:
            return None  # aiohttp has closed it (1009 for an oversized frame)
        try:
            if message.type != WSMsgType.TEXT:
                raise BadFrame("frames must be text")
            frame = parse_client_frame(message.data)
            if not isinstance(frame, Connect):
                raise BadFrame("the first frame must be connect")
        except BadFrame as error:
            await socket.close(code=CloseCode.BAD_REQUEST, message=str(error).encode())
            return None
        if frame.token is None:
            self.bus.auth_failures["missing"] += 1
            await socket.close(code=CloseCode.UNAUTHORIZED, message=b"token required")
            return None
        return frame

    async def _handle(self, connection: Connection, frame: object) -> None:
        bus = self.bus
        if isinstance(frame, Ping):
            connection.send({"type": "pong"})
        elif isinstance(frame, Subscribe):
            await bus.subscribe(
                connection,
                frame.channels,
                frame.since,
                lambda result: {"type": "subscribed", **result.as_json()},
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
            claims = await self.bus.verifier.verify(token)
        except InvalidToken as error:
            logger.info("refresh refused: token %s", error.reason)
            self.bus.auth_failures[error.reason] += 1
            connection.close(CloseCode.UNAUTHORIZED)
            return
        except KeysUnavailable:
            return  # keep the current token until its own expiry; the client may retry
        if claims.subject != connection.claims.subject:
            connection.close(CloseCode.FORBIDDEN)
            return
        revoked = self.bus.regrant(connection, claims)
        if revoked:
            connection.send({"type": "unsubscribed", "channels": revoked, "reason": "revoked"})
        connection.send({"type": "refreshed", "expires_at": claims.expires_at, "revoked": revoked})

    # -- emit ------------------------------------------------------------

    async def emit(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.json_response(
                {"error": "method_not_allowed"}, status=405, headers={"Allow": "POST"}
            )
        if request.content_type != "application/json":
            return _json_error(415, "unsupported_media_type", expected="application/json")
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            loaded = _EMIT_SCHEMA.load(body)
        except ValidationError as error:
            return _json_error(400, "invalid_request", fields=error.messages_dict)
        channels: list[str] = loaded.get("channels") or [loaded["channel"]]
        channels = list(dict.fromkeys(channels))
        refusal = await self._authorize_emit(request, channels)
        if refusal is not None:
            return refusal
        data = encode_data(loaded["data"] if "data" in loaded else loaded["payload"])
        published = []
        try:
            for channel in channels:
                result = await self.bus.publish_encoded(channel, data, message_id=loaded.get("id"))
                published.append(
                    {"channel": result.channel, "offset": result.offset, "epoch": result.epoch}
                )
        except BrokerUnavailable:
            return _json_error(503, "broker_unavailable", published=published)
        except ValueError as error:
            return _json_error(400, "invalid_request", fields={"id": [str(error)]})
        return web.json_response({"published": published}, status=202)

    async def _read_body(self, request: web.Request) -> Any:
        limit = self.settings.emit_max_size
        if request.content_length is not None and request.content_length > limit:
            return _json_error(413, "payload_too_large", limit=limit)
        raw = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            raw += chunk
            if len(raw) > limit:
                return _json_error(413, "payload_too_large", limit=limit)
        try:
            return json.loads(raw)
        except ValueError:
            return _json_error(400, "invalid_request", fields={"_body": ["body is not valid JSON"]})

    async def _authorize_emit(
        self, request: web.Request, channels: list[str]
    ) -> web.Response | None:
        api_key = request.headers.get("X-API-Key")
        if api_key is not None:
            if self._is_known_api_key(api_key):
                return None
            self.bus.auth_failures["api_key"] += 1
            return self._unauthorized()
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.bus.auth_failures["missing"] += 1
            return self._unauthorized()
        try:
            claims = await self.bus.verifier.verify(token.strip())
        except InvalidToken as error:
            logger.info("emit refused: token %s", error.reason)
            self.bus.auth_failures[error.reason] += 1
            return self._unauthorized()
        except KeysUnavailable:
            return _json_error(503, "keys_unavailable")
        refused = [c for c in channels if not may(claims.publish, c)]
        if refused:
            return _json_error(403, "forbidden", channels=refused)
        return None

    def _is_known_api_key(self, candidate: str) -> bool:
        # Compare against every key, always, so timing says nothing about which matched.
        given = hashlib.sha256(candidate.encode()).digest()
        found = False
        for digest in self._api_key_digests:
            found |= hmac.compare_digest(given, digest)
        return found

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )

    # -- operations ------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """For load balancers: 503 while this process cannot do its job."""
        broker = "ok" if self.bus.broker.is_available else "down"
        jwks = self.bus.verifier.key_status
        # Stale keys still verify tokens: degraded, but worth keeping in rotation.
        is_serving = broker == "ok" and jwks != "unavailable"
        report = {
            "status": "ok" if broker == "ok" and jwks == "fresh" else "degraded",
            "connections": len(self.bus.connections),
            "broker": broker,
            "jwks": jwks,
        }
        return web.json_response(
            report, status=200 if is_serving else 503, headers={"Cache-Control": "no-store"}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        from .metrics import CONTENT_TYPE_LATEST, render

        api_key = request.headers.get("X-API-Key")
        if api_key is None or not self._is_known_api_key(api_key):
            self.bus.auth_failures["api_key" if api_key is not None else "missing"] += 1
            return _json_error(401, "unauthorized")
        assert self._metrics is not None
        return web.Response(
            body=render(self._metrics), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # -- javascript ------------------------------------------------------

    async def javascript(self, request: web.Request) -> web.StreamResponse:
        if self._javascript is None:
            try:
                source = (STATIC_DIR / "wsbus.js").read_bytes()
            except OSError:
                return _json_error(404, "not_found")
            self._javascript = (source, '"' + hashlib.sha256(source).hexdigest()[:32] + '"')
        source, etag = self._javascript
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=source, content_type="text/javascript", charset="utf-8", headers=headers
        )


async def _close_within(
    socket: web.WebSocketResponse, transport: asyncio.Transport | None, timeout: float
) -> None:
    try:
        async with asyncio.timeout(timeout):
            await socket.close(code=CloseCode.GOING_AWAY, message=b"server shutting down")
    except TimeoutError:
        if transport is not None:
            transport.abort()


def _welcome(connection: Connection, claims: Claims, result: SubscribeResult) -> dict[str, Any]:
    return {
        "type": "welcome",
        "client": connection.id,
        "user": claims.subject,
        "expires_at": claims.expires_at,
        **result.as_json(),
    }
