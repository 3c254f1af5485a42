"""The registry: which connections hear which channels, and only while granted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from aiohttp_wsbus.connection import MAX_TUPLE_CHANNELS, Connection
from aiohttp_wsbus.errors import Forbidden
from aiohttp_wsbus.registry import Registry

from .support import loopback_transport, make_claims, standalone_connection


@pytest.fixture
async def transport() -> AsyncIterator[asyncio.Transport]:
    async with loopback_transport() as (transport, _):
        yield transport


def connection_on(transport: asyncio.Transport, *grants: str) -> Connection:
    return standalone_connection(transport, make_claims(grants=grants))[0]


async def test_add_tells_whether_the_channel_had_no_subscriber_here(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    alice, bob = connection_on(transport, "chat:*"), connection_on(transport, "chat:*")
    assert registry.add(alice, "chat:a") is True
    assert registry.add(bob, "chat:a") is False
    assert registry.add(alice, "chat:a") is False  # again: still one entry
    assert registry.add(alice, "chat:b") is True
    assert set(registry.subscribers("chat:a")) == {alice, bob}
    assert set(alice.channels) == {"chat:a", "chat:b"}
    assert set(bob.channels) == {"chat:a"}
    assert (registry.channel_count, registry.subscription_count) == (2, 3)


@pytest.mark.parametrize("channel", ["news", "chat:", "chat:a b", "chat:\ud800", ""])
async def test_add_refuses_a_channel_the_grants_do_not_cover(
    transport: asyncio.Transport, channel: str
) -> None:
    registry = Registry()
    alice = connection_on(transport, "chat:*")
    with pytest.raises(Forbidden) as refused:
        registry.add(alice, channel)
    assert refused.value.channels == [channel]
    assert list(registry.subscribers(channel)) == []
    assert not alice.channels
    assert registry.channel_count == 0


async def test_a_channel_nobody_subscribed_has_no_subscribers(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    registry.add(connection_on(transport, "chat:*"), "chat:a")
    assert list(registry.subscribers("chat:b")) == []
    assert registry.channel_count == 1


async def test_remove_tells_whether_the_last_subscriber_left(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    alice, bob = connection_on(transport, "chat:*"), connection_on(transport, "chat:*")
    registry.add(alice, "chat:a")
    registry.add(bob, "chat:a")
    assert registry.remove(alice, "chat:a") is False
    assert list(registry.subscribers("chat:a")) == [bob]
    assert not alice.channels
    assert registry.remove(alice, "chat:a") is False  # not subscribed any more
    assert registry.remove(bob, "chat:a") is True
    assert list(registry.subscribers("chat:a")) == []
    assert registry.channel_count == 0
    assert registry.remove(bob, "chat:never") is False


async def test_remove_all_returns_only_the_channels_left_empty(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    alice, bob = connection_on(transport, "chat:*"), connection_on(transport, "chat:*")
    for channel in ("chat:a", "chat:b", "chat:c"):
        registry.add(alice, channel)
    registry.add(bob, "chat:b")
    assert sorted(registry.remove_all(alice)) == ["chat:a", "chat:c"]
    assert not alice.channels
    assert list(registry.subscribers("chat:b")) == [bob]
    assert (registry.channel_count, registry.subscription_count) == (1, 1)
    assert registry.remove_all(alice) == []


async def test_regrant_drops_what_new_claims_no_longer_cover(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    alice = connection_on(transport, "chat:*", "user:alice")
    bob = connection_on(transport, "chat:*")
    for channel in ("chat:a", "chat:b", "user:alice"):
        registry.add(alice, channel)
    registry.add(bob, "chat:b")
    alice.claims = make_claims(grants=("chat:a", "user:alice"))
    revoked, emptied = registry.regrant(alice)
    assert revoked == ["chat:b"]
    assert emptied == []  # bob still hears chat:b
    assert set(alice.channels) == {"chat:a", "user:alice"}
    assert list(registry.subscribers("chat:b")) == [bob]
    alice.claims = make_claims(grants=())
    revoked, emptied = registry.regrant(alice)
    assert sorted(revoked) == ["chat:a", "user:alice"]
    assert sorted(emptied) == ["chat:a", "user:alice"]
    assert not alice.channels
    assert (registry.channel_count, registry.subscription_count) == (1, 1)


async def test_regrant_with_the_same_grants_changes_nothing(
    transport: asyncio.Transport,
) -> None:
    registry = Registry()
    alice = connection_on(transport, "chat:*")
    registry.add(alice, "chat:a")
    alice.claims = make_claims(grants=("chat:*",))
    assert registry.regrant(alice) == ([], [])
    assert list(registry.subscribers("chat:a")) == [alice]


async def test_a_connection_keeps_its_channels_in_order_as_few_and_any_number_as_many(
    transport: asyncio.Transport,
) -> None:
    # A set of one channel costs an idle socket 216 bytes and a tracked container.
    registry = Registry()
    alice = connection_on(transport, "chat:*")
    registry.add(alice, "chat:b")
    registry.add(alice, "chat:a")
    registry.add(alice, "chat:b")
    assert alice.channels == ("chat:b", "chat:a")
    registry.remove(alice, "chat:b")
    assert list(alice.channels) == ["chat:a"]  # (a list: mypy narrowed the tuple above)
    many = [f"chat:{n}" for n in range(MAX_TUPLE_CHANNELS + 2)]
    for channel in many:
        registry.add(alice, channel)
    assert set(alice.channels) == {"chat:a", *many}
    registry.remove(alice, "chat:0")
    assert set(alice.channels) == {"chat:a", *many[1:]}
    alice.claims = make_claims(grants=("chat:1",))
    assert sorted(registry.regrant(alice)[0]) == sorted(["chat:a", *many[2:]])
    assert set(alice.channels) == {"chat:1"}
    assert registry.remove_all(alice) == ["chat:1"]
    assert not alice.channels


async def test_subscribers_of_a_channel_share_one_copy_of_its_name(
    transport: asyncio.Transport,
) -> None:
    # Each connect frame parses its own copy, which an idle socket would keep.
    registry = Registry()
    alice, bob = connection_on(transport, "chat:*"), connection_on(transport, "chat:*")
    registry.add(alice, "".join(["chat:", "a"]))
    registry.add(bob, "".join(["chat:", "a"]))
    [held_by_alice], [held_by_bob] = alice.channels, bob.channels
    assert held_by_alice is held_by_bob
    registry.remove(alice, "chat:a")
    registry.remove(bob, "chat:a")
    fresh = "".join(["chat:", "a"])
    registry.add(alice, fresh)  # the channel emptied: its name is not held any more
    [held] = alice.channels
    assert held is fresh


async def test_subscribers_with_no_other_channel_share_one_tuple(
    transport: asyncio.Transport,
) -> None:
    # A tuple of one channel costs an idle socket 48 bytes.
    registry = Registry()
    alice, bob = connection_on(transport, "chat:*"), connection_on(transport, "chat:*")
    registry.add(alice, "chat:a")
    registry.add(bob, "".join(["chat:", "a"]))
    assert alice.channels == ("chat:a",) and alice.channels is bob.channels
    registry.add(bob, "chat:b")
    registry.remove(bob, "chat:a")
    assert (alice.channels, bob.channels) == (("chat:a",), ("chat:b",))
