"""The broker contract's own values (brokers/base.py): history options and their bounds,
the values publishes make.

The contract's behaviour is tested on every broker in test_redis_broker.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from aiohttp_wsbus import InvalidSettings
from aiohttp_wsbus.brokers import HistoryOptions
from aiohttp_wsbus.brokers.base import MAX_HISTORY_SIZE, Message, Publication, Published
from aiohttp_wsbus.settings import load_settings


@pytest.mark.parametrize(("size", "ttl"), [(0, 0.001), (100, 300.0), (MAX_HISTORY_SIZE, 86400.0)])
def test_history_options_within_bounds(size: int, ttl: float) -> None:
    assert HistoryOptions(size, ttl) == HistoryOptions(size=size, ttl=ttl)


@pytest.mark.parametrize(
    ("size", "ttl", "error"),
    [
        (-1, 300.0, ValueError),
        (MAX_HISTORY_SIZE + 1, 300.0, ValueError),
        (100, 0.0, ValueError),
        (100, -1.0, ValueError),
        (100, math.inf, ValueError),
        (100, math.nan, ValueError),
        (True, 300.0, TypeError),
        (1.5, 300.0, TypeError),
    ],
)
def test_history_options_out_of_bounds(size: object, ttl: float, error: type[Exception]) -> None:
    with pytest.raises(error, match="history"):
        HistoryOptions(size, ttl)  # type: ignore[arg-type]


def test_settings_take_the_same_history_size_bound() -> None:
    secret = "s" * 32
    settings = load_settings({"jwt_secret": secret, "history_size": MAX_HISTORY_SIZE})
    assert HistoryOptions(settings.history_size, settings.history_ttl).size == MAX_HISTORY_SIZE
    with pytest.raises(InvalidSettings, match="history_size"):
        load_settings({"jwt_secret": secret, "history_size": MAX_HISTORY_SIZE + 1})


def test_published_values_are_made_as_dataclasses_make_them() -> None:
    published = Published("news", 3, "e1")
    assert published == Published(channel="news", offset=3, epoch="e1", is_repeat=False)
    assert repr(published) == (
        "Published(channel='news', offset=3, epoch='e1', is_repeat=False, is_ephemeral=False)"
    )
    assert Published("news", 0, "", is_ephemeral=True).is_ephemeral
    message = Message("news", 3, "e1", "{}")
    assert message == Message(channel="news", offset=3, epoch="e1", data="{}")
    assert Publication("news", "{}").history is None
    assert dataclasses.replace(published, offset=4).offset == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        published.offset = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        Message("news", 3, "e1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Published("news", 3, "e1", colour="red")  # type: ignore[call-arg]
