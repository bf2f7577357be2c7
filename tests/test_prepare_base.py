"""Tests of builder.prepare_base on ISOs mastered here from Debian packages."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import TEST_CMDLINE, master_fedora_style_iso

from builder.errors import BaseImageError
from builder.images import find_embed_area
from builder.prepare_base import (
    DEFAULT_EMBED_SIZE,
    add_embed_area,
    edit_boot_config,
    master_iso,
    read_boot_report,
)

EMBED = "/images/ignition.img"


def extract(iso: Path, path: str) -> str:
    with tempfile.TemporaryDirectory() as temporary:
        return extract_bytes(iso, path, Path(temporary) / "file").read_text()


def extract_bytes(iso: Path, path: str, out: Path) -> Path:
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", iso, "-extract", path, out],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return out


def fat_text(image: Path, path: str) -> str:
    return subprocess.run(
        ["mtype", "-i", image, f"::{path}"], capture_output=True, text=True, check=True,
        timeout=30, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"),
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def fedora_style(
    tmp_path_factory: pytest.TempPathFactory, kernel: Path, busybox_initramfs: Path
) -> tuple[Path, Path]:
    """A Fedora-style ISO and the output of add_embed_area on it."""
    workdir = tmp_path_factory.mktemp("fedora-style")
    src = workdir / "fedora-style.iso"
    master_fedora_style_iso(kernel=kernel, initrd=busybox_initramfs, dst=src, workdir=workdir)
    dst = workdir / "prepared.iso"
    add_embed_area(src, dst, size=DEFAULT_EMBED_SIZE, embed_path=EMBED)
    return src, dst


def test_master_iso_boot_configs_load_embed_area(base_iso: Path) -> None:
    isolinux = extract(base_iso, "/isolinux/isolinux.cfg")
    grub = extract(base_iso, "/EFI/BOOT/grub.cfg")
    assert f"initrd=/images/initrd.img,{EMBED} {TEST_CMDLINE}" in isolinux
    assert f"initrd /images/initrd.img {EMBED}" in grub
    assert "serial --unit=0" in grub
    assert "SERIAL 0 115200" in isolinux


def test_master_iso_has_bios_and_uefi_entries(base_iso: Path) -> None:
    report = read_boot_report(base_iso)
    platforms = [entry.platform for entry in report.entries]
    assert platforms == ["BIOS", "UEFI"]
    assert report.entries[0].path == "/isolinux/isolinux.bin"
    assert report.entries[1].path == "/images/efiboot.img"
    assert report.has("System area summary", "MBR isohybrid")
    assert report.has("System area summary", "GPT")


def test_master_iso_custom_embed_size(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path
) -> None:
    dst = tmp_path / "big.iso"
    master_iso(
        kernel=kernel,
        initrd=busybox_initramfs,
        dst=dst,
        size=1 << 20,
        embed_path=EMBED,
        cmdline=TEST_CMDLINE,
    )
    assert find_embed_area(dst).size == 1 << 20


def test_master_iso_rounds_embed_size(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path
) -> None:
    dst = tmp_path / "rounded.iso"
    master_iso(
        kernel=kernel, initrd=busybox_initramfs, dst=dst, size=1000, embed_path=EMBED,
        cmdline=TEST_CMDLINE,
    )  # fmt: skip
    assert find_embed_area(dst).size == 2048


def test_master_iso_rejects_bad_embed_path(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path
) -> None:
    with pytest.raises(BaseImageError, match="embed path 'images/x' is invalid"):
        master_iso(
            kernel=kernel, initrd=busybox_initramfs, dst=tmp_path / "x.iso", size=2048,
            embed_path="images/x", cmdline=TEST_CMDLINE,
        )  # fmt: skip
    assert not (tmp_path / "x.iso").exists()


def test_add_embed_area_fedora_style_area(fedora_style: tuple[Path, Path]) -> None:
    _, dst = fedora_style
    area = find_embed_area(dst)
    assert area.size == DEFAULT_EMBED_SIZE


def test_add_embed_area_fedora_style_configs(fedora_style: tuple[Path, Path]) -> None:
    _, dst = fedora_style
    isolinux = extract(dst, "/isolinux/isolinux.cfg")
    grub = extract(dst, "/EFI/BOOT/grub.cfg")
    assert f"append initrd=/images/pxeboot/initrd.img,{EMBED} {TEST_CMDLINE}" in isolinux
    assert "localboot 0xffff" in isolinux
    assert f"\tinitrd /images/pxeboot/initrd.img {EMBED}\n" in grub


def test_add_embed_area_edits_efi_image(tmp_path: Path, fedora_style: tuple[Path, Path]) -> None:
    src, dst = fedora_style
    before = extract_bytes(src, "/images/efiboot.img", tmp_path / "before.img")
    after = extract_bytes(dst, "/images/efiboot.img", tmp_path / "after.img")
    assert before.stat().st_size == after.stat().st_size
    assert f"initrd /images/pxeboot/initrd.img {EMBED}" in fat_text(after, "/EFI/BOOT/grub.cfg")
    assert EMBED not in fat_text(before, "/EFI/BOOT/grub.cfg")


def test_add_embed_area_keeps_boot_records(fedora_style: tuple[Path, Path]) -> None:
    src, dst = fedora_style
    before, after = read_boot_report(src), read_boot_report(dst)
    assert before.normalized() == after.normalized()
    assert [entry.platform for entry in after.entries] == ["BIOS", "UEFI"]
    assert after.has("System area summary", "MBR isohybrid")
    assert after.has("GPT partition path", "/images/efiboot.img")


def test_add_embed_area_keeps_mbr_boot_code(fedora_style: tuple[Path, Path]) -> None:
    src, dst = fedora_style
    with open(src, "rb") as before, open(dst, "rb") as after:
        assert before.read(432) == after.read(432)


def test_add_embed_area_keeps_appended_esp(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path
) -> None:
    # isohdpfx MBR with the ESP appended after the ISO (Arch Linux style); xorriso 1.5.4 moves
    # the appended partition and its El Torito entry together.
    src = master_appended_esp_iso(tmp_path, kernel=kernel, initrd=busybox_initramfs)
    dst = tmp_path / "prepared.iso"
    add_embed_area(src, dst, size=8 << 20, embed_path=EMBED)
    after = read_boot_report(dst)
    assert [entry.platform for entry in after.entries] == ["BIOS", "UEFI"]
    assert after.entries[1].path is None
    assert read_boot_report(src).normalized() == after.normalized()
    assert find_embed_area(dst).size == 8 << 20


def master_appended_esp_iso(workdir: Path, *, kernel: Path, initrd: Path) -> Path:
    """Master an ISO with an isohdpfx MBR and the ESP appended as partition 2 (Arch style)."""
    tree = workdir / "tree"
    (tree / "isolinux").mkdir(parents=True)
    (tree / "boot").mkdir()
    for name in ("isolinux.bin",):
        (tree / "isolinux" / name).write_bytes(Path("/usr/lib/ISOLINUX", name).read_bytes())
    (tree / "isolinux/ldlinux.c32").write_bytes(
        Path("/usr/lib/syslinux/modules/bios/ldlinux.c32").read_bytes()
    )
    (tree / "boot/vmlinuz").write_bytes(kernel.read_bytes())
    (tree / "boot/initrd.img").write_bytes(initrd.read_bytes())

    (tree / "isolinux/syslinux.cfg").write_text(
        "DEFAULT arch\nLABEL arch\n  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.img\n"
        f"  APPEND {TEST_CMDLINE}\n"
    )
    (tree / "boot/grub").mkdir()
    (tree / "boot/grub/grub.cfg").write_text(
        "menuentry arch {\n  linux /boot/vmlinuz\n  initrd /boot/initrd.img\n}\n"
    )

    esp = workdir / "esp.img"
    subprocess.run(["mkfs.vfat", "-C", esp, "2048"], check=True, capture_output=True, timeout=60)
    src = workdir / "appended.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-o", src, "-V", "APPENDED", "-R",
         "-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin",
         "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
         "-boot-load-size", "4", "-boot-info-table", "-eltorito-alt-boot",
         "-e", "--interval:appended_partition_2:all::", "-no-emul-boot",
         "-append_partition", "2", "0xef", esp, "-isohybrid-gpt-basdat", tree],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return src


def test_add_embed_area_rejects_grub_mkrescue_hfsplus(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "boot/grub").mkdir(parents=True)
    (tree / "boot/grub/grub.cfg").write_text(
        "menuentry x {\n  linux /vmlinuz\n  initrd /initrd.img\n}\n"
    )
    src = tmp_path / "rescue.iso"
    subprocess.run(["grub-mkrescue", "-o", src, tree], check=True, capture_output=True, timeout=300)
    dst = tmp_path / "out.iso"
    with pytest.raises(BaseImageError, match="HFS\\+") as caught:
        add_embed_area(src, dst, size=DEFAULT_EMBED_SIZE, embed_path=EMBED)
    assert "ppimage prepare-base --kernel" in str(caught.value)
    assert not dst.exists()


def test_add_embed_area_rejects_missing_config(tmp_path: Path, base_iso: Path) -> None:
    # A BIOS-only ISO whose isolinux.cfg loads no initrd: no configuration can take the area.
    tree = tmp_path / "tree"
    (tree / "isolinux").mkdir(parents=True)
    (tree / "isolinux/isolinux.bin").write_bytes(
        Path("/usr/lib/ISOLINUX/isolinux.bin").read_bytes()
    )
    (tree / "isolinux/isolinux.cfg").write_text("default local\nlabel local\n  localboot 0\n")
    src = tmp_path / "noinitrd.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-o", src, "-R", "-b", "isolinux/isolinux.bin",
         "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
         "-boot-info-table", tree],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(BaseImageError, match="no known boot configuration") as caught:
        add_embed_area(src, tmp_path / "out.iso", size=DEFAULT_EMBED_SIZE, embed_path=EMBED)
    assert "BIOS" in str(caught.value)


def test_add_embed_area_rejects_existing_file(tmp_path: Path, base_iso: Path) -> None:
    with pytest.raises(BaseImageError, match="already has a file at /images/ignition.img"):
        add_embed_area(base_iso, tmp_path / "out.iso", size=DEFAULT_EMBED_SIZE, embed_path=EMBED)


def test_edit_boot_config_syslinux_forms() -> None:
    text = (
        "label a\n  kernel /vmlinuz\n  append initrd=/a.img,/b.img quiet\n"
        "label b\n  linux /vmlinuz\n  initrd /c.img\n  append quiet\n"
        "label c\n  APPEND quiet INITRD=/d.img\n"
        "label d\n  localboot 0\n"
    )
    edited, count = edit_boot_config(text, syntax="syslinux", embed_path=EMBED)
    assert count == 3
    assert f"append initrd=/a.img,/b.img,{EMBED} quiet" in edited
    assert f"  initrd /c.img,{EMBED}\n" in edited
    assert f"APPEND quiet INITRD=/d.img,{EMBED}" in edited
    assert "  append quiet\n" in edited


def test_edit_boot_config_grub_forms() -> None:
    text = (
        "menuentry a {\n\tlinuxefi /vmlinuz\n\tinitrdefi /a.img\n}\n"
        "menuentry b {\n  linux16 /vmlinuz\n  initrd16 ($root)/b.img\n}\n"
        "menuentry c {\r\n  initrd /c.img /d.img\r\n}\r\n"
    )
    edited, count = edit_boot_config(text, syntax="grub", embed_path=EMBED)
    assert count == 3
    assert f"\tinitrdefi /a.img {EMBED}\n" in edited
    assert f"  initrd16 ($root)/b.img ($root){EMBED}\n" in edited
    assert f"  initrd /c.img /d.img {EMBED}\r\n" in edited


def test_edit_boot_config_is_idempotent() -> None:
    text = "menuentry a {\n  initrd /a.img\n}\n"
    once, _ = edit_boot_config(text, syntax="grub", embed_path=EMBED)
    twice, count = edit_boot_config(once, syntax="grub", embed_path=EMBED)
    assert twice == once
    assert count == 1
