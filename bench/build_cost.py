"""Measure the per-host cost of building images: payload and splice versus materialized files.

The bases are a 1 GiB ISO and the Debian installer's 40 MB initrd.gz. For each base, one run
prints the time and bytes written for three jobs. The first packs a payload and computes its
layout, which is all the image server does per host. The second materializes the image as a
file, and the third copies the base with `cp` as a baseline. Bytes written come from
/proc/self/io write_bytes or, for `cp`, from getrusage block output.

Usage: /tmp/venv/bin/python bench/build_cost.py --workdir DIR [--hosts N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.images import (  # noqa: E402
    Layout,
    find_embed_area,
    initrd_layout,
    iso_layout,
    materialize,
)
from builder.payload import pack_payload  # noqa: E402
from builder.prepare_base import master_iso  # noqa: E402
from builder.rendering import PayloadFile  # noqa: E402

INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
KERNEL = INSTALLER / "linux"
INITRD = INSTALLER / "initrd.gz"
PAD_SIZE = 1 << 30
_BLOCK = 512  # unit of ru_oublock


def write_bytes() -> int:
    """Return this process's write_bytes counter from /proc/self/io."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes line")


def host_files(index: int) -> list[PayloadFile]:
    keyfile = (
        f"[connection]\nid=eth0\ntype=ethernet\ninterface-name=eth0\n\n[ipv4]\nmethod=manual\n"
        f"address1=192.0.2.{index % 250 + 1}/24,192.0.2.254\ndns=192.0.2.53;\n"
    ).encode()
    return [
        PayloadFile(
            path="/etc/NetworkManager/system-connections/eth0.nmconnection",
            data=keyfile,
            mode=0o600,
        )
    ]


def make_big_iso(workdir: Path) -> Path:
    """Master a base ISO from the installer kernel and initrd, then add a 1 GiB non-zero file."""
    big = workdir / "base-1g.iso"
    if big.exists():
        return big
    base = workdir / "base.iso"
    master_iso(kernel=KERNEL, initrd=INITRD, dst=base, cmdline="console=ttyS0")
    pad = workdir / "pad.bin"
    block = bytes(range(256)) * 4096  # 1 MiB of non-zero bytes, so nothing is sparse
    with open(pad, "wb") as handle:
        for _ in range(PAD_SIZE // len(block)):
            handle.write(block)
    subprocess.run(
        ["xorriso", "-indev", base, "-outdev", big, "-boot_image", "any", "replay",
         "-map", pad, "/pad.bin", "-commit"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    pad.unlink()
    base.unlink()
    return big


def measure(action: Callable[[], object]) -> tuple[float, int]:
    """Run ``action`` and return (seconds, bytes this process wrote)."""
    written = write_bytes()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started, write_bytes() - written


def measure_cp(src: Path, dst: Path) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    started = time.perf_counter()
    subprocess.run(["cp", src, dst], check=True, timeout=600)
    subprocess.run(["sync", "--file-system", dst], check=True, timeout=600)
    elapsed = time.perf_counter() - started
    blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before
    return elapsed, blocks * _BLOCK


def report(label: str, seconds: list[float], written: list[int], size: int) -> None:
    median = statistics.median(seconds)
    print(
        f"  {label:<28} median {median * 1000:10.3f} ms   bytes written {max(written):>14,}"
        f"   output size {size:>14,}"
    )


def bench_base(
    name: str, base: Path, build: Callable[[bytes], Layout], *, workdir: Path, hosts: int,
    repeat: int,
) -> None:  # fmt: skip
    print(f"{name}: {base} ({base.stat().st_size:,} bytes)")

    splice_times, splice_written, payload_sizes = [], [], []
    layout = None
    for index in range(hosts):
        files = host_files(index)

        def pack_and_splice(files: list[PayloadFile] = files) -> None:
            nonlocal layout
            payload = pack_payload(files).archive
            payload_sizes.append(len(payload))
            layout = build(payload)

        elapsed, written = measure(pack_and_splice)
        splice_times.append(elapsed)
        splice_written.append(written)
    report(
        f"payload + layout ({hosts} hosts)",
        splice_times,
        splice_written,
        max(payload_sizes),
    )
    print(f"  {'':<28} stored per host: the payload, {max(payload_sizes):,} bytes")

    assert layout is not None
    out = workdir / f"{name}.out"
    times, written_list = [], []
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        elapsed, written = measure(lambda: materialize(layout, out))
        times.append(elapsed)
        written_list.append(written)
    report(f"materialize (x{repeat})", times, written_list, out.stat().st_size)
    out.unlink()

    copy = workdir / f"{name}.cp"
    times, written_list = [], []
    for _ in range(repeat):
        copy.unlink(missing_ok=True)
        elapsed, written = measure_cp(base, copy)
        times.append(elapsed)
        written_list.append(written)
    report(f"cp baseline (x{repeat})", times, written_list, copy.stat().st_size)
    copy.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="directory for the images")
    parser.add_argument("--hosts", type=int, default=50, help="payloads to build per base")
    parser.add_argument("--repeat", type=int, default=3, help="materialize and cp runs")
    arguments = parser.parse_args()
    workdir: Path = arguments.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    for tool in ("xorriso", "cp", "grub-mkstandalone"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    if not INITRD.is_file():
        sys.exit(f"{INITRD} is missing; install debian-installer-12-netboot-amd64")

    filesystem = subprocess.run(
        ["stat", "-f", "-c", "%T", workdir], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(
        f"workdir {workdir} on {filesystem}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )
    print("materialize includes fsync; cp is followed by sync of its file system")

    iso = make_big_iso(workdir)
    area = find_embed_area(iso)
    bench_base(
        "iso", iso, lambda payload: iso_layout(iso, area, payload),
        workdir=workdir, hosts=arguments.hosts, repeat=arguments.repeat,
    )  # fmt: skip
    bench_base(
        "initrd", INITRD, lambda payload: initrd_layout(INITRD, payload),
        workdir=workdir, hosts=arguments.hosts, repeat=arguments.repeat,
    )  # fmt: skip


if __name__ == "__main__":
    main()
