"""Prepare base ISOs: master a hybrid ISO with an embed area, or add one to an existing ISO.

The embed area is a zero-filled file that every boot entry loads as an extra initrd, so a
payload written into it is unpacked by the kernel over the base initramfs. ``master_iso``
builds a BIOS (isolinux) and UEFI (GRUB in an El Torito EFI image) hybrid that boots as a CD
and as a disk. ``add_embed_area`` keeps an existing ISO's boot records with
``xorriso -boot_image any replay``, edits every isolinux/syslinux and GRUB configuration, and
checks the result. A layout it cannot keep intact raises ``BaseImageError`` with the reason.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from builder.errors import BaseImageError
from builder.images import DEFAULT_EMBED_PATH, find_embed_area

LOG = logging.getLogger(__name__)

DEFAULT_EMBED_SIZE = 256 * 1024
# The kernel unpacks the whole area as an initramfs on every boot, so a large area only costs
# boot time; 64 MiB is far above any rendered network configuration.
MAX_EMBED_SIZE = 64 * 1024 * 1024
DEFAULT_VOLUME_ID = "PPIMAGE"
DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200n8"
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHYBRID_MBR = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
_COMMAND_TIMEOUT = 600
_SECTOR = 2048
_MAX_CONFIG_SIZE = 1 << 20

# GRUB modules for the standalone x86_64 EFI image: enough to find the ISO by its label,
# read ISO 9660 and FAT, print to the serial port and boot Linux with initrds.
_GRUB_MODULES = (
    "part_gpt part_msdos iso9660 fat search search_label search_fs_file normal linux"
    " configfile serial terminal echo test gzio all_video efi_gop"
)


def _run(command: Sequence[str | Path], *, action: str) -> str:
    """Run a command and return its stdout; raise BaseImageError with its stderr on failure."""
    argv = [str(part) for part in command]
    LOG.debug("running %s", " ".join(argv))
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError as error:
        raise BaseImageError(f"{action} failed: {argv[0]} is not installed") from error
    except subprocess.TimeoutExpired as error:
        raise BaseImageError(f"{action} timed out after {_COMMAND_TIMEOUT} s") from error
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise BaseImageError(f"{action} failed (exit status {result.returncode}): {tail}")
    return result.stdout


# Mastering a new ISO.


def _isolinux_config(*, kernel: str, initrds: Sequence[str], cmdline: str) -> str:
    return (
        "SERIAL 0 115200\n"
        "DEFAULT ppimage\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL ppimage\n"
        f"  KERNEL {kernel}\n"
        f"  APPEND initrd={','.join(initrds)} {cmdline}\n"
    )


def _grub_config(*, kernel: str, initrds: Sequence[str], cmdline: str) -> str:
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input console serial\n"
        "terminal_output console serial\n"
        "set timeout=0\n"
        "set default=0\n"
        "menuentry 'ppimage' {\n"
        f"  linux {kernel} {cmdline}\n"
        f"  initrd {' '.join(initrds)}\n"
        "}\n"
    )


def _make_efi_image(*, workdir: Path, out: Path, volume_id: str) -> None:
    """Write a FAT image holding a standalone GRUB as EFI/BOOT/BOOTX64.EFI.

    The GRUB built in finds the ISO by its volume label and reads /EFI/BOOT/grub.cfg from the
    ISO tree, so the menu stays a plain file that ``add_embed_area`` can edit.
    """
    embedded = workdir / "embedded-grub.cfg"
    embedded.write_text(
        f"search --no-floppy --set=root --label {volume_id}\n"
        "set prefix=($root)/EFI/BOOT\n"
        "configfile ($root)/EFI/BOOT/grub.cfg\n"
    )
    loader = workdir / "BOOTX64.EFI"
    _run(
        [
            "grub-mkstandalone",
            "--format=x86_64-efi",
            f"--output={loader}",
            f"--modules={_GRUB_MODULES}",
            f"--install-modules={_GRUB_MODULES}",
            "--locales=",
            "--fonts=",
            "--themes=",
            f"boot/grub/grub.cfg={embedded}",
        ],
        action="grub-mkstandalone",
    )
    # FAT12/16 overhead and slack: 512 KiB over the loader, rounded up to whole MiB.
    size_mib = max(2, math.ceil((loader.stat().st_size + (512 << 10)) / (1 << 20)))
    _run(["mkfs.vfat", "-n", "EFIBOOT", "-C", out, str(size_mib * 1024)], action="mkfs.vfat")
    _run(["mmd", "-i", out, "::/EFI", "::/EFI/BOOT"], action="mmd")
    _run(["mcopy", "-i", out, loader, "::/EFI/BOOT/BOOTX64.EFI"], action="mcopy")


def master_iso(
    *,
    kernel: Path,
    initrd: Path,
    dst: Path,
    size: int = DEFAULT_EMBED_SIZE,
    embed_path: str = DEFAULT_EMBED_PATH,
    cmdline: str = DEFAULT_CMDLINE,
    volume_id: str = DEFAULT_VOLUME_ID,
) -> None:
    """Master a BIOS+UEFI hybrid ISO that boots ``kernel`` with ``initrd`` and the embed area.

    BIOS boots isolinux, UEFI boots GRUB from an El Torito EFI image (efiboot.img), and an
    isohybrid MBR plus GPT let the same file boot as a disk. Both loaders load the kernel from
    /images/vmlinuz, the initramfs from /images/initrd.img and the ``size``-byte zero-filled
    embed area from ``embed_path``, with ``cmdline`` as the kernel command line. ``size`` is
    rounded up to a multiple of 2048 bytes, the ISO 9660 sector size.

    :raises BaseImageError: an input is missing, a tool fails, or the result has no embed area.
    """
    size = _check_embed_request(size=size, embed_path=embed_path)
    if "\n" in cmdline or "'" in cmdline:
        raise BaseImageError(f"kernel command line {cmdline!r} must not hold newlines or quotes")
    if not re.fullmatch(r"[A-Z0-9_]{1,32}", volume_id):
        raise BaseImageError(f"volume id {volume_id!r} is invalid; use 1-32 of A-Z, 0-9 and _")
    for path in (kernel, initrd, ISOLINUX_BIN, ISOHYBRID_MBR, LDLINUX_C32):
        if not path.is_file():
            raise BaseImageError(f"cannot master an ISO: {path} is missing")

    with tempfile.TemporaryDirectory(prefix="ppimage-master-") as temporary:
        workdir = Path(temporary)
        tree = workdir / "tree"
        for directory in ("isolinux", "images", "EFI/BOOT"):
            (tree / directory).mkdir(parents=True)
        shutil.copyfile(ISOLINUX_BIN, tree / "isolinux/isolinux.bin")
        shutil.copyfile(LDLINUX_C32, tree / "isolinux/ldlinux.c32")
        shutil.copyfile(kernel, tree / "images/vmlinuz")
        shutil.copyfile(initrd, tree / "images/initrd.img")
        embed_file = tree / embed_path.lstrip("/")
        embed_file.parent.mkdir(parents=True, exist_ok=True)
        with open(embed_file, "wb") as handle:
            handle.write(b"\0" * size)

        initrds = ("/images/initrd.img", embed_path)
        arguments = {"kernel": "/images/vmlinuz", "initrds": initrds, "cmdline": cmdline}
        (tree / "isolinux/isolinux.cfg").write_text(_isolinux_config(**arguments))
        (tree / "EFI/BOOT/grub.cfg").write_text(_grub_config(**arguments))
        _make_efi_image(workdir=workdir, out=tree / "images/efiboot.img", volume_id=volume_id)

        partial = dst.with_name(f".{dst.name}.partial")
        partial.unlink(missing_ok=True)
        try:
            _master_with_xorriso(tree=tree, out=partial, volume_id=volume_id)
            find_embed_area(partial, embed_path=embed_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(dst)
    LOG.info("mastered %s with a %d-byte embed area at %s", dst, size, embed_path)


def _master_with_xorriso(*, tree: Path, out: Path, volume_id: str) -> None:
    _run(
        [
            "xorriso", "-as", "mkisofs",
            "-o", out,
            "-V", volume_id,
            "-R", "-J",
            "-isohybrid-mbr", ISOHYBRID_MBR,
            "-b", "isolinux/isolinux.bin",
            "-c", "isolinux/boot.cat",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            "-eltorito-alt-boot",
            "-e", "images/efiboot.img", "-no-emul-boot",
            "-isohybrid-gpt-basdat",
            tree,
        ],
        action=f"mastering {out} with xorriso",
    )  # fmt: skip


def _check_iso9660(path: Path) -> None:
    """Raise BaseImageError unless ``path`` starts like an ISO 9660 image."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_SECTOR * 16 + 1)
            identifier = handle.read(5)
    except OSError as error:
        raise BaseImageError(f"{path}: cannot read: {error}") from error
    if identifier != b"CD001":
        raise BaseImageError(
            f"{path} is not an ISO 9660 image (no CD001 volume descriptor at sector 16)"
        )


def _check_embed_request(*, size: int, embed_path: str) -> int:
    """Validate the embed area request and return the size rounded up to whole ISO sectors."""
    if not 0 < size <= MAX_EMBED_SIZE:
        raise BaseImageError(
            f"embed size {size} is invalid; use 1 to {MAX_EMBED_SIZE} bytes "
            f"(payloads are a few KiB, the default is {DEFAULT_EMBED_SIZE})"
        )
    if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", embed_path):
        raise BaseImageError(
            f"embed path {embed_path!r} is invalid; use an absolute path of letters, digits,"
            " dots, dashes and underscores, such as /images/ignition.img"
        )
    return -(-size // _SECTOR) * _SECTOR


# Adding an embed area to an existing ISO.

# Report fields, by key and token index, that move when a file is added (positions, sizes) or
# that xorriso generates anew (GUIDs). Every other report field must stay as it was.
_MOVING_FIELDS: dict[str, tuple[int, ...]] = {
    "El Torito catalog": (0,),
    "El Torito boot img": (7,),
    "ISO image size/512": (0,),
    "MBR partition": (3, 4),
    "GPT disk GUID": (0,),
    "GPT partition GUID": (1,),
    "GPT lba range": (0, 1, 2),
    "GPT start and size": (1, 2),
    "APM start and size": (1, 2),
}
_MBR_BOOT_CODE = 432  # bytes 432..439 hold the boot image LBA that xorriso patches
_BOOT_INFO_TABLE = slice(8, 64)
_GRUB2_BOOT_INFO = slice(2548, 2556)


@dataclass(frozen=True)
class BootEntry:
    """One El Torito boot entry as ``xorriso -report_el_torito plain`` lists it."""

    number: int
    platform: str  # "BIOS", "UEFI", or another platform id
    lba: int
    load_sectors: int
    path: str | None  # None when the image is not a file of the ISO tree (appended partition)
    blocks: int | None
    options: tuple[str, ...]


@dataclass(frozen=True)
class BootReport:
    """El Torito and system area reports of an ISO, parsed."""

    lines: tuple[tuple[str, str], ...]
    entries: tuple[BootEntry, ...]

    def normalized(self) -> tuple[tuple[str, str], ...]:
        """Return the lines with moving positions, sizes and GUIDs replaced by "#"."""
        result = []
        for key, value in self.lines:
            tokens = value.split()
            for index in _MOVING_FIELDS.get(key, ()):
                if index < len(tokens):
                    tokens[index] = "#"
            result.append((key, " ".join(tokens)))
        return tuple(result)

    def has(self, key: str, text: str) -> bool:
        return any(k == key and text in v for k, v in self.lines)


def read_boot_report(iso: Path) -> BootReport:
    """Run ``xorriso -report_el_torito plain -report_system_area plain`` and parse it."""
    output = _run(
        [
            "xorriso", "-abort_on", "FAILURE", "-indev", iso,
            "-report_el_torito", "plain", "-report_system_area", "plain",
        ],
        action=f"reading the boot records of {iso}",
    )  # fmt: skip
    lines: list[tuple[str, str]] = []
    for raw in output.splitlines():
        key, separator, value = raw.partition(":")
        if separator:
            lines.append((key.strip(), value.strip()))
    return BootReport(lines=tuple(lines), entries=_boot_entries(lines))


def _boot_entries(lines: Sequence[tuple[str, str]]) -> tuple[BootEntry, ...]:
    fields: dict[int, dict[str, object]] = {}
    for key, value in lines:
        tokens = value.split()
        if not tokens or not tokens[0].isdigit():
            continue
        number = int(tokens[0])
        if key == "El Torito boot img":
            fields.setdefault(number, {}).update(
                platform=tokens[1], load_sectors=int(tokens[6]), lba=int(tokens[7])
            )
        elif key == "El Torito img path":
            fields.setdefault(number, {})["path"] = value.split(None, 1)[1]
        elif key == "El Torito img blks":
            fields.setdefault(number, {})["blocks"] = int(tokens[1])
        elif key == "El Torito img opts":
            fields.setdefault(number, {})["options"] = tuple(tokens[1:])
    return tuple(
        BootEntry(
            number=number,
            platform=str(entry["platform"]),
            lba=int(entry["lba"]),  # type: ignore[call-overload]
            load_sectors=int(entry["load_sectors"]),  # type: ignore[call-overload]
            path=entry.get("path"),  # type: ignore[arg-type]
            blocks=entry.get("blocks"),  # type: ignore[arg-type]
            options=entry.get("options", ()),  # type: ignore[arg-type]
        )
        for number, entry in sorted(fields.items())
        if "platform" in entry
    )


def _reject_unsupported(src: Path, report: BootReport) -> None:
    """Raise BaseImageError for layouts that ``xorriso -boot_image any replay`` cannot keep."""
    if not report.entries:
        raise BaseImageError(f"ISO {src} has no El Torito boot entry; it cannot boot from CD")
    if report.has("System area summary", "APM") or report.has("APM partition type", "Apple_HFS"):
        raise BaseImageError(
            f"ISO {src} has an HFS+ hybrid with an Apple partition map (as grub-mkrescue"
            " writes); xorriso 1.5.4 fails to rewrite its GPT, so its layout cannot be kept."
            " Master a new base from its kernel and initramfs with"
            " `ppimage prepare-base --kernel K --initrd I -o OUT.iso`"
        )
    for entry in report.entries:
        if entry.platform not in {"BIOS", "UEFI"}:
            raise BaseImageError(
                f"ISO {src} has an El Torito entry for platform {entry.platform}; only BIOS and"
                " UEFI entries are supported"
            )


# Boot configuration editing. Syslinux takes "initrd=a,b" in APPEND lines or an INITRD line;
# GRUB takes "initrd a b" (and the initrd16/initrdefi spellings of distro GRUBs).

_SYSLINUX_APPEND = re.compile(r"^(\s*append\s)(.*)$", re.IGNORECASE)
_SYSLINUX_INITRD_OPTION = re.compile(r"(?<!\S)(initrd=)(\S+)", re.IGNORECASE)
_SYSLINUX_INITRD_LINE = re.compile(r"^(\s*initrd\s+)(\S+)(.*)$", re.IGNORECASE)
_GRUB_INITRD = re.compile(r"^(\s*(?:initrd|initrd16|initrdefi)\s+)(\S.*?)(\s*)$")
_GRUB_DEVICE = re.compile(r"^(\([^)]*\)|\$\{?root\}?)")


def _config_syntax(path: str) -> str | None:
    """Return "syslinux", "grub" or None for an ISO or FAT path of a .cfg file."""
    lowered = path.lower()
    name = lowered.rsplit("/", 1)[-1]
    if not name.endswith(".cfg"):
        return None
    if name in {"grub.cfg", "loopback.cfg"} or "/grub" in lowered or lowered.startswith("/efi/"):
        return "grub"
    if (
        name in {"isolinux.cfg", "syslinux.cfg"}
        or "/isolinux/" in lowered
        or "/syslinux/" in lowered
    ):
        return "syslinux"
    return None


def edit_boot_config(text: str, *, syntax: str, embed_path: str) -> tuple[str, int]:
    """Add ``embed_path`` to every initrd list of a boot configuration.

    Returns the new text and the number of initrd lists it now carries the path in (lines
    that already list it count too).
    """
    count = 0
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        if syntax == "syslinux":
            body, changed = _edit_syslinux_line(body, embed_path)
        else:
            body, changed = _edit_grub_line(body, embed_path)
        count += changed
        lines.append(body + ending)
    return "".join(lines), count


def _edit_syslinux_line(line: str, embed_path: str) -> tuple[str, int]:
    append = _SYSLINUX_APPEND.match(line)
    if append:
        edited, found = _SYSLINUX_INITRD_OPTION.subn(
            lambda match: _extend_list(match.group(1), match.group(2), embed_path), append.group(2)
        )
        return append.group(1) + edited, found
    directive = _SYSLINUX_INITRD_LINE.match(line)
    if directive:
        initrds = _extend_list("", directive.group(2), embed_path)
        return directive.group(1) + initrds + directive.group(3), 1
    return line, 0


def _extend_list(prefix: str, initrds: str, embed_path: str) -> str:
    if embed_path in initrds.split(","):
        return prefix + initrds
    return f"{prefix}{initrds},{embed_path}"


def _edit_grub_line(line: str, embed_path: str) -> tuple[str, int]:
    match = _GRUB_INITRD.match(line)
    if not match:
        return line, 0
    arguments = match.group(2).split()
    # Use the device of the first initrd, so "($root)/x" or "(cd0)/x" configs stay consistent.
    device = _GRUB_DEVICE.match(arguments[0])
    target = (device.group(1) if device else "") + embed_path
    if target in arguments:
        return line, 1
    return f"{match.group(1)}{match.group(2)} {target}{match.group(3)}", 1


def _check_edited(text: str, *, syntax: str, embed_path: str, where: str) -> None:
    """Raise BaseImageError unless every initrd list of a configuration contains the embed path."""
    _, count = edit_boot_config(text, syntax=syntax, embed_path=embed_path)
    if count == 0 or embed_path not in text:
        raise BaseImageError(f"boot configuration {where} does not load {embed_path}")
    for line in text.splitlines():
        edited, found = (
            _edit_syslinux_line(line, embed_path)
            if syntax == "syslinux"
            else _edit_grub_line(line, embed_path)
        )
        if found and edited != line:
            raise BaseImageError(
                f"boot configuration {where} has an initrd list without {embed_path}: {line!r}"
            )


# Reading the ISO tree.


class _IsoTree:
    """Read-only access to the files of an ISO by their Rock Ridge or Joliet or ISO 9660 path."""

    def __init__(self, iso: Path) -> None:
        self._iso = iso
        self._reader = pycdlib.PyCdlib()
        try:
            self._reader.open(str(iso))
        except (OSError, PyCdlibException) as error:
            raise BaseImageError(f"cannot read ISO {iso}: {error}") from error
        if self._reader.has_rock_ridge():
            self._facet = "rr_path"
        elif self._reader.has_joliet():
            self._facet = "joliet_path"
        else:
            self._facet = "iso_path"

    def close(self) -> None:
        self._reader.close()

    def files(self) -> list[str]:
        found = []
        for directory, _, names in self._reader.walk(**{self._facet: "/"}):
            for name in names:
                found.append(f"{directory.rstrip('/')}/{name}")
        return found

    def display(self, path: str) -> str:
        """Return ``path`` without the ISO 9660 version suffix, for messages and -map targets."""
        return path.split(";", 1)[0] if self._facet == "iso_path" else path

    def read(self, path: str) -> bytes:
        buffer = io.BytesIO()
        try:
            self._reader.get_file_from_iso_fp(buffer, **{self._facet: path})
        except PyCdlibException as error:
            raise BaseImageError(f"cannot read {path} from ISO {self._iso}: {error}") from error
        return buffer.getvalue()

    def lookup(self, path: str) -> str | None:
        """Return the stored path of a file given its plain absolute path, or None."""
        expected = path.lower()
        for stored in self.files():
            if self.display(stored).lower() == expected:
                return stored
        return None


# Editing GRUB configurations inside a FAT EFI image with mtools.

_MTOOLS_ENVIRONMENT = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}


def _mtools(arguments: Sequence[str | Path], *, action: str) -> str:
    environment = dict(os.environ, **_MTOOLS_ENVIRONMENT)
    argv = [str(part) for part in arguments]
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            env=environment,
            check=False,
        )
    except FileNotFoundError as error:
        raise BaseImageError(f"{action} failed: {argv[0]} is not installed (mtools)") from error
    if result.returncode != 0:
        raise BaseImageError(f"{action} failed: {result.stderr.strip()}")
    return result.stdout


def _fat_files(image: Path) -> list[str]:
    try:
        output = _mtools(["mdir", "-/", "-b", "-i", image, "::/"], action=f"listing {image}")
    except BaseImageError:
        return []  # mdir fails on an empty FAT, which contains no configuration either
    return [
        line[2:]
        for line in output.splitlines()
        if line.startswith("::/") and not line.endswith("/")
    ]


def _edit_efi_image(image: Path, *, embed_path: str, workdir: Path, where: str) -> int:
    """Edit every GRUB configuration inside a FAT image in place; return how many were edited."""
    edited = 0
    for inner in _fat_files(image):
        if _config_syntax(inner) != "grub":
            continue
        local = workdir / f"fat-{edited}.cfg"
        _mtools(["mcopy", "-n", "-o", "-i", image, f"::{inner}", local], action=f"reading {inner}")
        text = local.read_bytes().decode("utf-8", "surrogateescape")
        new_text, count = edit_boot_config(text, syntax="grub", embed_path=embed_path)
        if count == 0:
            continue
        local.write_bytes(new_text.encode("utf-8", "surrogateescape"))
        _mtools(["mcopy", "-o", "-i", image, local, f"::{inner}"], action=f"writing {inner}")
        LOG.info("added %s to %s inside %s", embed_path, inner, where)
        edited += 1
    return edited


# The add_embed_area pipeline: inspect, edit, rewrite with xorriso, verify.


@dataclass(frozen=True)
class _Edits:
    """Files to map into the new ISO and the configurations that must list the embed area."""

    mappings: tuple[tuple[Path, str], ...]  # (local file, ISO path)
    configs: tuple[tuple[str, str], ...]  # (ISO path, syntax) of edited tree configurations
    efi_images: tuple[str, ...]  # ISO paths of EFI images whose GRUB configuration was edited


def add_embed_area(
    src: Path,
    dst: Path,
    *,
    size: int = DEFAULT_EMBED_SIZE,
    embed_path: str = DEFAULT_EMBED_PATH,
) -> None:
    """Write ``dst``: ``src`` plus a zero-filled embed file that every boot entry loads.

    Boot records are kept with ``xorriso -boot_image any replay``. Every isolinux/syslinux and
    GRUB configuration in the ISO tree and in El Torito EFI images gets ``embed_path`` as an
    extra initrd. The result is checked: the boot catalog and system area match the input's
    except for positions and GUIDs, boot images and the MBR boot code are unchanged, and the
    embed area is found. ``size`` is rounded up to a multiple of 2048 bytes.

    :raises BaseImageError: the layout cannot be kept intact, no boot configuration loads
        initrds for a platform, a tool fails, or a check of the result fails.
    """
    size = _check_embed_request(size=size, embed_path=embed_path)
    _check_iso9660(src)
    before = read_boot_report(src)
    _reject_unsupported(src, before)

    with tempfile.TemporaryDirectory(prefix="ppimage-prepare-") as temporary:
        workdir = Path(temporary)
        tree = _IsoTree(src)
        try:
            edits = _edit_configs(tree, before, src=src, embed_path=embed_path, workdir=workdir)
        finally:
            tree.close()

        embed_file = workdir / "embed.img"
        with open(embed_file, "wb") as handle:
            handle.truncate(size)
        mappings = ((embed_file, embed_path), *edits.mappings)
        partial = dst.with_name(f".{dst.name}.partial")
        partial.unlink(missing_ok=True)
        command: list[str | Path] = [
            "xorriso", "-abort_on", "FAILURE", "-indev", src, "-outdev", partial,
            "-boot_image", "any", "replay",
        ]  # fmt: skip
        for local, iso_path in mappings:
            command += ["-map", local, iso_path]
        command.append("-commit")
        try:
            _run(command, action=f"rewriting {src} with xorriso")
            _verify(src, partial, before=before, edits=edits, embed_path=embed_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(dst)
    LOG.info("wrote %s: %s with a %d-byte embed area at %s", dst, src, size, embed_path)


def _edit_configs(
    tree: _IsoTree, report: BootReport, *, src: Path, embed_path: str, workdir: Path
) -> _Edits:
    if tree.lookup(embed_path) is not None:
        raise BaseImageError(
            f"ISO {src} already has a file at {embed_path}; if it is a zero-filled embed area"
            " listed by every boot entry, use the ISO as it is, otherwise choose another"
            " --embed-path"
        )
    mappings: list[tuple[Path, str]] = []
    configs: list[tuple[str, str]] = []
    for stored in tree.files():
        path = tree.display(stored)
        syntax = _config_syntax(path)
        if syntax is None:
            continue
        text = tree.read(stored)[:_MAX_CONFIG_SIZE].decode("utf-8", "surrogateescape")
        new_text, count = edit_boot_config(text, syntax=syntax, embed_path=embed_path)
        if count == 0:
            continue
        local = workdir / f"config-{len(mappings)}.cfg"
        local.write_bytes(new_text.encode("utf-8", "surrogateescape"))
        mappings.append((local, path))
        configs.append((path, syntax))
        LOG.info("added %s to %s (%s, %d initrd lists)", embed_path, path, syntax, count)

    efi_images: list[str] = []
    for entry in report.entries:
        if entry.platform != "UEFI" or entry.path is None:
            continue
        stored = tree.lookup(entry.path)
        if stored is None:
            continue
        local = workdir / f"efi-{entry.number}.img"
        local.write_bytes(tree.read(stored))
        where = f"{src}:{entry.path}"
        if _edit_efi_image(local, embed_path=embed_path, workdir=workdir, where=where):
            mappings.append((local, entry.path))
            efi_images.append(entry.path)

    _check_coverage(report, src=src, configs=configs, efi_images=efi_images)
    return _Edits(mappings=tuple(mappings), configs=tuple(configs), efi_images=tuple(efi_images))


def _check_coverage(
    report: BootReport,
    *,
    src: Path,
    configs: Sequence[tuple[str, str]],
    efi_images: Sequence[str],
) -> None:
    """Raise BaseImageError when a platform's entries have no edited configuration."""
    syntaxes = {syntax for _, syntax in configs}
    for entry in report.entries:
        if entry.platform == "UEFI":
            covered = "grub" in syntaxes or bool(efi_images)
            expected = "a GRUB grub.cfg with initrd lines (in the ISO tree or the EFI image)"
        elif "linux" in (entry.path or "").lower():
            covered = "syslinux" in syntaxes
            expected = "an isolinux/syslinux .cfg with initrd= or INITRD"
        else:
            covered = "grub" in syntaxes
            expected = "a GRUB grub.cfg with initrd lines"
        # NOTE: any GRUB configuration counts for a GRUB entry; which one a loader reads is
        # decided by its built-in prefix, which is not parsed here.
        if not covered:
            raise BaseImageError(
                f"ISO {src}: no known boot configuration for El Torito entry {entry.number}"
                f" ({entry.platform}, boot image {entry.path or 'outside the ISO tree'});"
                f" expected {expected}. Master a new base with"
                " `ppimage prepare-base --kernel K --initrd I -o OUT.iso`"
            )


def _verify(src: Path, out: Path, *, before: BootReport, edits: _Edits, embed_path: str) -> None:
    after = read_boot_report(out)
    expected, actual = before.normalized(), after.normalized()
    if expected != actual:
        lost = [f"{key}: {value}" for key, value in expected if (key, value) not in actual]
        added = [f"{key}: {value}" for key, value in actual if (key, value) not in expected]
        raise BaseImageError(
            f"xorriso did not keep the boot records of {src}: lost {lost[:3]}, gained"
            f" {added[:3]}; this layout is not supported"
        )
    _compare_mbr_boot_code(src, out)
    _compare_boot_images(src, out, before=before, after=after, edits=edits)
    find_embed_area(out, embed_path=embed_path)

    tree = _IsoTree(out)
    try:
        for path, syntax in edits.configs:
            stored = tree.lookup(path)
            text = tree.read(stored).decode("utf-8", "surrogateescape") if stored else ""
            _check_edited(text, syntax=syntax, embed_path=embed_path, where=f"{out}:{path}")
    finally:
        tree.close()


def _compare_mbr_boot_code(src: Path, out: Path) -> None:
    with open(src, "rb") as before, open(out, "rb") as after:
        if before.read(_MBR_BOOT_CODE) != after.read(_MBR_BOOT_CODE):
            raise BaseImageError(
                f"xorriso changed the MBR boot code of {src}; this layout is not supported"
            )


def _compare_boot_images(
    src: Path, out: Path, *, before: BootReport, after: BootReport, edits: _Edits
) -> None:
    """Check that each El Torito boot image has the same bytes, except for patched tables."""
    replaced = {iso_path: local for local, iso_path in edits.mappings}
    source_tree, out_tree = _IsoTree(src), _IsoTree(out)
    try:
        for old, new in zip(before.entries, after.entries, strict=True):
            if old.path is not None and old.path in replaced:
                expected = replaced[old.path].read_bytes()
            else:
                expected = _boot_image_bytes(source_tree, src, old)
            actual = _boot_image_bytes(out_tree, out, new)
            if _mask_patched(expected, old) != _mask_patched(actual, new):
                raise BaseImageError(
                    f"xorriso changed El Torito boot image {old.number} ({old.platform},"
                    f" {old.path or 'outside the ISO tree'}) of {src}; this layout is not"
                    " supported"
                )
    finally:
        source_tree.close()
        out_tree.close()


def _boot_image_bytes(tree: _IsoTree, iso: Path, entry: BootEntry) -> bytes:
    if entry.path is not None:
        stored = tree.lookup(entry.path)
        if stored is None:
            raise BaseImageError(f"boot image {entry.path} is missing from {iso}")
        return tree.read(stored)
    length = entry.blocks * _SECTOR if entry.blocks else entry.load_sectors * 512
    with open(iso, "rb") as handle:
        return os.pread(handle.fileno(), length, entry.lba * _SECTOR)


def _mask_patched(data: bytes, entry: BootEntry) -> bytes:
    """Blank the tables xorriso writes into a boot image with the image's position."""
    masked = bytearray(data)
    if "boot-info-table" in entry.options:
        masked[_BOOT_INFO_TABLE] = bytes(_BOOT_INFO_TABLE.stop - _BOOT_INFO_TABLE.start)
    if "grub2-boot-info" in entry.options:
        masked[_GRUB2_BOOT_INFO] = bytes(_GRUB2_BOOT_INFO.stop - _GRUB2_BOOT_INFO.start)
    return bytes(masked)
