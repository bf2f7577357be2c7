"""The Celery application of the build workers and its queue settings.

Workers run the prefork pool because Celery 5.7 ignores time limits under the solo and threads
pools. A message is acknowledged after its task returns (``task_acks_late``). It is requeued at
once when its pool child dies or hits the hard time limit, and the task caps these redeliveries
per (uid, token) in Redis. The messages of a worker that died whole come back after the Redis
transport's visibility timeout, which therefore must exceed the hard time limit. Messages name
their queue (``build.ARCH``) when they are sent; only JSON is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery

from builder.settings import DEFAULT_BROKER_URL

DEFAULT_SOFT_TIME_LIMIT = 240
DEFAULT_TIME_LIMIT = 300
# Messages held by a worker that died as a whole come back only after this many seconds, so it
# stays a little above the hard time limit rather than the hour Celery suggests for ETA tasks.
DEFAULT_VISIBILITY_TIMEOUT = 900
DEFAULT_MAX_DELIVERIES = 5


class SettingsError(ValueError):
    """A queue setting is invalid; the message names the setting and the fix."""


@dataclass(frozen=True)
class QueueSettings:
    """Time limits in seconds, the broker's visibility timeout and the redelivery cap."""

    soft_time_limit: int = DEFAULT_SOFT_TIME_LIMIT
    time_limit: int = DEFAULT_TIME_LIMIT
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def check(self) -> QueueSettings:
        """Return self, or raise SettingsError naming the first inconsistent setting."""
        if self.soft_time_limit <= 0 or self.time_limit <= 0:
            raise SettingsError("--soft-time-limit and --time-limit must be positive seconds")
        if self.soft_time_limit >= self.time_limit:
            raise SettingsError(
                f"--soft-time-limit {self.soft_time_limit} must be lower than --time-limit"
                f" {self.time_limit}, so a build can clean up before it is killed"
            )
        if self.visibility_timeout <= self.time_limit:
            raise SettingsError(
                f"--visibility-timeout {self.visibility_timeout} must exceed --time-limit"
                f" {self.time_limit}, or Redis redelivers builds that are still running"
            )
        if self.max_deliveries < 1:
            raise SettingsError(f"--max-deliveries {self.max_deliveries} must be at least 1")
        return self


def queue_settings_from_environment() -> QueueSettings:
    """Read the queue settings from PPIMAGE_* variables; unset ones keep their defaults."""

    def number(variable: str, default: int) -> int:
        value = os.environ.get(variable)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise SettingsError(f"{variable}={value!r}: expected a whole number") from None

    return QueueSettings(
        soft_time_limit=number("PPIMAGE_SOFT_TIME_LIMIT", DEFAULT_SOFT_TIME_LIMIT),
        time_limit=number("PPIMAGE_TIME_LIMIT", DEFAULT_TIME_LIMIT),
        visibility_timeout=number("PPIMAGE_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT),
        max_deliveries=number("PPIMAGE_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
    )


def configure_app(celery_app: Celery, *, broker_url: str, queues: QueueSettings) -> None:
    """Apply the broker URL and the queue settings to ``celery_app``."""
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options={
            "visibility_timeout": queues.visibility_timeout,
            # kombu 5.7 looks for expired unacknowledged messages every interval x throttle
            # seconds, 100 s by default. Looking every tenth of the timeout (1 to 10 s) brings
            # a dead worker's messages back soon after the visibility timeout.
            "unacked_restore_interval": max(1, min(10, queues.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # JSON only: a message can carry references, never pickled objects.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # No result backend: task results are one word and only reach Flower through events.
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A failed task is acknowledged (it already wrote its status or asked for a retry),
        # a task killed by the hard time limit is requeued and counts as a delivery.
        task_acks_on_failure=True,
        task_acks_on_timeout=False,
        task_soft_time_limit=queues.soft_time_limit,
        task_time_limit=queues.time_limit,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_create_missing_queues=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
    )


app = Celery("ppimage", set_as_current=False)
configure_app(
    app,
    broker_url=os.environ.get("PPIMAGE_BROKER_URL") or DEFAULT_BROKER_URL,
    queues=queue_settings_from_environment(),
)
# Register the task with the app whether the worker starts from our command or from `celery -A`.
app.conf.imports = ("worker.tasks",)
