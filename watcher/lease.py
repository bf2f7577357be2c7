"""Leader election through a ``coordination.k8s.io/v1`` Lease, so one watcher replica is active.

The holder renews ``renewTime`` every few seconds. Another replica takes over only when the
record has not changed for ``leaseDurationSeconds`` by its own monotonic clock, as client-go
does, so clock skew between nodes does not matter. Every write carries the
resourceVersion it read, so of two replicas racing for an expired Lease one gets 409 and stays
a follower.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import kubernetes.client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "ppimage-watcher"
DEFAULT_DURATION_SECONDS = 15


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires and renews one Lease for ``identity``; call ``try_acquire_or_renew`` often."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        namespace: str,
        name: str = DEFAULT_LEASE_NAME,
        identity: str,
        duration_seconds: int = DEFAULT_DURATION_SECONDS,
        clock=time.monotonic,
    ) -> None:
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration_seconds = duration_seconds
        self.clock = clock
        self._observed: tuple | None = None
        self._observed_at = 0.0

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"

    def try_acquire_or_renew(self) -> bool:
        """Return whether this replica holds the Lease after one read and at most one write."""
        try:
            response = self.api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False
            )
        except ApiException as error:
            if error.status != 404:
                raise
            return self._create()
        lease = json.loads(response.data)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        now = self.clock()
        if record != self._observed:
            self._observed = record
            self._observed_at = now

        if holder and holder != self.identity:
            duration = int(spec.get("leaseDurationSeconds") or self.duration_seconds)
            if now - self._observed_at < duration:
                return False
            log.info("Lease %s: holder %s has not renewed for %s s; taking over",
                     self.display, holder, duration)
        return self._update(lease, holder=holder)

    def release(self) -> None:
        """Give the Lease up so another replica takes over at once instead of after it expires."""
        try:
            response = self.api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False
            )
            lease = json.loads(response.data)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec["holderIdentity"] = None
            spec["leaseDurationSeconds"] = 1
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("Lease %s: released by %s", self.display, self.identity)
        except ApiException as error:
            log.warning("Lease %s: could not release it: %s", self.display, error.reason)

    def _create(self) -> bool:
        now = _micro_time(datetime.now(UTC))
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration_seconds,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        log.info("Lease %s: created and acquired by %s", self.display, self.identity)
        return True

    def _update(self, lease: dict, *, holder: str) -> bool:
        now = _micro_time(datetime.now(UTC))
        spec = dict(lease.get("spec") or {})
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = self.duration_seconds
        spec["renewTime"] = now
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": spec,
        }
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as error:
            if error.status == 409:
                log.info("Lease %s: changed by another replica while %s wrote it",
                         self.display, self.identity)
                return False
            raise
        if holder != self.identity:
            log.info("Lease %s: acquired by %s", self.display, self.identity)
        return True
