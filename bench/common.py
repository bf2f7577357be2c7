"""Helpers shared by the benchmark scripts: base images, example hosts, processes and /proc reads.

Every process a benchmark starts goes through ``Processes``, which starts it in its own session
and stops it (and only it, by process group id) when the benchmark ends or fails.
"""

from __future__ import annotations

import base64
import copy
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

VENV_BIN = REPOSITORY / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
PPIMAGE = str(VENV_BIN / "ppimage") if (VENV_BIN / "ppimage").exists() else "ppimage"
INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
INSTALLER_KERNEL = INSTALLER / "linux"
INSTALLER_INITRD = INSTALLER / "initrd.gz"
EXAMPLES = REPOSITORY / "examples"
GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10


# Machine and load.


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as printed by uptime."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def describe_machine(workdir: Path) -> list[str]:
    """Return lines describing CPUs, memory, the file system of ``workdir``, kernel and Python."""
    memory_kib = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    filesystem = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return [
        f"machine: {os.cpu_count()} CPUs, {memory_kib / (1 << 20):.1f} GiB memory,"
        f" kernel {platform.release()}, Python {platform.python_version()}",
        f"workdir: {workdir} on {filesystem}",
        f"load average at start: {load_average()}",
    ]


# /proc readers.


def read_status_kib(pid: int, field_name: str) -> int:
    """Return a ``kB`` field of /proc/PID/status (VmHWM, VmRSS), or 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of a process from /proc/PID/stat, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name is in parentheses and may contain spaces, so split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Return the direct child process ids of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [int(child) for child in text.split()]


def io_counters() -> dict[str, int]:
    """Return this process's /proc/self/io counters (wchar, write_bytes, ...)."""
    counters = {}
    with open("/proc/self/io") as handle:
        for line in handle:
            name, value = line.split(":")
            counters[name] = int(value)
    return counters


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class PeakTracker:
    """Peak resident memory (VmHWM) of processes, read while they run and kept after they end.

    Pool children can be replaced, so each sample also records new children of the roots.
    """

    def __init__(self) -> None:
        self.peaks_kib: dict[tuple[str, int], int] = {}

    def sample(self, label: str, pid: int, *, with_children: bool = False) -> None:
        pids = [pid, *(children_of(pid) if with_children else [])]
        for index, each in enumerate(pids):
            name = label if index == 0 else f"{label} child"
            value = read_status_kib(each, "VmHWM")
            key = (name, each)
            self.peaks_kib[key] = max(self.peaks_kib.get(key, 0), value)

    def lines(self) -> list[str]:
        return [
            f"  {name:<28} pid {pid:<8} peak RSS {kib / 1024:8.1f} MiB"
            for (name, pid), kib in sorted(self.peaks_kib.items())
        ]


# Processes.


@dataclass
class Processes:
    """Processes started by one benchmark, each in its own session so it can be stopped whole."""

    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(
        self, label: str, command: list[str], *, log_path: Path, env: dict | None = None,
        stdin: int | None = None, stdout: int | None = None,
    ) -> subprocess.Popen:  # fmt: skip
        environment = dict(os.environ)
        environment.update(env or {})
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, cwd=REPOSITORY, env=environment, start_new_session=True,
                stdin=stdin, stdout=stdout if stdout is not None else log_file, stderr=log_file,
            )  # fmt: skip
        self.started.append((label, process))
        return process

    def stop(self, process: subprocess.Popen, *, timeout: float = 20.0) -> None:
        """Send SIGTERM to the process group of ``process``, then SIGKILL after ``timeout``."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # Pool children left behind by a killed parent are in the same process group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            self.stop(process)
        self.started.clear()


def wait_for(
    condition: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str
) -> object:
    """Poll ``condition`` until it returns a true value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Base images.


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None and not Path(tool).exists()]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)}; install them (see scripts/setup.sh)")


def make_small_bases(directory: Path, log_path: Path) -> Path:
    """Make the example bases (busybox initramfs, installer kernel, ISO) and return a catalog.

    The ISO is mastered by ``ppimage prepare-base`` (examples/make-base-images.sh).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "base.iso").exists():
        with open(log_path, "ab") as log_file:
            subprocess.run(
                ["sh", str(EXAMPLES / "make-base-images.sh"), str(directory)],
                env={**os.environ, "PPIMAGE": PPIMAGE}, check=True, stdout=log_file,
                stderr=log_file, timeout=300,
            )  # fmt: skip
    catalog = directory / "catalog.yaml"
    catalog.write_text(
        "architectures:\n  x86_64:\n    iso: base.iso\n    initrd: initramfs.img\n"
        "    kernel: vmlinuz\n    profile: networkmanager\n"
    )
    return catalog


def make_big_iso(directory: Path, *, size: int, log_path: Path) -> Path:
    """Return a base ISO of about ``size`` bytes: the example ISO plus a non-zero filler file.

    The example ISO comes from ``ppimage prepare-base``. xorriso replays its boot records and
    adds ``/filler.bin``, so the embed area and the boot entries stay as prepare-base made them.
    """
    big = directory / f"base-{size // MIB}m.iso"
    if big.exists():
        return big
    make_small_bases(directory, log_path)
    small = directory / "base.iso"
    filler = directory / "filler.bin"
    block = bytes(range(256)) * 4096  # 1 MiB of non-zero bytes, so nothing is sparse
    remaining = max(0, size - small.stat().st_size)
    with open(filler, "wb") as handle:
        while remaining > 0:
            handle.write(block[: min(len(block), remaining)])
            remaining -= len(block)
    partial = big.with_name(big.name + ".partial")
    try:
        subprocess.run(
            ["xorriso", "-indev", str(small), "-outdev", str(partial), "-boot_image", "any",
             "replay", "-map", str(filler), "/filler.bin", "-commit"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        partial.replace(big)
    finally:
        filler.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return big


def write_catalog(path: Path, *, iso: Path, initrd: Path, kernel: Path) -> Path:
    path.write_text(
        "architectures:\n  x86_64:\n"
        f"    iso: {iso}\n    initrd: {initrd}\n    kernel: {kernel}\n"
        "    profile: networkmanager\n"
    )
    return path


# Hosts made from the example manifests.


@dataclass(frozen=True)
class HostTemplate:
    """One example PreprovisioningImage and its Secret, the pattern for generated hosts."""

    image: dict
    secret: dict
    key: str  # the Secret key that carries the network data: nmstate or networkData


def host_templates() -> list[HostTemplate]:
    """Return the examples whose Secret carries nmstate or networkData."""
    from builder.manifests import load_manifests

    loaded = load_manifests(sorted(EXAMPLES.glob("*.yaml")))
    templates = []
    for image in loaded.images:
        secret = loaded.secret_for(image)
        if secret is None:
            continue
        data = secret.get("data") or {}
        key = "nmstate" if data.get("nmstate") else "networkData"
        if not data.get(key):
            continue
        templates.append(HostTemplate(image=image, secret=secret, key=key))
    if not templates:
        sys.exit(f"no example PreprovisioningImage with a Secret found in {EXAMPLES}")
    return templates


def vary_secret_data(secret: dict, key: str, index: int) -> dict:
    """Return the Secret data with its first documentation address changed per host.

    The example addresses come from 192.0.2.0/24, 198.51.100.0/24 and 2001:db8::/32, so each
    host gets different network data (and a different payload) from the same template.
    """
    data = dict(secret.get("data") or {})
    text = base64.b64decode(data[key]).decode()
    octet = index % 250 + 2
    for prefix in ("192.0.2.", "198.51.100."):
        start = text.find(prefix)
        if start >= 0:
            end = start + len(prefix)
            while end < len(text) and text[end].isdigit():
                end += 1
            text = text[: start + len(prefix)] + str(octet) + text[end:]
            break
    data[key] = base64.b64encode(text.encode()).decode()
    return data


def generate_hosts(
    count: int, *, namespace: str, with_finalizer: bool, accept_formats: list[str] | None = None
) -> Iterator[tuple[dict, dict]]:
    """Yield ``count`` (PreprovisioningImage, Secret) pairs cycling through the templates.

    The objects carry no resourceVersion or uid, so the API (or the caller) assigns them.
    """
    templates = host_templates()
    for index in range(count):
        template = templates[index % len(templates)]
        name = f"host-{index:05d}"
        secret_name = f"{name}-network"
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": secret_name,
                "namespace": namespace,
                "labels": {"environment.metal3.io": "baremetal"},
            },
            "type": "Opaque",
            "data": vary_secret_data(template.secret, template.key, index),
        }
        spec = copy.deepcopy(template.image["spec"])
        spec["networkDataName"] = secret_name
        if accept_formats is not None:
            spec["acceptFormats"] = list(accept_formats)
        metadata = {"name": name, "namespace": namespace}
        if with_finalizer:
            metadata["finalizers"] = ["preprovisioningimage.metal3.io"]
        image = {
            "apiVersion": "metal3.io/v1alpha1",
            "kind": "PreprovisioningImage",
            "metadata": metadata,
            "spec": spec,
        }
        yield image, secret


def with_identity(image: dict, secret: dict, index: int) -> tuple[dict, dict]:
    """Return copies with the uid and resourceVersions an API server would have assigned."""
    image = copy.deepcopy(image)
    secret = copy.deepcopy(secret)
    image["metadata"]["uid"] = str(uuid.UUID(int=index + 1))
    image["metadata"]["generation"] = 1
    secret["metadata"]["resourceVersion"] = str(1000 + index)
    return image, secret


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if not ordered:
        return float("nan")
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
