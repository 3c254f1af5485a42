"""Subscribing a socket to channels: admission (grants, the application's authorizers,
limits), the broker's interest, recovery (the replay, then live, with no gap and no
duplicate), unsubscribing and regranting on refresh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .authorizers import Verdict
from .brokers.base import History
from .connection import Connection, message_frame
from .errors import BrokerUnavailable
from .grants import is_valid_channel, may
from .hooks import ConnectionInfo
from .protocol import Position, encode, text_frame
from .tokens import Claims

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["SubscribeResult", "Subscriptions"]

logger = logging.getLogger("aiohttp_wsbus")


@dataclass(slots=True)
class SubscribeResult:
    """What became of a request to subscribe to some channels."""

    subscribed: list[str] = field(default_factory=list)
    denied: dict[str, str] = field(default_factory=dict)
    recovered: dict[str, bool] = field(default_factory=dict)
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Snapshots of the presence channels the token may read, as the frame
    # form's JSON text: see encode().
    presence: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The result's fields of a welcome or subscribed frame, but `presence`."""
        return {
            "subscribed": self.subscribed,
            "denied": self.denied,
            "recovered": self.recovered,
            "positions": self.positions,
        }

    def encode(self, frame: dict[str, Any]) -> bytes:
        """`frame` (a welcome or subscribed frame) encoded, with the presence
        snapshots spliced in as the JSON text they are kept as: re-encoding a
        channel's members for every welcome is what a connect storm would pay."""
        text = encode(frame)
        if not self.presence:
            return text
        listings = ",".join(f"{json.dumps(c)}:{t}" for c, t in self.presence.items())
        return b"%s,\"presence\":{%s}}" % (text[:-1], listings.encode())


class Subscriptions:
    """One bus's subscribing, unsubscribing and regranting of its connections."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def may_read(self, claims: Claims, channel: str) -> Verdict:
        """Whether `claims` may read `channel` (its history, its presence): subscribe
        grants, else the application's subscribe authorizers."""
        if may(claims.subscribe, channel):
            return "allowed"
        return (await self.bus.authorize(claims, [channel], "subscribe"))[channel]

    def drop_interest(self, channels: Collection[str]) -> None:
        """Tell the broker this node no longer needs `channels`."""
        for channel in channels:
            self.bus.track(self._unsubscribe_broker(channel))

    async def _unsubscribe_broker(self, channel: str) -> None:
        # A subscriber may have come back while this was scheduled.
        if self.bus.registry.subscribers(channel):
            return
        with contextlib.suppress(BrokerUnavailable):  # it forgets interest on reconnect
            await self.bus.broker.unsubscribe(channel)

    async def subscribe(
        self,
        connection: Connection,
        channels: list[str],
        since: Mapping[str, Position],
        reply: Callable[[SubscribeResult], dict[str, Any]],
        rewind: Mapping[str, int] | None = None,
    ) -> SubscribeResult:
        """Subscribe `connection` to the granted channels among `channels`.

        Queues `reply(result)` (a welcome or subscribed frame), then, for each
        channel with a position in `since` that can be recovered, the missed
        messages (or, with no `since`, the last `rewind[channel]` ones), then
        the live ones that arrived meanwhile: no gap, no duplicate.
        """
        result = SubscribeResult()
        candidates, undecided = self._select(connection, channels, result, since)
        allowed: set[str] = set()
        if undecided:
            allowed = await self._authorize_subscribe(connection, undecided, result)
        accepted = self._admit(connection, candidates, allowed, result)
        firsts = []
        for channel in accepted:
            # Held from the moment it joins the registry until the replay is queued.
            connection.hold(channel)
            if self.bus.registry.add(connection, channel):
                firsts.append(channel)
        if firsts:
            outcomes = await asyncio.gather(
                *(self.bus.broker.subscribe(c) for c in firsts), return_exceptions=True
            )
            failed = []
            for channel, outcome in zip(firsts, outcomes, strict=True):
                if outcome is None:
                    continue
                failed.append(channel)
                if not isinstance(outcome, BrokerUnavailable):
                    logger.error("broker subscribe failed: %s", channel, exc_info=outcome)
            self.drop(connection, failed)
            result.denied.update(dict.fromkeys(failed, "unavailable"))
            if connection.is_closing:
                # Closed while the broker answered: the close emptied the registry
                # first, so interest taken since then must be given back.
                self.drop_interest(firsts)
        accepted = [c for c in accepted if c in connection.channels]
        histories: dict[str, History] = {}
        reads: dict[str, Position | None] = {}
        if accepted:
            try:
                reads, histories, marks = await self._history(
                    connection, accepted, since, rewind or {}
                )
            except BrokerUnavailable:
                self.drop(connection, accepted)
                result.denied.update(dict.fromkeys(accepted, "unavailable"))
                accepted = []
        # Revoked or closed while the broker answered: those are gone already.
        accepted = [c for c in accepted if c in connection.channels]
        if accepted and self.bus.presence_keeper:
            accepted = await self._join_presence(connection, accepted, result)
        for channel in accepted:
            history = histories[channel]
            result.subscribed.append(channel)
            result.positions[channel] = history.position.as_json()
            if channel in since:
                result.recovered[channel] = history.recovered
        connection.enqueue(text_frame(result.encode(reply(result))))
        for channel in accepted:
            self._go_live(connection, channel, histories[channel], reads.get(channel), marks)
        if accepted and self.bus.on_subscribe and connection.is_announced:
            info = ConnectionInfo.of(connection)
            self.bus.track(
                self.bus.hooks.send("on_subscribe", self.bus.on_subscribe, info, accepted)
            )
        return result

    async def _history(
        self,
        connection: Connection,
        channels: list[str],
        since: Mapping[str, Position],
        rewind: Mapping[str, int],
    ) -> tuple[dict[str, Position | None], dict[str, History], dict[str, int]]:
        """Where each channel is read from, its top with what was missed since then, and
        how many of its messages the connection held when that top was known: those
        held after it came from this node after the top, whatever their epoch.

        A channel reads from its `since` position where it is recoverable; one
        to rewind (no `since`) from `rewind[channel]` messages (at most its
        history size) before its current top.
        """
        namespaces = self.bus.namespaces
        options = {c: namespaces.of(c) for c in channels}
        own = {c: o.history for c, o in options.items() if o is not namespaces.default}
        reads: dict[str, Position | None] = {
            c: since.get(c) if o.is_recoverable else None for c, o in options.items()
        }
        counts = {
            c: min(rewind[c], options[c].history.size)
            for c in channels
            if c not in since and rewind.get(c)
        }
        counts = {c: n for c, n in counts.items() if n > 0}
        broker = self.bus.broker
        if counts:
            tops = await broker.history(
                dict.fromkeys(counts), options={c: h for c, h in own.items() if c in counts}
            )
            for channel, count in counts.items():
                top = tops[channel].position
                reads[channel] = Position(max(0, top.offset - count), top.epoch)
        # Where the node's live stream stands will do for a start from the top.
        known = {}
        marks = {}
        for channel, read in reads.items():
            position = None if read is not None else await broker.delivered_position(channel)
            if position is not None:
                known[channel] = History([], position, recovered=False)
                marks[channel] = connection.held(channel)
        asked = {c: read for c, read in reads.items() if c not in known}
        histories = await broker.history_for_subscribers(asked, options=own) if asked else {}
        marks.update((c, connection.held(c)) for c in asked)
        return reads, {**histories, **known}, marks

    async def _join_presence(
        self, connection: Connection, accepted: list[str], result: SubscribeResult
    ) -> list[str]:
        """Join the presence of those of `accepted` that keep it; the channels still accepted."""
        presence = self.bus.presence_keeper
        present = [c for c in accepted if presence.keeps(c)]
        if not present:
            return accepted
        try:
            result.presence = await presence.join(connection, present)
        except BrokerUnavailable:
            self.drop(connection, present)
            result.denied.update(dict.fromkeys(present, "unavailable"))
        # Left while joining (closed, unsubscribed, revoked): that leave may have
        # reached the broker before the join did, so leave again.
        gone = [c for c in present if c not in connection.channels]
        if gone:
            presence.leave(connection, gone)
            for channel in gone:
                result.presence.pop(channel, None)
        return [c for c in accepted if c in connection.channels]

    def _go_live(
        self,
        connection: Connection,
        channel: str,
        history: History,
        since: Position | None,
        marks: Mapping[str, int],
    ) -> None:
        held = connection.release(channel)
        mark = marks.get(channel, 0)
        epoch = history.position.epoch
        last = history.position.offset
        if since is not None and history.recovered:
            last = since.offset
            for message in history.messages:
                if message.offset > last:
                    connection.enqueue(message_frame(message, recovered=True))
                    last = message.offset
        for index, item in enumerate(held):
            if isinstance(item, bytes):  # a join or leave: after the snapshot, in order
                connection.enqueue(item)
                continue
            message = item
            if last == 0 and message.offset == 1:
                epoch = message.epoch  # a channel's first message starts its epoch
            elif message.epoch != epoch and index >= mark:
                # Delivered by this node after the top was known: a newer epoch (the
                # channel was lost and began again), all of it news to this socket.
                epoch, last = message.epoch, 0
            if message.epoch == epoch and message.offset > last:
                connection.enqueue(message_frame(message))
                last = message.offset

    def _select(
        self,
        connection: Connection,
        channels: list[str],
        result: SubscribeResult,
        since: Mapping[str, Position],
    ) -> tuple[list[str], list[str]]:
        """The channels to consider, in order, and those of them the authorizers decide.

        The others are answered in `result` (invalid, forbidden, already subscribed).
        """
        candidates: list[str] = []
        undecided: list[str] = []
        if connection.is_closing:
            return candidates, undecided
        authorizers = self.bus.authorizers["subscribe"]
        for channel in channels:
            if not is_valid_channel(channel):
                result.denied[channel] = "invalid"
            elif channel in connection.channels:
                result.subscribed.append(channel)
                if channel in since:  # live on this socket all along: nothing missed
                    result.recovered[channel] = True
            elif may(connection.claims.subscribe, channel):
                candidates.append(channel)
            elif authorizers:
                candidates.append(channel)
                undecided.append(channel)
            else:
                result.denied[channel] = "forbidden"
        return candidates, undecided

    async def _authorize_subscribe(
        self, connection: Connection, channels: list[str], result: SubscribeResult
    ) -> set[str]:
        """Ask the application's authorizers; the allowed channels (the rest are denied)."""
        verdicts = await self.bus.authorize(connection.claims, channels, "subscribe")
        allowed = set()
        for channel, verdict in verdicts.items():
            if verdict == "allowed":
                allowed.add(channel)
            else:
                result.denied[channel] = verdict
        return allowed

    def _admit(
        self,
        connection: Connection,
        candidates: list[str],
        allowed: set[str],
        result: SubscribeResult,
    ) -> list[str]:
        """The candidates within `max_channels` (denied `limit` past it).

        Channels an authorizer allowed are allowed for this connection only.
        """
        accepted: list[str] = []
        if connection.is_closing:  # closed while the authorizers answered
            return accepted
        room = self.bus.settings.max_channels - len(connection.channels)
        for channel in candidates:
            if channel in result.denied:
                continue
            if room <= 0:
                result.denied[channel] = "limit"
                continue
            accepted.append(channel)
            room -= 1
            if channel in allowed:
                if connection.allowed is None:
                    connection.allowed = set()
                connection.allowed.add(channel)
        return accepted

    def drop(self, connection: Connection, channels: list[str]) -> None:
        if self.bus.presence_keeper:
            self.bus.presence_keeper.leave(connection, channels)
        for channel in channels:
            connection.release(channel)
            if connection.allowed is not None:
                connection.allowed.discard(channel)
        if connection.allowed is not None and not connection.allowed:
            connection.allowed = None
        self.drop_interest([c for c in channels if self.bus.registry.remove(connection, c)])

    def unsubscribe(self, connection: Connection, channels: list[str]) -> list[str]:
        """Unsubscribe from those of `channels` the connection has; return them."""
        left = [c for c in channels if c in connection.channels]
        self.drop(connection, left)
        self.unsubscribed(connection, left, "client")
        return left

    async def refresh(self, connection: Connection, claims: Claims) -> list[str]:
        """Switch to a refreshed token; return the channels it no longer grants.

        Subscribed channels the new token does not cover are put to the
        application's authorizers again; those they refuse (or cannot answer
        for) are dropped with the ones no longer granted. Raises InvalidToken
        if the token was revoked meanwhile.
        """
        authorizers = self.bus.authorizers["subscribe"]
        uncovered = [c for c in connection.channels if not may(claims.subscribe, c)]
        if authorizers and uncovered:
            verdicts = await self.bus.authorize(claims, uncovered, "subscribe")
            self.bus.check_revoked(claims)  # revoked while the authorizers answered
            allowed = {c for c, verdict in verdicts.items() if verdict == "allowed"}
            connection.allowed = allowed or None
        else:
            connection.allowed = None
        return self.regrant(connection, claims)

    def regrant(self, connection: Connection, claims: Claims) -> list[str]:
        """Switch to claims whose grants and allowances are already decided."""
        connection.claims = claims
        revoked, emptied = self.bus.registry.regrant(connection)
        if self.bus.presence_keeper:
            self.bus.presence_keeper.leave(connection, revoked)
            self.bus.presence_keeper.regrant(connection)
        for channel in revoked:
            connection.release(channel)
        self.drop_interest(emptied)
        connection.expire_at(claims.expires_at + self.bus.settings.leeway)
        self.unsubscribed(connection, revoked, "revoked")
        return revoked

    def unsubscribed(self, connection: Connection, channels: list[str], reason: str) -> None:
        if channels and self.bus.on_unsubscribe and connection.is_announced:
            info = ConnectionInfo.of(connection)
            self.bus.track(
                self.bus.hooks.send(
                    "on_unsubscribe", self.bus.on_unsubscribe, info, channels, reason
                )
            )
