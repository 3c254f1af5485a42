"""The Python client's reconnect policy is the JS client's: both suites read the same
vectors (js/test-support/policy-vectors.json; js/test/policy.test.js is the other reader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aiohttp_wsbus import client_policy
from aiohttp_wsbus.client_policy import CloseAction, backoff_delay, decide, refresh_delay

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "js" / "test-support" / "policy-vectors.json").read_text()
)
BACKOFF: dict[str, Any] = VECTORS["backoff"]


@pytest.mark.parametrize(
    "case",
    VECTORS["close"]["cases"],
    ids=lambda c: f"{c['code']}-{c['welcomed']}-{c['retried_unauthorized']}",
)
def test_close_code_action_is_the_shared_one(case: dict[str, Any]) -> None:
    decision = decide(
        case["code"],
        was_welcomed=case["welcomed"],
        has_retried_unauthorized=case["retried_unauthorized"],
    )
    assert (decision.action, decision.is_error) == (CloseAction(case["action"]), case["error"])


@pytest.mark.parametrize("bounds", BACKOFF["attempts"], ids=lambda b: f"attempt-{b['attempt']}")
def test_backoff_delay_spans_the_shared_bounds(bounds: dict[str, Any]) -> None:
    attempt = bounds["attempt"]
    assert backoff_delay(attempt, 0.0) == bounds["min_ms"] / 1000
    assert backoff_delay(attempt, 1.0) == bounds["max_ms"] / 1000
    assert bounds["min_ms"] / 1000 < backoff_delay(attempt, 0.5) < bounds["max_ms"] / 1000


def test_default_delays_are_the_shared_ones() -> None:
    assert BACKOFF["min_reconnect_delay_ms"] / 1000 == client_policy.MIN_RECONNECT_DELAY
    assert BACKOFF["max_reconnect_delay_ms"] / 1000 == client_policy.MAX_RECONNECT_DELAY


def test_backoff_of_a_huge_attempt_is_the_maximum() -> None:
    assert backoff_delay(10**6, 1.0) == client_policy.MAX_RECONNECT_DELAY


@pytest.mark.parametrize(
    "case", VECTORS["refresh"]["cases"], ids=lambda c: f"expires-in-{c['expires_in_s']}"
)
def test_refresh_delay_is_the_shared_one(case: dict[str, Any]) -> None:
    delay = refresh_delay(1000.0 + case["expires_in_s"], 1000.0, case["refresh_before_s"])
    assert delay == case["delay_s"]


def test_a_rate_limited_close_waits_at_least_the_shared_pause() -> None:
    rate_limited = VECTORS["rate_limited"]
    decision = decide(rate_limited["code"], was_welcomed=True, has_retried_unauthorized=False)
    assert decision.action is CloseAction.BACKOFF
    assert decision.at_least == rate_limited["min_wait_ms"] / 1000
    assert decide(1006, was_welcomed=True, has_retried_unauthorized=False).at_least == 0
