"""Shared fixtures: Debian's installer kernel, a busybox initramfs that prints the payload
files it received, and base ISOs mastered from them (needs the Debian packages listed in
examples/make-base-images.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.prepare_base import master_iso

REPOSITORY = Path(__file__).resolve().parent.parent
MAKE_BASE_IMAGES = REPOSITORY / "examples" / "make-base-images.sh"
KERNEL = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/linux")
INSTALLER_INITRD = KERNEL.with_name("initrd.gz")
TEST_CMDLINE = "console=ttyS0 quiet panic=-1"


@pytest.fixture(scope="session")
def kernel() -> Path:
    if not KERNEL.is_file():
        pytest.skip(f"{KERNEL} is missing; install debian-installer-12-netboot-amd64")
    return KERNEL


@pytest.fixture(scope="session")
def busybox_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initramfs of examples/make-base-images.sh: gzip newc, /lib a symlink to usr/lib."""
    outdir = tmp_path_factory.mktemp("base-images")
    result = subprocess.run(
        [MAKE_BASE_IMAGES, "--initramfs-only", outdir],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"make-base-images.sh --initramfs-only failed: {result.stderr.strip()}")
    return outdir / "initramfs.img"


@pytest.fixture(scope="session")
def base_iso(
    tmp_path_factory: pytest.TempPathFactory, kernel: Path, busybox_initramfs: Path
) -> Path:
    """A BIOS+UEFI hybrid ISO made by master_iso, with the default 256 KiB embed area."""
    if shutil.which("xorriso") is None:
        pytest.skip("xorriso is missing")
    dst = tmp_path_factory.mktemp("base-iso") / "base.iso"
    master_iso(kernel=kernel, initrd=busybox_initramfs, dst=dst, cmdline=TEST_CMDLINE)
    return dst


def master_fedora_style_iso(*, kernel: Path, initrd: Path, dst: Path, workdir: Path) -> None:
    """Master an ISO laid out as Fedora/RHEL ones: isolinux, an EFI image with GRUB and its
    grub.cfg inside, a copy of that grub.cfg in the tree, an isohybrid MBR and GPT."""
    tree = workdir / "tree"
    for directory in ("isolinux", "images/pxeboot", "EFI/BOOT"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/usr/lib/ISOLINUX/isolinux.bin", tree / "isolinux/isolinux.bin")
    shutil.copyfile("/usr/lib/syslinux/modules/bios/ldlinux.c32", tree / "isolinux/ldlinux.c32")
    shutil.copyfile(kernel, tree / "images/pxeboot/vmlinuz")
    shutil.copyfile(initrd, tree / "images/pxeboot/initrd.img")
    (tree / "isolinux/isolinux.cfg").write_text(
        "serial 0 115200\ndefault linux\nprompt 0\ntimeout 0\n"
        "label linux\n  menu label ^Install\n  kernel /images/pxeboot/vmlinuz\n"
        f"  append initrd=/images/pxeboot/initrd.img {TEST_CMDLINE}\n"
        "label local\n  menu label Boot from ^local drive\n  localboot 0xffff\n"
    )
    grub_cfg = (
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=0\nset default=0\n"
        "search --no-floppy --set=root -l 'FEDORA_STYLE'\n"
        "menuentry 'Install' --class fedora {\n"
        f"\tlinux /images/pxeboot/vmlinuz {TEST_CMDLINE}\n"
        "\tinitrd /images/pxeboot/initrd.img\n}\n"
    )
    (tree / "EFI/BOOT/grub.cfg").write_text(grub_cfg)

    # The EFI image carries its own grub.cfg next to the loader, read through $cmdpath.
    embedded = workdir / "embedded.cfg"
    embedded.write_text("configfile $cmdpath/grub.cfg\n")
    loader = workdir / "BOOTX64.EFI"
    modules = "part_gpt part_msdos iso9660 fat search search_label normal linux configfile serial"
    _check_call(
        "grub-mkstandalone", "--format=x86_64-efi", f"--output={loader}",
        f"--modules={modules}", f"--install-modules={modules}", "--locales=", "--fonts=",
        "--themes=", f"boot/grub/grub.cfg={embedded}",
    )  # fmt: skip
    efi_cfg = workdir / "grub.cfg"
    efi_cfg.write_text(grub_cfg)
    image = tree / "images/efiboot.img"
    _check_call("mkfs.vfat", "-C", str(image), "3072")
    _check_call("mmd", "-i", str(image), "::/EFI", "::/EFI/BOOT")
    _check_call("mcopy", "-i", str(image), str(loader), str(efi_cfg), "::/EFI/BOOT/")
    _check_call(
        "xorriso", "-as", "mkisofs", "-o", str(dst), "-V", "FEDORA_STYLE", "-R", "-J",
        "-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin",
        "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
        "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
        "-eltorito-alt-boot", "-e", "images/efiboot.img", "-no-emul-boot",
        "-isohybrid-gpt-basdat", str(tree),
    )  # fmt: skip


def _check_call(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


# The Kubernetes API emulator fixture, shared by the watcher, worker and emulator tests.
from kube_fixtures import kube_api  # noqa: E402, F401
