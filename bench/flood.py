"""Create many PreprovisioningImages at once and measure how the farm brings them all to Ready.

One watcher, one worker with a prefork pool of 2 children (``ppimage worker --concurrency 2``,
so 2 builds run at a time) and one image server run against the Kubernetes API emulator and a
Redis database on 127.0.0.1. The emulator creates N Secrets (nmstate and networkData, from the
example manifests, one address changed per host) and then N PreprovisioningImages without our
finalizer, all in one go, as a flood of new BareMetalHosts would. The run reports:

- the time until every object is Ready (watched like a client of the API would);
- the builds executed (Celery "succeeded ... 'ready'" lines and "published" lines per object),
  compared with N, so duplicates show;
- worker idle time while the queue is not empty: the queue length (LLEN build.x86_64) and the
  messages held by workers (HLEN unacked) are sampled every 50 ms, and each sample with a
  non-empty queue adds (pool slots - messages held) x interval;
- the lower bound of the queue phase: the sum of task run times divided by the pool slots;
- peak RSS (VmHWM) of the watcher, the worker and its pool children, the server and the emulator.

Usage: .venv/bin/python bench/flood.py [--quick] [--count N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster  # noqa: E402
import common  # noqa: E402

REDIS_DB = 8
CONCURRENCY = 2
SAMPLE_SECONDS = 0.05
_SUCCEEDED = re.compile(r"Task ppimage\.build\[[^\]]+\] succeeded in ([0-9.]+)s: '(\w+)'")
_PUBLISHED = re.compile(r": (\S+/\S+): published ")
_ENQUEUED = re.compile(r": enqueued build with token \w+: (.*)$", re.MULTILINE)


class Sampler:
    """Samples queue length, messages held by workers and peak RSS in a background thread."""

    def __init__(self, farm: cluster.Farm, pids: dict[str, int], slots: int) -> None:
        self.farm = farm
        self.pids = pids
        self.slots = slots
        self.peaks = common.PeakTracker()
        self.idle_slot_seconds = 0.0
        self.queue_nonempty_seconds = 0.0
        self.max_queue = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample_memory()

    def sample_memory(self) -> None:
        for label, pid in self.pids.items():
            self.peaks.sample(label, pid, with_children=label == "worker")

    def _run(self) -> None:
        last = time.monotonic()
        next_memory = last
        while not self._stop.is_set():
            time.sleep(SAMPLE_SECONDS)
            now = time.monotonic()
            interval, last = now - last, now
            length = self.farm.queue_length()
            held = self.farm.unacked()
            self.samples += 1
            self.max_queue = max(self.max_queue, length)
            if length > 0:
                self.queue_nonempty_seconds += interval
                self.idle_slot_seconds += interval * max(0, self.slots - held)
            if now >= next_memory:
                self.sample_memory()
                next_memory = now + 0.5


def fetch_size(url: str) -> int:
    with urllib.request.urlopen(url, timeout=60) as response:
        size = 0
        while chunk := response.read(1 << 20):
            size += len(chunk)
        return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 objects instead of 1,000")
    parser.add_argument("--count", type=int, help="PreprovisioningImages to create")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Ready")
    parser.add_argument("--keep-logs", type=Path, help="copy the process logs to this directory")
    arguments = parser.parse_args()
    count = arguments.count or (200 if arguments.quick else 1000)
    common.require_tools("xorriso", "cpio", "gzip")

    workdir = Path(tempfile.mkdtemp(prefix="ppimage-bench-flood-", dir="/var/tmp"))
    farm = None
    try:
        for line in common.describe_machine(workdir):
            print(line)
        farm = cluster.Farm(workdir, redis_db=REDIS_DB)
        farm.catalog = common.make_small_bases(workdir / "bases", workdir / "bases.log")
        server = farm.start_server(common.free_port())
        watcher, watcher_log = farm.start_watcher()
        cluster.wait_for_log(watcher_log, "initial lists stored", timeout=60, process=watcher)
        worker, worker_log = farm.start_worker("worker", concurrency=CONCURRENCY)
        print(f"farm: 1 watcher, 1 worker with {CONCURRENCY} pool children, 1 image server,"
              f" emulator at {farm.emulator.url}, Redis db {REDIS_DB}")  # fmt: skip

        pairs = list(common.generate_hosts(count, namespace="bench", with_finalizer=False))
        kinds = Counter(
            "nmstate" if secret["data"].get("nmstate") else "networkData" for _, secret in pairs
        )
        formats = Counter(image["spec"]["acceptFormats"][0] for image, _ in pairs)
        objects = cluster.write_objects(workdir / "objects.json", pairs)

        watch = cluster.ReadyWatch(farm.emulator)
        watch.start()
        pids = {"watcher": watcher.pid, "worker": worker.pid, "ppimage serve": server.pid,
                "emulator": farm.emulator.pid}  # fmt: skip
        sampler = Sampler(farm, pids, slots=CONCURRENCY)
        cpu_before = {label: common.cpu_seconds(pid) for label, pid in pids.items()}
        children_before = {
            child: common.cpu_seconds(child) for child in common.children_of(worker.pid)
        }
        print(f"load average before the flood: {common.load_average()}")
        sampler.start()
        started = time.monotonic()
        created = farm.emulator.command(op="create", path=str(objects))
        print(f"created {count} Secrets ({dict(kinds)}) and {count} PreprovisioningImages"
              f" (first accepted format {dict(formats)})"
              f" in {created['seconds']:.2f} s")  # fmt: skip
        common.wait_for(lambda: len(watch.ready_at) >= count, timeout=arguments.timeout,
                        interval=0.1, what=f"{count} Ready PreprovisioningImages")  # fmt: skip
        finished = time.monotonic()
        time.sleep(1.0)  # let late duplicate builds, if any, show in the logs
        sampler.stop()
        watch.stop()
        elapsed = finished - started
        cpu = {label: common.cpu_seconds(pid) - cpu_before[label] for label, pid in pids.items()}
        children_cpu = sum(
            common.cpu_seconds(child) - children_before.get(child, 0.0)
            for child in common.children_of(worker.pid)
        )

        worker_text = worker_log.read_text(errors="replace")
        outcomes = Counter(match.group(2) for match in _SUCCEEDED.finditer(worker_text))
        task_seconds = [float(match.group(1)) for match in _SUCCEEDED.finditer(worker_text)]
        published = Counter(match.group(1) for match in _PUBLISHED.finditer(worker_text))
        duplicates = {name: n for name, n in published.items() if n > 1}
        watcher_text = watcher_log.read_text(errors="replace")
        reasons = Counter(match.group(1) for match in _ENQUEUED.finditer(watcher_text))
        enqueued = sum(reasons.values())
        ready_times = sorted(at - started for at in watch.ready_at.values())

        print(f"\nall {count} Ready after {elapsed:.1f} s"
              f" ({count / elapsed:.1f} objects/s); first Ready after {ready_times[0]:.2f} s,"
              f" median {common.median(ready_times):.1f} s")  # fmt: skip
        print(
            f"Error=True seen on {len(watch.errors)} objects"
            + (f", e.g. {next(iter(watch.errors.items()))}" if watch.errors else "")
        )
        print(f"builds: {outcomes.get('ready', 0)} tasks published an image, all task outcomes"
              f" {dict(outcomes)}; {sum(published.values())} 'published' lines for"
              f" {len(published)} objects; objects built more than once: {len(duplicates)};"
              f" watcher enqueued {enqueued} messages for {count} objects,"
              f" reasons {dict(reasons)}")  # fmt: skip
        busy = sum(task_seconds)
        print(f"task run time: sum {busy:.1f} s,"
              f" median {common.median(task_seconds) * 1000:.0f} ms,"
              f" p95 {common.percentile(task_seconds, 0.95) * 1000:.0f} ms;"
              f" lower bound with {CONCURRENCY} slots: {busy / CONCURRENCY:.1f} s")  # fmt: skip
        slot_seconds = CONCURRENCY * sampler.queue_nonempty_seconds
        idle_share = sampler.idle_slot_seconds / slot_seconds if slot_seconds else 0.0
        print(f"queue: max length {sampler.max_queue}, non-empty for"
              f" {sampler.queue_nonempty_seconds:.1f} s; idle pool slots while non-empty:"
              f" {sampler.idle_slot_seconds:.1f} slot-seconds"
              f" ({idle_share:.0%} of slot time), {sampler.samples} samples")  # fmt: skip
        print("CPU seconds during the flood: "
              + ", ".join(f"{label} {seconds:.1f}" for label, seconds in cpu.items())
              + f", worker pool children {children_cpu:.1f}"
              f" (machine capacity {elapsed * (os.cpu_count() or 1):.1f})")  # fmt: skip
        print("peak RSS:")
        for line in sampler.peaks.lines():
            print(line)

        # The published images must download from the image server.
        urls = []
        for name in sorted(watch.ready_at)[:3]:
            namespace, object_name = name.split("/")
            answer = farm.emulator.command(
                op="get", resource="preprovisioningimages", namespace=namespace, name=object_name
            )
            obj = answer["object"]
            urls.append(obj["status"]["imageUrl"])
        sizes = [fetch_size(url) for url in urls]
        print(f"downloaded {len(urls)} images from ppimage serve: sizes {sizes}")
        print(f"load average at end: {common.load_average()}")
    finally:
        if farm is not None:
            farm.close()
        if arguments.keep_logs is not None:
            arguments.keep_logs.mkdir(parents=True, exist_ok=True)
            for log_path in workdir.glob("*.log"):
                shutil.copy(log_path, arguments.keep_logs / log_path.name)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
