"""Resolve image server requests to open base files and the layouts that describe the response.

An image URL names a record in the payload store. The record names its architecture, format and
the digest of the base it was built on, and the catalog gives the current base file. When that
file's digest differs, the URL gets 410 Gone, because the image id covers the base digest and the
bytes published under it cannot be served again. A rebuild publishes a new URL. Layouts are
cached per record and base file state, and nothing else is kept.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from builder import images
from builder.catalog import Catalog
from builder.errors import BuilderError
from builder.store import ImageRecord, PayloadStore

log = logging.getLogger(__name__)

DEFAULT_LAYOUT_CACHE_SIZE = 256
IMAGE_CACHE_CONTROL = "private, max-age=3600"
KERNEL_CACHE_CONTROL = "public, no-cache"


class ResolveError(Exception):
    """A request that gets no content. ``status`` is the HTTP status of the response."""

    status = 500


class NotFound(ResolveError):
    """No such image or kernel (or its payload expired)."""

    status = 404


class BaseImageChanged(ResolveError):
    """The base image changed since the image was published."""

    status = 410


class Unavailable(ResolveError):
    """A base or payload file is unreadable, or was replaced during the request."""

    status = 503


@dataclass
class OpenedResource:
    """A response body: a layout over one open base file, with its validators.

    ``base_file`` is the base file as it was when the layout was checked. The caller sends
    its ranges from this descriptor and closes it.
    """

    layout: images.Layout
    base_path: Path
    base_file: BinaryIO
    etag: str
    last_modified: float
    cache_control: str
    object_name: str
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.layout.size

    def close(self) -> None:
        self.base_file.close()

    def __enter__(self) -> OpenedResource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class Resolver:
    """Look up images and kernels for the image server; safe to share between threads."""

    def __init__(
        self,
        *,
        store: PayloadStore,
        catalog: Catalog,
        layout_cache_size: int = DEFAULT_LAYOUT_CACHE_SIZE,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.layout_cache_size = layout_cache_size
        self.warmed = threading.Event()
        self._layouts: OrderedDict[tuple, images.Layout] = OrderedDict()
        self._layouts_lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._digest_locks_lock = threading.Lock()
        self._reported_changes: set[tuple[str, str]] = set()

    def open_image(
        self, *, namespace: str, name: str, uid: str, image_id: str, image_format: str
    ) -> OpenedResource:
        """Open the image at ``images/NAMESPACE/NAME/UID/IMAGE_ID.FORMAT``.

        :raises NotFound: no such record, or its payload expired.
        :raises BaseImageChanged: the base image changed since the image was published.
        :raises Unavailable: the catalog's base file is unreadable or was replaced meanwhile.
        """
        object_name = f"{namespace}/{name}"
        record = self._lookup(namespace, name, uid, image_id)
        if record is None or record.image_format != image_format:
            raise NotFound(f"{object_name}: no image {image_id}.{image_format} for uid {uid}")
        base = self.catalog.lookup(record.architecture)
        base_path = None
        if base is not None:
            base_path = base.iso if image_format == "iso" else base.initrd
        if base is None or base_path is None:
            log.warning(
                "%s: image %s needs a %s base for architecture %s, which the catalog lacks",
                object_name,
                image_id,
                image_format,
                record.architecture,
            )
            raise NotFound(f"{object_name}: no {image_format} base for {record.architecture}")

        base_file, identity, digest = self._open_base(base_path, object_name=object_name)
        try:
            if digest != record.base_digest:
                self._report_base_change(record, base_path, digest)
                raise BaseImageChanged(
                    f"{object_name}: base image {base_path} changed since {image_id}"
                )
            layout = self._layout(record, base_path, identity, embed_path=base.embed_path)
            return OpenedResource(
                layout=layout,
                base_path=base_path,
                base_file=base_file,
                etag=f'"{image_id}-{record.base_digest[:16]}"',
                last_modified=record.published_at,
                cache_control=IMAGE_CACHE_CONTROL,
                object_name=object_name,
            )
        except BaseException:
            base_file.close()
            raise

    def open_kernel(self, architecture: str) -> OpenedResource:
        """Open the catalog kernel of ``architecture`` (any alias), published as kernelUrl.

        :raises NotFound: the catalog has no kernel for the architecture.
        :raises Unavailable: the kernel file is unreadable or was replaced meanwhile.
        """
        base = self.catalog.lookup(architecture)
        if base is None or base.kernel is None:
            raise NotFound(f"no kernel for architecture {architecture}")
        object_name = f"bases/{base.architecture}/kernel"
        kernel_file, identity, digest = self._open_base(base.kernel, object_name=object_name)
        size = identity[3]
        layout = images.Layout(
            segments=(images.BaseRange(path=base.kernel, offset=0, length=size),)
        )
        return OpenedResource(
            layout=layout,
            base_path=base.kernel,
            base_file=kernel_file,
            etag=f'"kernel-{digest[:32]}"',
            last_modified=os.fstat(kernel_file.fileno()).st_mtime,
            cache_control=KERNEL_CACHE_CONTROL,
            object_name=object_name,
        )

    def warm(self) -> None:
        """Compute the digests and embed areas of every catalog base, so requests need not."""
        for base in self.catalog.architectures.values():
            for path in (base.iso, base.initrd, base.kernel):
                if path is None:
                    continue
                try:
                    self._digest(path)
                    if path == base.iso:
                        images.find_embed_area(path, embed_path=base.embed_path)
                except (BuilderError, OSError) as error:
                    log.error(
                        "bases/%s: cannot read base image %s: %s", base.architecture, path, error
                    )
        self.warmed.set()

    def readiness_problems(self) -> list[str]:
        """Return why this server cannot serve yet: an unreadable store or base file."""
        problems = []
        try:
            with os.scandir(self.store.root):
                pass
        except OSError as error:
            problems.append(f"payload store {self.store.root} is unreadable: {error}")
        for base in self.catalog.architectures.values():
            for path in (base.iso, base.initrd, base.kernel):
                if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
                    problems.append(f"base image {path} of {base.architecture} is unreadable")
        if not self.warmed.is_set():
            problems.append("base image digests are still being computed")
        return problems

    def _lookup(self, namespace: str, name: str, uid: str, image_id: str) -> ImageRecord | None:
        try:
            return self.store.lookup(namespace, name, uid, image_id)
        except (KeyError, TypeError, ValueError) as error:
            # A record with missing or mistyped fields: lookup() catches only unreadable JSON.
            log.warning(
                "%s/%s: record of image %s is invalid: %r", namespace, name, image_id, error
            )
            return None

    def _open_base(self, path: Path, *, object_name: str) -> tuple[BinaryIO, tuple, str]:
        # Open first, then check that the path still names the open file after hashing it,
        # so the digest describes the very bytes this request will send.
        try:
            base_file = open(path, "rb")  # noqa: SIM115 (closed by OpenedResource)
        except OSError as error:
            log.error("%s: cannot open base image %s: %s", object_name, path, error)
            raise Unavailable(f"{object_name}: base image {path} is unreadable") from error
        try:
            identity = _identity(os.fstat(base_file.fileno()))
            digest = self._digest(path)
            current = _identity(path.stat())
        except (BuilderError, OSError) as error:
            base_file.close()
            log.error("%s: cannot read base image %s: %s", object_name, path, error)
            raise Unavailable(f"{object_name}: base image {path} is unreadable") from error
        if current != identity:
            base_file.close()
            log.warning("%s: base image %s was replaced during the request", object_name, path)
            raise Unavailable(f"{object_name}: base image {path} was replaced, retry the request")
        return base_file, identity, digest

    def _digest(self, path: Path) -> str:
        # digest_file caches but does not lock, so without this lock every request that
        # arrives while a new base is hashed would hash it again.
        with self._digest_locks_lock:
            lock = self._digest_locks.setdefault(str(path), threading.Lock())
        with lock:
            return images.digest_file(path)

    def _report_base_change(self, record: ImageRecord, base_path: Path, digest: str) -> None:
        key = (record.url_path, digest)
        if key in self._reported_changes:
            return
        if len(self._reported_changes) > 4096:
            self._reported_changes.clear()
        self._reported_changes.add(key)
        log.warning(
            "%s/%s: base image %s changed since image %s was published (digest %s, now %s)."
            " Its URL gets 410 Gone until a rebuild publishes a new one:"
            " run `ppimage rebuild --all`",
            record.namespace,
            record.name,
            base_path,
            record.image_id,
            record.base_digest[:16],
            digest[:16],
        )

    def _layout(
        self, record: ImageRecord, base_path: Path, identity: tuple, *, embed_path: str
    ) -> images.Layout:
        key = (record.url_path, str(base_path), identity, embed_path)
        with self._layouts_lock:
            layout = self._layouts.get(key)
            if layout is not None:
                self._layouts.move_to_end(key)
                return layout
        layout = self._build_layout(record, base_path, embed_path=embed_path)
        with self._layouts_lock:
            self._layouts[key] = layout
            while len(self._layouts) > self.layout_cache_size:
                self._layouts.popitem(last=False)
        return layout

    def _build_layout(
        self, record: ImageRecord, base_path: Path, *, embed_path: str
    ) -> images.Layout:
        object_name = f"{record.namespace}/{record.name}"
        if record.payload_path is None:
            return images.base_layout(base_path)
        try:
            payload = record.payload_path.read_bytes()
        except FileNotFoundError as error:
            raise NotFound(f"{object_name}: payload of {record.image_id} expired") from error
        except OSError as error:
            log.error("%s: cannot read payload %s: %s", object_name, record.payload_path, error)
            raise Unavailable(f"{object_name}: payload of {record.image_id} unreadable") from error
        try:
            if record.image_format == "iso":
                area = images.find_embed_area(base_path, embed_path=embed_path)
                return images.iso_layout(base_path, area, payload)
            return images.initrd_layout(base_path, payload)
        except BuilderError as error:
            log.error(
                "%s: cannot lay out image %s on %s: %s",
                object_name,
                record.image_id,
                base_path,
                error,
            )
            raise ResolveError(f"{object_name}: image {record.image_id}: {error}") from error
