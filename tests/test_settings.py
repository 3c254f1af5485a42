"""setup() settings: one home per setting, validated by one schema, errors that name it."""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, get_args, get_type_hints

import pytest
from aiohttp import web
from marshmallow import fields as mf

import aiohttp_wsbus
from aiohttp_wsbus.namespaces import ChannelsField
from aiohttp_wsbus.settings import Settings, load_settings, setting_bounds, setting_help

JWKS = "https://idp.example.com/.well-known/jwks.json"


def test_defaults() -> None:
    settings = load_settings({"jwks_url": JWKS})
    assert settings.algorithms == ("RS256",)
    assert settings.base_path == "/ws"
    assert settings.max_channels == 128
    assert settings.allow_query_token is False


def test_secret_defaults_to_hs256() -> None:
    assert load_settings({"jwt_secret": "s" * 32}).algorithms == ("HS256",)


def test_setup_takes_every_setting_with_its_default() -> None:
    parameters = inspect.signature(aiohttp_wsbus.setup).parameters
    assert all(p.kind is p.KEYWORD_ONLY for name, p in parameters.items() if name != "app")
    taken = {name: p.default for name, p in parameters.items() if name not in ("app", "broker")}
    defaults = {field.name: field.default for field in fields(Settings)}
    # setup()'s algorithms=None means "the usual one for the key source".
    assert taken.pop("algorithms") is None
    assert load_settings({"jwks_url": JWKS}).algorithms == defaults.pop("algorithms")
    assert taken == defaults


# What marshmallow loads for each annotated type (a Url is a String).
BOUNDS_BY_TYPE = {
    str: mf.String,
    int: mf.Integer,
    float: mf.Float,
    bool: mf.Boolean,
    tuple[float, int]: mf.Tuple,  # a rate: per second, burst
    Mapping[str, Mapping[str, Any]]: ChannelsField,  # options per grant pattern
}


@pytest.mark.parametrize("field", fields(Settings), ids=lambda field: field.name)
def test_each_setting_has_bounds_of_its_type_and_a_meaning(field: Any) -> None:
    hint = get_type_hints(Settings)[field.name]
    is_optional = isinstance(hint, types.UnionType) and type(None) in get_args(hint)
    if is_optional:
        (hint,) = [argument for argument in get_args(hint) if argument is not type(None)]
    bounds = setting_bounds(field)
    expected = mf.List if hint == tuple[str, ...] else BOUNDS_BY_TYPE[hint]
    assert isinstance(bounds, expected)
    assert bounds.allow_none is is_optional
    assert setting_help(field).strip()
    assert "|" not in setting_help(field)  # it is a cell of README's table
    key_source = {"jwt_secret": "s" * 32} if field.name == "jwks_url" else {"jwks_url": JWKS}
    load_settings(key_source | {field.name: field.default})  # the default is in bounds


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"jwks_url": JWKS, "jwt_secret": "s" * 32}, "jwks_url"),
        ({}, "jwks_url"),
        ({"jwks_url": JWKS, "algorithms": ["HS256"]}, "algorithms"),
        ({"jwt_secret": "s" * 32, "algorithms": ["RS256"]}, "algorithms"),
        ({"jwks_url": JWKS, "algorithms": ["none"]}, "algorithms"),
        ({"jwks_url": JWKS, "algorithms": []}, "algorithms"),
        ({"jwks_url": JWKS, "algorithms": "RS256"}, "algorithms"),
        ({"jwks_url": JWKS, "base_path": "ws"}, "base_path"),
        ({"jwks_url": JWKS, "base_path": "/ws/"}, "base_path"),
        ({"jwks_url": "ftp://idp/jwks"}, "jwks_url"),
        ({"jwt_secret": "short"}, "jwt_secret"),
        ({"jwks_url": JWKS, "api_keys": ["short"]}, "api_keys"),
        ({"jwks_url": JWKS, "max_channels": 0}, "max_channels"),
        ({"jwks_url": JWKS, "max_connections": 0}, "max_connections"),
        ({"jwks_url": JWKS, "max_message_size": "big"}, "max_message_size"),
        ({"jwks_url": JWKS, "heartbeat": -1}, "heartbeat"),
        ({"jwks_url": JWKS, "leeway": 3600}, "leeway"),
        ({"jwks_url": JWKS, "history_ttl": 0}, "history_ttl"),
        ({"jwks_url": JWKS, "send_buffer_limit": 10}, "send_buffer_limit"),
        ({"jwks_url": JWKS, "max_connections_per_user": 0}, "max_connections_per_user"),
        ({"jwks_url": JWKS, "client_rate": (20, 0)}, "client_rate"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(given: dict[str, Any], named: str) -> None:
    app = web.Application()
    with pytest.raises(ValueError, match=named):
        aiohttp_wsbus.setup(app, **given)
    assert aiohttp_wsbus.BUS_KEY not in app


def test_broker_must_be_a_broker() -> None:
    with pytest.raises(ValueError, match="broker"):
        aiohttp_wsbus.setup(web.Application(), jwks_url=JWKS, broker=object())  # type: ignore[arg-type]


def test_setup_twice_is_refused() -> None:
    app = web.Application()
    aiohttp_wsbus.setup(app, jwks_url=JWKS)
    with pytest.raises(ValueError, match="already"):
        aiohttp_wsbus.setup(app, jwks_url=JWKS)


def test_setup_returns_the_stored_bus() -> None:
    app = web.Application()
    bus = aiohttp_wsbus.setup(app, jwks_url=JWKS)
    assert app[aiohttp_wsbus.BUS_KEY] is bus is aiohttp_wsbus.get_bus(app)


def test_get_bus_names_the_forgotten_call() -> None:
    with pytest.raises(RuntimeError, match=r"aiohttp_wsbus.setup\(app"):
        aiohttp_wsbus.get_bus(web.Application())
