"""The settings setup() takes: a marshmallow schema, and the Settings it loads."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Final

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

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "Settings",
    "SettingsSchema",
    "load_settings",
]

ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
MIN_API_KEY_LENGTH: Final = 16
MIN_SECRET_LENGTH: Final = 32


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that shapes one bus, validated."""

    jwks_url: str | None = None
    jwt_secret: str | None = None
    issuer: str | None = None
    audience: str | None = None
    base_path: str = "/ws"
    algorithms: tuple[str, ...] = ("RS256",)
    channels_claim: str = "channels"
    publish_claim: str = "publish"
    api_keys: tuple[str, ...] = ()
    leeway: float = 30.0
    heartbeat: float | None = 25.0
    auth_timeout: float = 10.0
    close_timeout: float = 5.0
    max_message_size: int = 65536
    max_channels: int = 128
    max_connections: int | None = None
    send_buffer_limit: int = 1 << 20
    allowed_origins: tuple[str, ...] | None = None
    allow_query_token: bool = False
    emit_max_size: int = 1 << 20
    history_size: int = 100
    history_ttl: float = 300.0
    jwks_refetch_interval: float = 30.0
    jwks_refresh_interval: float = 300.0
    metrics: bool = False


def _positive(name: str) -> validate.Range:
    return validate.Range(min=0, min_inclusive=False, error=f"{name} must be greater than 0")


class SettingsSchema(Schema):
    """Validates setup() settings; every error names the setting it is about."""

    class Meta:
        unknown = RAISE

    jwks_url = mf.Url(allow_none=True, schemes={"http", "https"}, require_tld=False)
    jwt_secret = mf.String(allow_none=True, validate=validate.Length(min=MIN_SECRET_LENGTH))
    issuer = mf.String(allow_none=True, validate=validate.Length(min=1))
    audience = mf.String(allow_none=True, validate=validate.Length(min=1))
    base_path = mf.String(
        validate=validate.Regexp(
            r"^/([A-Za-z0-9._~\-]+(/[A-Za-z0-9._~\-]+)*)?$",
            error="base_path must start with '/', have no trailing '/' and no special characters",
        )
    )
    algorithms = mf.List(mf.String(), validate=validate.Length(min=1))
    channels_claim = mf.String(validate=validate.Length(min=1))
    publish_claim = mf.String(validate=validate.Length(min=1))
    api_keys = mf.List(
        mf.String(
            validate=validate.Length(
                min=MIN_API_KEY_LENGTH,
                error=f"api keys must be at least {MIN_API_KEY_LENGTH} characters",
            )
        )
    )
    leeway = mf.Float(validate=validate.Range(min=0, max=300))
    heartbeat = mf.Float(allow_none=True, validate=_positive("heartbeat"))
    auth_timeout = mf.Float(validate=_positive("auth_timeout"))
    close_timeout = mf.Float(validate=_positive("close_timeout"))
    max_message_size = mf.Integer(strict=True, validate=validate.Range(min=256))
    max_channels = mf.Integer(strict=True, validate=validate.Range(min=1))
    max_connections = mf.Integer(strict=True, allow_none=True, validate=validate.Range(min=1))
    send_buffer_limit = mf.Integer(strict=True, validate=validate.Range(min=1024))
    allowed_origins = mf.List(mf.String(validate=validate.Length(min=1)), allow_none=True)
    allow_query_token = mf.Boolean()
    emit_max_size = mf.Integer(strict=True, validate=validate.Range(min=256))
    history_size = mf.Integer(strict=True, validate=validate.Range(min=0, max=MAX_HISTORY_SIZE))
    history_ttl = mf.Float(validate=_positive("history_ttl"))
    jwks_refetch_interval = mf.Float(validate=validate.Range(min=0))
    jwks_refresh_interval = mf.Float(validate=_positive("jwks_refresh_interval"))
    metrics = mf.Boolean()

    @validates("algorithms")
    def _known_algorithms(self, value: list[str], **_: Any) -> None:
        unknown = sorted(set(value) - ASYMMETRIC_ALGORITHMS - HMAC_ALGORITHMS)
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
        algorithms = set(data.get("algorithms", ("HS256",) if secret else ("RS256",)))
        if jwks_url and algorithms & HMAC_ALGORITHMS:
            raise ValidationError(
                "HS algorithms need jwt_secret; a JWKS URL serves public keys", "algorithms"
            )
        if secret and algorithms - HMAC_ALGORITHMS:
            raise ValidationError("jwt_secret works only with HS256, HS384 or HS512", "algorithms")


def load_settings(given: dict[str, Any]) -> Settings:
    """Validate setup()'s keyword arguments; raise InvalidSettings naming the bad ones."""
    given = dict(given)
    # algorithms=None means the usual one for the key source.
    if given.get("algorithms") is None:
        given["algorithms"] = ("HS256",) if given.get("jwt_secret") else ("RS256",)
    for name in ("algorithms", "api_keys", "allowed_origins"):
        if isinstance(given.get(name), str):
            raise InvalidSettings(f"{name}: give a list of strings, not one string")
    try:
        loaded = SettingsSchema().load(given)
    except ValidationError as error:
        raise InvalidSettings(_describe(error)) from None
    for name in ("algorithms", "api_keys", "allowed_origins"):
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
