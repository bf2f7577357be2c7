"""The base image catalog: per architecture, the base ISO, initrd and kernel and how to use them.

The catalog is one YAML file, or the equivalent single-architecture command-line options::

    architectures:
      x86_64:
        iso: base.iso                 # ISO with an embed area (ppimage prepare-base)
        initrd: initrd.img            # base initramfs for the initrd format
        kernel: vmlinuz               # kernel published as kernelUrl
        kernelUrl: http://images.example/bases/x86_64/kernel   # optional
        extraKernelParams: console=ttyS0                        # optional, agent's own
        profile: networkmanager       # networkmanager, ignition, glean, networkd or dracut
        embedPath: /images/ignition.img
        ignition: agent.ign           # optional, merged by the ignition profile

Relative paths are relative to the catalog file. ``amd64``/``x86_64`` and ``arm64``/``aarch64``
name the same entry.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BaseImageError
from builder.safe_yaml import YAMLError, load_document

DEFAULT_PROFILE = "networkmanager"
PROFILE_NAMES = ("networkmanager", "ignition", "glean", "networkd", "dracut")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_EMBED_PATH = "/images/ignition.img"
FORMATS = ("iso", "initrd")

_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}
_KEYS = {
    "iso",
    "initrd",
    "kernel",
    "kernelUrl",
    "extraKernelParams",
    "profile",
    "embedPath",
    "ignition",
}


def canonical_architecture(architecture: str) -> str:
    """Return the catalog key for ``architecture``: amd64 is x86_64, arm64 is aarch64."""
    return _ALIASES.get(architecture, architecture)


def host_architecture() -> str:
    """Return the canonical architecture of this machine."""
    return canonical_architecture(platform.machine())


@dataclass(frozen=True)
class BaseImages:
    """The base images and settings of one architecture."""

    architecture: str
    iso: Path | None = None
    initrd: Path | None = None
    kernel: Path | None = None
    kernel_url: str | None = None
    extra_kernel_params: str = ""
    profile: str = DEFAULT_PROFILE
    embed_path: str = DEFAULT_EMBED_PATH
    ignition: dict | None = None

    def supports(self, image_format: str) -> bool:
        """Return whether this architecture has the base images ``image_format`` needs."""
        if image_format == "iso":
            return self.iso is not None
        if image_format == "initrd":
            return self.initrd is not None and self.kernel is not None
        return False

    def published_kernel_url(self) -> str | None:
        """Return the kernel URL for the status: the configured one, else a file:// URL."""
        if self.kernel_url:
            return self.kernel_url
        return self.kernel.resolve().as_uri() if self.kernel else None


@dataclass(frozen=True)
class Catalog:
    """Base images by canonical architecture."""

    architectures: dict[str, BaseImages]

    def lookup(self, architecture: str) -> BaseImages | None:
        """Return the base images for ``architecture`` (any alias), or None when there are none."""
        return self.architectures.get(canonical_architecture(architecture))


def load_catalog(path: Path) -> Catalog:
    """Read a catalog file; raise BaseImageError naming the file and the bad entry."""
    try:
        document = load_document(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as error:
        raise BaseImageError(f"base image catalog {path}: cannot read it: {error}") from error
    entries = (document or {}).get("architectures") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise BaseImageError(
            f"base image catalog {path}: no 'architectures' mapping; "
            "list at least one architecture with its iso or initrd and kernel"
        )
    architectures = {}
    for architecture, entry in entries.items():
        where = f"base image catalog {path}, architecture {architecture}"
        if not isinstance(entry, dict):
            raise BaseImageError(f"{where}: expected a mapping of iso, initrd, kernel, ...")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise BaseImageError(
                f"{where}: unknown keys {', '.join(unknown)}; valid keys are "
                + ", ".join(sorted(_KEYS))
            )
        base = _base_from_entry(str(architecture), entry, relative_to=path.parent, where=where)
        if base.architecture in architectures:
            raise BaseImageError(
                f"{where}: {base.architecture} is listed twice (aliases name the same "
                "architecture); merge the entries"
            )
        architectures[base.architecture] = base
    return Catalog(architectures)


def _base_from_entry(
    architecture: str, entry: dict, *, relative_to: Path, where: str
) -> BaseImages:
    def path_of(key: str) -> Path | None:
        value = entry.get(key)
        if value is None:
            return None
        return relative_to / str(value)

    ignition = None
    ignition_path = path_of("ignition")
    if ignition_path is not None:
        try:
            ignition = json.loads(ignition_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise BaseImageError(f"{where}: cannot read Ignition config: {error}") from error
    return single_architecture(
        architecture=architecture,
        iso=path_of("iso"),
        initrd=path_of("initrd"),
        kernel=path_of("kernel"),
        kernel_url=entry.get("kernelUrl"),
        extra_kernel_params=str(entry.get("extraKernelParams") or ""),
        profile=entry.get("profile") or DEFAULT_PROFILE,
        embed_path=entry.get("embedPath") or DEFAULT_EMBED_PATH,
        ignition=ignition,
    )


def single_architecture(
    *,
    architecture: str,
    iso: Path | None = None,
    initrd: Path | None = None,
    kernel: Path | None = None,
    kernel_url: str | None = None,
    extra_kernel_params: str = "",
    profile: str = DEFAULT_PROFILE,
    embed_path: str = DEFAULT_EMBED_PATH,
    ignition: dict | None = None,
) -> BaseImages:
    """Check the paths of one architecture's base images and return them.

    Raises BaseImageError when a named file does not exist or when initrd and kernel are not
    given together.
    """
    where = f"base images for {architecture!r}"
    if not architecture or architecture != architecture.strip():
        raise BaseImageError(f"{where}: the architecture name is empty or has spaces")
    for label, path in (("iso", iso), ("initrd", initrd), ("kernel", kernel)):
        if path is None:
            continue
        if not path.is_file():
            raise BaseImageError(f"{where}: {label} {path} does not exist or is not a file")
        if path.stat().st_size == 0:
            raise BaseImageError(f"{where}: {label} {path} is empty")
    if profile not in PROFILE_NAMES:
        raise BaseImageError(
            f"{where}: unknown profile {profile!r}; use one of {', '.join(PROFILE_NAMES)}"
        )
    if _UNSAFE.search(extra_kernel_params):
        raise BaseImageError(
            f"{where}: extraKernelParams contains a newline or control character; "
            "write the arguments on one line"
        )
    if kernel_url is not None and not str(kernel_url).startswith(("http://", "https://")):
        raise BaseImageError(f"{where}: kernelUrl {kernel_url!r} is not an http(s) URL")
    if (initrd is None) != (kernel is None):
        raise BaseImageError(
            f"{where}: the initrd format needs both an initrd and a kernel; give both or neither"
        )
    if iso is None and initrd is None:
        raise BaseImageError(f"{where}: give an iso, or an initrd and a kernel")
    return BaseImages(
        architecture=canonical_architecture(architecture),
        iso=iso,
        initrd=initrd,
        kernel=kernel,
        kernel_url=kernel_url,
        extra_kernel_params=extra_kernel_params,
        profile=profile,
        embed_path=embed_path,
        ignition=ignition,
    )
