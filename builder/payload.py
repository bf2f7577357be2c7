"""Pack rendered files into the payload, and read which directories of a base are symlinks.

``pack_payload`` writes a reproducible newc cpio archive (mtime 0, owner root:root, parent
directories 0755) and compresses it with gzip without a timestamp or file name, so the same
files give the same bytes. ``symlinked_dirs`` reads a base initramfs, which may be several
concatenated archives (uncompressed, gzip, zstd, xz, bzip2), and returns the paths that are
symlinks to directories, so the payload emits no directory entry over them.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import posixpath
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from builder.errors import BaseImageError, ImageBuildInvalid
from builder.rendering import PayloadFile

NEWC_MAGIC = b"070701"
NEWC_CRC_MAGIC = b"070702"
_HEADER_SIZE = 110
_HEADER_FIELDS = 13
_TRAILER = "TRAILER!!!"
_DIRECTORY_MODE = 0o755
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Payload:
    """A packed payload: the gzip archive that is served, and the cpio it compresses."""

    archive: bytes
    cpio: bytes
    digest: str  # sha256 hex of ``cpio``, stable across zlib versions


def pack_payload(
    files: Iterable[PayloadFile], *, skip_dirs: frozenset[str] = frozenset()
) -> Payload:
    """Pack files into a gzip-compressed newc cpio archive with their parent directories.

    Files are sorted by path, so the order of ``files`` does not change the bytes. Every parent
    directory gets one 0755 entry before the first file, except the paths in ``skip_dirs``
    (directories that are symlinks in the base image).

    :raises ImageBuildInvalid: a path is not absolute and normalized, appears twice, or is both
        a file and the parent directory of another file.
    """
    ordered = sorted(files, key=lambda item: item.path)
    names = [_archive_name(item.path) for item in ordered]
    _check_unique(names)
    skipped = {_archive_name(path) for path in skip_dirs}
    directories = _parent_directories(names)
    clashes = sorted(directories.intersection(names))
    if clashes:
        raise ImageBuildInvalid(
            f"payload path /{clashes[0]} is both a file and a parent directory of another file;"
            " give each file a distinct path"
        )

    out = io.BytesIO()
    inode = 0
    for directory in sorted(directories - skipped):
        inode += 1
        out.write(_entry(directory, b"", mode=stat.S_IFDIR | _DIRECTORY_MODE, inode=inode))
    for name, item in zip(names, ordered, strict=True):
        inode += 1
        mode = stat.S_IFREG | stat.S_IMODE(item.mode)
        out.write(_entry(name, item.data, mode=mode, inode=inode))
    out.write(_entry(_TRAILER, b"", mode=0, inode=0))
    cpio = out.getvalue()

    # mtime=0 and no file name keep the gzip header fixed (gzip.compress omits the name).
    archive = gzip.compress(cpio, compresslevel=9, mtime=0)
    return Payload(archive=archive, cpio=cpio, digest=hashlib.sha256(cpio).hexdigest())


def _archive_name(path: str) -> str:
    """Return the cpio name (no leading slash) of an absolute, normalized path."""
    if not path.startswith("/") or path == "/" or posixpath.normpath(path) != path:
        raise ImageBuildInvalid(
            f"payload path {path!r} is invalid; use an absolute normalized path such as"
            " /etc/NetworkManager/system-connections/eth0.nmconnection"
        )
    return path.lstrip("/")


def _check_unique(names: list[str]) -> None:
    for previous, current in zip(names, names[1:], strict=False):
        if previous == current:
            raise ImageBuildInvalid(
                f"payload path /{current} appears twice; each file needs a distinct path"
            )


def _parent_directories(names: Iterable[str]) -> set[str]:
    directories: set[str] = set()
    for name in names:
        parent = posixpath.dirname(name)
        while parent and parent not in directories:
            directories.add(parent)
            parent = posixpath.dirname(parent)
    return directories


def _entry(name: str, data: bytes, *, mode: int, inode: int) -> bytes:
    """Encode one newc entry: header, NUL-terminated name and data, each padded to 4 bytes."""
    encoded_name = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded_name), 0)
    header = NEWC_MAGIC + ("%08X" * _HEADER_FIELDS % fields).encode("ascii")
    return b"".join(
        (
            header,
            encoded_name,
            _padding(_HEADER_SIZE + len(encoded_name)),
            data,
            _padding(len(data)),
        )
    )


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


# Reading a base initramfs.


class _Decompressor(Protocol):
    eof: bool
    unused_data: bytes

    def decompress(self, data: bytes) -> bytes: ...


class _ZstdDecompressor:
    """Adapt zstandard's decompressobj to the stdlib decompressor interface, one frame each."""

    def __init__(self) -> None:
        self._inner = zstandard.ZstdDecompressor().decompressobj()

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def unused_data(self) -> bytes:
        return self._inner.unused_data

    def decompress(self, data: bytes) -> bytes:
        return self._inner.decompress(data)


# Magic numbers as the kernel's decompress_method() recognizes them (lib/decompress.c).
_COMPRESSIONS: tuple[tuple[bytes, str, Callable[[], _Decompressor]], ...] = (
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(wbits=31)),
    (b"\x28\xb5\x2f\xfd", "zstd", _ZstdDecompressor),
    (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor),
    (b"BZh", "bzip2", bz2.BZ2Decompressor),
)


class _Stream:
    """A byte stream with look-ahead and push-back, over a file or a chain of decompressors."""

    def __init__(self, fill: Callable[[], bytes]) -> None:
        self._fill = fill
        self._buffer = bytearray()
        self._done = False

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size and not self._done:
            chunk = self._fill()
            if chunk:
                self._buffer += chunk
            else:
                self._done = True
        return bytes(self._buffer[:size])

    def read(self, size: int) -> bytes:
        data = self.peek(size)
        del self._buffer[: len(data)]
        return data

    def skip(self, size: int) -> None:
        while size > 0:
            chunk = self.read(min(size, _READ_CHUNK))
            if not chunk:
                return
            size -= len(chunk)

    def unread(self, data: bytes) -> None:
        self._buffer[:0] = data

    def skip_zeros(self) -> None:
        while True:
            head = self.peek(_READ_CHUNK)
            stripped = head.lstrip(b"\0")
            self.read(len(head) - len(stripped))
            if stripped or not head:
                return


def _decompressed(source: _Stream, magic: bytes, factory: Callable[[], _Decompressor]) -> _Stream:
    """Return a stream of the decompressed data of consecutive members of one format."""
    state = {"decompressor": factory()}

    def fill() -> bytes:
        decompressor = state["decompressor"]
        if decompressor.eof:
            source.unread(decompressor.unused_data)
            if source.peek(len(magic)) != magic:
                return b""
            decompressor = state["decompressor"] = factory()
        chunk = source.read(_READ_CHUNK)
        if not chunk:
            return b""
        try:
            data = decompressor.decompress(chunk)
        except (zlib.error, lzma.LZMAError, OSError, zstandard.ZstdError, ValueError) as error:
            raise BaseImageError(f"initramfs member is corrupt: {error}") from error
        # Return at least one byte unless the input ends, so an empty chunk means end of data.
        return data if data or decompressor.eof else fill()

    return _Stream(fill)


def _cpio_entries(stream: _Stream, *, origin: str) -> Iterator[tuple[str, int, bytes]]:
    """Yield (name, mode, symlink target or b"") for the entries of one cpio archive."""
    while True:
        header = stream.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[:6] not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            raise BaseImageError(f"{origin}: truncated or invalid newc cpio header")
        fields = struct.unpack("8s" * _HEADER_FIELDS, header[6:])
        values = [int(field, 16) for field in fields]
        mode, file_size, name_size = values[1], values[6], values[11]
        name = stream.read(name_size).rstrip(b"\0").decode("utf-8", "surrogateescape")
        stream.skip(-(_HEADER_SIZE + name_size) % 4)
        if name == _TRAILER:
            return
        target = b""
        if stat.S_ISLNK(mode):
            target = stream.read(file_size)
        else:
            stream.skip(file_size)
        stream.skip(-file_size % 4)
        yield name, mode, target


def _archives(stream: _Stream, *, origin: str, nested: bool) -> Iterator[tuple[str, int, bytes]]:
    """Yield the entries of every archive in a stream, as the kernel's unpack_to_rootfs does."""
    while True:
        stream.skip_zeros()
        head = stream.peek(6)
        if not head:
            return
        if head[:5] == NEWC_MAGIC[:5]:
            yield from _cpio_entries(stream, origin=origin)
            continue
        if nested:
            raise BaseImageError(f"{origin}: compressed data is not newc cpio")
        for magic, name, factory in _COMPRESSIONS:
            if head.startswith(magic):
                inner = _decompressed(stream, magic, factory)
                yield from _archives(inner, origin=f"{origin} ({name})", nested=True)
                break
        else:
            raise BaseImageError(
                f"{origin}: unknown data at an archive boundary (starts with {head.hex()});"
                " supported members are newc cpio, gzip, zstd, xz and bzip2"
            )


def symlinked_dirs(initramfs: Path) -> frozenset[str]:
    """Read a base initramfs and return the absolute paths of its symlinks to directories.

    A later entry for the same path replaces an earlier one, as when the kernel unpacks it.

    :raises BaseImageError: the file is missing, corrupt or in an unknown format.
    """
    entries: dict[str, tuple[int, bytes]] = {}
    try:
        with open(initramfs, "rb") as handle:
            source = _Stream(_reader(handle))
            for name, mode, target in _archives(source, origin=str(initramfs), nested=False):
                path = posixpath.normpath("/" + name.lstrip("/"))
                entries[path] = (mode, target)
    except OSError as error:
        raise BaseImageError(f"cannot read initramfs {initramfs}: {error}") from error
    return frozenset(
        path
        for path, (mode, _) in entries.items()
        if stat.S_ISLNK(mode) and _resolves_to_directory(path, entries)
    )


def _reader(handle: BinaryIO) -> Callable[[], bytes]:
    return lambda: handle.read(_READ_CHUNK)


def _resolves_to_directory(path: str, entries: dict[str, tuple[int, bytes]]) -> bool:
    """Follow symlinks inside the archive (at most 40 hops, as Linux) and test for a directory.

    NOTE: symlinks in the middle of a target are not followed, so a link such as
    ``/lib64 -> lib/x86_64`` next to ``/lib -> usr/lib`` is not recognized as a directory.
    """
    for _ in range(40):
        mode, target = entries.get(path, (0, b""))
        if stat.S_ISDIR(mode):
            return True
        if not stat.S_ISLNK(mode):
            return False
        text = target.decode("utf-8", "surrogateescape")
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), text))
    return False
