"""The watcher's threads: list-then-watch per resource and namespace, and one processing thread.

The official client is used instead of kopf for control. The watcher stores compact records,
not whole objects, so 10,000 PreprovisioningImages and Secrets fit in little memory. A 410
relists only the resource that expired. A Lease starts and stops the whole controller. kopf
would bring its own asyncio loop and its own finalizer and annotation handling, which would all
have to be switched off, and its peering is not leader election. The list-then-watch loop here
is small, and tests cover its 410, reconnect and leadership paths.

Watch threads list a resource, store compact records in the ObjectCache and mark the affected
PreprovisioningImages dirty, then watch from the list's resourceVersion with bookmarks. A 410
relists at once; any other failure reconnects with exponential backoff from the last
resourceVersion seen. The processing thread waits until every initial list is stored, so a
restart compares against complete state and enqueues only what is out of date. Then it
reconciles dirty objects one at a time, re-evaluates everything each resync period and pops
due entries of the retry schedule.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from watcher import metrics
from watcher.kube import KubeAccess
from watcher.reconcile import Reconciler
from watcher.state import (
    SECRET_LABEL_SELECTOR,
    ObjectCache,
    ObjectKey,
    SecretState,
    image_state,
    secret_state,
)

log = logging.getLogger(__name__)

DEFAULT_RESYNC_SECONDS = 600.0
DEFAULT_RETRY_POLL_SECONDS = 1.0
# Server-side watch timeout; the API server's own default is 30 to 60 minutes.
DEFAULT_WATCH_TIMEOUT_SECONDS = 300
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# Delay before an object whose reconcile failed (API or Redis error) is tried again.
ERROR_RETRY_SECONDS = 5.0

CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True)
class LoopSettings:
    """Timing and scope of one controller."""

    namespaces: tuple[str, ...] = ()
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    retry_poll_seconds: float = DEFAULT_RETRY_POLL_SECONDS
    watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_SECONDS

    def scopes(self) -> tuple[str | None, ...]:
        """Return the namespaces to watch, None meaning all namespaces."""
        return self.namespaces or (None,)


class Backoff:
    """Exponential backoff with jitter between reconnects."""

    def __init__(self, first: float = BACKOFF_FIRST_SECONDS, maximum: float = BACKOFF_MAX_SECONDS):
        self.first = first
        self.maximum = maximum
        self.current = first

    def next_delay(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = self.first


class DirtyQueue:
    """Keys waiting to be reconciled, each at most once, plus keys due at a later time.

    A key marked again before it is taken keeps one entry, and keeps its retry flag once set.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._pending: dict[ObjectKey, bool] = {}
        self._later: list[tuple[float, ObjectKey]] = []
        self.busy = False

    def mark(self, keys: Iterable[ObjectKey], *, retry_due: bool = False) -> None:
        with self._condition:
            for key in keys:
                self._pending[key] = self._pending.get(key, False) or retry_due
            self._condition.notify_all()

    def mark_later(self, key: ObjectKey, delay: float) -> None:
        with self._condition:
            heapq.heappush(self._later, (time.monotonic() + delay, key))
            self._condition.notify_all()

    def take(self, timeout: float) -> tuple[ObjectKey, bool] | None:
        """Return the next key and its retry flag, waiting up to ``timeout`` seconds."""
        with self._condition:
            deadline = time.monotonic() + timeout
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, key = heapq.heappop(self._later)
                    self._pending.setdefault(key, False)
                if self._pending:
                    key = next(iter(self._pending))
                    retry_due = self._pending.pop(key)
                    self.busy = True
                    return key, retry_due
                self.busy = False
                self._condition.notify_all()
                remaining = deadline - now
                if self._later:
                    remaining = min(remaining, self._later[0][0] - now)
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)

    def wait_empty(self, timeout: float) -> bool:
        """Return once nothing is pending or being reconciled; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._pending or self.busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True


class Controller:
    """Watches, caches and reconciles until ``stop``; one instance per leadership term."""

    def __init__(
        self,
        *,
        kube: KubeAccess,
        reconciler: Reconciler,
        cache: ObjectCache,
        settings: LoopSettings,
    ) -> None:
        self.kube = kube
        self.reconciler = reconciler
        self.cache = cache
        self.settings = settings
        self.dirty = DirtyQueue()
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: set = set()
        self._watches_lock = threading.Lock()
        self._tombstones: dict[ObjectKey, set[str]] = {}
        self._tombstones_lock = threading.Lock()
        self._pending_lists = len(settings.scopes()) * 2
        self._synced = threading.Event()
        self._synced_lock = threading.Lock()
        reconciler.mark_dirty = self.dirty.mark

    # -- lifecycle

    def start(self) -> None:
        for namespace in self.settings.scopes():
            scope = namespace or "all namespaces"
            self._spawn(f"watch-images {scope}", self._watch_loop, self._sync_images, namespace)
            self._spawn(f"watch-secrets {scope}", self._watch_loop, self._sync_secrets, namespace)
        self._spawn("reconcile", self._process_loop)
        log.info("watcher controller started for %s",
                 ", ".join(self.settings.namespaces) or "all namespaces")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread; watch threads end at their next event or server timeout."""
        self._stop.set()
        with self._watches_lock:
            for watch in self._watches:
                watch.stop()
        self.dirty.mark(())
        for thread in self._threads:
            if thread.name == "reconcile":
                thread.join(timeout)
        log.info("watcher controller stopped")

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Return once the initial lists are stored and no object waits for a reconcile."""
        deadline = time.monotonic() + timeout
        if not self._synced.wait(timeout):
            return False
        return self.dirty.wait_empty(max(deadline - time.monotonic(), 0.0))

    def _spawn(self, name: str, target: Callable, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- watch threads

    def _watch_loop(self, sync: Callable[[str | None, str | None], str], namespace) -> None:
        """List and watch one resource in one scope until stopped.

        ``sync(namespace, resource_version)`` lists when ``resource_version`` is None, then
        watches, and returns the last resourceVersion it saw.
        """
        backoff = Backoff()
        resource_version: str | None = None
        scope = namespace or "all namespaces"
        while not self._stop.is_set():
            try:
                resource_version = sync(namespace, resource_version)
                backoff.reset()
            except ApiException as error:
                if self._stop.is_set():
                    return
                if error.status == 410:
                    self._count("relists")
                    log.info("%s in %s: resourceVersion %s expired; relisting",
                             sync.__name__, scope, resource_version)
                    resource_version = None
                    continue
                self._count("watch_errors")
                delay = backoff.next_delay()
                log.warning("%s in %s failed: HTTP %s %s; retrying in %.1f s",
                            sync.__name__, scope, error.status, error.reason, delay)
                self._stop.wait(delay)
            except CONNECTION_ERRORS as error:
                if self._stop.is_set():
                    return
                self._count("watch_errors")
                delay = backoff.next_delay()
                log.warning("%s in %s failed: %s; retrying in %.1f s",
                            sync.__name__, scope, error, delay)
                self._stop.wait(delay)

    def _stream(self, watch, stream, on_event: Callable[[str, dict], None], version: str) -> str:
        with self._watches_lock:
            self._watches.add(watch)
        try:
            for event in stream:
                if self._stop.is_set():
                    break
                obj = event.get("raw_object") or {}
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if event.get("type") != "BOOKMARK":
                    on_event(event["type"], obj)
        finally:
            with self._watches_lock:
                self._watches.discard(watch)
        return version

    def _list_done(self) -> None:
        with self._synced_lock:
            self._pending_lists -= 1
            if self._pending_lists == 0:
                log.info("initial lists stored: %d PreprovisioningImages, %d Secrets",
                         len(self.cache), self.cache.secret_count())
                self._synced.set()

    def _sync_images(self, namespace: str | None, resource_version: str | None) -> str:
        if resource_version is None:
            items, resource_version = self.kube.list_images(namespace)
            states = [image_state(item) for item in items]
            del items
            vanished = self.cache.replace_images(states, namespace=namespace)
            for old in vanished:
                self._tombstone(old.key, old.uid)
            self.dirty.mark([state.key for state in states])
            self.dirty.mark([old.key for old in vanished])
            if not self._synced.is_set():
                self._list_done()
        watch, stream = self.kube.watch_images(
            namespace, resource_version=resource_version,
            timeout_seconds=self.settings.watch_timeout_seconds,
        )
        return self._stream(watch, stream, self._on_image_event, resource_version)

    def _sync_secrets(self, namespace: str | None, resource_version: str | None) -> str:
        if resource_version is None:
            items, resource_version = self.kube.list_secrets(
                namespace, label_selector=SECRET_LABEL_SELECTOR
            )
            states: dict[ObjectKey, SecretState] = {}
            for item in items:
                metadata = item.get("metadata") or {}
                key = (metadata.get("namespace", ""), metadata.get("name", ""))
                states[key] = secret_state(item, hmac_of=self.reconciler.secret_hmac)
            del items
            self.dirty.mark(self.cache.replace_labelled_secrets(states, namespace=namespace))
            if not self._synced.is_set():
                self._list_done()
        watch, stream = self.kube.watch_secrets(
            namespace, label_selector=SECRET_LABEL_SELECTOR, resource_version=resource_version,
            timeout_seconds=self.settings.watch_timeout_seconds,
        )
        return self._stream(watch, stream, self._on_secret_event, resource_version)

    def _on_image_event(self, event_type: str, obj: dict) -> None:
        state = image_state(obj)
        if event_type == "DELETED":
            old = self.cache.remove_image(state.key)
            self._tombstone(state.key, state.uid)
            if old is not None and old.uid != state.uid:
                self._tombstone(state.key, old.uid)
        else:
            old = self.cache.put_image(state)
            if old is not None and old.uid != state.uid:
                self._tombstone(state.key, old.uid)
        self.dirty.mark([state.key])

    def _on_secret_event(self, event_type: str, obj: dict) -> None:
        metadata = obj.get("metadata") or {}
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        if event_type == "DELETED":
            # A Secret that lost its label also leaves the watch as DELETED. Forgetting it makes
            # the next reconcile read it directly, which finds it if it still exists.
            affected = self.cache.remove_secret(key)
        else:
            affected = self.cache.put_secret(
                key, secret_state(obj, hmac_of=self.reconciler.secret_hmac)
            )
        self.dirty.mark(affected)

    def _tombstone(self, key: ObjectKey, uid: str) -> None:
        with self._tombstones_lock:
            self._tombstones.setdefault(key, set()).add(uid)

    # -- processing thread

    def _process_loop(self) -> None:
        while not self._stop.is_set() and not self._synced.wait(0.2):
            pass
        next_resync = time.monotonic() + self.settings.resync_seconds
        next_retry_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_resync:
                self._resync()
                next_resync = now + self.settings.resync_seconds
            if now >= next_retry_poll:
                self._poll_retries()
                next_retry_poll = now + self.settings.retry_poll_seconds
            wait = max(min(next_resync, next_retry_poll) - time.monotonic(), 0.0)
            taken = self.dirty.take(wait)
            if taken is None or self._stop.is_set():
                continue
            key, retry_due = taken
            self._process(key, retry_due=retry_due)

    def _process(self, key: ObjectKey, *, retry_due: bool) -> None:
        display = f"{key[0]}/{key[1]}"
        try:
            current = self.cache.image(key)
            with self._tombstones_lock:
                uids = self._tombstones.pop(key, set())
            for uid in uids:
                if current is None or current.uid != uid:
                    self.reconciler.clean_up_deleted(namespace=key[0], name=key[1], uid=uid)
            outcome = self.reconciler.reconcile(key, retry_due=retry_due)
        except (ApiException, *CONNECTION_ERRORS) as error:
            self._count("reconcile_errors")
            log.warning("%s: reconcile failed: %s; retrying in %.0f s", display, error,
                        ERROR_RETRY_SECONDS)
            self.dirty.mark_later(key, ERROR_RETRY_SECONDS)
            return
        except Exception:
            self._count("reconcile_errors")
            log.exception("%s: reconcile failed; retrying in %.0f s", display, ERROR_RETRY_SECONDS)
            self.dirty.mark_later(key, ERROR_RETRY_SECONDS)
            return
        self._count(outcome.action)
        if outcome.recheck_after is not None:
            self.dirty.mark_later(key, outcome.recheck_after)

    def _count(self, event: str) -> None:
        self.counters[event] += 1
        metrics.count_event(event)

    def _resync(self) -> None:
        forgotten = self.cache.forget_unwatched()
        keys = self.cache.image_keys()
        log.info("resync: re-evaluating %d PreprovisioningImages (%d directly read Secrets "
                 "to read again)", len(keys), forgotten)
        self.dirty.mark(keys)

    def _poll_retries(self) -> None:
        scopes = set(self.settings.namespaces)
        try:
            due = self.reconciler.enqueuer.pop_due_retries(
                accept=lambda namespace: not scopes or namespace in scopes
            )
        except Exception as error:
            log.warning("could not read the retry schedule: %s", error)
            return
        for namespace, name, uid in due:
            current = self.cache.image((namespace, name))
            if current is None or current.uid != uid:
                log.debug("%s/%s: retry for uid %s dropped: object gone", namespace, name, uid)
                continue
            log.info("%s/%s: retry due; reading the Secret again", namespace, name)
            self.dirty.mark([(namespace, name)], retry_due=True)
