"""Prometheus metrics of the workers, summed over every process of the prefork pool.

Builds run in pool child processes, so the metrics use prometheus-client's multiprocess mode:
each process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and the exporter in the
main worker process adds them up at each scrape. That mode is chosen when prometheus_client is
first imported, so ``prepare_multiprocess_directory`` runs before any import of it, and the
metric objects are created on first use, in the child that records them.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Build durations are a few milliseconds for a payload; the long buckets catch slow API calls.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def prepare_multiprocess_directory() -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` (a new temporary directory unless already set) and
    delete values left there by an earlier run; return the directory."""
    configured = os.environ.get(MULTIPROCESS_VARIABLE)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="ppimage-worker-metrics-"))
        os.environ[MULTIPROCESS_VARIABLE] = str(directory)
    return directory


@functools.cache
def _metrics():
    from prometheus_client import Counter, Histogram

    return {
        "builds": Counter(
            "ppimage_builds_total",
            "Builds finished by a worker, by result (success, error) and condition reason.",
            ["result", "reason"],
        ),
        "duration": Histogram(
            "ppimage_build_duration_seconds",
            "Time to render, pack and publish one image, by format.",
            ["format"],
            buckets=DURATION_BUCKETS,
        ),
        "deliveries": Counter(
            "ppimage_worker_deliveries_total",
            "Build messages handled, by outcome (ready, error, current, refreshed, stale, "
            "busy, gone, failed).",
            ["outcome"],
        ),
        "conflicts": Counter(
            "ppimage_status_write_conflicts_total",
            "Status writes rejected with 409 Conflict (stale resourceVersion) and retried.",
        ),
    }


def record_build(*, result: str, reason: str) -> None:
    """Count one finished build."""
    _metrics()["builds"].labels(result=result, reason=reason).inc()


def observe_build_duration(*, image_format: str, seconds: float) -> None:
    """Record the duration of one successful render, pack and publish."""
    _metrics()["duration"].labels(format=image_format).observe(seconds)


def record_delivery(outcome: str) -> None:
    """Count one handled build message by its outcome word."""
    _metrics()["deliveries"].labels(outcome=outcome).inc()


def record_conflict() -> None:
    """Count one status write that hit a stale resourceVersion."""
    _metrics()["conflicts"].inc()


def start_exporter(*, host: str, port: int) -> None:
    """Serve the summed metrics of every worker process on ``host:port`` in a thread.

    Every path returns the metrics, so ``/healthz`` succeeds while the process runs.
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
