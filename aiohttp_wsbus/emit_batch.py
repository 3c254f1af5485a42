"""The batch form of POST {base_path}/emit: {"messages": [{channel, data, id?, ephemeral?}]}.

Every message is checked, authorized and rewritten like a single emit's before
any is published (the common message by `simple_message`, which the single emit
shares, anything else by the schema, which words every error); then the runs of
stored messages go to the broker in one round trip each
(`Bus.publish_checked_many`), the ephemeral ones one by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from marshmallow import Schema, ValidationError, validate, validates_schema
from marshmallow import fields as mf

from .brokers.base import Published, is_valid_message_id
from .errors import BrokerUnavailable, http_error
from .grants import is_valid_channel
from .protocol import encode_data
from .tokens import Claims

if TYPE_CHECKING:
    from .emit import Endpoints

__all__ = ["MAX_BATCH_MESSAGES", "emit_batch", "simple_message"]

MAX_BATCH_MESSAGES: Final = 1000
_SIMPLE_FIELDS: Final = frozenset(("channel", "data", "id", "ephemeral"))


def simple_message(body: Any) -> dict[str, Any] | None:
    """A common well-formed message (one channel, data, maybe id or ephemeral), a
    single emit's body or one of a batch's, as the schemas load it, without their
    cost; None for anything else.

    It only ever accepts: whatever it passes over goes through the schema, which
    refuses or accepts it and words every error.
    """
    if type(body) is not dict or not body.keys() <= _SIMPLE_FIELDS or "data" not in body:
        return None
    channel = body.get("channel")
    ephemeral = body.get("ephemeral", False)
    if type(ephemeral) is not bool or not is_valid_channel(channel):
        return None
    loaded = {"channel": channel, "data": body["data"], "ephemeral": ephemeral}
    if "id" in body:
        message_id = body["id"]
        if ephemeral or type(message_id) is not str or not is_valid_message_id(message_id):
            return None
        loaded["id"] = message_id
    return loaded


def _simple_batch(body: Any) -> list[dict[str, Any]] | None:
    """A batch of common well-formed messages as the schema loads it; None for anything
    else (the schema then checks it, and words every error)."""
    if type(body) is not dict or len(body) != 1:
        return None
    messages = body.get("messages")
    if type(messages) is not list or not 1 <= len(messages) <= MAX_BATCH_MESSAGES:
        return None
    loaded = []
    for message in messages:
        simple = simple_message(message)
        if simple is None:
            return None
        loaded.append(simple)
    return loaded


class _MessageSchema(Schema):
    """One message of a batch: a single emit's fields, for one channel."""

    channel = mf.String(required=True)
    data = mf.Raw(required=True, allow_none=True)
    id = mf.String()
    ephemeral = mf.Boolean(truthy={True}, falsy={False}, load_default=False)

    @validates_schema
    def _check(self, message: dict[str, Any], **_: Any) -> None:
        if "channel" in message and not is_valid_channel(message["channel"]):
            raise ValidationError(f"invalid channel name: {message['channel']!r}", "channel")
        if "id" in message and not is_valid_message_id(message["id"]):
            raise ValidationError("id must be 1 to 128 printable ASCII characters", "id")
        if "id" in message and message.get("ephemeral"):
            raise ValidationError("an ephemeral message takes no id", "id")


class _BatchSchema(Schema):
    messages = mf.List(
        mf.Nested(_MessageSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_BATCH_MESSAGES),
    )


_BATCH_SCHEMA: Final = _BatchSchema()


def _invalid_message(index: int, field: str, message: str) -> web.HTTPException:
    return http_error(
        web.HTTPBadRequest,
        "invalid_request",
        fields={"messages": {str(index): {field: [message]}}},
    )


async def emit_batch(
    endpoints: Endpoints, publisher: str, claims: Claims | None, body: Any
) -> list[Published]:
    """Check every message, then publish them in order; where each landed.

    Raises the 4xx of the first refused message before any is published, and
    BrokerUnavailable holding every message that landed before the broker went.
    """
    messages = _simple_batch(body) or _load(body)
    values = [message["data"] for message in messages]
    if claims is not None:
        await endpoints.admit(claims, list(dict.fromkeys(m["channel"] for m in messages)))
        if endpoints.bus.requests.publish_hooks:
            values = await _rewrite(endpoints, claims, messages)
    texts = []
    for index, value in enumerate(values):
        try:
            texts.append(encode_data(value))
        except ValueError as error:
            raise _invalid_message(index, "data", str(error)) from None
    published: list[Published] = []
    try:
        await _publish(endpoints, publisher, messages, texts, published)
    except BrokerUnavailable as error:
        raise BrokerUnavailable(*error.args, published=published) from None
    return published


def _load(body: Any) -> list[dict[str, Any]]:
    try:
        messages: list[dict[str, Any]] = _BATCH_SCHEMA.load(body)["messages"]
    except ValidationError as error:
        fields = error.messages_dict
        raise http_error(web.HTTPBadRequest, "invalid_request", fields=fields) from None
    return messages


async def _rewrite(
    endpoints: Endpoints, claims: Claims, messages: list[dict[str, Any]]
) -> list[Any]:
    """What the on_publish hooks make of each message's data, as for a single emit."""
    rewritten = []
    for index, message in enumerate(messages):
        rewritten.append(
            await endpoints.rewrite_one(
                claims, message["channel"], message["data"], ("messages", str(index), "data")
            )
        )
    return rewritten


async def _publish(
    endpoints: Endpoints,
    publisher: str,
    messages: list[dict[str, Any]],
    texts: list[str],
    published: list[Published],
) -> None:
    """Publish in order into `published`: each run of stored messages in one round trip."""
    bus = endpoints.bus
    run: list[tuple[str, str, str | None]] = []
    for message, text in zip(messages, texts, strict=True):
        if not message["ephemeral"]:
            run.append((message["channel"], text, message.get("id")))
            continue
        await _publish_run(endpoints, publisher, run, published)
        published.append(await bus.publish_ephemeral(message["channel"], text))
    await _publish_run(endpoints, publisher, run, published)


async def _publish_run(
    endpoints: Endpoints,
    publisher: str,
    run: list[tuple[str, str, str | None]],
    published: list[Published],
) -> None:
    if not run:
        return
    try:
        published += await endpoints.bus.publish_checked_many(run, publisher)
    except BrokerUnavailable as error:
        published += error.published
        raise
    finally:
        run.clear()

