"""Profile output: the files for the payload and the kernel command-line arguments.

Profiles decide paths and modes. ``builder.payload`` packs the files into a cpio archive, and
the status carries ``kernel_params`` as ``extraKernelParams`` for the initrd format.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PayloadFile:
    """One regular file of the payload: an absolute path inside the initramfs, bytes and mode."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Rendering:
    """The output of one profile for one host."""

    profile: str
    files: tuple[PayloadFile, ...] = ()
    kernel_params: tuple[str, ...] = ()
