"""Prometheus metrics of the image server, registered in prometheus-client's default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SENT_BYTES = Counter(
    "ppimage_server_sent_bytes",
    "Bytes of image and kernel bodies sent to clients, headers excluded.",
    ["route"],
)
ACTIVE_DOWNLOADS = Gauge(
    "ppimage_server_active_downloads",
    "Image and kernel bodies being sent right now.",
)
REQUESTS = Counter(
    "ppimage_server_requests",
    "HTTP requests answered, by status code.",
    ["code"],
)
REJECTED_CONNECTIONS = Counter(
    "ppimage_server_rejected_connections",
    "Connections answered with 503 because --max-connections connections were open.",
)
