"""The example chat: the demo identity provider, the bus at /ws, the chat endpoints and the page.

Routes:

- `GET /`: the chat page (plain HTML/CSS/JS using the served `/ws/wsbus.js`)
- `GET /.well-known/jwks.json` and `POST /login {"user"}`: the demo identity provider
- `POST /send {"room", "text"}`: a signed-in user posts to a room or to `user:NAME`
  over HTTP (checks the sender's token, or membership for a private room, and
  publishes in-process with `bus.publish`). The page itself publishes on its
  socket instead (`client_publish`): the bus checks the token's `publish` grants
  (or, for a private room, the same membership), and the app's `on_publish`
  hooks stamp the sender (example_app/messages.py)
- `GET /rooms`, `POST /rooms {"name"}`, `POST /rooms/NAME/invite {"user"}`: private
  rooms (example_app/rooms.py), in no token: the bus asks the app's authorizer
- `POST /sign-out-everywhere`: the signed-in user ends every session of theirs: the bus
  closes all their sockets (4410, the pages show "signed out") and refuses every token
  of theirs issued before now
- `POST /admin/bans {"user", "minutes"?}`: staff only (the token's `roles` claim): the
  bus closes the user's sockets and refuses all their tokens; the app refuses their
  login until the ban ends (example_app/bans.py)
- `POST /api/notify {"text", "channel"?}`: stands for any other back end: it emits
  through `POST /ws/emit` with an API key, over HTTP, like a service in another language.
  It asks for no credentials (it is a demo trigger, and the app listens on loopback by
  default); the API key itself never leaves the server.
- `/ws`, `/ws/emit`, `/ws/wsbus.js`: the bus, keeping presence on `chat:*` and `room:*`
  (each room's "online" list: tokens carry the `presence` grant and `info` {"name"})
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

from .bans import MAX_BAN_MINUTES, BanLimit, Bans
from .identity import (
    AUDIENCE,
    LOBBY,
    PRESENCE,
    STAFF_ROLE,
    STAFF_ROOM,
    IdentityProvider,
    check_user_name,
)
from .messages import CHAT_PREFIXES, MAX_TEXT_LENGTH, chat_message, now_ms, stamper
from .rooms import (
    ROOM_PREFIX,
    NotAMember,
    PrivateRooms,
    RoomError,
    RoomExists,
    check_room_name,
)

__all__ = ["BANS_KEY", "PRIVATE_ROOMS_KEY", "ROOMS", "ExampleSettings", "local_url", "make_app"]

logger = logging.getLogger("example_app")

STATIC_DIR: Final = Path(__file__).parent / "static"
JWKS_PATH: Final = "/.well-known/jwks.json"
DEFAULT_BAN_MINUTES: Final = 60
SIGNED_OUT_EVERYWHERE: Final = "signed out everywhere"  # the close reason the pages show

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
PRIVATE_ROOMS_KEY: Final = web.AppKey("example_app.private_rooms", PrivateRooms)
BANS_KEY: Final = web.AppKey("example_app.bans", Bans)


def local_url(host: str, port: int) -> str:
    """The URL this process can reach itself at, whatever address it listens on."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison, not a bind)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def make_app(
    settings: ExampleSettings, *, broker: aiohttp_wsbus.Broker | None = None
) -> web.Application:
    """The example application, ready for web.run_app or an AppRunner.

    `broker` is the bus's (default: a MemoryBroker; a RedisBroker shares it between processes).
    """
    base_url = local_url(settings.host, settings.port)
    identity = IdentityProvider(
        f"{base_url}/", staff=settings.staff, token_lifetime=settings.token_lifetime
    )
    app = web.Application()
    app[SETTINGS_KEY] = settings
    app[IDENTITY_KEY] = identity
    rooms = PrivateRooms()
    app[PRIVATE_ROOMS_KEY] = rooms
    app[BANS_KEY] = Bans()
    app.cleanup_ctx.append(_client_session)
    # This is where a real identity provider goes: Keycloak, Auth0, ... publish a JWKS URL.
    # Here it is this app, which does not listen yet when the bus first fetches:
    # the bus retries a second later (logged at INFO), by which time it does.
    bus = aiohttp_wsbus.setup(
        app,
        jwks_url=base_url + JWKS_PATH,
        issuer=identity.issuer,
        audience=AUDIENCE,
        api_keys=[settings.api_key],
        broker=broker,
        client_publish=True,  # pages send their messages on the socket
        presence=PRESENCE,  # each room's "online" list: who is subscribed to it now
    )
    # Private rooms are in no token: for room:NAME the bus asks the app, at subscribe
    # time (and again at each token refresh), and before a member publishes there.
    # Registered before the app starts.
    bus.authorizer("room:{name}")(rooms.may_join)
    bus.authorizer("room:{name}", action="publish")(rooms.may_join)
    # What a page publishes is stamped with its verified sender: nobody speaks for another.
    for prefix in CHAT_PREFIXES:
        bus.on_publish(prefix + "{name}")(stamper(prefix))
    app.on_startup.append(_explain_first_key_fetch)  # runs after the bus has started
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_post("/login", login)
    app.router.add_post("/send", send)
    app.router.add_get("/rooms", list_rooms)
    app.router.add_post("/rooms", create_room)
    app.router.add_post("/rooms/{name:[a-z0-9_-]{1,32}}/invite", invite)
    app.router.add_post("/sign-out-everywhere", sign_out_everywhere)
    app.router.add_post("/admin/bans", ban)
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
    """The verified claims of the request's bearer token; raises 401 without one.

    A token the bus has revoked (signed out everywhere, banned) is no token here either.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized()
    bus = aiohttp_wsbus.get_bus(request.app)
    try:
        return await bus.verify(token.strip())
    except aiohttp_wsbus.InvalidToken:
        raise _unauthorized() from None
    except aiohttp_wsbus.KeysUnavailable:
        raise _error(503, "keys_unavailable") from None


async def _staff_member(request: web.Request) -> aiohttp_wsbus.Claims:
    """The verified claims of a staff token; raises 401 without a token, 403 for anyone else."""
    claims = await _sender(request)
    roles = claims.extra.get("roles")
    if not isinstance(roles, list) or STAFF_ROLE not in roles:
        raise _error(403, "forbidden", detail="staff only")
    return claims


def _unauthorized() -> web.HTTPException:
    exception = _error(401, "unauthorized")
    exception.headers["WWW-Authenticate"] = "Bearer"
    return exception


def _check_user(value: str) -> None:
    try:
        check_user_name(value)
    except ValueError as error:
        raise ValidationError(str(error)) from None


def _check_room_name(value: str) -> None:
    try:
        check_room_name(value)
    except ValueError as error:
        raise ValidationError(str(error)) from None


def _check_room(value: str) -> None:
    if value in ROOM_CHANNELS:
        return
    prefix, _, name = value.partition(":")
    if prefix == "user" and name:
        _check_user(name)
    elif prefix + ":" == ROOM_PREFIX and name:
        _check_room_name(name)
    else:
        raise ValidationError(f"must be one of {sorted(ROOM_CHANNELS)}, user:NAME or room:NAME")


def _check_text(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be blank")


class _LoginSchema(Schema):
    user = mf.String(required=True, validate=_check_user)


class _SendSchema(Schema):
    room = mf.String(required=True, validate=_check_room)
    text = mf.String(required=True, validate=[validate.Length(max=MAX_TEXT_LENGTH), _check_text])


class _RoomSchema(Schema):
    name = mf.String(required=True, validate=_check_room_name)


class _InviteSchema(Schema):
    user = mf.String(required=True, validate=_check_user)


class _BanSchema(Schema):
    user = mf.String(required=True, validate=_check_user)
    minutes = mf.Integer(
        load_default=DEFAULT_BAN_MINUTES,
        strict=True,
        validate=validate.Range(min=1, max=MAX_BAN_MINUTES),
    )


class _NotifySchema(Schema):
    channel = mf.String(load_default=LOBBY, validate=_check_room)
    text = mf.String(required=True, validate=[validate.Length(max=MAX_TEXT_LENGTH), _check_text])


_LOGIN_SCHEMA: Final = _LoginSchema()
_SEND_SCHEMA: Final = _SendSchema()
_ROOM_SCHEMA: Final = _RoomSchema()
_INVITE_SCHEMA: Final = _InviteSchema()
_BAN_SCHEMA: Final = _BanSchema()
_NOTIFY_SCHEMA: Final = _NotifySchema()


# -- handlers --------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[IDENTITY_KEY].jwks())


async def login(request: web.Request) -> web.Response:
    """Demo sign-in: anyone may be anyone, but the banned. Answers a token and what it grants."""
    body = await _json_body(request, _LOGIN_SCHEMA)
    user: str = body["user"]
    banned_until = request.app[BANS_KEY].banned_until(user)
    if banned_until is not None:
        raise _error(403, "banned", user=user, until=banned_until)
    issued = request.app[IDENTITY_KEY].issue(user)
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
    if not await _may_post(request, claims, room):
        raise _error(403, "forbidden", room=room)
    message = chat_message(claims.subject, room, body["text"])
    published = await _publish(request, room, message)
    return web.json_response(
        {
            "published": {"channel": published.channel, "offset": published.offset},
            "message": message,
        },
        status=202,
    )


async def _may_post(request: web.Request, claims: aiohttp_wsbus.Claims, room: str) -> bool:
    """Whether the sender may write to `room`: the rule the bus applies to reading it."""
    if room in ROOM_CHANNELS:  # granted by the token
        return may(claims.subscribe, room)
    if room.startswith(ROOM_PREFIX):  # the same function the bus's authorizer is
        return await request.app[PRIVATE_ROOMS_KEY].may_join(claims, room.removeprefix(ROOM_PREFIX))
    return True  # anyone signed in may write to a user's channel


async def _publish(
    request: web.Request, channel: str, message: dict[str, Any]
) -> aiohttp_wsbus.Published:
    try:
        return await aiohttp_wsbus.get_bus(request.app).publish(channel, message)
    except aiohttp_wsbus.BrokerUnavailable:
        raise _error(503, "broker_unavailable") from None


# -- private rooms ---------------------------------------------------------------


def _room_error(error: RoomError, name: str) -> web.HTTPException:
    """The HTTP answer to what the room store refused about room `name`."""
    room = ROOM_PREFIX + name
    if isinstance(error, NotAMember):
        return _error(403, "forbidden", room=room)
    if isinstance(error, RoomExists):
        return _error(409, "room_exists", room=room)
    return _error(409, "room_limit", room=room, detail=str(error))


async def list_rooms(request: web.Request) -> web.Response:
    """The private rooms the signed-in user is a member of."""
    claims = await _sender(request)
    rooms = request.app[PRIVATE_ROOMS_KEY].rooms_of(claims.subject)
    return web.json_response({"rooms": [room.as_json() for room in rooms]})


async def create_room(request: web.Request) -> web.Response:
    """A new private room; the signed-in user is its first member."""
    claims = await _sender(request)
    body = await _json_body(request, _ROOM_SCHEMA)
    name: str = body["name"]
    try:
        room = request.app[PRIVATE_ROOMS_KEY].create(name, claims.subject)
    except RoomError as error:
        raise _room_error(error, name) from None
    return web.json_response({"room": room.as_json()}, status=201)


async def invite(request: web.Request) -> web.Response:
    """A member adds a user to a private room, and the bus tells the room and the user.

    The user's open sockets may then subscribe to the room at once: the authorizer
    sees the new member; no new token is needed.
    """
    claims = await _sender(request)
    body = await _json_body(request, _INVITE_SCHEMA)
    name, inviter, invitee = request.match_info["name"], claims.subject, body["user"]
    try:
        room, is_new = request.app[PRIVATE_ROOMS_KEY].invite(name, inviter, invitee)
    except RoomError as error:
        raise _room_error(error, name) from None
    if is_new:
        sent_at = now_ms()
        news = {"from": inviter, "room": room.channel, "sent_at": sent_at}
        await _publish(
            request,
            room.channel,
            {
                **news,
                "kind": "member",
                "member": invitee,
                "members": list(room.members),
                "text": f"{inviter} invited {invitee}",
            },
        )
        await _publish(
            request,
            f"user:{invitee}",
            {**news, "kind": "invite", "name": room.name, "text": f"{inviter} invited you"},
        )
    return web.json_response({"room": room.as_json(), "added": is_new})


# -- ending sessions --------------------------------------------------------------


async def sign_out_everywhere(request: web.Request) -> web.Response:
    """The signed-in user ends every session of theirs, on every node of the bus.

    `bus.disconnect` closes their sockets now, with the reason their pages show;
    `bus.revoke(issued_before=now)` makes sure no token issued before now comes
    back, wherever a copy of it is (another device, a window offline right now),
    until the last of them would have expired anyway. A new sign-in still works.
    """
    claims = await _sender(request)
    bus = aiohttp_wsbus.get_bus(request.app)
    user = claims.subject
    now = time.time()
    # The disconnect first: its reason is what the pages show ("token revoked" otherwise).
    # A socket that connects in between with an old token is closed by the revocation.
    until = now + request.app[SETTINGS_KEY].token_lifetime + bus.settings.leeway
    await _end_sessions(bus, user, SIGNED_OUT_EVERYWHERE, issued_before=now, until=until)
    return web.json_response(
        {"user": user, "issued_before": now, "refused_until": until}, status=202
    )


async def ban(request: web.Request) -> web.Response:
    """Staff ban a user: every socket of theirs closes, every token of theirs is refused,
    and the app refuses their login, until the ban ends."""
    staff = await _staff_member(request)
    body = await _json_body(request, _BAN_SCHEMA)
    user: str = body["user"]
    if user == staff.subject:
        raise _error(400, "invalid_request", fields={"user": ["you cannot ban yourself"]})
    until = time.time() + body["minutes"] * 60
    try:
        # The app's own refusal first: it holds even if the broker is down below.
        request.app[BANS_KEY].ban(user, until)
    except BanLimit as error:
        raise _error(409, "ban_limit", detail=str(error)) from None
    bus = aiohttp_wsbus.get_bus(request.app)
    await _end_sessions(bus, user, f"banned by {staff.subject}", issued_before=None, until=until)
    return web.json_response({"banned": user, "until": until}, status=202)


async def _end_sessions(
    bus: aiohttp_wsbus.Bus, user: str, reason: str, *, issued_before: float | None, until: float
) -> None:
    """Close every socket of `user` with `reason` (4410), then refuse their tokens
    (those issued before `issued_before`, or all of them) until `until`."""
    try:
        await bus.disconnect(user, reason=reason)
        await bus.revoke(user=user, issued_before=issued_before, until=until)
    except aiohttp_wsbus.BrokerUnavailable:
        raise _error(503, "broker_unavailable") from None


async def notify(request: web.Request) -> web.Response:
    """A back-end event: emitted through POST /ws/emit with the API key, as any service would."""
    body = await _json_body(request, _NOTIFY_SCHEMA)
    settings = request.app[SETTINGS_KEY]
    message = {
        "from": "backend",
        "kind": "notice",
        "text": body["text"],
        "room": body["channel"],
        "sent_at": now_ms(),
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

