"""The example chat: the demo identity provider, the bus at /ws, the chat endpoints and the page.

Routes:

- `GET /`: the chat page (plain HTML/CSS/JS using the served `/ws/wsbus.js`)
- `GET /.well-known/jwks.json` and `POST /login {"user"}`: the demo identity provider
- `POST /send {"room", "text"}`: a signed-in user posts to a room or to `user:NAME`
  (checks the sender's token, publishes in-process with `bus.publish`)
- `POST /api/notify {"text", "channel"?}`: stands for any other back end: it emits
  through `POST /ws/emit` with an API key, over HTTP, like a service in another language.
  It asks for no credentials (it is a demo trigger, and the app listens on loopback by
  default); the API key itself never leaves the server.
- `/ws`, `/ws/emit`, `/ws/wsbus.js`: the bus
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from marshmallow import Schema, ValidationError, validate
from marshmallow import fields as mf

import aiohttp_wsbus
from aiohttp_wsbus.grants import may

from .identity import AUDIENCE, LOBBY, STAFF_ROOM, IdentityProvider, check_user_name

__all__ = ["ROOMS", "ExampleSettings", "local_url", "make_app"]

logger = logging.getLogger("example_app")

STATIC_DIR: Final = Path(__file__).parent / "static"
JWKS_PATH: Final = "/.well-known/jwks.json"
MAX_TEXT_LENGTH: Final = 2000

ROOMS: Final = (
    {"channel": LOBBY, "title": "Lobby", "about": "Everyone who signs in"},
    {"channel": STAFF_ROOM, "title": "Staff", "about": "Staff members only"},
)
ROOM_CHANNELS: Final = frozenset(room["channel"] for room in ROOMS)


@dataclass(frozen=True, slots=True)
class ExampleSettings:
    """How the example app is run (the command-line flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    staff: tuple[str, ...] = ("alice", "carol")
    token_lifetime: int = 120
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)


IDENTITY_KEY: Final = web.AppKey("example_app.identity", IdentityProvider)
SETTINGS_KEY: Final = web.AppKey("example_app.settings", ExampleSettings)
SESSION_KEY: Final = web.AppKey("example_app.session", aiohttp.ClientSession)


def local_url(host: str, port: int) -> str:
    """The URL this process can reach itself at, whatever address it listens on."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison, not a bind)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def make_app(settings: ExampleSettings) -> web.Application:
    """The example application, ready for web.run_app or an AppRunner."""
    base_url = local_url(settings.host, settings.port)
    identity = IdentityProvider(
        f"{base_url}/", staff=settings.staff, token_lifetime=settings.token_lifetime
    )
    app = web.Application()
    app[SETTINGS_KEY] = settings
    app[IDENTITY_KEY] = identity
    app.cleanup_ctx.append(_client_session)
    # This is where a real identity provider goes: Keycloak, Auth0, ... publish a JWKS URL.
    # Here it is this app, which does not listen yet when the bus first fetches:
    # the bus retries a second later (logged at INFO), by which time it does.
    aiohttp_wsbus.setup(
        app,
        jwks_url=base_url + JWKS_PATH,
        issuer=identity.issuer,
        audience=AUDIENCE,
        api_keys=[settings.api_key],
    )
    app.on_startup.append(_explain_first_key_fetch)  # runs after the bus has started
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_post("/login", login)
    app.router.add_post("/send", send)
    app.router.add_post("/api/notify", notify)
    return app


async def _explain_first_key_fetch(app: web.Application) -> None:
    """Say why the bus's first key fetch failed, right after the bus logged it."""
    if aiohttp_wsbus.get_bus(app).verifier.key_status == "fresh":
        return
    logger.info(
        "the JWKS line above is expected here: the bus asked this app for its keys before "
        "the app was listening; the retry a second later gets them (a real identity "
        "provider would already be up)"
    )


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        app[SESSION_KEY] = session
        yield


# -- errors and input ------------------------------------------------------


def _error(status: int, error: str, **details: Any) -> web.HTTPException:
    """An HTTP error with a JSON body, to raise."""
    body = json.dumps({"error": error, **details})
    exception = web.HTTPException(text=body, content_type="application/json")
    exception.set_status(status)
    return exception


async def _json_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The request's JSON body, loaded by `schema`; raises a 4xx JSON error otherwise."""
    if request.content_type != "application/json":
        raise _error(415, "unsupported_media_type", expected="application/json")
    try:
        body = await request.json()
    except ValueError:
        raise _error(400, "invalid_request", fields={"_body": ["body is not valid JSON"]}) from None
    try:
        loaded: dict[str, Any] = schema.load(body)
    except ValidationError as error:
        raise _error(400, "invalid_request", fields=error.messages_dict) from None
    return loaded


async def _sender(request: web.Request) -> aiohttp_wsbus.Claims:
    """The verified claims of the request's bearer token; raises 401 without one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized()
    bus = aiohttp_wsbus.get_bus(request.app)
    try:
        return await bus.verifier.verify(token.strip())
    except aiohttp_wsbus.InvalidToken:
        raise _unauthorized() from None
    except aiohttp_wsbus.KeysUnavailable:
        raise _error(503, "keys_unavailable") from None


def _unauthorized() -> web.HTTPException:
    exception = _error(401, "unauthorized")
    exception.headers["WWW-Authenticate"] = "Bearer"
    return exception


def _check_user(value: str) -> None:
    try:
        check_user_name(value)
    except ValueError as error:
        raise ValidationError(str(error)) from None


def _check_room(value: str) -> None:
    if value in ROOM_CHANNELS:
        return
    prefix, _, user = value.partition(":")
    if prefix != "user" or not user:
        raise ValidationError(f"must be one of {sorted(ROOM_CHANNELS)} or user:NAME")
    _check_user(user)


def _check_text(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be blank")


class _LoginSchema(Schema):
    user = mf.String(required=True, validate=_check_user)


class _SendSchema(Schema):
    room = mf.String(required=True, validate=_check_room)
    text = mf.String(required=True, validate=[validate.Length(max=MAX_TEXT_LENGTH), _check_text])


class _NotifySchema(Schema):
    channel = mf.String(load_default=LOBBY, validate=_check_room)
    text = mf.String(required=True, validate=[validate.Length(max=MAX_TEXT_LENGTH), _check_text])


_LOGIN_SCHEMA: Final = _LoginSchema()
_SEND_SCHEMA: Final = _SendSchema()
_NOTIFY_SCHEMA: Final = _NotifySchema()


# -- handlers --------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[IDENTITY_KEY].jwks())


async def login(request: web.Request) -> web.Response:
    """Demo sign-in: anyone may be anyone. Answers a token and what it grants."""
    body = await _json_body(request, _LOGIN_SCHEMA)
    issued = request.app[IDENTITY_KEY].issue(body["user"])
    return web.json_response(
        {
            "token": issued.token,
            "user": issued.user,
            "is_staff": issued.is_staff,
            "expires_at": issued.expires_at,
            "channels": issued.channels,
            "rooms": list(ROOMS),
        }
    )


async def send(request: web.Request) -> web.Response:
    """Post a signed-in user's message to a room they may read, or to a user."""
    claims = await _sender(request)
    body = await _json_body(request, _SEND_SCHEMA)
    room: str = body["room"]
    # Rooms follow the token's grants; anyone signed in may write to a user's channel.
    if room in ROOM_CHANNELS and not may(claims.subscribe, room):
        raise _error(403, "forbidden", room=room)
    message: dict[str, Any] = {
        "from": claims.subject,
        "text": body["text"],
        "room": room,
        "sent_at": _now_ms(),
    }
    if room.startswith("user:"):
        message["to"] = room.removeprefix("user:")
    bus = aiohttp_wsbus.get_bus(request.app)
    try:
        published = await bus.publish(room, message)
    except aiohttp_wsbus.BrokerUnavailable:
        raise _error(503, "broker_unavailable") from None
    return web.json_response(
        {
            "published": {"channel": published.channel, "offset": published.offset},
            "message": message,
        },
        status=202,
    )


async def notify(request: web.Request) -> web.Response:
    """A back-end event: emitted through POST /ws/emit with the API key, as any service would."""
    body = await _json_body(request, _NOTIFY_SCHEMA)
    settings = request.app[SETTINGS_KEY]
    message = {
        "from": "backend",
        "kind": "notice",
        "text": body["text"],
        "room": body["channel"],
        "sent_at": _now_ms(),
    }
    try:
        async with request.app[SESSION_KEY].post(
            local_url(settings.host, settings.port) + "/ws/emit",
            json={"channel": body["channel"], "data": message},
            headers={"X-API-Key": settings.api_key},
        ) as response:
            status = response.status
            answer = await response.json() if status == 202 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        logger.warning("emit failed: %s", type(error).__name__)
        raise _error(502, "emit_failed") from None
    if answer is None:
        logger.warning("emit answered HTTP %s", status)
        raise _error(502, "emit_failed", emit_status=status)
    return web.json_response({"published": answer["published"], "message": message}, status=202)


def _now_ms() -> int:
    return int(time.time() * 1000)
