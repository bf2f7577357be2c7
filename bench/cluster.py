"""A local farm for the benchmarks: emulator, Redis database, watcher, workers and image server.

``Farm`` starts each role as the ``ppimage`` command would run in production, pointed at the
Kubernetes API emulator (bench/emulator_process.py) and at one Redis database on 127.0.0.1.
It flushes only that database, at the start and at the end.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import common
import redis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
QUEUE_KEY = "build.x86_64"
# kombu's Redis transport keeps delivered, not yet acknowledged messages in this hash.
UNACKED_KEY = "unacked"
API_PREFIX = "/apis/metal3.io/v1alpha1"
# The watcher runs through the real command line. Its package logs at DEBUG, so every object it
# finds up to date shows in its log, and other loggers stay at INFO.
WATCHER_LAUNCHER = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.INFO, "
    "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
    "logging.getLogger('watcher').setLevel(logging.DEBUG); "
    "from builder.cli import main; main(sys.argv[1:], prog_name='ppimage')"
)


class Emulator:
    """The emulator subprocess and its stdin/stdout command channel."""

    def __init__(self, processes: common.Processes, workdir: Path, *, history_limit: int):
        self.process = processes.start(
            "emulator",
            [common.PYTHON, str(Path(__file__).with_name("emulator_process.py")),
             "--history-limit", str(history_limit), "--bookmark-interval", "5"],
            log_path=workdir / "emulator.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        first = self.process.stdout.readline()
        if not first:
            raise RuntimeError(f"the emulator did not start; see {workdir / 'emulator.log'}")
        self.url = json.loads(first)["url"]
        self.pid = self.process.pid
        self._lock = threading.Lock()

    def command(self, **command) -> dict:
        with self._lock:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
            answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"emulator command {command['op']} failed: {answer['error']}")
        return answer

    def request(self, method: str, path: str) -> dict:
        parsed = urllib.parse.urlsplit(self.url)
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return json.loads(response.read())
        finally:
            connection.close()


@dataclass
class ReadyWatch:
    """A watch on PreprovisioningImages that records when each first becomes Ready."""

    emulator: Emulator
    ready_at: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        listing = self.emulator.request("GET", f"{API_PREFIX}/preprovisioningimages?limit=1")
        self._version = listing["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, daemon=True, name="ready-watch")
        self._thread.start()

    def _run(self) -> None:
        parsed = urllib.parse.urlsplit(self.emulator.url)
        while not self._stop.is_set():
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
            path = (f"{API_PREFIX}/preprovisioningimages?watch=true&allowWatchBookmarks=true"
                    f"&timeoutSeconds=600&resourceVersion={self._version}")  # fmt: skip
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                for line in response:
                    if self._stop.is_set():
                        return
                    self._on_event(json.loads(line))
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                time.sleep(0.2)
            finally:
                connection.close()

    def _on_event(self, event: dict) -> None:
        obj = event.get("object") or {}
        metadata = obj.get("metadata") or {}
        self._version = metadata.get("resourceVersion") or self._version
        if event.get("type") not in ("ADDED", "MODIFIED"):
            return
        status = obj.get("status") or {}
        conditions = {entry.get("type"): entry for entry in status.get("conditions") or []}
        ready = conditions.get("Ready") or {}
        error = conditions.get("Error") or {}
        name = f"{metadata.get('namespace')}/{metadata.get('name')}"
        if (
            ready.get("status") == "True"
            and ready.get("observedGeneration") == metadata.get("generation")
            and status.get("imageUrl")
        ):
            self.ready_at.setdefault(name, time.monotonic())
        if error.get("status") == "True":
            self.errors[name] = f"{error.get('reason')}: {error.get('message')}"

    def stop(self) -> None:
        self._stop.set()


class Farm:
    """Processes of one benchmark run against one Redis database and one emulator."""

    def __init__(self, workdir: Path, *, redis_db: int, history_limit: int = 200_000) -> None:
        self.workdir = workdir
        self.processes = common.Processes()
        self.broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
        self.redis = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
        self.redis.flushdb()
        self.store = workdir / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.emulator = Emulator(self.processes, workdir, history_limit=history_limit)
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.emulator.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "emulator", "namespace": "default"}}],
            "current-context": "emulator",
        }))  # fmt: skip
        self.catalog: Path | None = None
        self.public_url = "http://127.0.0.1:8080"

    def service_options(self) -> list[str]:
        assert self.catalog is not None
        return ["--broker", self.broker_url, "--store", str(self.store), "--config",
                str(self.catalog), "--public-url", self.public_url]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}

    def start_watcher(self, label: str = "watcher") -> tuple[subprocess.Popen, Path]:
        log_path = self.workdir / f"{label}.log"
        process = self.processes.start(
            label,
            [common.PYTHON, "-c", WATCHER_LAUNCHER, "watcher", *self.service_options(),
             "--kubeconfig", str(self.kubeconfig), "--lease-namespace", "default"],
            log_path=log_path, env=self.environment(),
        )  # fmt: skip
        return process, log_path

    def start_worker(self, label: str, *, concurrency: int) -> tuple[subprocess.Popen, Path]:
        log_path = self.workdir / f"{label}.log"
        process = self.processes.start(
            label,
            [common.PPIMAGE, "worker", *self.service_options(), "--concurrency",
             str(concurrency), "--loglevel", "INFO"],
            log_path=log_path, env=self.environment(),
        )  # fmt: skip
        common.wait_for(
            lambda: " ready." in log_path.read_text(errors="replace") or process.poll() is not None,
            timeout=60, what=f"{label} to start",
        )  # fmt: skip
        if process.poll() is not None:
            raise RuntimeError(f"{label} exited; see {log_path}")
        return process, log_path

    def start_server(self, port: int) -> subprocess.Popen:
        self.public_url = f"http://127.0.0.1:{port}"
        return self.processes.start(
            "ppimage serve",
            [common.PPIMAGE, "serve", *self.service_options(), "--listen", f"127.0.0.1:{port}"],
            log_path=self.workdir / "serve.log",
        )  # fmt: skip

    def queue_length(self) -> int:
        return int(self.redis.llen(QUEUE_KEY))

    def unacked(self) -> int:
        return int(self.redis.hlen(UNACKED_KEY))

    def close(self) -> None:
        self.processes.stop_all()
        try:
            self.redis.flushdb()
        finally:
            self.redis.close()


def wait_for_log(path: Path, pattern: str, *, timeout: float, process: subprocess.Popen) -> float:
    """Wait until a line of ``path`` matches ``pattern``; return the time it was seen."""
    compiled = re.compile(pattern)

    def seen() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited; see {path}")
        return bool(compiled.search(path.read_text(errors="replace")))

    common.wait_for(seen, timeout=timeout, interval=0.02, what=f"{pattern!r} in {path.name}")
    return time.monotonic()


def write_objects(path: Path, pairs: list[tuple[dict, dict]]) -> Path:
    """Write Secrets first, then PreprovisioningImages, as the emulator's create command reads."""
    objects = [["secrets", secret] for _, secret in pairs]
    objects += [["preprovisioningimages", image] for image, _ in pairs]
    path.write_text(json.dumps(objects))
    return path
