"""Brokers carry messages between the processes that share one bus.

What a broker author needs is in `base`, re-exported here.
"""

from .base import (
    Broker,
    Deliver,
    History,
    HistoryOptions,
    Message,
    Position,
    Publication,
    Published,
    check_publish,
    recover,
)
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "Deliver",
    "History",
    "HistoryOptions",
    "MemoryBroker",
    "Message",
    "Position",
    "Publication",
    "Published",
    "check_publish",
    "recover",
]
