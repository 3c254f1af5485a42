"""The subscriber client's channels: who listens to each, where each stands (offset and
epoch), and what the server's welcome, subscribed and message frames change in them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .client_subscription import Message, Subscription, SubscriptionDenied, as_position
from .protocol import Position

__all__ = ["Channels"]

Emit = Callable[..., None]


class Channels:
    """The channels the application wants, and the client's position on each.

    `emit(event, *args)` tells the application ("subscribed", "denied", "recovered").
    """

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.subscriptions: dict[str, list[Subscription]] = {}  # the wanted channels
        self.positions: dict[str, Position] = {}  # last received: where to recover from
        self.requested: set[str] = set()  # asked of the current socket
        self.unavailable: set[str] = set()  # denied "unavailable": asked again later
        self.gaps: set[str] = set()  # the next message there follows a gap

    def add(self, subscription: Subscription, *, is_welcomed: bool) -> bool:
        """Listen; True when the channel is new (the server must be asked for it)."""
        channel = subscription.channel
        held = self.subscriptions.setdefault(channel, [])
        held.append(subscription)
        if len(held) > 1:
            if channel in self.requested and is_welcomed:
                subscription.ready.set()  # already subscribed on this socket
            return False
        if subscription.since is not None:
            self.positions[channel] = subscription.since
        else:
            self.positions.pop(channel, None)  # a fresh subscription starts from now
        return True

    def remove(self, subscription: Subscription) -> bool:
        """Stop listening; True when nobody listens to the channel any more."""
        held = self.subscriptions.get(subscription.channel, [])
        if subscription in held:
            held.remove(subscription)
        if held or self.subscriptions.pop(subscription.channel, None) is None:
            return False
        self.unavailable.discard(subscription.channel)
        return True

    def forget_socket(self) -> None:
        """The socket is gone: the next connect frame asks for every wanted channel."""
        self.requested = set()
        self.unavailable.clear()

    def end_all(self, error: BaseException | None) -> None:
        for subscriptions in list(self.subscriptions.values()):
            for subscription in subscriptions:
                subscription.end(error)

    def changes(self) -> tuple[list[str], list[str]]:
        """The channels to ask for and to leave on the current socket (now counted as done)."""
        asked = self.requested | self.unavailable
        added = [c for c in self.subscriptions if c not in asked]
        removed = [c for c in self.requested if c not in self.subscriptions]
        self.requested.difference_update(removed)
        self.requested.update(added)
        return added, removed

    def since(self, channels: Iterable[str]) -> dict[str, Any]:
        return {c: self.positions[c].as_json() for c in channels if c in self.positions}

    def apply(self, frame: dict[str, Any]) -> bool:
        """Apply a welcome or subscribed frame; True if some channel is "unavailable"."""
        denied, positions = _mapping(frame, "denied"), _mapping(frame, "positions")
        recovered = _mapping(frame, "recovered")
        is_unavailable = False
        for channel, reason in denied.items():
            is_unavailable |= self.deny(channel, str(reason))
        for channel, raw in positions.items():
            position = as_position(raw) if isinstance(raw, dict) else None
            if channel not in self.subscriptions or position is None:
                continue
            if channel not in recovered:
                self._advance(channel, position)  # fresh: recover from here next time
            elif recovered[channel] is not True:
                # Too far behind, or a new epoch: continue from the server's position.
                self.positions[channel] = position
        for channel in strings(frame.get("subscribed")):
            for subscription in self.subscriptions.get(channel, []):
                subscription.ready.set()
            if channel in self.subscriptions:
                self.emit("subscribed", channel)
        for channel, ok in recovered.items():
            if channel in self.subscriptions:
                if ok is not True:
                    self.gaps.add(channel)  # never silent: the next message says so too
                self.emit("recovered", channel, ok is True)
        return is_unavailable

    def deny(self, channel: str, reason: str) -> bool:
        """The server will not deliver `channel`; True if only for now ("unavailable")."""
        self.requested.discard(channel)
        subscriptions = self.subscriptions.get(channel)
        if subscriptions is None:
            return False
        is_unavailable = reason == "unavailable"
        if is_unavailable:
            # The server's broker is down: keep the channel and its position, ask again later.
            self.unavailable.add(channel)
        else:
            del self.subscriptions[channel]
            self.gaps.discard(channel)
            for subscription in subscriptions:
                subscription.end(SubscriptionDenied(channel, reason))
        self.emit("denied", channel, reason)
        return is_unavailable

    async def deliver(self, frame: dict[str, Any]) -> None:
        """Hand a message frame to the channel's subscriptions, once, gaps flagged."""
        channel, offset, epoch = frame.get("channel"), frame.get("offset"), frame.get("epoch")
        subscriptions = self.subscriptions.get(channel) if isinstance(channel, str) else None
        if not subscriptions or not isinstance(channel, str):
            return  # left it; the server has not caught up yet
        if frame.get("ephemeral") is True:
            # No position: neither a gap nor a repeat, and a pending gap flag waits for
            # the next stored message.
            ephemeral = Message(channel, 0, "", frame.get("data"), ephemeral=True)
            for subscription in list(subscriptions):
                await subscription.put(ephemeral)
            return
        after_gap = channel in self.gaps
        if isinstance(offset, int) and isinstance(epoch, str):
            last = self.positions.get(channel)
            if last is not None and last.epoch == epoch and offset <= last.offset:
                return  # seen it already
            self.positions[channel] = Position(offset, epoch)
            # A new epoch or a hole on a live socket: messages may be gone, say so. A
            # channel never published to (offset 0) continues with offset 1 in any epoch.
            is_gap = last is not None and (last.epoch != epoch or offset > last.offset + 1)
            if is_gap and not (last is not None and last.offset == 0 and offset == 1):
                after_gap = True
                self.emit("recovered", channel, False)
        self.gaps.discard(channel)
        message = Message(
            channel,
            offset if isinstance(offset, int) else -1,
            epoch if isinstance(epoch, str) else "",
            frame.get("data"),
            recovered=frame.get("recovered") is True,
            after_gap=after_gap,
        )
        for subscription in list(subscriptions):
            await subscription.put(message)  # waits while the application is behind

    def _advance(self, channel: str, position: Position) -> None:
        """Move a channel's position forward, never back within the same epoch."""
        last = self.positions.get(channel)
        if last is None or last.epoch != position.epoch or last.offset < position.offset:
            self.positions[channel] = position


def _mapping(frame: dict[str, Any], key: str) -> dict[str, Any]:
    value = frame.get(key)
    return value if isinstance(value, dict) else {}


def strings(value: object) -> list[str]:
    """The strings of a JSON list (nothing for anything else)."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []
