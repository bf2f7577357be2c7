"""Measure the watcher with many objects: initial list, memory, and Secret change latency.

The Kubernetes API emulator contains N PreprovisioningImages (with our finalizer, as after an
earlier run) and N labelled Secrets (nmstate and networkData from the example manifests). The
watcher runs as ``ppimage watcher`` against a Redis database on 127.0.0.1. Phases:

0. baseline: the watcher with an empty API, so its own memory shows apart from the objects;
1. nothing built yet: time from start until the initial lists are stored and until all N
   build messages are queued (LLEN build.x86_64 = N);
2. everything up to date: the statuses are written as a worker would write them and the built
   tokens are recorded in Redis, then the watcher restarts; time until its log shows all N
   objects found up to date, and that it queues nothing;
3. with one worker (``ppimage worker --concurrency 2``) running: the data of one Secret at a
   time changes; latency until the watcher records the new desired token in Redis (the step
   right before it sends the message) and until the object is Ready with the new
   networkData.version.

Peak memory is VmHWM of the watcher process, read from /proc before it stops.

Usage: .venv/bin/python bench/watcher_scale.py [--quick] [--count N] [--changes K]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster  # noqa: E402
import common  # noqa: E402

from builder import contract  # noqa: E402

REDIS_DB = 9
TARGET_MIB = 300
_UP_TO_DATE = re.compile(r": no build needed: up to date$", re.MULTILINE)


def run_watcher_until(farm: cluster.Farm, label: str, done, *, timeout: float) -> dict[str, float]:
    """Start a watcher, wait until ``done(log_text)`` is true, stop it; return its figures."""
    started = time.monotonic()
    process, log_path = farm.start_watcher(label)
    peak_rss = 0
    listed_at = None
    deadline = started + timeout

    while True:
        text = log_path.read_text(errors="replace")
        if listed_at is None and "initial lists stored" in text:
            listed_at = time.monotonic()
        peak_rss = max(peak_rss, common.read_status_kib(process.pid, "VmHWM"))
        if listed_at is not None and done(text):
            break
        if process.poll() is not None:
            raise RuntimeError(f"the watcher exited; see {log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: not done after {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)
    finished = time.monotonic()

    time.sleep(0.5)
    rss = common.read_status_kib(process.pid, "VmRSS")
    peak_rss = max(peak_rss, common.read_status_kib(process.pid, "VmHWM"))
    cpu = common.cpu_seconds(process.pid)
    farm.processes.stop(process)
    return {
        "listed": (listed_at or finished) - started,
        "done": finished - started,
        "peak_mib": peak_rss / 1024,
        "rss_mib": rss / 1024,
        "cpu": cpu,
        "log": log_path.read_text(errors="replace"),
    }


def mark_all_built(farm: cluster.Farm) -> int:
    """Write Ready statuses and record each desired token as built, as finished builds would."""
    uids = farm.emulator.command(op="mark-ready", url=farm.public_url)["uids"]
    desired = farm.redis.mget([contract.desired_key(uid) for uid in uids])
    pipe = farm.redis.pipeline(transaction=False)
    for uid, token in zip(uids, desired, strict=True):
        if token is None:
            raise RuntimeError(f"no desired token recorded for uid {uid}")
        pipe.set(contract.built_key(uid), token)
        pipe.delete(contract.waiting_key(uid))
    pipe.delete(cluster.QUEUE_KEY)
    pipe.execute()
    return len(uids)


def change_secrets(farm: cluster.Farm, count: int, changes: int) -> list[tuple[float, float]]:
    """Change one Secret at a time; return (seconds to queued, seconds to Ready) of each."""
    templates = common.host_templates()
    chooser = random.Random(1)
    latencies = []
    for change in range(changes):
        index = chooser.randrange(count)
        name = f"host-{index:05d}"
        image = farm.emulator.command(
            op="get", resource="preprovisioningimages", namespace="bench", name=name
        )["object"]
        uid = image["metadata"]["uid"]
        template = templates[index % len(templates)]
        desired_before = farm.redis.get(contract.desired_key(uid))
        data = common.vary_secret_data(template.secret, template.key, 100_000 + change)
        started = time.monotonic()
        version = farm.emulator.command(
            op="patch", resource="secrets", namespace="bench", name=f"{name}-network",
            patch={"data": data},
        )["resourceVersion"]  # fmt: skip
        common.wait_for(
            lambda uid=uid, before=desired_before: farm.redis.get(contract.desired_key(uid))
            != before,
            timeout=120, interval=0.001, what=f"a new desired token for {name}",
        )  # fmt: skip
        queued = time.monotonic() - started

        def ready(name: str = name, version: str = version) -> bool:
            obj = farm.emulator.command(
                op="get", resource="preprovisioningimages", namespace="bench", name=name
            )["object"]
            status = obj.get("status") or {}
            conditions = {entry["type"]: entry for entry in status.get("conditions") or []}
            return (status.get("networkData") or {}).get("version") == version and conditions.get(
                "Ready", {}
            ).get("status") == "True"

        common.wait_for(ready, timeout=120, interval=0.01, what=f"{name} Ready again")
        latencies.append((queued, time.monotonic() - started))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 objects and 5 changes")
    parser.add_argument("--count", type=int, help="PreprovisioningImages (and Secrets)")
    parser.add_argument("--changes", type=int, help="Secret changes timed in phase 3")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    arguments = parser.parse_args()
    count = arguments.count or (2000 if arguments.quick else 10_000)
    changes = arguments.changes or (5 if arguments.quick else 20)
    common.require_tools("xorriso", "cpio", "gzip")

    workdir = Path(tempfile.mkdtemp(prefix="ppimage-bench-watcher-", dir="/var/tmp"))
    farm = None
    try:
        for line in common.describe_machine(workdir):
            print(line)
        farm = cluster.Farm(workdir, redis_db=REDIS_DB)
        farm.catalog = common.make_small_bases(workdir / "bases", workdir / "bases.log")

        baseline = run_watcher_until(farm, "watcher-empty", lambda text: True, timeout=120)
        print(f"phase 0, empty API: watcher RSS {baseline['rss_mib']:.1f} MiB,"
              f" peak {baseline['peak_mib']:.1f} MiB")  # fmt: skip

        pairs = list(common.generate_hosts(count, namespace="bench", with_finalizer=True))
        objects = cluster.write_objects(workdir / "objects.json", pairs)
        created = farm.emulator.command(op="create", path=str(objects))
        print(f"created {count} Secrets and {count} PreprovisioningImages in the emulator"
              f" in {created['seconds']:.1f} s; load average {common.load_average()}")  # fmt: skip

        first = run_watcher_until(
            farm, "watcher-unbuilt", lambda text: farm.queue_length() >= count,
            timeout=arguments.timeout,
        )  # fmt: skip
        print(f"phase 1, nothing built: initial lists stored after {first['listed']:.1f} s,"
              f" {count} messages queued after {first['done']:.1f} s"
              f" ({count / max(1e-9, first['done'] - first['listed']):.0f} objects/s after the"
              f" lists); watcher CPU {first['cpu']:.1f} s, RSS {first['rss_mib']:.1f} MiB,"
              f" peak {first['peak_mib']:.1f} MiB")  # fmt: skip

        marked = mark_all_built(farm)
        second = run_watcher_until(
            farm, "watcher-current", lambda text: len(_UP_TO_DATE.findall(text)) >= count,
            timeout=arguments.timeout,
        )  # fmt: skip
        enqueued = second["log"].count(": enqueued build with token ")
        print(f"phase 2, {marked} up to date: initial lists stored after {second['listed']:.1f} s,"
              f" all confirmed up to date after {second['done']:.1f} s; {enqueued} messages"
              f" queued (expected 0); watcher CPU {second['cpu']:.1f} s,"
              f" RSS {second['rss_mib']:.1f} MiB, peak {second['peak_mib']:.1f} MiB")  # fmt: skip
        peak = max(first["peak_mib"], second["peak_mib"])
        verdict = "met" if peak < TARGET_MIB else "MISSED"
        print(f"target watcher memory < {TARGET_MIB} MB for {count} objects: {verdict}"
              f" (peak {peak:.1f} MiB; {peak - baseline['peak_mib']:.1f} MiB above the empty"
              f" baseline, {(peak - baseline['peak_mib']) * 1024 / (2 * count):.1f} KiB per"
              f" object)")  # fmt: skip

        watcher, _ = farm.start_watcher("watcher-changes")
        common.wait_for(
            lambda: len(_UP_TO_DATE.findall(
                (workdir / "watcher-changes.log").read_text(errors="replace"))) >= count,
            timeout=arguments.timeout, what="the watcher to confirm every object",
        )  # fmt: skip
        farm.start_worker("worker", concurrency=2)
        print(f"phase 3: load average {common.load_average()}")
        latencies = change_secrets(farm, count, changes)
        queued = [entry[0] * 1000 for entry in latencies]
        ready = [entry[1] * 1000 for entry in latencies]
        print(f"phase 3, {changes} Secret changes with {count} objects watched:"
              f" to queued median {common.median(queued):.0f} ms, max {max(queued):.0f} ms;"
              f" to Ready median {common.median(ready):.0f} ms,"
              f" max {max(ready):.0f} ms")  # fmt: skip
        print(
            f"watcher peak RSS in phase 3: "
            f"{common.read_status_kib(watcher.pid, 'VmHWM') / 1024:.1f} MiB"
        )
        print(f"load average at end: {common.load_average()}")
    finally:
        if farm is not None:
            farm.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
