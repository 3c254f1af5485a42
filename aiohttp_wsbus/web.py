"""The aiohttp side: setup(), the routes, the bus's lifetime, health, metrics, static files."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web

from .brokers import Broker, MemoryBroker
from .bus import Bus
from .emit import ApiKeys, Endpoints
from .errors import InvalidSettings, http_error
from .protocol import SHUTTING_DOWN
from .queries import Queries
from .settings import Settings, load_settings
from .tokens import JwksVerifier, SecretVerifier, TokenVerifier
from .websocket import WebSocketHandler

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["BUS_KEY", "get_bus", "setup"]

logger = logging.getLogger("aiohttp_wsbus")

BUS_KEY: Final = web.AppKey("aiohttp_wsbus.bus", Bus)
STATIC_DIR: Final = Path(__file__).parent / "static"
# What the bus serves under base_path, and as what.
STATIC_FILES: Final = {
    "wsbus.js": "text/javascript; charset=utf-8",
    "wsbus.d.ts": "application/typescript; charset=utf-8",
}


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
    authorize_timeout: float = 2.0,
    close_timeout: float = 5.0,
    max_message_size: int = 65536,
    max_channels: int = 128,
    max_connections: int | None = None,
    max_connections_per_user: int | None = None,
    client_rate: tuple[float, int] | None = (20, 100),
    subscribe_rate: tuple[float, int] | None = (50, 256),
    emit_rate: tuple[float, int] | None = None,
    send_buffer_limit: int = 1 << 20,
    allowed_origins: Sequence[str] | None = None,
    allow_query_token: bool = False,
    emit_max_size: int = 1 << 20,
    emit_timeout: float = 10.0,
    history_size: int = 100,
    history_ttl: float = 300.0,
    client_publish: bool = False,
    rpc_timeout: float = 10.0,
    channels: Mapping[str, Mapping[str, Any]] | None = None,
    presence: Sequence[str] = (),
    presence_claim: str = "presence",
    presence_info_claim: str = "info",
    presence_ttl: float = 60.0,
    max_presence_members: int = 1000,
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
    routes = _Routes(bus)
    base = settings.base_path.rstrip("/")
    app.router.add_get(base or "/", routes.websocket.handle)
    if base:
        app.router.add_get(base + "/", routes.websocket.handle)
    app.router.add_route("*", base + "/emit", routes.http.emit)
    app.router.add_route("*", base + "/users/{user}/disconnect", routes.http.disconnect)
    app.router.add_route("*", base + "/users/{user}/unsubscribe", routes.http.unsubscribe)
    app.router.add_route("*", base + "/revocations", routes.http.revoke)
    # Channel names may hold '/': the name is everything up to the last segment.
    app.router.add_route("*", base + "/channels/{channel:.+}/presence", routes.queries.presence)
    app.router.add_route("*", base + "/channels/{channel:.+}/position", routes.queries.position)
    app.router.add_route("*", base + "/channels/{channel:.+}/history", routes.queries.history)
    for name in STATIC_FILES:
        app.router.add_get(f"{base}/{name}", routes.static)
    app.router.add_get(base + "/health", routes.health)
    if settings.metrics:
        app.router.add_get(base + "/metrics", routes.metrics)
    app.cleanup_ctx.append(routes.lifetime)
    app.on_shutdown.append(routes.shutdown)
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


class _Routes:
    """The routes of one bus, and what they share."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self.api_keys = ApiKeys(self.settings.api_keys)
        self.websocket = WebSocketHandler(bus)
        self.http = Endpoints(bus, self.api_keys)
        self.queries = Queries(bus, self.http)
        self._metrics: CollectorRegistry | None = None
        if self.settings.metrics:
            from .metrics import registry_for  # prometheus-client is an optional extra

            self._metrics = registry_for(bus)

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self.bus.start(session)
            try:
                yield
            finally:
                await self.bus.stop()

    async def shutdown(self, app: web.Application) -> None:
        """Close every socket and cut short bodies still arriving, within close_timeout."""
        await self.http.shutdown()
        await asyncio.gather(self.bus.close_all(SHUTTING_DOWN), self.websocket.shutdown())

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
        if api_key is None or self.api_keys.publisher(api_key) is None:
            self.bus.refused("metrics", "missing" if api_key is None else "api_key")
            raise http_error(web.HTTPUnauthorized, "unauthorized")
        assert self._metrics is not None
        return web.Response(
            body=render(self._metrics), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def static(self, request: web.Request) -> web.StreamResponse:
        """The JS client and its types: ETag and If-None-Match are aiohttp's own."""
        name = request.path.rsplit("/", 1)[-1]
        return web.FileResponse(
            STATIC_DIR / name,
            headers={"Content-Type": STATIC_FILES[name], "Cache-Control": "no-cache"},
        )
