"""The settings setup() takes: each one's default, bounds and meaning in one place.

`Settings` is that place. Each field is declared with `setting(default, bounds,
help=...)`: the marshmallow field that validates it sits next to its default and
its one-line meaning. `SettingsSchema` is built from those fields; the CLI's
flags and help, and (through a test) setup()'s signature and README's table,
come from the same declarations.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    validate,
    validates,
    validates_schema,
)
from marshmallow import fields as mf

from .brokers.base import MAX_HISTORY_SIZE
from .errors import InvalidSettings
from .grants import is_valid_pattern
from .jwks import KEY_TYPE_BY_ALGORITHM, SECRET_ALGORITHMS
from .namespaces import ChannelsField
from .presence import MAX_INFO_SIZE

__all__ = ["Settings", "SettingsSchema", "load_settings", "setting_bounds", "setting_help"]

MIN_API_KEY_LENGTH: Final = 16
MIN_SECRET_LENGTH: Final = 32

T = TypeVar("T")


def setting(default: T, bounds: mf.Field[Any], *, help: str) -> T:
    """Declare a Settings field: its default, the marshmallow field bounding it, its meaning."""
    return dataclasses.field(default=default, metadata={"bounds": bounds, "help": help})


def setting_bounds(field: dataclasses.Field[Any]) -> mf.Field[Any]:
    """The marshmallow field that validates a Settings field."""
    bounds: mf.Field[Any] = field.metadata["bounds"]
    return bounds


def setting_help(field: dataclasses.Field[Any]) -> str:
    """What a Settings field is for, in one line (the CLI's help, README's meaning)."""
    text: str = field.metadata["help"]
    return text


def _positive(name: str) -> validate.Range:
    return validate.Range(min=0, min_inclusive=False, error=f"{name} must be greater than 0")


def _rate(name: str) -> mf.Tuple:
    """A token bucket: (refills per second > 0, burst >= 1), or None for no limit."""
    return mf.Tuple(
        (
            mf.Float(validate=_positive(f"{name}'s rate")),
            mf.Integer(strict=True, validate=validate.Range(min=1)),
        ),
        allow_none=True,
    )


def _grant_pattern(pattern: str) -> None:
    if not is_valid_pattern(pattern):
        raise ValidationError(
            f"{pattern!r} is not a grant pattern: a channel name, 'prefix:*' or '*'"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that shapes one bus, validated."""

    jwks_url: str | None = setting(
        None,
        mf.Url(allow_none=True, schemes={"http", "https"}, require_tld=False),
        help="URL of the identity provider's JWKS, the public keys that sign client tokens "
        "(give this or `jwt_secret`)",
    )
    jwt_secret: str | None = setting(
        None,
        mf.String(allow_none=True, validate=validate.Length(min=MIN_SECRET_LENGTH)),
        help=f"shared HS256/384/512 secret instead of a JWKS URL, {MIN_SECRET_LENGTH}+ "
        "characters (development)",
    )
    issuer: str | None = setting(
        None,
        mf.String(allow_none=True, validate=validate.Length(min=1)),
        help="required `iss` claim of client tokens (unchecked when not given)",
    )
    audience: str | None = setting(
        None,
        mf.String(allow_none=True, validate=validate.Length(min=1)),
        help="required `aud` claim of client tokens (unchecked when not given)",
    )
    base_path: str = setting(
        "/ws",
        mf.String(
            validate=validate.Regexp(
                r"^/([A-Za-z0-9._~\-]+(/[A-Za-z0-9._~\-]+)*)?$",
                error="base_path must start with '/', have no trailing '/' "
                "and no special characters",
            )
        ),
        help="where the routes live: the WebSocket, `/emit`, `/health`, `/metrics`, `/wsbus.js`",
    )
    algorithms: tuple[str, ...] = setting(
        ("RS256",),
        mf.List(mf.String(), validate=validate.Length(min=1)),
        help="accepted JWT algorithms: RS, PS, ES (256/384/512) and EdDSA with `jwks_url`; "
        "HS256/384/512 with `jwt_secret`, where HS256 is the default",
    )
    channels_claim: str = setting(
        "channels",
        mf.String(validate=validate.Length(min=1)),
        help="claim listing the channel patterns a token may subscribe to",
    )
    publish_claim: str = setting(
        "publish",
        mf.String(validate=validate.Length(min=1)),
        help="claim listing the channel patterns a token may publish to",
    )
    api_keys: tuple[str, ...] = setting(
        (),
        mf.List(
            mf.String(
                validate=validate.Length(
                    min=MIN_API_KEY_LENGTH,
                    error=f"api keys must be at least {MIN_API_KEY_LENGTH} characters",
                )
            )
        ),
        help=f"keys that back ends send as `X-API-Key` to emit, {MIN_API_KEY_LENGTH}+ "
        "characters each",
    )
    leeway: float = setting(
        30.0,
        mf.Float(validate=validate.Range(min=0, max=300)),
        help="seconds of clock skew allowed on `exp`/`nbf`/`iat` (at most 300)",
    )
    heartbeat: float | None = setting(
        25.0,
        mf.Float(allow_none=True, validate=_positive("heartbeat")),
        help="seconds between WebSocket pings; unanswered peers are dropped (None: no pings)",
    )
    auth_timeout: float = setting(
        10.0,
        mf.Float(validate=_positive("auth_timeout")),
        help="seconds a new socket has to send its connect frame",
    )
    authorize_timeout: float = setting(
        2.0,
        mf.Float(validate=_positive("authorize_timeout")),
        help="seconds the application's authorizers and on_connect hooks have to answer "
        "(a channel is then denied `unavailable`)",
    )
    close_timeout: float = setting(
        5.0,
        mf.Float(validate=_positive("close_timeout")),
        help="seconds a closing socket gets before it is aborted",
    )
    max_message_size: int = setting(
        65536,
        mf.Integer(strict=True, validate=validate.Range(min=256)),
        help="largest client frame in bytes (closed with 1009 above it)",
    )
    max_channels: int = setting(
        128,
        mf.Integer(strict=True, validate=validate.Range(min=1)),
        help="subscriptions per connection (denied as `limit` above it)",
    )
    max_connections: int | None = setting(
        None,
        mf.Integer(strict=True, allow_none=True, validate=validate.Range(min=1)),
        help="sockets this process accepts (closed with 1013 above it; None: no limit)",
    )
    max_connections_per_user: int | None = setting(
        None,
        mf.Integer(strict=True, allow_none=True, validate=validate.Range(min=1)),
        help="sockets one user (`sub`) may hold, on every node with Redis (closed with 4408 "
        "above it; None: no limit)",
    )
    client_rate: tuple[float, int] | None = setting(
        (20, 100),
        _rate("client_rate"),
        help="frames per second and burst one socket may send, pings included "
        "(closed with 4429 above it; None: no limit)",
    )
    subscribe_rate: tuple[float, int] | None = setting(
        (50, 256),
        _rate("subscribe_rate"),
        help="channels per second and burst in one socket's subscribe and unsubscribe "
        "frames, the connect frame's free (closed with 4429 above it; None: no limit)",
    )
    emit_rate: tuple[float, int] | None = setting(
        None,
        _rate("emit_rate"),
        help="emits per second and burst per API key or token subject "
        "(429 with `Retry-After` above it; None: no limit)",
    )
    send_buffer_limit: int = setting(
        1 << 20,
        mf.Integer(strict=True, validate=validate.Range(min=1024)),
        help="unsent bytes before a socket is closed as a slow consumer (4002)",
    )
    allowed_origins: tuple[str, ...] | None = setting(
        None,
        mf.List(mf.String(validate=validate.Length(min=1)), allow_none=True),
        help="browser `Origin`s allowed to connect (403 otherwise; None: any)",
    )
    allow_query_token: bool = setting(
        False,
        mf.Boolean(),
        help="accept `?token=` in the WebSocket URL (it ends up in access logs)",
    )
    emit_max_size: int = setting(
        1 << 20,
        mf.Integer(strict=True, validate=validate.Range(min=256)),
        help="largest emit body in bytes (413 above it)",
    )
    emit_timeout: float = setting(
        10.0,
        mf.Float(validate=_positive("emit_timeout")),
        help="seconds an emit request has to send its whole body",
    )
    history_size: int = setting(
        100,
        mf.Integer(strict=True, validate=validate.Range(min=0, max=MAX_HISTORY_SIZE)),
        help="messages kept per channel for recovery (at most 100000)",
    )
    history_ttl: float = setting(
        300.0,
        mf.Float(validate=_positive("history_ttl")),
        help="seconds a channel's history is kept",
    )
    client_publish: bool = setting(
        False,
        mf.Boolean(),
        help="accept `publish` frames from clients whose `publish` grant or publish "
        "authorizers cover the channel (off: answered `disabled`)",
    )
    rpc_timeout: float = setting(
        10.0,
        mf.Float(validate=_positive("rpc_timeout")),
        help="seconds an RPC handler (`bus.rpc`) has to answer (then the client gets `timeout`)",
    )
    channels: Mapping[str, Mapping[str, Any]] | None = setting(
        None,
        ChannelsField(allow_none=True),
        help="options per grant pattern (`history_size`, `history_ttl`, `recovery`, "
        "`presence`) for the channels it covers, the most specific pattern winning; see "
        "docs/recovery.md",
    )
    presence: tuple[str, ...] = setting(
        (),
        mf.List(mf.String(validate=_grant_pattern)),
        help="grant patterns of the channels that keep presence: who is subscribed, "
        "with join and leave (none by default: no cost)",
    )
    presence_claim: str = setting(
        "presence",
        mf.String(validate=validate.Length(min=1)),
        help="claim listing the channel patterns whose presence a token may read",
    )
    presence_info_claim: str = setting(
        "info",
        mf.String(validate=validate.Length(min=1)),
        help=f"claim holding a JSON object (at most {MAX_INFO_SIZE} bytes) shown as the "
        "member's info",
    )
    presence_ttl: float = setting(
        60.0,
        mf.Float(validate=validate.Range(min=0.3, max=86400)),
        help="seconds a crashed node's members stay listed at most (nodes refresh "
        "theirs every third of it)",
    )
    max_presence_members: int = setting(
        1000,
        mf.Integer(strict=True, validate=validate.Range(min=0)),
        help="users a channel lists; above it subscribers get only the count and no "
        "join or leave",
    )
    jwks_refetch_interval: float = setting(
        30.0,
        mf.Float(validate=validate.Range(min=0)),
        help="least seconds between JWKS refetches for a token naming an unknown key",
    )
    jwks_refresh_interval: float = setting(
        300.0,
        mf.Float(validate=_positive("jwks_refresh_interval")),
        help="seconds between periodic JWKS refreshes",
    )
    metrics: bool = setting(
        False,
        mf.Boolean(),
        help="serve Prometheus metrics at `{base_path}/metrics` to API-key holders "
        "(needs `api_keys` and `aiohttp-wsbus[metrics]`)",
    )


def default_algorithms(jwt_secret: str | None) -> tuple[str, ...]:
    """What algorithms=None means: the usual one for the key source."""
    return ("HS256",) if jwt_secret else Settings().algorithms


# Settings given as a list of strings (setup() takes any sequence, Settings holds tuples).
_LIST_SETTINGS: Final = tuple(
    f.name for f in dataclasses.fields(Settings) if isinstance(setting_bounds(f), mf.List)
)


class _SettingsRules(Schema):
    """Checks beyond one field's bounds (known algorithms, extras, settings that go together).

    The fields themselves come from Settings: see SettingsSchema below.
    """

    class Meta:
        unknown = RAISE

    @validates("algorithms")
    def _known_algorithms(self, value: list[str], **_: Any) -> None:
        unknown = sorted(set(value) - set(KEY_TYPE_BY_ALGORITHM))
        if unknown:
            raise ValidationError(f"unsupported algorithms: {', '.join(unknown)}")

    @validates("metrics")
    def _metrics_can_be_served(self, value: bool, **_: Any) -> None:
        if value and importlib.util.find_spec("prometheus_client") is None:
            raise ValidationError("needs prometheus-client: pip install 'aiohttp-wsbus[metrics]'")

    @validates_schema
    def _metrics_are_protected(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("metrics") and not data.get("api_keys"):
            raise ValidationError("metrics are served only to an api key: give api_keys", "metrics")

    @validates_schema
    def _one_key_source(self, data: dict[str, Any], **_: Any) -> None:
        jwks_url, secret = data.get("jwks_url"), data.get("jwt_secret")
        if jwks_url and secret:
            raise ValidationError("give jwks_url or jwt_secret, not both", "jwks_url")
        if not jwks_url and not secret:
            raise ValidationError("one of jwks_url or jwt_secret is required", "jwks_url")
        algorithms = set(data.get("algorithms", default_algorithms(secret)))
        if jwks_url and algorithms & SECRET_ALGORITHMS:
            raise ValidationError(
                "HS algorithms need jwt_secret; a JWKS URL serves public keys", "algorithms"
            )
        if secret and algorithms - SECRET_ALGORITHMS:
            raise ValidationError("jwt_secret works only with HS256, HS384 or HS512", "algorithms")


SettingsSchema: Final = _SettingsRules.from_dict(
    {f.name: setting_bounds(f) for f in dataclasses.fields(Settings)}, name="SettingsSchema"
)
"""Validates setup() settings; every error names the setting it is about."""


def load_settings(given: dict[str, Any]) -> Settings:
    """Validate setup()'s keyword arguments; raise InvalidSettings naming the bad ones."""
    given = dict(given)
    if given.get("algorithms") is None:
        given["algorithms"] = default_algorithms(given.get("jwt_secret"))
    for name in _LIST_SETTINGS:
        if isinstance(given.get(name), str):
            raise InvalidSettings(f"{name}: give a list of strings, not one string")
    try:
        loaded = SettingsSchema().load(given)
    except ValidationError as error:
        raise InvalidSettings(_describe(error)) from None
    for name in _LIST_SETTINGS:
        if loaded.get(name) is not None:
            loaded[name] = tuple(loaded[name])
    return Settings(**loaded)


def _describe(error: ValidationError) -> str:
    messages = error.messages_dict
    parts = []
    for name, problems in sorted(messages.items()):
        text = "; ".join(_flatten(problems))
        parts.append(f"{name}: {text}")
    return "invalid aiohttp_wsbus settings: " + " | ".join(parts)


def _flatten(problems: Any) -> list[str]:
    if isinstance(problems, str):
        return [problems]
    if isinstance(problems, dict):
        return [m for value in problems.values() for m in _flatten(value)]
    return [m for value in problems for m in _flatten(value)]
