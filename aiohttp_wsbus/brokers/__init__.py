"""Brokers carry messages between the processes that share one bus."""

from .base import Broker, History, Message, Published
from .memory import MemoryBroker

__all__ = ["Broker", "History", "MemoryBroker", "Message", "Published"]
