"""Image layouts: an output image described as ranges of a base file and literal bytes.

A ``Layout`` is immutable and cheap: per host only the payload is held in memory. The image
server reads it with ``read``/``iter_chunks`` for Range requests, and ``materialize`` writes
it as a file with ``os.copy_file_range`` (a reflink where the filesystem supports it) plus
``os.pwrite`` for the literal bytes. ``find_embed_area`` locates the zero-filled file of a base
ISO that every boot entry loads as an extra initrd; the payload is spliced in there.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from builder.errors import BaseImageError, ImageBuildInvalid

DEFAULT_EMBED_PATH = "/images/ignition.img"
CHUNK_SIZE = 1 << 20
_ZERO_CHECK_CHUNK = 1 << 16


@dataclass(frozen=True)
class EmbedArea:
    """Byte range of the embed file inside a base ISO."""

    offset: int
    size: int


@dataclass(frozen=True)
class BaseRange:
    """A range of a base file, copied unchanged."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class Literal:
    """Bytes held in memory: a payload or zero padding."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


Segment = BaseRange | Literal


@dataclass(frozen=True)
class Layout:
    """An output image as consecutive segments, each starting where the previous one ends."""

    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(segment.length for segment in self.segments)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``, fewer only at the end of the image."""
        return b"".join(self.iter_chunks(offset, offset + length))

    def iter_chunks(self, start: int, end: int, *, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the bytes of ``[start, end)`` in chunks of at most ``chunk_size`` bytes.

        :raises BaseImageError: a base file is shorter than the layout expects.
        """
        if start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end})")
        position = 0
        for segment in self.segments:
            segment_end = position + segment.length
            low, high = max(start, position), min(end, segment_end)
            if low < high:
                yield from _segment_chunks(segment, low - position, high - position, chunk_size)
            position = segment_end
            if position >= end:
                return


def _segment_chunks(segment: Segment, low: int, high: int, chunk_size: int) -> Iterator[bytes]:
    if isinstance(segment, Literal):
        for offset in range(low, high, chunk_size):
            yield segment.data[offset : min(high, offset + chunk_size)]
        return
    with open(segment.path, "rb") as handle:
        fd = handle.fileno()
        offset = low
        while offset < high:
            data = os.pread(fd, min(chunk_size, high - offset), segment.offset + offset)
            if not data:
                raise BaseImageError(
                    f"base image {segment.path} is shorter than expected (ends before byte"
                    f" {segment.offset + offset}); it changed after its layout was computed"
                )
            yield data
            offset += len(data)


def base_layout(base: Path) -> Layout:
    """Describe the base image served unchanged (a host without network data)."""
    return Layout(segments=(BaseRange(path=base, offset=0, length=_file_size(base)),))


def initrd_layout(base: Path, payload: bytes) -> Layout:
    """Describe base initramfs ‖ zero padding to a 4-byte boundary ‖ payload.

    The kernel requires an uncompressed cpio member to start 4-byte aligned, so the payload
    starts aligned whatever it is.
    """
    size = _file_size(base)
    return Layout(
        segments=(
            BaseRange(path=base, offset=0, length=size),
            Literal(data=b"\0" * (-size % 4)),
            Literal(data=payload),
        )
    )


def iso_layout(base: Path, area: EmbedArea, payload: bytes) -> Layout:
    """Describe the base ISO with ``payload`` written at the start of its embed area.

    The rest of the area stays zero, which the kernel skips between initramfs members.

    :raises ImageBuildInvalid: the payload does not fit in the embed area.
    """
    if len(payload) > area.size:
        raise ImageBuildInvalid(
            f"payload is {len(payload)} bytes, the embed area of {base} holds {area.size};"
            " reduce the network data or rebuild the base image with a larger area"
            " (raise the embed size with prepare-base --embed-size)"
        )
    size = _file_size(base)
    after = area.offset + len(payload)
    return Layout(
        segments=(
            BaseRange(path=base, offset=0, length=area.offset),
            Literal(data=payload),
            BaseRange(path=base, offset=after, length=size - after),
        )
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:
        raise BaseImageError(f"base image {path} is unreadable: {error}") from error


# Materializing.


def materialize(layout: Layout, out: Path) -> None:
    """Write ``layout`` to ``out`` atomically: a temporary file in the same directory, renamed.

    Base ranges are copied in the kernel with ``os.copy_file_range``; ``os.sendfile`` is the
    fallback only where that call fails with EXDEV or ENOSYS.
    """
    fd, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        os.ftruncate(fd, layout.size)
        position = 0
        for segment in layout.segments:
            if isinstance(segment, Literal):
                _pwrite_all(fd, segment.data, position)
            else:
                _copy_range(segment, fd, position)
            position += segment.length
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, out)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _copy_range(segment: BaseRange, out_fd: int, position: int) -> None:
    with open(segment.path, "rb") as source:
        in_fd = source.fileno()
        copied = 0
        while copied < segment.length:
            remaining = segment.length - copied
            try:
                count = os.copy_file_range(
                    in_fd, out_fd, remaining, segment.offset + copied, position + copied
                )
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.ENOSYS):
                    raise
                count = _sendfile(
                    in_fd, out_fd, segment.offset + copied, position + copied, remaining
                )
            if count == 0:
                raise BaseImageError(
                    f"base image {segment.path} ended at byte {segment.offset + copied}, before"
                    f" the {segment.offset + segment.length} bytes its layout expects"
                )
            copied += count


def _sendfile(in_fd: int, out_fd: int, in_offset: int, out_offset: int, count: int) -> int:
    # sendfile writes at the current position of out_fd.
    os.lseek(out_fd, out_offset, os.SEEK_SET)
    return os.sendfile(out_fd, in_fd, in_offset, count)


# Reading base images, cached per (path, mtime, size) so a replaced file is read again.


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        info = path.stat()
    except OSError as error:
        raise BaseImageError(f"base image {path} is unreadable: {error}") from error
    return (str(path.resolve()), info.st_mtime_ns, info.st_size)


def digest_file(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in chunks and cached per version."""
    return _digest_cached(_stat_key(path))


@functools.lru_cache(maxsize=64)
def _digest_cached(key: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def find_embed_area(iso: Path, *, embed_path: str = DEFAULT_EMBED_PATH) -> EmbedArea:
    """Find the extent of the embed file of an ISO and check that it is zero-filled.

    :raises BaseImageError: the ISO is unreadable, has no file at ``embed_path``, or that file
        is not zero-filled.
    """
    return _find_embed_area_cached(_stat_key(iso), embed_path)


@functools.lru_cache(maxsize=64)
def _find_embed_area_cached(key: tuple[str, int, int], embed_path: str) -> EmbedArea:
    iso = Path(key[0])
    area = _read_extent(iso, embed_path)
    _check_zero_filled(iso, area, embed_path)
    return area


def _read_extent(iso: Path, embed_path: str) -> EmbedArea:
    reader = pycdlib.PyCdlib()
    try:
        reader.open(str(iso))
    except (OSError, PyCdlibException, struct.error, ValueError, IndexError) as error:
        # pycdlib 1.22 raises struct.error on a truncated image, not PyCdlibException.
        detail = str(error) or type(error).__name__
        raise BaseImageError(
            f"cannot read ISO {iso}: {detail}; is it a complete ISO 9660 image?"
        ) from error
    try:
        record = _lookup(reader, embed_path)
        if record is None or not record.is_file():
            raise BaseImageError(
                f"ISO {iso} has no embed area at {embed_path}; add one with"
                f" `ppimage prepare-base {iso} -o OUT.iso`"
            )
        size = record.get_data_length()
        offset = record.extent_location() * reader.logical_block_size
        if size <= 0:
            raise BaseImageError(
                f"the embed area {embed_path} of ISO {iso} is empty; rebuild the base with"
                f" `ppimage prepare-base {iso} -o OUT.iso --embed-size BYTES`"
            )
        if offset + size > iso.stat().st_size:
            raise BaseImageError(
                f"the embed area {embed_path} of ISO {iso} ends past the end of the file; "
                "the ISO is truncated, copy it again"
            )
        return EmbedArea(offset=offset, size=size)
    finally:
        reader.close()


def _lookup(reader: pycdlib.PyCdlib, embed_path: str):  # noqa: ANN202 (pycdlib record types)
    """Look a path up by its Rock Ridge, Joliet or ISO 9660 name, whichever the ISO has."""
    attempts: list[dict[str, str]] = []
    if reader.has_rock_ridge():
        attempts.append({"rr_path": embed_path})
    if reader.has_joliet():
        attempts.append({"joliet_path": embed_path})
    attempts.append({"iso_path": embed_path.upper() + ";1"})
    for attempt in attempts:
        try:
            return reader.get_record(**attempt)
        except PyCdlibException:
            continue
    return None


def _check_zero_filled(iso: Path, area: EmbedArea, embed_path: str) -> None:
    with open(iso, "rb") as handle:
        fd = handle.fileno()
        for offset in range(area.offset, area.offset + area.size, _ZERO_CHECK_CHUNK):
            length = min(_ZERO_CHECK_CHUNK, area.offset + area.size - offset)
            chunk = os.pread(fd, length, offset)
            if len(chunk) < length:
                raise BaseImageError(
                    f"ISO {iso} is truncated: the embed area {embed_path} ends past its end"
                )
            if chunk.count(0) != length:
                raise BaseImageError(
                    f"the embed area {embed_path} of ISO {iso} is not zero-filled at byte"
                    f" {offset}; use a base image whose embed area is empty, for example one"
                    f" made by `ppimage prepare-base`"
                )
