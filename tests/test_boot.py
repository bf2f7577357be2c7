"""Boot tests: the Linux kernel under QEMU (TCG, no network) unpacks our images and the busybox
init of the test initramfs prints the files it received on the serial console."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TEST_CMDLINE, master_fedora_style_iso

from builder.images import find_embed_area, initrd_layout, iso_layout, materialize
from builder.payload import pack_payload, symlinked_dirs
from builder.prepare_base import add_embed_area
from builder.rendering import PayloadFile

pytestmark = [
    pytest.mark.boot,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU missing"),
]

QEMU_TIMEOUT = 120
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
KEYFILE_PATH = "/etc/NetworkManager/system-connections/boot-test.nmconnection"
KEYFILE_TEXT = "[connection]\nid=boot-test\ntype=ethernet\ninterface-name=eth7\n"
KEYFILE = PayloadFile(path=KEYFILE_PATH, data=KEYFILE_TEXT.encode(), mode=0o600)
FIRMWARE = PayloadFile(path="/lib/firmware/boot-test.txt", data=b"through the symlink\n")


def run_qemu(arguments: list[str | Path], *, log: Path) -> str:
    """Boot QEMU without a network device and return the serial console output."""
    command = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
        "-nic", "none", *arguments,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        [str(part) for part in command], stdin=subprocess.DEVNULL, capture_output=True,
        timeout=QEMU_TIMEOUT, check=False,
    )  # fmt: skip
    output = result.stdout.decode(errors="replace").replace("\r\n", "\n")
    log.write_text(output)
    print(f"QEMU booted in {time.monotonic() - started:.1f} s, console log in {log}")
    return output


def assert_keyfile_received(console: str) -> None:
    header = f"ppimage-boot: file {KEYFILE_PATH} mode 600 owner 0:0\n"
    assert "ppimage-boot: files received" in console
    assert header in console
    assert header + KEYFILE_TEXT + "\nppimage-boot: end" in console
    assert "ppimage-boot: done" in console


def uefi_arguments(tmp_path: Path) -> list[str | Path]:
    if not OVMF_CODE.is_file():
        pytest.skip(f"{OVMF_CODE} is missing; install ovmf")
    variables = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, variables)
    return [
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={variables}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def payload_archive(busybox_initramfs: Path) -> bytes:
    return pack_payload([KEYFILE, FIRMWARE], skip_dirs=symlinked_dirs(busybox_initramfs)).archive


@pytest.fixture(scope="module")
def customized_iso(
    tmp_path_factory: pytest.TempPathFactory, base_iso: Path, payload_archive: bytes
) -> Path:
    out = tmp_path_factory.mktemp("customized") / "host.iso"
    materialize(iso_layout(base_iso, find_embed_area(base_iso), payload_archive), out)
    return out


def test_boot_initrd_layout_receives_keyfile(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path, payload_archive: bytes
) -> None:
    initrd = tmp_path / "host-initrd.img"
    materialize(initrd_layout(busybox_initramfs, payload_archive), initrd)
    console = run_qemu(
        ["-kernel", kernel, "-initrd", initrd, "-append", TEST_CMDLINE],
        log=tmp_path / "console.log",
    )
    assert_keyfile_received(console)
    assert "ppimage-boot: /lib is usr/lib\n" in console
    assert "ppimage-boot: cmdline console=ttyS0 quiet panic=-1" in console


def test_boot_initrd_without_skip_dirs_replaces_symlink(
    tmp_path: Path, kernel: Path, busybox_initramfs: Path
) -> None:
    # The kernel replaces a symlink by a directory entry of the same path, so the payload must
    # skip /lib on merged-/usr bases. This run shows that the boot test detects the damage.
    initrd = tmp_path / "host-initrd.img"
    materialize(initrd_layout(busybox_initramfs, pack_payload([FIRMWARE]).archive), initrd)
    console = run_qemu(
        ["-kernel", kernel, "-initrd", initrd, "-append", TEST_CMDLINE],
        log=tmp_path / "console.log",
    )
    assert "ppimage-boot: /lib is not a symlink\n" in console


def test_boot_master_iso_bios_cdrom(tmp_path: Path, customized_iso: Path) -> None:
    console = run_qemu(["-cdrom", customized_iso], log=tmp_path / "console.log")
    assert_keyfile_received(console)
    assert "initrd=/images/initrd.img,/images/ignition.img" in console


def test_boot_master_iso_bios_disk(tmp_path: Path, customized_iso: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(customized_iso, disk)
    console = run_qemu(["-drive", f"file={disk},format=raw,if=ide"], log=tmp_path / "console.log")
    assert_keyfile_received(console)


def test_boot_master_iso_uefi_cdrom(tmp_path: Path, customized_iso: Path) -> None:
    console = run_qemu(
        [*uefi_arguments(tmp_path), "-cdrom", customized_iso], log=tmp_path / "console.log"
    )
    assert_keyfile_received(console)
    assert "ppimage-boot: cmdline BOOT_IMAGE=/images/vmlinuz console=ttyS0" in console


@pytest.fixture(scope="module")
def prepared_fedora_style(
    tmp_path_factory: pytest.TempPathFactory,
    kernel: Path,
    busybox_initramfs: Path,
    payload_archive: bytes,
) -> Path:
    """A Fedora-style ISO after add_embed_area, customized with the payload."""
    workdir = tmp_path_factory.mktemp("fedora-style-boot")
    src = workdir / "fedora-style.iso"
    master_fedora_style_iso(kernel=kernel, initrd=busybox_initramfs, dst=src, workdir=workdir)
    prepared = workdir / "prepared.iso"
    add_embed_area(src, prepared, size=256 * 1024, embed_path="/images/ignition.img")
    out = workdir / "host.iso"
    materialize(iso_layout(prepared, find_embed_area(prepared), payload_archive), out)
    return out


def test_boot_prepared_fedora_style_bios(tmp_path: Path, prepared_fedora_style: Path) -> None:
    console = run_qemu(["-cdrom", prepared_fedora_style], log=tmp_path / "console.log")
    assert_keyfile_received(console)


def test_boot_prepared_fedora_style_uefi(tmp_path: Path, prepared_fedora_style: Path) -> None:
    console = run_qemu(
        [*uefi_arguments(tmp_path), "-cdrom", prepared_fedora_style], log=tmp_path / "console.log"
    )
    assert_keyfile_received(console)
