"""The watcher's memory: compact records of PreprovisioningImages and Secrets, and their index.

The watcher keeps per object only what its decisions read (spec fields, uid, generation,
finalizers, the status fields the BareMetalHost controller compares, a Secret's
resourceVersion and HMAC), never whole objects and never Secret values. ``ObjectCache`` is
shared by the watch threads, which write it, and the processing thread, which reads it. Every
method takes its lock, and the records are immutable.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

OUR_FINALIZER = "preprovisioningimage.metal3.io"
# PreprovisioningImages with this label belong to the assisted-installer's controller.
FOREIGN_LABEL = "infraenvs.agent-install.openshift.io"
SECRET_LABEL = ("environment.metal3.io", "baremetal")
SECRET_LABEL_SELECTOR = "=".join(SECRET_LABEL)

ObjectKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class StatusView:
    """The status fields of a PreprovisioningImage that the BareMetalHost controller checks."""

    architecture: str = ""
    image_format: str = ""
    image_url: bool = False
    network_data_name: str = ""
    network_data_version: str = ""
    ready_status: str = ""
    ready_generation: int | None = None
    error_status: str = ""
    error_generation: int | None = None
    error_reason: str = ""


@dataclass(frozen=True, slots=True)
class ImageState:
    """The watcher's record of one PreprovisioningImage."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: int
    architecture: str
    accept_formats: tuple[str, ...]
    network_data_name: str
    finalizers: tuple[str, ...]
    deleting: bool
    foreign: bool
    status: StatusView

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spec(self) -> dict:
        """Return the spec fields the build token hashes, spelled as the API spells them."""
        return {
            "architecture": self.architecture,
            "acceptFormats": list(self.accept_formats),
            "networkDataName": self.network_data_name,
        }

    def secret_key(self) -> ObjectKey | None:
        if not self.network_data_name:
            return None
        return (self.namespace, self.network_data_name)


@dataclass(frozen=True, slots=True)
class SecretState:
    """The watcher's record of one Secret: its resourceVersion and an HMAC of its data.

    ``exists`` is False for a Secret that a direct read did not find, so repeated evaluations
    do not read it again before the retry schedule or the next resync. ``labelled`` is False
    for a Secret read directly because it lacks the label the Secret watch selects.
    """

    resource_version: str
    hmac: str
    labelled: bool
    exists: bool = True


MISSING_SECRET = SecretState(resource_version="", hmac="none", labelled=False, exists=False)


def _text(value: object) -> str:
    return sys.intern(str(value)) if value is not None else ""


def _generation(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def status_view(status: dict | None) -> StatusView:
    """Extract the compared status fields from a PreprovisioningImage's ``status``."""
    status = status or {}
    network_data = status.get("networkData") or {}
    conditions = {
        entry.get("type"): entry
        for entry in status.get("conditions") or []
        if isinstance(entry, dict)
    }
    ready = conditions.get("Ready") or {}
    error = conditions.get("Error") or {}
    return StatusView(
        architecture=_text(status.get("architecture")),
        image_format=_text(status.get("format")),
        image_url=bool(status.get("imageUrl")),
        network_data_name=_text(network_data.get("name")),
        network_data_version=str(network_data.get("version") or ""),
        ready_status=_text(ready.get("status")),
        ready_generation=_generation(ready.get("observedGeneration")),
        error_status=_text(error.get("status")),
        error_generation=_generation(error.get("observedGeneration")),
        error_reason=_text(error.get("reason")),
    )


def image_state(obj: dict) -> ImageState:
    """Extract an ImageState from a PreprovisioningImage as the API returns it."""
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    labels = metadata.get("labels") or {}
    return ImageState(
        namespace=_text(metadata.get("namespace")),
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
        resource_version=str(metadata.get("resourceVersion") or ""),
        generation=_generation(metadata.get("generation")) or 0,
        architecture=_text(spec.get("architecture")),
        accept_formats=tuple(_text(entry) for entry in spec.get("acceptFormats") or []),
        network_data_name=str(spec.get("networkDataName") or ""),
        finalizers=tuple(_text(entry) for entry in metadata.get("finalizers") or []),
        deleting=bool(metadata.get("deletionTimestamp")),
        foreign=FOREIGN_LABEL in labels,
        status=status_view(obj.get("status")),
    )


def secret_state(obj: dict, *, hmac_of: Callable[[dict], str]) -> SecretState:
    """Extract a SecretState from a Secret; ``hmac_of`` computes the HMAC of its data.

    A Secret with a ``deletionTimestamp`` counts as missing.
    """
    metadata = obj.get("metadata") or {}
    labels = metadata.get("labels") or {}
    return SecretState(
        resource_version=str(metadata.get("resourceVersion") or ""),
        hmac=hmac_of(obj),
        labelled=labels.get(SECRET_LABEL[0]) == SECRET_LABEL[1],
        exists=not metadata.get("deletionTimestamp"),
    )


class ObjectCache:
    """PreprovisioningImages and Secrets by (namespace, name), with a Secret → images index.

    Every change returns the keys of the PreprovisioningImages to evaluate again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images: dict[ObjectKey, ImageState] = {}
        self._secrets: dict[ObjectKey, SecretState] = {}
        self._users: dict[ObjectKey, set[ObjectKey]] = {}

    def __len__(self) -> int:
        return len(self._images)

    def image(self, key: ObjectKey) -> ImageState | None:
        with self._lock:
            return self._images.get(key)

    def secret(self, key: ObjectKey) -> SecretState | None:
        with self._lock:
            return self._secrets.get(key)

    def image_keys(self) -> list[ObjectKey]:
        with self._lock:
            return list(self._images)

    def secret_count(self) -> int:
        with self._lock:
            return len(self._secrets)

    def put_image(self, state: ImageState) -> ImageState | None:
        """Store ``state`` and return the record it replaced."""
        with self._lock:
            old = self._images.get(state.key)
            self._images[state.key] = state
            old_secret = old.secret_key() if old else None
            new_secret = state.secret_key()
            if old_secret != new_secret:
                self._unlink(old_secret, state.key)
                if new_secret is not None:
                    self._users.setdefault(new_secret, set()).add(state.key)
            return old

    def remove_image(self, key: ObjectKey) -> ImageState | None:
        """Forget one PreprovisioningImage and return its last record."""
        with self._lock:
            old = self._images.pop(key, None)
            if old is not None:
                self._unlink(old.secret_key(), key)
            return old

    def replace_images(
        self, states: Iterable[ImageState], *, namespace: str | None
    ) -> list[ImageState]:
        """Replace the records of ``namespace`` (None: all) with a fresh list; return the
        records that vanished."""
        fresh = {state.key: state for state in states}
        with self._lock:
            vanished = [
                old
                for key, old in self._images.items()
                if key not in fresh and namespace in (None, key[0])
            ]
        for old in vanished:
            self.remove_image(old.key)
        for state in fresh.values():
            self.put_image(state)
        return vanished

    def put_secret(self, key: ObjectKey, state: SecretState) -> list[ObjectKey]:
        """Store a Secret's record; return the images to evaluate when it changed."""
        with self._lock:
            old = self._secrets.get(key)
            self._secrets[key] = state
            if old == state:
                return []
            return sorted(self._users.get(key, ()))

    def remove_secret(self, key: ObjectKey) -> list[ObjectKey]:
        """Forget a Secret; return the images that named it."""
        with self._lock:
            old = self._secrets.pop(key, None)
            if old is None:
                return []
            return sorted(self._users.get(key, ()))

    def replace_labelled_secrets(
        self, states: dict[ObjectKey, SecretState], *, namespace: str | None
    ) -> list[ObjectKey]:
        """Replace the labelled Secrets of ``namespace`` (None: all) with a fresh list; return
        the images to evaluate.

        Records of Secrets read directly (unlabelled or missing) stay until ``forget_unwatched``.
        """
        with self._lock:
            vanished = [
                key
                for key, old in self._secrets.items()
                if old.labelled and key not in states and namespace in (None, key[0])
            ]
        affected: set[ObjectKey] = set()
        for key in vanished:
            affected.update(self.remove_secret(key))
        for key, state in states.items():
            affected.update(self.put_secret(key, state))
        return sorted(affected)

    def forget_unwatched(self) -> int:
        """Drop the records of Secrets read directly so they are read again when needed."""
        with self._lock:
            unwatched = [key for key, old in self._secrets.items() if not old.labelled]
            for key in unwatched:
                del self._secrets[key]
            return len(unwatched)

    def _unlink(self, secret_key: ObjectKey | None, image_key: ObjectKey) -> None:
        if secret_key is None:
            return
        users = self._users.get(secret_key)
        if users is None:
            return
        users.discard(image_key)
        if not users:
            del self._users[secret_key]
