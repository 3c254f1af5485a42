"""Presence on this node: which channels keep it, who may read it, this node's
sockets as members, and the joins and leaves handed to subscribers.

The broker keeps the members and decides joins and leaves cluster-wide (see
brokers/presence.py); this module only speaks for this node's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

from .brokers.presence import (
    Member,
    PresenceEvent,
    PresenceOptions,
    PresenceSnapshot,
    decode_info,
)
from .errors import BrokerUnavailable, InvalidChannel
from .grants import grant_patterns, is_valid_channel, may
from .protocol import encode, encode_data, text_frame
from .tokens import Claims

if TYPE_CHECKING:
    from .bus import Bus
    from .connection import Connection

__all__ = ["MAX_INFO_SIZE", "Presence"]

logger = logging.getLogger("aiohttp_wsbus")

MAX_INFO_SIZE: Final = 1024  # bytes of a member's info, as JSON
_NO_INFO: Final = "{}"


class Presence:
    """The `presence` settings at work on one bus."""

    def __init__(self, bus: Bus) -> None:
        settings = bus.settings
        self.bus = bus
        self.patterns = settings.presence
        self._namespaces = bus.namespaces
        # A namespace's `presence` option wins over the patterns for its channels.
        self._is_on = bool(self.patterns) or any(
            options.presence for options in bus.namespaces.patterns.values()
        )
        self.options = PresenceOptions(settings.presence_ttl, settings.max_presence_members)
        self._claim = settings.presence_claim
        self._info_claim = settings.presence_info_claim
        # The sockets here that joined each channel and may read its presence: a
        # join or leave goes to these without checking every subscriber's grant.
        self._readers: dict[str, dict[Connection, None]] = {}
        # Leaves still on their way to the broker, by connection: a join of the
        # same socket (unsubscribed, then subscribed again) waits for them, or
        # the late leave would take the new entry away.
        self._leaving: dict[str, asyncio.Task[None]] = {}
        # Joins and leaves decided this tick, by channel, not yet handed out: a
        # connect storm decides many per tick, and each reader then takes them in
        # one call instead of one per event. Handed out at the end of the tick, or
        # before a message reaches the channel's readers, so each reader gets
        # exactly the events it would have got at once, in the same order with the
        # channel's messages; a reader that leaves takes those queued so far alone.
        # A reader that came while some were queued takes them from where it came
        # (`_late`): its snapshot holds the earlier ones.
        self.queued: dict[str, list[bytes]] = {}
        self._late: dict[str, dict[Connection, int]] = {}

    def __bool__(self) -> bool:
        """Whether any channel keeps presence (off by default: then nothing here runs)."""
        return self._is_on

    def keeps(self, channel: str) -> bool:
        """Whether `channel` keeps presence: its namespace's `presence` option, or else
        whether a `presence` pattern covers it."""
        decided = self._namespaces.of(channel).presence
        return may(self.patterns, channel) if decided is None else decided

    def may_read(self, claims: Claims, channel: str) -> bool:
        """Whether the token's presence grant covers `channel`."""
        return may(self._read_grants(claims.extra), channel)

    def _read_grants(self, extra: Mapping[str, Any]) -> tuple[str, ...]:
        """The patterns of the presence grant among the token's claims (`claims.extra`,
        read once by the caller: each read decodes it)."""
        return grant_patterns(extra.get(self._claim))

    def info(self, claims: Claims, extra: Mapping[str, Any] | None = None) -> str:
        """The member info the token carries, as JSON text (`{}` without a usable one);
        `extra`: claims.extra already read (each read decodes it)."""
        value = (claims.extra if extra is None else extra).get(self._info_claim)
        if value is None:
            return _NO_INFO
        try:
            info = encode_data(value) if isinstance(value, dict) else None
        except ValueError:
            info = None
        if info is None or len(info.encode()) > MAX_INFO_SIZE:
            # The identity provider's mistake, not the user's: say so, keep the socket.
            logger.warning(
                "presence: claim %r of user %r is not a JSON object of at most %d bytes; "
                "its info is left empty",
                self._info_claim,
                claims.subject,
                MAX_INFO_SIZE,
            )
            return _NO_INFO
        return info

    async def join(self, connection: Connection, channels: list[str]) -> dict[str, str]:
        """Make the socket a member of `channels`; the snapshots (the frame form's JSON
        text, taken after it joined) of those whose presence its token may read.

        Raises BrokerUnavailable when the broker cannot take it.
        """
        leaving = self._leaving.get(connection.id)
        if leaving is not None:
            await asyncio.wait({leaving})
        claims = connection.claims
        broker = self.bus.broker
        extra = claims.extra  # decoded once for the grant and the info
        grants = self._read_grants(extra)
        readable = [c for c in channels if may(grants, c)]
        for channel in readable:  # from now on: a join racing the snapshot is held, not lost
            readers = self._readers.setdefault(channel, {})
            queued = self.queued.get(channel)
            if queued and connection not in readers:  # a reader already takes them all
                self._late.setdefault(channel, {})[connection] = len(queued)
            readers[connection] = None
        snapshots = await broker.join(
            connection.id,
            claims.subject,
            self.info(claims, extra),
            channels,
            snapshot=readable,
            limit=self.options.max_members,
        )
        return {channel: snapshot.text for channel, snapshot in snapshots.items()}

    def leave(self, connection: Connection, channels: Collection[str]) -> None:
        """Take the socket out of those of `channels` that keep presence (in the background)."""
        present = [c for c in channels if self.keeps(c)]
        if not present:
            return
        for channel in present:
            readers = self._readers.get(channel)
            if readers is None or connection not in readers:
                continue
            # What was decided before it left goes to it alone: handing the tick's
            # queue to every reader at each leave would make a close storm quadratic.
            self._hand_out_to(channel, connection)
            del readers[connection]
            if not readers:
                del self._readers[channel]
        connection_id = connection.id
        earlier = self._leaving.get(connection_id)
        if earlier is None and self.bus.broker.leave_at_once(connection_id, present):
            return  # no task: a close storm closes thousands at once
        task = self.bus.track(self._leave(connection_id, present, earlier))
        self._leaving[connection_id] = task

        def done(task: asyncio.Task[None]) -> None:
            if self._leaving.get(connection_id) is task:
                del self._leaving[connection_id]

        task.add_done_callback(done)

    def regrant(self, connection: Connection) -> None:
        """Re-read which of its presence channels a refreshed token may read."""
        grants = self._read_grants(connection.claims.extra)
        for channel in connection.channels:
            if not self.keeps(channel):
                continue
            self.hand_out(channel)
            readers = self._readers.setdefault(channel, {})
            if may(grants, channel):
                readers[connection] = None
            else:
                readers.pop(connection, None)
                if not readers:
                    del self._readers[channel]

    async def _leave(
        self, connection_id: str, channels: list[str], earlier: asyncio.Task[None] | None
    ) -> None:
        if earlier is not None:  # in the order they were decided
            await asyncio.wait({earlier})
        # Unreachable now: the entries expire within presence_ttl and are swept.
        with contextlib.suppress(BrokerUnavailable):
            await self.bus.broker.leave(connection_id, channels)

    def on_event(self, event: PresenceEvent) -> None:
        """Hand a join or leave to the channel's subscribers who may read its presence
        (called by the broker)."""
        readers = self._readers.get(event.channel)
        if not readers:
            return
        frame: dict[str, Any] = {"type": "join" if event.joined else "leave"}
        frame["channel"] = event.channel
        frame["user"] = event.user
        if event.info is not None:
            frame["info"] = decode_info(event.info)
        data = text_frame(encode(frame))
        queued = self.queued.get(event.channel)
        if queued is not None:
            queued.append(data)
            return
        if not self.queued:
            asyncio.get_running_loop().call_soon(self.hand_out_all)
        self.queued[event.channel] = [data]

    def hand_out(self, channel: str) -> None:
        """Give the channel's readers the joins and leaves queued for it."""
        frames = self.queued.pop(channel, None)
        late = self._late.pop(channel, None)
        if frames is None:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        for connection in self._readers.get(channel, ()):
            start = late.get(connection) if late else None
            if start is None:
                connection.deliver_frame(channel, data)
            elif start < len(frames):
                connection.deliver_frame(channel, b"".join(frames[start:]))

    def _hand_out_to(self, channel: str, connection: Connection) -> None:
        """Give one reader the channel's joins and leaves queued since it began reading."""
        frames = self.queued.get(channel)
        late = self._late.get(channel)
        start = late.pop(connection, 0) if late else 0
        if frames and start < len(frames):
            connection.deliver_frame(channel, b"".join(frames[start:]))

    def hand_out_all(self) -> None:
        """End of the tick: every queued join and leave goes out."""
        for channel in list(self.queued):
            self.hand_out(channel)

    async def members(self, channel: str) -> dict[str, Member]:
        """Everyone present in `channel`, by user."""
        snapshot = (await self.bus.broker.presence([self._checked(channel)]))[channel]
        return snapshot.members or {}

    async def count(self, channel: str) -> int:
        """How many users are present in `channel`."""
        snapshots = await self.bus.broker.presence([self._checked(channel)], limit=0)
        return snapshots[channel].count

    async def snapshot(self, channel: str) -> PresenceSnapshot:
        """`channel`'s members as subscribers see them (a count above max_presence_members)."""
        channels = [self._checked(channel)]
        return (await self.bus.broker.presence(channels, limit=self.options.max_members))[channel]

    def _checked(self, channel: str) -> str:
        if not is_valid_channel(channel):
            raise InvalidChannel(f"invalid channel name: {channel!r}")
        if not self.keeps(channel):
            raise ValueError(
                f"channel {channel!r} keeps no presence: no `presence` pattern or namespace"
            )
        return channel
