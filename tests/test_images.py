"""Tests of builder.images: layouts, materializing, embed areas and splicing on real ISOs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder.errors import BaseImageError, ImageBuildInvalid
from builder.images import (
    EmbedArea,
    base_layout,
    digest_file,
    find_embed_area,
    initrd_layout,
    iso_layout,
    materialize,
)
from builder.payload import pack_payload
from builder.prepare_base import DEFAULT_EMBED_SIZE
from builder.rendering import PayloadFile

KEYFILE = PayloadFile(
    path="/etc/NetworkManager/system-connections/eth0.nmconnection",
    data=b"[connection]\nid=eth0\n",
    mode=0o600,
)


def boot_report(iso: Path) -> str:
    return subprocess.run(
        ["xorriso", "-indev", iso, "-report_el_torito", "plain", "-report_system_area", "plain"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.mark.parametrize("base_size", [1000, 1001, 1002, 1003, 1004])
def test_initrd_layout_aligns_payload(tmp_path: Path, base_size: int) -> None:
    base = tmp_path / "initrd.img"
    base.write_bytes(b"\x5a" * base_size)
    payload = b"payload!"
    layout = initrd_layout(base, payload)
    padded = base_size + (-base_size % 4)
    assert layout.size == padded + len(payload)
    assert layout.read(0, base_size) == base.read_bytes()
    assert layout.read(base_size, padded - base_size) == b"\0" * (padded - base_size)
    assert layout.read(padded, len(payload)) == payload


def test_layout_read_stops_at_end(tmp_path: Path) -> None:
    base = tmp_path / "initrd.img"
    base.write_bytes(b"abcd")
    layout = initrd_layout(base, b"xyz")
    assert layout.read(2, 100) == b"cdxyz"
    assert layout.read(7, 10) == b""


def test_layout_iter_chunks_respects_size(tmp_path: Path) -> None:
    base = tmp_path / "base.bin"
    base.write_bytes(os.urandom(10_000))
    layout = initrd_layout(base, b"p" * 3000)
    chunks = list(layout.iter_chunks(500, 12_500, chunk_size=1024))
    assert all(len(chunk) <= 1024 for chunk in chunks)
    assert b"".join(chunks) == layout.read(500, 12_000)
    assert b"".join(chunks) == (base.read_bytes() + b"p" * 3000)[500:12_500]


def test_base_layout_is_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.bin"
    base.write_bytes(os.urandom(5000))
    layout = base_layout(base)
    assert layout.size == 5000
    assert layout.read(0, 5000) == base.read_bytes()


def test_materialize_equals_layout_read(tmp_path: Path) -> None:
    base = tmp_path / "initrd.img"
    base.write_bytes(os.urandom(50 * 1024 * 1024 + 3))
    payload = pack_payload([KEYFILE]).archive
    layout = initrd_layout(base, payload)
    out = tmp_path / "host.img"
    materialize(layout, out)
    assert out.stat().st_size == layout.size
    assert out.read_bytes() == layout.read(0, layout.size)
    assert out.stat().st_mode & 0o777 == 0o644


def test_materialize_leaves_no_temporary(tmp_path: Path) -> None:
    base = tmp_path / "base.bin"
    base.write_bytes(b"x" * 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    materialize(base_layout(base), out_dir / "host.img")
    assert sorted(path.name for path in out_dir.iterdir()) == ["host.img"]


def test_materialize_rejects_shrunken_base(tmp_path: Path) -> None:
    base = tmp_path / "base.bin"
    base.write_bytes(b"x" * 10_000)
    layout = base_layout(base)
    base.write_bytes(b"x" * 10)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BaseImageError, match="ended at byte"):
        materialize(layout, out_dir / "host.img")
    assert list(out_dir.iterdir()) == []


def test_digest_file_matches_sha256sum(tmp_path: Path) -> None:
    path = tmp_path / "base.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    expected = subprocess.run(
        ["sha256sum", path], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()[0]
    assert digest_file(path) == expected


def test_digest_file_follows_changes(tmp_path: Path) -> None:
    path = tmp_path / "base.bin"
    path.write_bytes(b"one")
    first = digest_file(path)
    path.write_bytes(b"two, longer")
    assert digest_file(path) != first


def test_find_embed_area_in_mastered_iso(base_iso: Path) -> None:
    area = find_embed_area(base_iso)
    assert area.size == DEFAULT_EMBED_SIZE
    assert area.offset % 2048 == 0
    with open(base_iso, "rb") as handle:
        assert os.pread(handle.fileno(), area.size, area.offset) == b"\0" * area.size


def test_find_embed_area_missing_names_prepare_base(base_iso: Path) -> None:
    with pytest.raises(BaseImageError, match="no embed area at /images/absent.img") as caught:
        find_embed_area(base_iso, embed_path="/images/absent.img")
    assert "ppimage prepare-base" in str(caught.value)


def test_find_embed_area_rejects_filled_area(tmp_path: Path, base_iso: Path) -> None:
    area = find_embed_area(base_iso)
    filled = tmp_path / "filled.iso"
    materialize(iso_layout(base_iso, area, b"\x01"), filled)
    with pytest.raises(BaseImageError, match="not zero-filled"):
        find_embed_area(filled)


def test_iso_layout_changes_only_embed_area(tmp_path: Path, base_iso: Path) -> None:
    area = find_embed_area(base_iso)
    payload = pack_payload([KEYFILE]).archive
    out = tmp_path / "host.iso"
    materialize(iso_layout(base_iso, area, payload), out)
    before, after = base_iso.read_bytes(), out.read_bytes()
    assert len(after) == len(before)
    assert after[: area.offset] == before[: area.offset]
    assert after[area.offset : area.offset + len(payload)] == payload
    assert after[area.offset + len(payload) :] == before[area.offset + len(payload) :]


def test_iso_layout_keeps_boot_records(tmp_path: Path, base_iso: Path) -> None:
    out = tmp_path / "host.iso"
    materialize(
        iso_layout(base_iso, find_embed_area(base_iso), pack_payload([KEYFILE]).archive), out
    )
    assert boot_report(out) == boot_report(base_iso)


def test_iso_layout_rejects_large_payload(base_iso: Path) -> None:
    area = find_embed_area(base_iso)
    with pytest.raises(ImageBuildInvalid, match="--embed-size") as caught:
        iso_layout(base_iso, area, b"\x01" * (area.size + 1))
    assert f"payload is {area.size + 1} bytes" in str(caught.value)
    assert f"holds {area.size}" in str(caught.value)


def test_iso_layout_accepts_full_area(tmp_path: Path) -> None:
    base = tmp_path / "base.iso"
    base.write_bytes(b"\x07" * 4096 + b"\0" * 2048 + b"\x07" * 2048)
    layout = iso_layout(base, EmbedArea(offset=4096, size=2048), b"\x01" * 2048)
    assert layout.read(4096, 2048) == b"\x01" * 2048
    assert layout.read(6144, 2048) == b"\x07" * 2048
