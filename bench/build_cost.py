"""Measure the per-host cost of building an image, for the ISO and the initrd format.

Four ways to produce one host's image are measured side by side in one run:

- worker path: ``builder.build.plan_image`` (render, pack the payload, lay out the image) and
  ``builder.store.PayloadStore.publish`` (payload file and record), as a worker does per build;
- ``ppimage build``: the offline command, which writes each image as a materialized file
  (``os.copy_file_range`` of the base, a full copy on ext4, plus the payload, then fsync);
- ``cp`` of the base followed by ``sync FILE``: the naive per-host copy (baseline);
- writing only the payload bytes to a file: the lower limit of any per-host build.

Bytes written are ``wchar`` (bytes passed to write calls) and ``write_bytes`` (bytes sent to
the block layer) from /proc/self/io for in-process work, and ``ru_oublock`` (512-byte blocks)
plus allocated blocks of the output files for subprocesses.

The bases are a 1 GiB ISO (the example ISO mastered by ``ppimage prepare-base`` with a filler
file added by xorriso) and the Debian installer's 40 MB initrd.gz. Hosts come from the example
manifests, with one address changed per host.

Usage: .venv/bin/python bench/build_cost.py [--quick] [--workdir DIR] [--bases DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GIB, KIB  # noqa: E402

from builder.build import plan_image  # noqa: E402
from builder.catalog import load_catalog  # noqa: E402
from builder.images import digest_file, materialize  # noqa: E402
from builder.store import PayloadStore  # noqa: E402

TARGET_MS = 50.0
TARGET_BYTES = 64 * KIB
BLOCK = 512  # unit of ru_oublock and st_blocks


@dataclass
class Sample:
    seconds: float
    cpu_seconds: float
    logical_bytes: int  # wchar, or the apparent size of what a subprocess wrote
    disk_bytes: int  # write_bytes, ru_oublock or allocated blocks


@dataclass
class Row:
    label: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        seconds = [sample.seconds * 1000 for sample in self.samples]
        cpu = [sample.cpu_seconds * 1000 for sample in self.samples]
        logical = max(sample.logical_bytes for sample in self.samples)
        disk = [sample.disk_bytes for sample in self.samples]
        return (
            f"  {self.label:<36} n={len(self.samples):<4} median {common.median(seconds):9.2f} ms"
            f"  p95 {common.percentile(seconds, 0.95):9.2f} ms  CPU {common.median(cpu):9.2f} ms"
            f"  written max {logical:>14,} B, to disk median {common.median(disk):>14,.0f} B"
            f" max {max(disk):>14,} B {self.note}"
        )


def measure_in_process(action) -> tuple[Sample, object]:
    before = common.io_counters()
    cpu = common.self_cpu_seconds()
    started = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - started
    cpu = common.self_cpu_seconds() - cpu
    after = common.io_counters()
    sample = Sample(
        seconds=elapsed,
        cpu_seconds=cpu,
        logical_bytes=after["wchar"] - before["wchar"],
        disk_bytes=after["write_bytes"] - before["write_bytes"],
    )
    return sample, result


def run_measured(command: list[str], *, stdout=subprocess.DEVNULL) -> tuple[float, float, int]:
    """Run a command; return (seconds, CPU seconds, ru_oublock bytes) of it and its children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=stdout, timeout=1800)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return elapsed, cpu, (after.ru_oublock - usage.ru_oublock) * BLOCK


def tree_bytes(root: Path) -> tuple[int, int]:
    """Return (apparent size, allocated bytes) of the regular files under ``root``."""
    apparent = allocated = 0
    for path in root.rglob("*"):
        if path.is_file():
            info = path.stat()
            apparent += info.st_size
            allocated += info.st_blocks * BLOCK
    return apparent, allocated


# The four ways to build a host's image.


def bench_worker_path(hosts: list[tuple[dict, dict]], catalog, store_root: Path) -> Row:
    store = PayloadStore(store_root)
    row = Row("worker: plan_image + publish")

    def build_one(image: dict, secret: dict):
        plan = plan_image(image, secret, catalog)
        base = plan.base.iso if plan.image_format == "iso" else plan.base.initrd
        return store.publish(
            namespace=plan.namespace, name=plan.name, uid=image["metadata"]["uid"],
            image_format=plan.image_format, architecture=plan.architecture,
            base_digest=digest_file(base),
            payload_archive=plan.payload.archive if plan.payload else None,
            payload_digest=plan.payload.digest if plan.payload else None,
        )  # fmt: skip

    for image, secret in hosts:
        sample, _ = measure_in_process(lambda image=image, secret=secret: build_one(image, secret))
        row.samples.append(sample)
    apparent, allocated = tree_bytes(store_root)
    row.note = (
        f"\n  {'':<36} store after {len(hosts)} hosts: {apparent / len(hosts):,.0f} B per host"
        f" in files, {allocated / len(hosts):,.0f} B per host allocated on disk"
    )
    return row


def bench_payload_only(payloads: list[bytes], directory: Path) -> Row:
    row = Row("limit: write the payload only")
    directory.mkdir(parents=True, exist_ok=True)
    for index, payload in enumerate(payloads):
        path = directory / f"{index}.cpio.gz"

        def write(path: Path = path, payload: bytes = payload) -> None:
            with open(path, "wb") as handle:
                handle.write(payload)

        sample, _ = measure_in_process(write)
        row.samples.append(sample)
    return row


def bench_ppimage_build(
    hosts: list[tuple[dict, dict]], catalog_path: Path, workdir: Path, *, image_format: str
) -> tuple[Row, Row]:
    """Run ``ppimage build`` on 1 host and on all hosts; return the total and per-host rows."""
    rows = []
    for count in (1, len(hosts)):
        manifest = workdir / f"hosts-{image_format}-{count}.json"
        items = [obj for pair in hosts[:count] for obj in (pair[1], pair[0])]
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        out = workdir / f"build-out-{image_format}"
        shutil.rmtree(out, ignore_errors=True)
        elapsed, cpu, oublock = run_measured(
            [common.PPIMAGE, "build", str(manifest), "--out", str(out), "--config",
             str(catalog_path)]
        )  # fmt: skip
        apparent, allocated = tree_bytes(out)
        shutil.rmtree(out)
        manifest.unlink()
        rows.append(Sample(elapsed, cpu, apparent, max(oublock, allocated)))
    single, many = rows
    count = len(hosts)
    total = Row(f"ppimage build, 1 process, {count} hosts", [many])
    marginal = Row(
        "ppimage build per host (marginal)",
        [
            Sample(
                seconds=(many.seconds - single.seconds) / max(1, count - 1),
                cpu_seconds=(many.cpu_seconds - single.cpu_seconds) / max(1, count - 1),
                logical_bytes=many.logical_bytes // count,
                disk_bytes=many.disk_bytes // count,
            )
        ],
        note=f"(1 host alone: {single.seconds * 1000:.0f} ms, mostly start-up)",
    )
    return total, marginal


def bench_materialize_and_cp(layout, base: Path, workdir: Path, repeat: int) -> tuple[Row, Row]:
    """Alternate ``materialize`` (what ``ppimage build`` does per host) and ``cp`` + sync.

    Each output is deleted before the next run, so both see the same page cache state.
    """
    materialized = Row("ppimage build: materialize + fsync")
    baseline = Row("baseline: cp base + sync FILE")
    out = workdir / "materialized.img"
    copy_path = workdir / "copy.img"
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        sample, _ = measure_in_process(lambda: materialize(layout, out))
        info = out.stat()
        sample.disk_bytes = max(sample.disk_bytes, info.st_blocks * BLOCK)
        materialized.samples.append(sample)
        out.unlink()

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(["cp", str(base), str(copy_path)], check=True, timeout=600)
        subprocess.run(["sync", str(copy_path)], check=True, timeout=600)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        info = copy_path.stat()
        baseline.samples.append(
            Sample(elapsed, cpu, info.st_size,
                   max((after.ru_oublock - usage.ru_oublock) * BLOCK, info.st_blocks * BLOCK))
        )  # fmt: skip
        copy_path.unlink()
    return materialized, baseline


# Driver.


def hosts_for(count: int, image_format: str) -> list[tuple[dict, dict]]:
    generated = common.generate_hosts(
        count, namespace="bench", with_finalizer=True, accept_formats=[image_format]
    )
    return [common.with_identity(image, secret, index) for index, (image, secret) in
            enumerate(generated)]  # fmt: skip


def bench_format(
    image_format: str, *, base: Path, catalog_path: Path, workdir: Path, hosts: int,
    materialized: int, repeat: int,
) -> list[Row]:  # fmt: skip
    print(f"\n{image_format}: base {base} ({base.stat().st_size:,} bytes)")
    catalog = load_catalog(catalog_path)
    pairs = hosts_for(hosts, image_format)

    # The first build of a process hashes the base (digest_file caches it per file version).
    started = time.perf_counter()
    digest_file(base)
    print(f"  base digest (once per base and process): {time.perf_counter() - started:.2f} s")
    warm_image, warm_secret = copy.deepcopy(pairs[0])
    warm_image["metadata"]["name"] = "warm-up"
    plan_image(warm_image, warm_secret, catalog)

    store_root = workdir / f"store-{image_format}"
    worker = bench_worker_path(pairs, catalog, store_root)
    payloads = [path.read_bytes() for path in sorted(store_root.rglob("*.cpio.gz"))]
    shutil.rmtree(store_root)
    limit = bench_payload_only(payloads, workdir / f"payloads-{image_format}")
    shutil.rmtree(workdir / f"payloads-{image_format}")
    total, marginal = bench_ppimage_build(
        pairs[:materialized], catalog_path, workdir, image_format=image_format
    )
    materialized_row, baseline = bench_materialize_and_cp(
        plan_image(pairs[0][0], pairs[0][1], catalog).layout, base, workdir, repeat
    )
    rows = [worker, materialized_row, marginal, total, baseline, limit]
    for row in rows:
        print(row.line())

    time_ms = common.median([sample.seconds for sample in worker.samples]) * 1000
    written = max(sample.logical_bytes for sample in worker.samples)
    disk = max(sample.disk_bytes for sample in worker.samples)
    print(
        f"  target worker per host < {TARGET_MS:.0f} ms: "
        f"{'met' if time_ms < TARGET_MS else 'MISSED'} ({time_ms:.2f} ms median)"
    )
    print(
        f"  target worker per host < {TARGET_BYTES // KIB} KiB written: "
        f"{'met' if max(written, disk) < TARGET_BYTES else 'MISSED'}"
        f" (max {written:,} B passed to write, {disk:,} B to the block layer)"
    )
    cp_ms = common.median([sample.seconds for sample in baseline.samples]) * 1000
    print(f"  worker path is {cp_ms / time_ms:,.0f} times faster than cp of the base")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer hosts and repeats (~1 min)")
    parser.add_argument(
        "--workdir", type=Path,
        help="directory for outputs (default: a temporary directory, removed at the end)",
    )  # fmt: skip
    parser.add_argument(
        "--bases", type=Path,
        help="directory that keeps the base images between runs (default: inside the workdir)",
    )  # fmt: skip
    parser.add_argument("--iso-size", type=int, default=GIB, help="ISO size in bytes")
    arguments = parser.parse_args()
    common.require_tools("xorriso", "cp", "sync", str(common.INSTALLER_INITRD))

    hosts, materialized, repeat = (20, 2, 2) if arguments.quick else (200, 5, 5)
    temporary = None
    if arguments.workdir is None:
        temporary = tempfile.mkdtemp(prefix="ppimage-bench-build-", dir="/var/tmp")
        workdir = Path(temporary)
    else:
        workdir = arguments.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        for line in common.describe_machine(workdir):
            print(line)
        bases = arguments.bases or workdir / "bases"
        iso = common.make_big_iso(bases, size=arguments.iso_size, log_path=workdir / "bases.log")
        catalog_path = common.write_catalog(
            workdir / "catalog.yaml", iso=iso, initrd=common.INSTALLER_INITRD,
            kernel=common.INSTALLER_KERNEL,
        )  # fmt: skip
        print(f"mode {'quick' if arguments.quick else 'full'}: {hosts} hosts on the worker path,"
              f" {materialized} by ppimage build, {repeat} cp runs per format")  # fmt: skip
        bench_format(
            "iso", base=iso, catalog_path=catalog_path, workdir=workdir, hosts=hosts,
            materialized=materialized, repeat=repeat,
        )  # fmt: skip
        bench_format(
            "initrd", base=common.INSTALLER_INITRD, catalog_path=catalog_path, workdir=workdir,
            hosts=hosts, materialized=materialized * 2, repeat=repeat,
        )  # fmt: skip
        print(f"\nload average at end: {common.load_average()}")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        elif arguments.bases is None:
            shutil.rmtree(workdir / "bases", ignore_errors=True)


if __name__ == "__main__":
    main()
