"""Prometheus metrics of the watcher: enqueues, watch health, reconciles and queue lengths.

The watcher is one process, so the default registry is used. Queue lengths are read from Redis
at each scrape (Flower's own metrics have no queue length).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from builder import contract

log = logging.getLogger(__name__)

ENQUEUES = Counter(
    "ppimage_watcher_enqueues_total",
    "Build requests by result: enqueued (a message was sent) or coalesced (one already waited, "
    "only the desired token moved).",
    ["result"],
)
EVENTS = Counter(
    "ppimage_watcher_events_total",
    "Watch and reconcile events: relists after 410 Gone, watch errors, reconcile errors and "
    "reconcile decisions.",
    ["event"],
)
LEADER = Gauge("ppimage_watcher_leader", "1 while this watcher holds the leader Lease, else 0.")


def count_enqueue(result: str) -> None:
    """Count one enqueue decision (``enqueued`` or ``coalesced``)."""
    ENQUEUES.labels(result=result).inc()


def count_event(event: str) -> None:
    """Count one watch or reconcile event."""
    EVENTS.labels(event=event).inc()


class QueueCollector(Collector):
    """Reads the length of each build queue and of the retry schedule from Redis."""

    def __init__(self, client: redis.Redis, queues: Iterable[str]) -> None:
        self.client = client
        self.queues = sorted(set(queues))

    def collect(self):
        lengths = GaugeMetricFamily(
            "ppimage_queue_length", "Build messages waiting in each queue.", labels=["queue"]
        )
        retries = GaugeMetricFamily(
            "ppimage_retry_schedule_length", "Objects waiting for a scheduled retry."
        )
        try:
            for queue in self.queues:
                lengths.add_metric([queue], self.client.llen(queue))
            retries.add_metric([], self.client.zcard(contract.RETRY_SCHEDULE))
        except redis.RedisError as error:
            log.warning("metrics: cannot read queue lengths from Redis: %s", error)
            return
        yield lengths
        yield retries


def start_exporter(*, host: str, port: int, client: redis.Redis, queues: Iterable[str]) -> None:
    """Serve the watcher's metrics on ``host:port`` in a thread, on every path."""
    REGISTRY.register(QueueCollector(client, queues))
    start_http_server(port, addr=host)
