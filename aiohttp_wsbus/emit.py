"""The HTTP emit and control endpoints: who is asking (API key or Bearer token), the
body, then the publish or the control (disconnect, unsubscribe, revoke)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Sequence
from typing import Any, Final, NoReturn

import aiohttp
from aiohttp import web
from marshmallow import Schema, ValidationError, validate, validates_schema
from marshmallow import fields as mf

from .brokers.base import Published, is_valid_message_id, subject_publisher
from .bus import Bus
from .emit_batch import emit_batch, simple_message
from .errors import BrokerUnavailable, InvalidToken, KeysUnavailable, RequestError, http_error
from .grants import is_valid_channel, may
from .limits import PublisherLimits
from .protocol import encode_data
from .tokens import Claims

__all__ = ["ApiKeys", "Endpoints"]

MAX_EMIT_CHANNELS: Final = 100


class ApiKeys:
    """The configured API keys; tells which one a request holds, in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        # Digests compare in constant time whatever the keys' lengths; each key's
        # scope is named once, not per request.
        digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self._scopes = [(digest, "key:" + digest[:8].hex()) for digest in digests]

    def publisher(self, candidate: str) -> str | None:
        """The idempotency scope of the key `candidate` ("key:..."), or None if unknown."""
        # Headers arrive decoded with surrogateescape: encode them back the same way.
        given = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        found = None
        # Compare against every key, always, so timing says nothing about which matched.
        for digest, scope in self._scopes:
            if hmac.compare_digest(given, digest):
                found = scope
        return found


class _EmitSchema(Schema):
    """The body of POST {base_path}/emit: the one place its fields are checked."""

    channel = mf.String()
    channels = mf.List(mf.String(), validate=validate.Length(min=1, max=MAX_EMIT_CHANNELS))
    data = mf.Raw(allow_none=True)
    payload = mf.Raw(allow_none=True)  # asgi_ws's name for data
    id = mf.String()
    ephemeral = mf.Boolean(truthy={True}, falsy={False}, load_default=False)

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
        if "id" in body and not is_valid_message_id(body["id"]):
            raise ValidationError("id must be 1 to 128 printable ASCII characters", "id")
        if "id" in body and body.get("ephemeral"):
            raise ValidationError("an ephemeral message takes no id", "id")


_EMIT_SCHEMA: Final = _EmitSchema()
def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _not_a_number(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads(raw, parse_float=...) would make a decoder per request.
_JSON_DECODER: Final = json.JSONDecoder(parse_float=_finite, parse_constant=_not_a_number)


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no numbers that overflow to them."""
    try:
        return _JSON_DECODER.decode(raw.decode(_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise _invalid("_body", "JSON nested too deeply") from None
    except ValueError as error:  # UnicodeDecodeError included
        raise _invalid("_body", f"body is not valid JSON: {error}") from None


def _encoding(raw: bytes) -> str:
    """What json.loads takes bytes for: UTF-8, -16 or -32, told apart by the first bytes.

    A body that opens with "{" and then a byte other than zero (no byte order
    mark, not UTF-16 or -32) is UTF-8: the common case, told without the look-up.
    """
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return "utf-8"
    return json.detect_encoding(raw)


def _invalid(field: str, message: str) -> web.HTTPException:
    return http_error(web.HTTPBadRequest, "invalid_request", fields={field: [message]})


class Endpoints:
    """POST {base_path}/emit and the control endpoints (API key only)."""

    def __init__(self, bus: Bus, api_keys: ApiKeys) -> None:
        self.bus = bus
        self.settings = bus.settings
        self.api_keys = api_keys
        self._body_deadlines: set[asyncio.Timeout] = set()
        self._is_shutting_down = False
        rate = self.settings.emit_rate
        self._limits = None if rate is None else PublisherLimits(*rate)

    async def shutdown(self) -> None:
        """Give bodies still arriving at most close_timeout more, then answer them 503."""
        self._is_shutting_down = True
        deadline = asyncio.get_running_loop().time() + self.settings.close_timeout
        for timeout in self._body_deadlines:
            when = timeout.when()
            if when is None or when > deadline:
                timeout.reschedule(deadline)

    async def emit(self, request: web.Request) -> web.Response:
        """POST {base_path}/emit."""
        _check_post_json(request)
        # Credentials first, from the headers: a stranger's body is never read.
        publisher, claims = await self.authenticate(request, "emit")
        self._check_rate(publisher)
        body = await self._read_json(request)
        try:
            if isinstance(body, dict) and "messages" in body:
                published = await emit_batch(self, publisher, claims, body)
            else:
                published = await self._emit_one(publisher, claims, body)
        except BrokerUnavailable as error:  # with what landed before it went
            landed = _answers(error.published)
            raise http_error(
                web.HTTPServiceUnavailable, "broker_unavailable", published=landed
            ) from None
        return _accepted(published)

    async def _emit_one(
        self, publisher: str, claims: Claims | None, body: Any
    ) -> list[Published]:
        """The single form: one message to `channel`, or the same to each of `channels`."""
        loaded = simple_message(body) or self._validate(body)
        if "channel" in loaded:
            channels = [loaded["channel"]]
        else:  # the schema's: one of the two, at least one channel
            channels = list(dict.fromkeys(loaded["channels"]))
        if claims is not None:
            await self.admit(claims, channels)
        value = loaded["data"] if "data" in loaded else loaded["payload"]
        values = dict.fromkeys(channels, value)
        if claims is not None and self.bus.requests.publish_hooks:
            values = {c: await self.rewrite_one(claims, c, value, ("data",)) for c in channels}
        texts = _encode_each(values)
        published: list[Published] = []
        try:
            for channel in channels:
                data = texts[channel]
                if loaded["ephemeral"]:
                    published.append(await self.bus.publish_ephemeral(channel, data))
                else:
                    published.append(
                        await self.bus.publish_checked(channel, data, loaded.get("id"), publisher)
                    )
        except BrokerUnavailable as error:
            raise BrokerUnavailable(*error.args, published=published) from None
        return published

    async def admit(self, claims: Claims, channels: list[str]) -> None:
        """403/503 unless a Bearer emit may publish to every one of `channels`; 401 if its
        token was revoked while the body or the authorizers were awaited."""
        await self._authorize(claims, channels)
        try:
            self.bus.check_revoked(claims)
        except InvalidToken as error:
            self.bus.refused("emit", error.reason)
            raise _unauthorized(error.reason) from None

    async def rewrite_one(
        self, claims: Claims, channel: str, value: Any, field: tuple[str, ...]
    ) -> Any:
        """What the on_publish hooks make of `value` on `channel` (`field`: where a 400 points);
        a Bearer emit is a client's publish too, so nobody speaks for another over HTTP."""
        try:
            return await self.bus.requests.rewrite(claims, channel, value)
        except RequestError as error:
            if error.error == "forbidden":
                raise http_error(web.HTTPForbidden, "forbidden", channels=[channel]) from None
            if error.error == "invalid":
                fields: Any = [error.reason]
                for name in reversed(field):
                    fields = {name: fields}
                raise http_error(web.HTTPBadRequest, "invalid_request", fields=fields) from None
            raise http_error(
                web.HTTPServiceUnavailable, "authorizer_unavailable", channels=[channel]
            ) from None

    def _check_rate(self, publisher: str) -> None:
        """429 with Retry-After when `publisher` is over emit_rate (before its body is read)."""
        if self._limits is None:
            return
        retry_after = self._limits.retry_after(publisher)
        if retry_after is not None:
            self.bus.rate_limited["emit"] += 1
            error = http_error(web.HTTPTooManyRequests, "rate_limited", retry_after=retry_after)
            error.headers["Retry-After"] = str(retry_after)
            raise error

    async def disconnect(self, request: web.Request) -> web.Response:
        """POST {base_path}/users/{user}/disconnect {"reconnect": false, "reason": ""}."""
        body = await self._control_body(request, _DISCONNECT_SCHEMA)
        user = request.match_info["user"]
        return await self._control(
            self.bus.disconnect(user, reconnect=body["reconnect"], reason=body["reason"])
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """POST {base_path}/users/{user}/unsubscribe {"channels": [...]}."""
        body = await self._control_body(request, _UNSUBSCRIBE_SCHEMA)
        user = request.match_info["user"]
        return await self._control(self.bus.unsubscribe_user(user, body["channels"]))

    async def revoke(self, request: web.Request) -> web.Response:
        """POST {base_path}/revocations {"user"|"token_id", "issued_before"?, "until"}."""
        body = await self._control_body(request, _REVOCATION_SCHEMA)
        return await self._control(self.bus.revoke(**body))

    async def _control_body(self, request: web.Request, schema: Schema) -> dict[str, Any]:
        """The control request's body, after its API key (a user's token never will do)."""
        api_key = request.headers.get("X-API-Key")
        if request.method == "POST" and (
            api_key is None or self.api_keys.publisher(api_key) is None
        ):
            self.bus.refused("control", "missing" if api_key is None else "api_key")
            raise _unauthorized()
        _check_post_json(request)
        raw = await self._read_json(request)
        try:
            loaded: dict[str, Any] = schema.load({} if raw is None else raw)
        except ValidationError as error:
            raise http_error(
                web.HTTPBadRequest, "invalid_request", fields=error.messages_dict
            ) from None
        return loaded

    @staticmethod
    async def _control(action: Awaitable[object]) -> web.Response:
        try:
            await action
        except ValueError as error:  # the bus names the field: "user: must be ..."
            field, _, message = str(error).partition(": ")
            raise _invalid(field, message) from None
        except BrokerUnavailable:
            raise http_error(web.HTTPServiceUnavailable, "broker_unavailable") from None
        return web.json_response({"accepted": True}, status=202)

    async def authenticate(self, request: web.Request, what: str) -> tuple[str, Claims | None]:
        """The publisher's idempotency scope, and the claims of a Bearer token.

        Raises 401 for a missing or refused credential (counted as `what`), 503
        when the keys to check a token are unavailable.
        """
        api_key = request.headers.get("X-API-Key")
        if api_key is not None:
            publisher = self.api_keys.publisher(api_key)
            if publisher is None:
                self.bus.refused(what, "api_key")
                raise _unauthorized()
            return publisher, None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.bus.refused(what, "missing")
            raise _unauthorized()
        try:
            claims = await self.bus.verify(token.strip())
        except InvalidToken as error:
            self.bus.refused(what, error.reason)
            raise _unauthorized(error.reason) from None
        except KeysUnavailable:
            raise http_error(web.HTTPServiceUnavailable, "keys_unavailable") from None
        return subject_publisher(claims.subject), claims

    async def _authorize(self, claims: Claims, channels: list[str]) -> None:
        """Refuse channels that neither the token's publish grants nor an authorizer allow."""
        ungranted = [c for c in channels if not may(claims.publish, c)]
        if not ungranted:
            return
        verdicts = await self.bus.authorize(claims, ungranted, "publish")
        forbidden = [c for c in ungranted if verdicts[c] == "forbidden"]
        if forbidden:
            raise http_error(web.HTTPForbidden, "forbidden", channels=forbidden)
        unavailable = [c for c in ungranted if verdicts[c] == "unavailable"]
        if unavailable:
            raise http_error(
                web.HTTPServiceUnavailable, "authorizer_unavailable", channels=unavailable
            )

    async def _read_json(self, request: web.Request) -> Any:
        limit = self.settings.emit_max_size
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit, request.content_length)
        try:
            if request.content.is_eof():
                # The whole body came with the headers (a small emit): nothing to wait for.
                raw = request.content.read_nowait()
                if len(raw) > limit:
                    raise _closing(_too_large(limit, len(raw)))
            else:
                raw = await self._receive(request, limit)
        except TimeoutError:
            if self._is_shutting_down:
                raise _closing(http_error(web.HTTPServiceUnavailable, "shutting_down")) from None
            raise _closing(
                http_error(
                    web.HTTPRequestTimeout, "request_timeout", limit=self.settings.emit_timeout
                )
            ) from None
        except (web.RequestPayloadError, aiohttp.ClientPayloadError, ConnectionError):
            # A broken gzip or deflate body, or a client that left mid-body.
            raise _closing(_invalid("_body", "the body cannot be decoded or ended early")) from None
        return _parse_json(raw)

    async def _receive(self, request: web.Request, limit: int) -> bytes:
        """The body as it arrives, within emit_timeout (close_timeout once shutting down)."""
        raw = bytearray()
        # A body that starts once shutdown has begun gets only close_timeout.
        limit_seconds = (
            self.settings.close_timeout if self._is_shutting_down else self.settings.emit_timeout
        )
        async with asyncio.timeout(limit_seconds) as deadline:
            self._body_deadlines.add(deadline)
            try:
                async for chunk in request.content.iter_chunked(65536):
                    raw += chunk
                    if len(raw) > limit:
                        raise _closing(_too_large(limit, len(raw)))
            finally:
                self._body_deadlines.discard(deadline)
        return bytes(raw)

    @staticmethod
    def _validate(body: Any) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = _EMIT_SCHEMA.load(body)
        except ValidationError as error:
            raise http_error(
                web.HTTPBadRequest, "invalid_request", fields=error.messages_dict
            ) from None
        return loaded


class _DisconnectSchema(Schema):
    reconnect = mf.Boolean(load_default=False)
    reason = mf.String(load_default="")


class _UnsubscribeSchema(Schema):
    channels = mf.List(mf.String(), required=True)


class _RevocationSchema(Schema):
    user = mf.String()
    token_id = mf.String()
    issued_before = mf.Float(allow_nan=False)
    until = mf.Float(required=True, allow_nan=False)


_DISCONNECT_SCHEMA: Final = _DisconnectSchema()
_UNSUBSCRIBE_SCHEMA: Final = _UnsubscribeSchema()
_REVOCATION_SCHEMA: Final = _RevocationSchema()


def _encode_each(values: dict[str, Any]) -> dict[str, str]:
    """Each channel's data as JSON text; data shared by several channels is encoded once."""
    texts: dict[int, str] = {}
    encoded = {}
    for channel, value in values.items():
        text = texts.get(id(value))
        if text is None:
            try:
                text = texts[id(value)] = encode_data(value)
            except ValueError as error:
                raise _invalid("data", str(error)) from None
        encoded[channel] = text
    return encoded


def _answers(published: list[Published]) -> list[dict[str, Any]]:
    """Where each message landed, as the emit answers it."""
    return [json.loads(_answer(p)) for p in published]


def _answer(published: Published) -> str:
    # Channel names and epochs hold no characters JSON would escape (as in
    # protocol.encode_message): the answer is written, not run through an encoder.
    if published.is_ephemeral:
        return f'{{"channel":"{published.channel}","ephemeral":true}}'
    return (
        f'{{"channel":"{published.channel}","offset":{published.offset},'
        f'"epoch":"{published.epoch}"}}'
    )


def _accepted(published: list[Published]) -> web.Response:
    """202 {"published": [...]}: one entry per channel, or per message of a batch."""
    text = '{"published":[' + ",".join(map(_answer, published)) + "]}"
    return web.Response(text=text, status=202, content_type="application/json")


def _check_post_json(request: web.Request) -> None:
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(
            request.method,
            ["POST"],
            text=json.dumps({"error": "method_not_allowed"}),
            content_type="application/json",
        )
    # The header as sent is the common case: only anything else is parsed.
    if (
        request.headers.get("Content-Type") != "application/json"
        and request.content_type != "application/json"
    ):
        raise http_error(
            web.HTTPUnsupportedMediaType, "unsupported_media_type", expected="application/json"
        )


def _unauthorized(reason: str | None = None) -> web.HTTPException:
    # Only a revoked token is told why: the other reasons are for logs and metrics.
    details = {"reason": reason} if reason == "revoked" else {}
    error = http_error(web.HTTPUnauthorized, "unauthorized", **details)
    error.headers["WWW-Authenticate"] = "Bearer"
    return error


def _too_large(limit: int, size: int) -> web.HTTPException:
    status = functools.partial(web.HTTPRequestEntityTooLarge, limit, size)
    return http_error(status, "payload_too_large", limit=limit)


def _closing(error: web.HTTPException) -> web.HTTPException:
    """An answer after which the connection closes (its body was not read to the end)."""
    error.force_close()
    return error
