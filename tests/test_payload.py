"""Tests of builder.payload against real cpio, lsinitramfs, gzip and zstd tools."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import BaseImageError, ImageBuildInvalid
from builder.payload import pack_payload, symlinked_dirs
from builder.rendering import PayloadFile

KEYFILE_PATH = "/etc/NetworkManager/system-connections/eth0.nmconnection"
KEYFILE = PayloadFile(path=KEYFILE_PATH, data=b"[connection]\nid=eth0\ntype=ethernet\n", mode=0o600)
UNIT = PayloadFile(path="/etc/systemd/network/10-eth0.network", data=b"[Match]\nName=eth0\n")
FIRMWARE = PayloadFile(path="/lib/firmware/extra.bin", data=b"\x00\x01\x02")


def cpio_listing(archive: bytes) -> dict[str, list[str]]:
    """List a gzip cpio archive with `cpio -itv`: name -> [mode, links, owner, group, ...]."""
    result = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=gzip.decompress(archive), capture_output=True,
        check=True, timeout=30,
    )  # fmt: skip
    listing = {}
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        listing[fields[-1]] = fields[:-1]
    return listing


def test_pack_payload_lists_in_cpio() -> None:
    payload = pack_payload([KEYFILE, UNIT])
    listing = cpio_listing(payload.archive)
    keyfile = listing["etc/NetworkManager/system-connections/eth0.nmconnection"]
    assert keyfile[0] == "-rw-------"
    assert keyfile[2:4] == ["root", "root"]
    assert keyfile[4] == str(len(KEYFILE.data))
    assert keyfile[5:8] == ["Jan", "1", "1970"]
    assert listing["etc/systemd/network/10-eth0.network"][0] == "-rw-r--r--"
    for directory in (
        "etc",
        "etc/NetworkManager",
        "etc/NetworkManager/system-connections",
        "etc/systemd",
        "etc/systemd/network",
    ):
        assert listing[directory][0] == "drwxr-xr-x", directory
        assert listing[directory][2:4] == ["root", "root"], directory
        assert listing[directory][5:8] == ["Jan", "1", "1970"], directory


def test_pack_payload_directories_precede_files() -> None:
    payload = pack_payload([UNIT, KEYFILE])
    names = list(cpio_listing(payload.archive))
    assert names == [
        "etc",
        "etc/NetworkManager",
        "etc/NetworkManager/system-connections",
        "etc/systemd",
        "etc/systemd/network",
        "etc/NetworkManager/system-connections/eth0.nmconnection",
        "etc/systemd/network/10-eth0.network",
    ]


def test_pack_payload_extracts_file_contents(tmp_path: Path) -> None:
    payload = pack_payload([KEYFILE])
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=payload.cpio,
        cwd=tmp_path, check=True, timeout=30,
    )  # fmt: skip
    extracted = tmp_path / KEYFILE_PATH.lstrip("/")
    assert extracted.read_bytes() == KEYFILE.data
    assert extracted.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("lsinitramfs") is None, reason="initramfs-tools-core missing")
def test_pack_payload_lsinitramfs_lists_files(tmp_path: Path) -> None:
    archive = tmp_path / "payload.img"
    archive.write_bytes(pack_payload([KEYFILE, UNIT]).archive)
    result = subprocess.run(
        ["lsinitramfs", archive], capture_output=True, text=True, check=True, timeout=60
    )
    names = result.stdout.split()
    assert "etc/NetworkManager/system-connections/eth0.nmconnection" in names
    assert "etc/systemd/network/10-eth0.network" in names


def test_pack_payload_is_reproducible() -> None:
    first = pack_payload([KEYFILE, UNIT])
    second = pack_payload([UNIT, KEYFILE])
    assert first.archive == second.archive
    assert first.cpio == second.cpio
    assert first.digest == second.digest


def test_pack_payload_digest_is_cpio_sha256() -> None:
    payload = pack_payload([KEYFILE])
    assert payload.digest == hashlib.sha256(payload.cpio).hexdigest()
    assert gzip.decompress(payload.archive) == payload.cpio


def test_pack_payload_gzip_header_is_fixed() -> None:
    archive = pack_payload([KEYFILE]).archive
    assert archive[:3] == b"\x1f\x8b\x08"
    assert archive[3] & 0x08 == 0  # FNAME flag: no file name stored
    assert archive[4:8] == b"\0\0\0\0"  # MTIME


def test_pack_payload_ends_with_trailer() -> None:
    cpio = pack_payload([KEYFILE]).cpio
    assert b"TRAILER!!!\0" in cpio[-128:]
    assert len(cpio) % 4 == 0


def test_pack_payload_skip_dirs_omits_entry() -> None:
    payload = pack_payload([FIRMWARE, KEYFILE], skip_dirs=frozenset({"/lib"}))
    listing = cpio_listing(payload.archive)
    assert "lib" not in listing
    assert listing["lib/firmware"][0] == "drwxr-xr-x"
    assert "lib/firmware/extra.bin" in listing
    assert "etc" in listing


def test_pack_payload_without_skip_dirs_emits_lib() -> None:
    listing = cpio_listing(pack_payload([FIRMWARE]).archive)
    assert listing["lib"][0] == "drwxr-xr-x"


@pytest.mark.parametrize("path", ["etc/relative", "/etc/../x", "/etc//x", "/", "/etc/x/"])
def test_pack_payload_rejects_invalid_path(path: str) -> None:
    with pytest.raises(ImageBuildInvalid, match="invalid"):
        pack_payload([PayloadFile(path=path, data=b"")])


def test_pack_payload_rejects_duplicate_path() -> None:
    with pytest.raises(ImageBuildInvalid, match="appears twice"):
        pack_payload([KEYFILE, KEYFILE])


def test_pack_payload_rejects_file_as_directory() -> None:
    clash = PayloadFile(path="/etc/NetworkManager", data=b"")
    with pytest.raises(ImageBuildInvalid, match="both a file and a parent directory"):
        pack_payload([KEYFILE, clash])


def merged_usr_tree(root: Path) -> None:
    (root / "usr/lib/modules").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "lib").symlink_to("usr/lib")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/hostname").write_text("test\n")
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")  # dangling: not a directory


def pack_tree(root: Path) -> bytes:
    names = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, check=True, timeout=30
    ).stdout
    return subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=names,
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def test_symlinked_dirs_reads_gzip(tmp_path: Path) -> None:
    merged_usr_tree(tmp_path / "root")
    initramfs = tmp_path / "initrd.img"
    initramfs.write_bytes(gzip.compress(pack_tree(tmp_path / "root")))
    assert symlinked_dirs(initramfs) == frozenset({"/lib", "/bin"})


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd missing")
def test_symlinked_dirs_reads_zstd_after_microcode(tmp_path: Path) -> None:
    # Debian's layout: an uncompressed early-microcode archive, then the zstd main archive.
    early = tmp_path / "early"
    (early / "kernel/x86/microcode").mkdir(parents=True)
    (early / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"\x01" * 1000)
    merged_usr_tree(tmp_path / "root")
    main = subprocess.run(
        ["zstd", "-q", "-c", "-1"], input=pack_tree(tmp_path / "root"), capture_output=True,
        check=True, timeout=30,
    ).stdout  # fmt: skip
    initramfs = tmp_path / "initrd.img"
    initramfs.write_bytes(pack_tree(early) + main)
    assert symlinked_dirs(initramfs) == frozenset({"/lib", "/bin"})


def test_symlinked_dirs_reads_xz_and_plain(tmp_path: Path) -> None:
    merged_usr_tree(tmp_path / "root")
    plain = pack_tree(tmp_path / "root")
    packed = subprocess.run(
        ["xz", "-c", "--check=crc32"], input=plain, capture_output=True, check=True, timeout=30
    ).stdout
    for name, data in (("plain.img", plain), ("xz.img", packed)):
        initramfs = tmp_path / name
        initramfs.write_bytes(data)
        assert symlinked_dirs(initramfs) == frozenset({"/lib", "/bin"}), name


def test_symlinked_dirs_reads_busybox_initramfs(busybox_initramfs: Path) -> None:
    assert symlinked_dirs(busybox_initramfs) == frozenset({"/lib"})


def test_symlinked_dirs_later_archive_wins(tmp_path: Path) -> None:
    merged_usr_tree(tmp_path / "first")
    (tmp_path / "second/bin").mkdir(parents=True)  # a real /bin directory replaces the link
    initramfs = tmp_path / "initrd.img"
    initramfs.write_bytes(
        gzip.compress(pack_tree(tmp_path / "first")) + gzip.compress(pack_tree(tmp_path / "second"))
    )
    assert symlinked_dirs(initramfs) == frozenset({"/lib"})


def test_symlinked_dirs_rejects_unknown_data(tmp_path: Path) -> None:
    initramfs = tmp_path / "initrd.img"
    initramfs.write_bytes(b"not an initramfs")
    with pytest.raises(BaseImageError, match="unknown data"):
        symlinked_dirs(initramfs)


def test_symlinked_dirs_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BaseImageError, match="cannot read initramfs"):
        symlinked_dirs(tmp_path / "absent.img")
