"""Faults an application's tests inflict on the bus under test: sockets dropped, tokens
expired now (the broker's outage lives in capture.py, next to what watches publishes)."""

from __future__ import annotations

from ..bus import Bus

__all__ = ["drop_sockets", "expire_tokens"]


def drop_sockets(bus: Bus, user: str) -> int:
    """Cut every socket of `user` on this node without a close frame, as a network
    failure would (clients see 1006 and reconnect); return how many."""
    connections = bus.connections.of(user)
    for connection in connections:
        connection.transport.abort()
    return len(connections)


def expire_tokens(bus: Bus, user: str) -> int:
    """Treat the tokens of `user`'s sockets as expired now: each is closed with 4001
    (clients fetch a fresh token and reconnect); return how many."""
    connections = bus.connections.of(user)
    for connection in connections:
        connection.expire_at(0.0)
    return len(connections)
