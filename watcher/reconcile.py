"""Handle one PreprovisioningImage: finalizer, deletion, and the decision to enqueue a build.

``Reconciler.reconcile`` reads the cached records and reads a Secret directly when the Secret
watch cannot see it. It computes the desired token with the same contract functions as the
workers. Then it enqueues, waits, or returns a delay after which to reconcile the object again.
It never logs or enqueues Secret contents, because it keeps a Secret only as its
resourceVersion and an HMAC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException

from builder import contract
from builder.catalog import Catalog
from builder.errors import BaseImageError
from builder.store import PayloadStore, StoreError
from watcher.decide import decide
from watcher.enqueue import Enqueuer
from watcher.kube import KubeAccess
from watcher.state import (
    FOREIGN_LABEL,
    MISSING_SECRET,
    OUR_FINALIZER,
    ImageState,
    ObjectCache,
    ObjectKey,
    SecretState,
    secret_state,
)

log = logging.getLogger(__name__)

# How long to wait before looking again at an object a worker is building right now.
DEFAULT_RECHECK_SECONDS = 5.0


def queue_for(catalog: Catalog, architecture: str) -> str:
    """Return the build queue of ``architecture``.

    An architecture without base images still needs a worker to report ConfigurationError,
    so its messages go to the queue of the first catalog architecture, which has consumers.
    """
    if catalog.lookup(architecture) is None and catalog.architectures:
        return contract.queue_name(next(iter(catalog.architectures)))
    return contract.queue_name(architecture)


@dataclass(frozen=True)
class Outcome:
    """The result of one reconcile: what happened, and when to look again (None: on events)."""

    action: str
    recheck_after: float | None = None


class Reconciler:
    """Applies the watcher's rules to one object at a time, from the processing thread."""

    def __init__(
        self,
        *,
        cache: ObjectCache,
        kube: KubeAccess,
        enqueuer: Enqueuer,
        catalog: Catalog,
        store: PayloadStore,
        hmac_key: bytes,
        profile: str | None = None,
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        mark_dirty: Callable[[list[ObjectKey]], None] = lambda keys: None,
    ) -> None:
        self.cache = cache
        self.kube = kube
        self.enqueuer = enqueuer
        self.catalog = catalog
        self.store = store
        self.hmac_key = hmac_key
        self.profile = profile
        self.recheck_seconds = recheck_seconds
        self.mark_dirty = mark_dirty

    def secret_hmac(self, secret: dict) -> str:
        return contract.secret_hmac(secret, hmac_key=self.hmac_key)

    # -- entry points

    def reconcile(self, key: ObjectKey, *, retry_due: bool = False) -> Outcome:
        """Bring one object's finalizer, deletion and build queue up to date."""
        image = self.cache.image(key)
        if image is None:
            return Outcome("gone")
        if image.foreign:
            return self._release(image)
        if image.deleting:
            return self._finalize(image)
        if OUR_FINALIZER not in image.finalizers:
            self._add_finalizer(image)
        return self._evaluate(image, retry_due=retry_due)

    def clean_up_deleted(self, *, namespace: str, name: str, uid: str) -> None:
        """Delete the stored images and Redis keys of an object that no longer exists."""
        try:
            self.store.delete_object(namespace, name, uid)
        except (StoreError, OSError) as error:
            log.warning("%s/%s: could not delete stored images of uid %s: %s",
                        namespace, name, uid, error)
        self.enqueuer.clear(namespace=namespace, name=name, uid=uid)

    def resolve_secret(self, image: ImageState, *, refresh: bool = False) -> SecretState | None:
        """Return the record of the Secret ``image`` names, reading it directly when needed.

        A direct read happens when the watch has no record (the Secret lacks the label or does
        not exist) or when ``refresh`` is True.
        """
        key = image.secret_key()
        if key is None:
            return None
        if not refresh:
            cached = self.cache.secret(key)
            if cached is not None:
                return cached
        obj = self.kube.read_secret(*key)
        state = MISSING_SECRET if obj is None else secret_state(obj, hmac_of=self.secret_hmac)
        log.debug("%s/%s: read Secret directly (exists %s, labelled %s)",
                  key[0], key[1], state.exists, state.labelled)
        others = [other for other in self.cache.put_secret(key, state) if other != image.key]
        self.mark_dirty(others)
        return state

    # -- steps

    def _evaluate(self, image: ImageState, *, retry_due: bool) -> Outcome:
        secret = self.resolve_secret(image, refresh=retry_due)
        try:
            token = contract.token_from_parts(
                spec=image.spec(),
                secret_hmac=secret.hmac if secret is not None else "none",
                catalog=self.catalog,
                profile=self.profile,
            )
        except BaseImageError as error:
            log.error("%s: cannot compute the build token: %s", image.display, error)
            return Outcome("base image unreadable")
        built = self.enqueuer.built_token(image.uid)
        decision = decide(
            image=image, secret=secret, desired_token=token, built_token=built,
            retry_due=retry_due,
        )
        if not decision.enqueue:
            log.debug("%s: no build needed: %s", image.display, decision.reason)
            return Outcome("skipped")

        # While a worker holds the object's lease, another message would only be dropped as
        # busy, so record the token and look again later instead. The worker queues a build for
        # a newer desired token after it releases the lease, and the recheck covers the rest (a
        # worker that dies, or one that checked the status before this change). The desired key
        # is written before the lease is read and the worker releases the lease before it reads
        # the desired key. Redis runs commands one at a time, so one of the two reads the
        # other's write.
        self.enqueuer.record_desired(image.uid, token)
        if self.enqueuer.building(image.uid):
            log.debug("%s: a worker is building it, desired token is now %s", image.display,
                      token)
            return Outcome("building", recheck_after=self.recheck_seconds)
        if built != token and self.enqueuer.built_token(image.uid) == token:
            # A worker finished this very token between the first read and the lease check.
            # Its status write reaches this watcher as an event, which decides again.
            log.debug("%s: token %s was built meanwhile", image.display, token)
            return Outcome("built meanwhile", recheck_after=self.recheck_seconds)

        sent = self.enqueuer.enqueue(
            namespace=image.namespace, name=image.name, uid=image.uid, token=token,
            queue=queue_for(self.catalog, image.architecture),
        )
        if sent:
            log.info("%s: enqueued build with token %s: %s", image.display, token,
                     decision.reason)
            return Outcome("enqueued")
        return Outcome("coalesced")

    def _add_finalizer(self, image: ImageState) -> None:
        finalizers = [*image.finalizers, OUR_FINALIZER]
        if self._patch_finalizers(image, finalizers):
            log.info("%s: added finalizer %s", image.display, OUR_FINALIZER)

    def _finalize(self, image: ImageState) -> Outcome:
        if OUR_FINALIZER not in image.finalizers:
            return Outcome("deleting without our finalizer")
        others = [entry for entry in image.finalizers if entry != OUR_FINALIZER]
        if others:
            log.info("%s: deletion waits for finalizers %s", image.display, ", ".join(others))
            return Outcome("deletion waits")
        self.clean_up_deleted(namespace=image.namespace, name=image.name, uid=image.uid)
        if self._patch_finalizers(image, []):
            log.info("%s: deleted stored images and removed finalizer %s", image.display,
                     OUR_FINALIZER)
        return Outcome("finalized")

    def _release(self, image: ImageState) -> Outcome:
        if OUR_FINALIZER not in image.finalizers:
            return Outcome("foreign")
        # NOTE: stored images stay until the object is deleted, because a host may still be
        # downloading the last URL this watcher's workers published.
        self.enqueuer.client.delete(
            contract.desired_key(image.uid), contract.waiting_key(image.uid)
        )
        finalizers = [entry for entry in image.finalizers if entry != OUR_FINALIZER]
        if self._patch_finalizers(image, finalizers):
            log.info("%s: label %s present: released finalizer %s", image.display,
                     FOREIGN_LABEL, OUR_FINALIZER)
        return Outcome("released")

    def _patch_finalizers(self, image: ImageState, finalizers: list[str]) -> bool:
        # A 409 or 404 means the cached record is stale; the watch delivers the newer state
        # and the object is reconciled again then.
        try:
            self.kube.patch_finalizers(
                image.namespace, image.name, finalizers=finalizers,
                resource_version=image.resource_version,
            )
        except ApiException as error:
            if error.status in (404, 409):
                log.debug("%s: finalizer update skipped: HTTP %s", image.display, error.status)
                return False
            raise
        return True
