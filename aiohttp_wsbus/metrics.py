"""Prometheus metrics for one bus, read from the bus's plain counters at scrape time.

Needs prometheus-client (`pip install 'aiohttp-wsbus[metrics]'`). With
`setup(..., metrics=True)` the bus serves them at `GET {base_path}/metrics`;
`BusCollector(bus)` can also be registered in an application's own registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .bus import Bus

__all__ = ["CONTENT_TYPE_LATEST", "BusCollector", "registry_for", "render"]


class BusCollector(Collector):
    """Reports a bus's gauges and counters; nothing is counted on the hot path here."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        bus = self.bus
        yield _gauge(
            "wsbus_connections", "Authenticated WebSocket connections.", len(bus.connections)
        )
        yield _gauge(
            "wsbus_open_sockets", "Upgraded WebSockets, authenticated or not.", bus.open_sockets
        )
        yield _gauge(
            "wsbus_subscriptions",
            "Channel subscriptions held by connections.",
            bus.registry.subscription_count,
        )
        yield _gauge(
            "wsbus_channels",
            "Channels with at least one subscriber here.",
            bus.registry.channel_count,
        )
        yield _counter(
            "wsbus_messages_published",
            "Messages published through this process.",
            bus.messages_published,
        )
        yield _counter(
            "wsbus_messages_delivered",
            "Messages handed to subscribed sockets (one per subscriber).",
            bus.messages_delivered,
        )
        yield _counter(
            "wsbus_slow_consumer_closes",
            "Sockets closed with 4002 because they did not keep up.",
            bus.slow_consumer_closes,
        )
        yield _labelled(
            "wsbus_auth_failures",
            "Refused tokens and API keys, by reason.",
            "reason",
            bus.auth_failures,
        )
        yield _labelled(
            "wsbus_hook_errors",
            "Application hooks and authorizers that failed or timed out, by hook.",
            "hook",
            bus.hook_errors,
        )
        yield _labelled(
            "wsbus_rate_limited",
            "Sockets and emits refused by a limit, by kind: user_connections (4408), "
            "client and subscribe (4429), emit (429).",
            "kind",
            bus.rate_limited,
        )
        yield _counter("wsbus_jwks_fetches", "JWKS fetch attempts.", bus.verifier.fetch_count)
        yield _counter(
            "wsbus_jwks_fetch_failures", "JWKS fetches that failed.", bus.verifier.fetch_failures
        )
        yield _gauge(
            "wsbus_broker_available",
            "1 when the broker can publish right now.",
            int(bus.broker.is_available),
        )
        yield _counter(
            "wsbus_broker_reconnects",
            "Times the broker re-established its connection.",
            bus.broker.reconnects,
        )


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format."""
    return generate_latest(registry)


def registry_for(bus: Bus) -> CollectorRegistry:
    """A registry of its own for `bus`, so several buses in one process never clash."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BusCollector(bus))
    return registry


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(
    name: str, documentation: str, label: str, counts: Mapping[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family
