"""Channel-name rules and grant patterns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiohttp_wsbus.grants import MAX_CHANNEL_LENGTH, is_valid_channel, may

NAME_ALPHABET = "ABCxyz019_-.:@/="
names = st.text(alphabet=NAME_ALPHABET, min_size=1, max_size=40)


@pytest.mark.parametrize(
    ("patterns", "channel", "expected"),
    [
        (["chat:lobby"], "chat:lobby", True),
        (["chat:lobby"], "chat:lobby2", False),
        (["chat:*"], "chat:lobby", True),
        (["chat:*"], "chat:", False),  # the prefix needs at least one more character
        (["chat:*"], "chat", False),
        (["chat:*"], "chatter:x", False),
        (["chat:*"], "chat:a:b", True),
        (["*"], "anything.at/all", True),
        ([], "chat:lobby", False),
        (["user:alice", "chat:*"], "user:alice", True),
        (["user:alice"], "user:alice:private", False),
    ],
)
def test_patterns(patterns: list[str], channel: str, expected: bool) -> None:
    assert may(patterns, channel) is expected


@pytest.mark.parametrize(
    "channel",
    [
        "",
        "has space",
        "star*",
        "tab\there",
        "new\nline",
        "x" * (MAX_CHANNEL_LENGTH + 1),
        "é",
        "a,b",
    ],
)
def test_invalid_names_are_never_granted_even_by_star(channel: str) -> None:
    assert not is_valid_channel(channel)
    assert not may(["*"], channel)


def test_non_strings_are_invalid() -> None:
    assert not is_valid_channel(None)
    assert not is_valid_channel(42)


def test_longest_valid_name() -> None:
    assert is_valid_channel("x" * MAX_CHANNEL_LENGTH)


@given(prefix=names, rest=names)
def test_prefix_pattern_covers_exactly_its_namespace(prefix: str, rest: str) -> None:
    pattern = prefix + ":*"
    assert may([pattern], prefix + ":" + rest)
    assert not may([pattern], prefix)
    assert not may([pattern], rest) or rest.startswith(prefix + ":")


@given(st.text(max_size=50))
def test_any_string_gives_an_answer_not_an_exception(channel: str) -> None:
    assert may(["*"], channel) == is_valid_channel(channel)
