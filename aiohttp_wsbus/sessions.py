"""Sessions the application ends: disconnect a user, unsubscribe them, revoke tokens.

Each call is checked here, then carried by the broker to every node's bus
(this one's included), where `apply` acts on the local sockets.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Final

from .grants import is_valid_channel
from .protocol import TOKEN_REVOKED, Close, CloseCode, ended
from .protocol import reconnect as protocol_reconnect
from .revocations import Revocation, Revocations, check_user

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["Sessions"]

MAX_CONTROL_CHANNELS: Final = 100
MAX_REASON_BYTES: Final = 123  # what a close frame has room for


class Sessions:
    """One bus's side of ending sessions, and the revocations in force."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.revocations = Revocations()

    async def disconnect(self, user: str, *, reconnect: bool = False, reason: str = "") -> None:
        """Check, then carry to every node (what it does: Bus.disconnect)."""
        check_user(user)
        close = (protocol_reconnect if reconnect else ended)(_check_reason(reason))
        await self.bus.broker.control(
            {"type": "disconnect", "user": user, "code": int(close.code), "reason": close.reason}
        )

    async def unsubscribe_user(self, user: str, channels: Collection[str]) -> None:
        """Check, then carry to every node (what it does: Bus.unsubscribe_user)."""
        check_user(user)
        names = list(dict.fromkeys(channels)) if not isinstance(channels, str) else [channels]
        if not 0 < len(names) <= MAX_CONTROL_CHANNELS or not all(map(is_valid_channel, names)):
            raise ValueError(f"channels: 1 to {MAX_CONTROL_CHANNELS} valid channel names")
        await self.bus.broker.control({"type": "unsubscribe", "user": user, "channels": names})

    def apply(self, message: Mapping[str, Any]) -> None:
        """Act on a control message from the broker (from this node or another)."""
        kind = message.get("type")
        if kind == "disconnect":
            close = Close(CloseCode(message["code"]), message["reason"])
            for connection in self.bus.connections.of(message["user"]):
                connection.close(close)
        elif kind == "unsubscribe":
            for connection in self.bus.connections.of(message["user"]):
                left = [c for c in message["channels"] if c in connection.channels]
                if left:
                    self.bus.subscriptions.drop(connection, left)
                    connection.send({"type": "unsubscribed", "channels": left, "reason": "server"})
                    self.bus.subscriptions.unsubscribed(connection, left, "server")
        elif kind == "revoke":
            revocation = Revocation.from_json(message["revocation"])
            self.revocations.add(revocation)
            self._close_revoked([revocation])
        elif kind == "revocations":  # the broker (re)loaded every revocation in force
            revocations = [Revocation.from_json(r) for r in message["revocations"]]
            self.revocations.replace(revocations)
            self._close_revoked(revocations)

    def _close_revoked(self, revocations: list[Revocation]) -> None:
        """Close 4410 the sockets whose token a revocation in force now covers."""
        users = {r.user for r in revocations}
        if None in users:  # a token id: any socket may hold it, so look at each once
            holders = list(self.bus.connections)
        else:
            holders = [c for user in users if user for c in self.bus.connections.of(user)]
        for connection in holders:
            if self.revocations.covers(connection.claims):
                connection.close(TOKEN_REVOKED)


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str):
        raise ValueError(f"reason: at most {MAX_REASON_BYTES} bytes of UTF-8")
    if len(reason.encode("utf-8", "surrogatepass")) > MAX_REASON_BYTES:
        raise ValueError(f"reason: at most {MAX_REASON_BYTES} bytes of UTF-8")
    try:
        reason.encode()
    except UnicodeEncodeError:
        raise ValueError("reason: not valid Unicode") from None
    return reason
