"""The broker contract's own values (brokers/base.py): history options and their bounds.

The contract's behaviour is tested on every broker in test_redis_broker.py.
"""

from __future__ import annotations

import math

import pytest

from aiohttp_wsbus import InvalidSettings
from aiohttp_wsbus.brokers import HistoryOptions
from aiohttp_wsbus.brokers.base import MAX_HISTORY_SIZE
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
