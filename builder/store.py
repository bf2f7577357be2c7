"""The payload store shared by workers (which publish) and image servers (which read).

A directory, usually a shared volume. Each published image is two files under
``images/NAMESPACE/NAME/UID/``: ``IMAGE_ID.cpio.gz`` (the payload, absent when the host has no
network data) and ``IMAGE_ID.json`` (format, architecture, base digest, publication time). The
image id is a digest of the *uncompressed* payload, the base image digest and the format, so
the same inputs always give the same URL, whatever zlib version compressed the payload.

Publishing writes the payload, then the record, each by atomic rename, so a reader never sees
a half-written image. The previous images of an object stay for a grace period after a new one
is published, because hosts may still be downloading them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 600.0

# Kubernetes object names (DNS-1123 subdomains) and UIDs; anything else could escape the store.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
FORMATS = ("iso", "initrd")


class StoreError(ValueError):
    """A reference to the store is malformed (a name, uid or image id that cannot be valid)."""


@dataclass(frozen=True)
class ImageRecord:
    """One published image."""

    namespace: str
    name: str
    uid: str
    image_id: str
    image_format: str
    architecture: str
    base_digest: str
    payload_path: Path | None
    published_at: float

    @property
    def url_path(self) -> str:
        """The path part of the image URL, below the public URL prefix."""
        return f"images/{self.namespace}/{self.name}/{self.uid}/{self.image_id}.{self.image_format}"


def image_id(*, payload_digest: str | None, base_digest: str, image_format: str) -> str:
    """Return the deterministic id of an image from its uncompressed payload and base."""
    material = f"{payload_digest or 'base'}\n{base_digest}\n{image_format}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def check_reference(namespace: str, name: str, uid: str) -> None:
    """Raise StoreError unless the namespace, name and uid are valid Kubernetes values."""
    if not _NAME.match(namespace) or not _NAME.match(name):
        raise StoreError(f"invalid object reference {namespace!r}/{name!r}")
    if not _UID.match(uid):
        raise StoreError(f"invalid uid {uid!r} for {namespace}/{name}")


class PayloadStore:
    """A payload store rooted at a directory."""

    def __init__(self, root: Path, *, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        self.root = root
        self.grace_seconds = grace_seconds

    def _object_dir(self, namespace: str, name: str, uid: str) -> Path:
        check_reference(namespace, name, uid)
        return self.root / "images" / namespace / name / uid

    def publish(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        image_format: str,
        architecture: str,
        base_digest: str,
        payload_archive: bytes | None,
        payload_digest: str | None,
    ) -> ImageRecord:
        """Store one image and return its record; older images of the object start their grace."""
        if image_format not in FORMATS:
            raise StoreError(f"unknown image format {image_format!r}")
        directory = self._object_dir(namespace, name, uid)
        directory.mkdir(parents=True, exist_ok=True)
        identifier = image_id(
            payload_digest=payload_digest, base_digest=base_digest, image_format=image_format
        )
        payload_path = None
        if payload_archive is not None:
            payload_path = directory / f"{identifier}.cpio.gz"
            _write_atomic(payload_path, payload_archive)
        record = ImageRecord(
            namespace=namespace,
            name=name,
            uid=uid,
            image_id=identifier,
            image_format=image_format,
            architecture=architecture,
            base_digest=base_digest,
            payload_path=payload_path,
            published_at=time.time(),
        )
        _write_atomic(directory / f"{identifier}.json", _encode(record))
        self._expire_others(directory, keep=identifier)
        return record

    def lookup(self, namespace: str, name: str, uid: str, identifier: str) -> ImageRecord | None:
        """Return the record of a published image, or None when it does not exist."""
        if not _IMAGE_ID.match(identifier):
            return None
        try:
            directory = self._object_dir(namespace, name, uid)
        except StoreError:
            return None
        try:
            document = json.loads((directory / f"{identifier}.json").read_text())
        except (OSError, ValueError):
            return None
        payload = document.get("payload")
        return ImageRecord(
            namespace=namespace,
            name=name,
            uid=uid,
            image_id=identifier,
            image_format=document["format"],
            architecture=document["architecture"],
            base_digest=document["baseDigest"],
            payload_path=directory / payload if payload else None,
            published_at=float(document["publishedAt"]),
        )

    def delete_object(self, namespace: str, name: str, uid: str) -> bool:
        """Delete every stored image of one object; return whether anything was there."""
        directory = self._object_dir(namespace, name, uid)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        log.info("%s/%s: deleted stored images of uid %s", namespace, name, uid)
        return True

    def _expire_others(self, directory: Path, *, keep: str) -> None:
        # Each superseded record gets a "supersededAt" time on the first publish after it and
        # is deleted, with its payload, on the first publish after its grace period.
        now = time.time()
        for record_path in directory.glob("*.json"):
            identifier = record_path.stem
            if identifier == keep:
                continue
            try:
                document = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            superseded_at = document.get("supersededAt")
            if superseded_at is None:
                document["supersededAt"] = now
                _write_atomic(record_path, json.dumps(document).encode())
            elif now - float(superseded_at) >= self.grace_seconds:
                record_path.unlink(missing_ok=True)
                (directory / f"{identifier}.cpio.gz").unlink(missing_ok=True)


def _encode(record: ImageRecord) -> bytes:
    document = {
        "format": record.image_format,
        "architecture": record.architecture,
        "baseDigest": record.base_digest,
        "payload": record.payload_path.name if record.payload_path else None,
        "publishedAt": record.published_at,
    }
    return json.dumps(document, sort_keys=True).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
