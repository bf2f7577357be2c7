"""Coalesced enqueueing of build messages, and the watcher's other Redis keys.

``Enqueuer.enqueue`` always records the latest desired token. It sends a Celery message only
when it creates the object's waiting key (SET NX), so at most one message per object waits in
a queue however often its inputs change. The worker reads the desired key when it starts, so
the latest token wins, and it deletes the waiting key when it takes the message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis
from celery import Celery

from builder import contract
from watcher import metrics

log = logging.getLogger(__name__)

# The waiting key expires so that a message lost with a flushed broker or a dead worker cannot
# block its object for long. NOTE: 20 minutes is a guess at the longest queue wait, above the
# workers' default visibility timeout of 15 minutes. If a message waits longer, the next change
# sends a second one, and the worker finds the token already built.
DEFAULT_WAITING_TTL_SECONDS = 1200


def broker_redis(broker_url: str) -> redis.Redis:
    """Return a Redis client for the broker URL, with short timeouts so failures show early."""
    return redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=30)


def ensure_hmac_key(client: redis.Redis) -> bytes:
    """Return the HMAC key shared with the workers, creating a random one if none exists."""
    client.set(contract.HMAC_KEY, os.urandom(32), nx=True)
    key = client.get(contract.HMAC_KEY)
    if not key:
        raise RuntimeError(f"Redis key {contract.HMAC_KEY} vanished right after it was set")
    return key


def celery_producer(broker_url: str) -> Celery:
    """Return a Celery app that only sends messages to ``broker_url``."""
    app = Celery("ppimage-watcher", broker=broker_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_timeout = 5
    return app


class Enqueuer:
    """Sends build messages through Celery and reads and clears the per-object Redis keys."""

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        *,
        waiting_ttl: int = DEFAULT_WAITING_TTL_SECONDS,
    ) -> None:
        self.client = client
        self.app = app
        self.waiting_ttl = waiting_ttl
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def built_token(self, uid: str) -> str | None:
        value = self.client.get(contract.built_key(uid))
        return value.decode() if value is not None else None

    def desired_token(self, uid: str) -> str | None:
        value = self.client.get(contract.desired_key(uid))
        return value.decode() if value is not None else None

    def record_desired(self, uid: str, token: str) -> None:
        """Record ``token`` as the latest desired token of ``uid`` without sending a message."""
        self.client.set(contract.desired_key(uid), token)

    def building(self, uid: str) -> bool:
        """Return whether a worker holds the build lease of ``uid``."""
        return bool(self.client.exists(contract.lease_key(uid)))

    def enqueue(self, *, namespace: str, name: str, uid: str, token: str, queue: str) -> bool:
        """Record ``token`` as desired and send a message unless one already waits.

        Returns whether a message was sent. A failed send deletes the waiting key again, so the
        next evaluation retries, and re-raises.
        """
        self.client.set(contract.desired_key(uid), token)
        created = self.client.set(contract.waiting_key(uid), token, nx=True, ex=self.waiting_ttl)
        if not created:
            self._count("coalesced")
            log.debug("%s/%s: a build message already waits; desired token is now %s",
                      namespace, name, token)
            return False
        kwargs = contract.task_kwargs(namespace=namespace, name=name, uid=uid, token=token)
        try:
            self.app.send_task(contract.TASK_NAME, kwargs=kwargs, queue=queue)
        except Exception:
            self.client.delete(contract.waiting_key(uid))
            raise
        self._count("enqueued")
        return True

    def forget_waiting(self, uid: str) -> None:
        """Delete the waiting key of ``uid``, so the next enqueue sends a message even if one
        was lost with a dead worker."""
        self.client.delete(contract.waiting_key(uid))

    def forget_built(self, uid: str) -> None:
        """Delete the built token of ``uid`` so its next build message rebuilds the image."""
        self.client.delete(contract.built_key(uid))

    def clear(self, *, namespace: str, name: str, uid: str) -> None:
        """Delete every Redis key of a deleted object except a worker's build lease.

        The lease belongs to the worker holding it and expires on its own.
        """
        keys = [
            contract.desired_key(uid),
            contract.built_key(uid),
            contract.waiting_key(uid),
            contract.retry_delay_key(uid),
        ]
        keys.extend(self.client.scan_iter(match=f"{contract.KEY_PREFIX}redeliveries:{uid}:*"))
        self.client.delete(*keys)
        member = contract.retry_member(namespace=namespace, name=name, uid=uid)
        self.client.zrem(contract.RETRY_SCHEDULE, member)

    def pop_due_retries(
        self,
        *,
        accept: Callable[[str], bool] = lambda namespace: True,
        now: float | None = None,
    ) -> list[tuple[str, str, str]]:
        """Remove and return the (namespace, name, uid) of every retry whose time has come.

        Members in namespaces ``accept`` rejects stay for the watcher that handles them. A
        member another process removed first is not returned, so each is handled once.
        """
        now = time.time() if now is None else now
        due = self.client.zrangebyscore(contract.RETRY_SCHEDULE, "-inf", now)
        popped = []
        for member in due:
            parts = member.decode(errors="replace").split("/")
            if len(parts) != 3:
                log.warning("removed malformed retry schedule member %r", member)
                self.client.zrem(contract.RETRY_SCHEDULE, member)
                continue
            if not accept(parts[0]):
                continue
            if self.client.zrem(contract.RETRY_SCHEDULE, member):
                popped.append((parts[0], parts[1], parts[2]))
        return popped

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1
        metrics.count_enqueue(name)
