"""End-to-end tests of the whole farm: watcher, workers, image server and Flower as subprocesses.

Each test starts the Kubernetes API emulator in this process and runs ``ppimage watcher``,
``ppimage worker`` (prefork), ``ppimage serve`` and, where needed, ``ppimage flower`` as real
subprocesses on 127.0.0.1. They share one payload store, one catalog (a mastered ISO with an
embed area, the busybox initramfs and Debian's installer kernel) and Redis database 11, which
is flushed around each test. The objects come from ``examples/``. Images fetched from the
image server are compared with what the offline ``ppimage build`` command writes for the same
objects. Every process is stopped, and its process group killed, when the test ends.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml

from builder import contract, images
from builder.status import condition

if __package__:
    from . import kube_fixtures
    from .kube_emulator import ApiError
else:
    import kube_fixtures
    from kube_emulator import ApiError

kube_api = kube_fixtures.kube_api

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLES = REPOSITORY / "examples"
PPIMAGE = Path(sys.executable).with_name("ppimage")
REDIS_DB = 11
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
QUEUE = "build.x86_64"
NAMESPACE = "metal3"
PPI = "preprovisioningimages"
STATUS_PATH = f"/apis/metal3.io/v1alpha1/namespaces/{NAMESPACE}/{PPI}/{{name}}/status"
START_TIMEOUT = 40.0
BUILD_TIMEOUT = 40.0
# Metadata the API server assigns, which a create request must not carry.
SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")


# Processes.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], object], *, timeout: float, description: str) -> object:
    """Poll ``predicate`` until it returns a true value and return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.05)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@dataclass
class Service:
    """One ``ppimage`` subprocess in its own session, logging to a file."""

    role: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def wait_started(self, ready: Callable[[], bool], *, description: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_text()[-3000:]
                self.stop()
                pytest.fail(f"{self.role} did not start ({description}):\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Send SIGTERM, wait, then kill whatever is left of the process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()

    def kill_group(self) -> None:
        # The process is a session leader, so its group id is its pid; pool children stay in
        # that group even when their parent is gone.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Farm:
    """The emulator, Redis database and the ``ppimage`` services of one test."""

    kube: kube_fixtures.KubeApi
    redis: redis.Redis
    catalog_path: Path
    directory: Path
    server_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = self.directory / "store"
        self.store.mkdir(parents=True, exist_ok=True)

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    # Starting and stopping services.

    def _spawn(self, role: str, arguments: list[str], *, extra_env=None) -> Service:
        log_path = self.directory / f"{role}-{len(self.services)}.log"
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PPIMAGE_") and key != "FLOWER_UNAUTHENTICATED_API"
        }
        environment.update(KUBECONFIG=str(self.kube.kubeconfig_path), **(extra_env or {}))
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [str(PPIMAGE), "-vv", *arguments], cwd=self.directory, env=environment,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        service = Service(role=role, process=process, log_path=log_path)
        self.services.append(service)
        return service

    def _service_options(self) -> list[str]:
        return [
            "--broker", BROKER_URL, "--store", str(self.store), "--public-url", self.public_url,
            "--config", str(self.catalog_path),
        ]  # fmt: skip

    def spawn_watcher(self) -> Service:
        return self._spawn(
            "watcher",
            ["watcher", *self._service_options(), "--kubeconfig", str(self.kube.kubeconfig_path)],
        )

    def spawn_worker(self, *, build_delay: float | None = None, options=()) -> Service:
        extra_env = {"PPIMAGE_TEST_BUILD_DELAY": str(build_delay)} if build_delay else None
        arguments = [
            "worker", *self._service_options(), "--concurrency", "1", "--loglevel", "DEBUG",
            *options,
        ]  # fmt: skip
        return self._spawn("worker", arguments, extra_env=extra_env)

    def spawn_server(self) -> Service:
        listen = f"127.0.0.1:{self.server_port}"
        return self._spawn("server", ["serve", *self._service_options(), "--listen", listen])

    def start(
        self,
        *,
        watcher: bool = True,
        workers: int = 1,
        server: bool = True,
        build_delay: float | None = None,
        worker_options=(),
    ) -> None:
        """Start the services side by side, then wait until each one is ready."""
        started: list[tuple[str, Service]] = []
        if watcher:
            started.append(("watcher", self.spawn_watcher()))
        for _ in range(workers):
            worker = self.spawn_worker(build_delay=build_delay, options=worker_options)
            started.append(("worker", worker))
        if server:
            started.append(("server", self.spawn_server()))
        for role, service in started:
            self.wait_ready(role, service)

    def wait_ready(self, role: str, service: Service) -> None:
        if role == "watcher":
            service.wait_started(
                lambda: "initial lists stored" in service.log_text(), description="initial lists"
            )
        elif role == "worker":
            service.wait_started(
                lambda: " ready." in service.log_text(), description="celery ready"
            )
        elif role == "server":
            service.wait_started(
                lambda: http_status(f"{self.public_url}/healthz") == 200, description="/healthz"
            )

    def start_flower(self) -> tuple[Service, str]:
        port = free_port()
        service = self._spawn(
            "flower",
            ["flower", "--broker", BROKER_URL, "--port", str(port), "--unauthenticated-api"],
        )
        url = f"http://127.0.0.1:{port}"
        service.wait_started(lambda: http_status(f"{url}/api/workers") == 200, description="API")
        return service, url

    def role(self, role: str) -> list[Service]:
        return [service for service in self.services if service.role == role]

    def stop_all(self) -> None:
        """Send SIGTERM to every service at once, then stop each one."""
        for service in self.services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in self.services:
            service.stop()

    # Objects in the emulator.

    def create(self, resource: str, body: dict) -> dict:
        return self.kube.create(resource, creatable(body), namespace=NAMESPACE)

    def create_example(self, name: str) -> tuple[dict, dict]:
        secret, image = example(name)
        return self.create("secrets", secret), self.create(PPI, image)

    def image(self, name: str) -> dict:
        return self.kube.get(PPI, name, namespace=NAMESPACE)

    def secret(self, name: str) -> dict | None:
        try:
            return self.kube.get("secrets", name, namespace=NAMESPACE)
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def secret_of(self, image: dict) -> dict | None:
        return self.secret(image["spec"]["networkDataName"])

    def request_mark(self) -> int:
        return len(self.kube.emulator.request_log())

    def status_writes(self, name: str, *, since: int = 0) -> list[dict]:
        """Return the status patches the API accepted for ``name`` since a request_mark."""
        path = STATUS_PATH.format(name=name)
        return [
            record.body["status"]
            for record in self.kube.emulator.request_log()[since:]
            if record.method == "PATCH" and record.path == path and record.status == 200
        ]

    # Waiting for the farm.

    def wait_usable(self, name: str, *, timeout: float = BUILD_TIMEOUT) -> dict:
        """Wait until the status passes every check of the BareMetalHost controller."""

        def usable() -> dict | None:
            image = self.image(name)
            return image if usable_problems(image, self.secret_of(image)) == [] else None

        def describe() -> str:
            image = self.image(name)
            problems = usable_problems(image, self.secret_of(image))
            return f"{name} to be usable; last problems {problems}, status {image.get('status')}"

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            image = usable()
            if image is not None:
                return image
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout} s waiting for {describe()}")

    def wait_error(self, name: str, reason: str, *, timeout: float = BUILD_TIMEOUT) -> dict:
        def reported() -> dict | None:
            image = self.image(name)
            error = condition(image.get("status") or {}, "Error") or {}
            generation = image["metadata"]["generation"]
            if error.get("reason") == reason and error.get("observedGeneration") == generation:
                return image
            return None

        return wait_for(reported, timeout=timeout, description=f"{name} to report {reason}")

    def wait_quiet(self, uid: str, *, timeout: float = BUILD_TIMEOUT) -> None:
        """Wait until nothing is queued, waiting, building or desired beyond the built token."""

        def quiet() -> bool:
            desired = self.redis.get(contract.desired_key(uid))
            return (
                self.redis.llen(QUEUE) == 0
                and not self.redis.exists(contract.waiting_key(uid))
                and not self.redis.exists(contract.lease_key(uid))
                and desired is not None
                and desired == self.redis.get(contract.built_key(uid))
            )

        description = f"uid {uid} to have no build queued or running"
        wait_for(quiet, timeout=timeout, description=description)

    def published_records(self, name: str) -> list[Path]:
        return sorted((self.store / "images" / NAMESPACE / name).glob("*/*.json"))


def usable_problems(image: dict, secret: dict | None) -> list[str]:
    """Return the checks of the BareMetalHost controller that ``image``'s status fails."""
    status = image.get("status") or {}
    spec = image["spec"]
    generation = image["metadata"]["generation"]
    ready = condition(status, "Ready") or {}
    error = condition(status, "Error") or {}
    network_data = status.get("networkData") or {}
    live_version = (secret or {}).get("metadata", {}).get("resourceVersion")
    checks = {
        "architecture": status.get("architecture") == spec["architecture"],
        "format": status.get("format") in spec["acceptFormats"],
        "networkData.name": network_data.get("name") == spec["networkDataName"],
        "networkData.version": secret is not None and network_data.get("version") == live_version,
        "Error": error.get("status") == "False",
        "Ready": ready.get("status") == "True",
        "Ready.observedGeneration": ready.get("observedGeneration") == generation,
        "imageUrl": bool(status.get("imageUrl")),
        "kernelUrl": status.get("format") != "initrd" or bool(status.get("kernelUrl")),
    }
    return [name for name, passed in checks.items() if not passed]


def assert_usable(image: dict, secret: dict) -> None:
    """Assert, one condition at a time, what the BareMetalHost controller checks."""
    status = image["status"]
    spec = image["spec"]
    generation = image["metadata"]["generation"]
    ready = condition(status, "Ready")
    error = condition(status, "Error")
    assert status["architecture"] == spec["architecture"]
    assert status["format"] in spec["acceptFormats"]
    assert status["networkData"]["name"] == spec["networkDataName"]
    assert status["networkData"]["version"] == secret["metadata"]["resourceVersion"]
    assert error["status"] == "False"
    assert error["observedGeneration"] == generation
    assert ready["status"] == "True"
    assert ready["reason"] == "ImageSuccess"
    assert ready["observedGeneration"] == generation
    assert status["imageUrl"]
    if status["format"] == "initrd":
        assert status["kernelUrl"]


# Objects and expected images.


def example(name: str) -> tuple[dict, dict]:
    """Return the Secret and the PreprovisioningImage of ``examples/NAME-*.yaml``."""
    (path,) = EXAMPLES.glob(f"{name}-*.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))
    secret = next(document for document in documents if document["kind"] == "Secret")
    image = next(document for document in documents if document["kind"] != "Secret")
    return secret, image


def creatable(body: dict) -> dict:
    """Return ``body`` without the status and the metadata the API server assigns."""
    body = copy.deepcopy(body)
    body.pop("status", None)
    for key in SERVER_FIELDS:
        body["metadata"].pop(key, None)
    return body


def secret_value(secret: dict) -> tuple[str, str]:
    """Return the (only) key of a Secret's data and its decoded value."""
    ((key, value),) = secret["data"].items()
    return key, base64.b64decode(value).decode()


def data_patch(key: str, value: str) -> dict:
    return {"data": {key: base64.b64encode(value.encode()).decode()}}


@dataclass
class Expected:
    """The image ``ppimage build`` wrote for the live objects."""

    data: bytes
    status: dict

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def build_offline(farm: Farm, name: str) -> Expected:
    """Run the offline ``ppimage build`` on the live objects, with the farm's catalog."""
    image = farm.image(name)
    secret = farm.secret_of(image)
    directory = farm.directory / f"offline-{time.monotonic_ns()}"
    directory.mkdir()
    manifest = directory / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all([secret, image]))
    result = subprocess.run(
        [str(PPIMAGE), "build", str(manifest), "--out", str(directory / "out"),
         "--config", str(farm.catalog_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (item,) = yaml.safe_load(result.stdout)["items"]
    written = directory / "out" / NAMESPACE / f"{name}.{item['status']['format']}"
    return Expected(data=written.read_bytes(), status=item["status"])


def fetch(url: str, *, byte_range: str | None = None, method: str = "GET"):
    """Return (HTTP status, headers, body) of one request to the image server."""
    headers = {"Range": f"bytes={byte_range}"} if byte_range else {}
    request = urllib.request.Request(url, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers, response.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload_bounds(farm: Farm, image_url: str) -> tuple[int, int]:
    """Return the byte offsets where the payload starts and ends inside the served image."""
    _, name, uid, file_name = image_url.split("/images/", 1)[1].split("/")
    image_id, image_format = file_name.split(".")
    payload = farm.store / "images" / NAMESPACE / name / uid / f"{image_id}.cpio.gz"
    bases = yaml.safe_load(farm.catalog_path.read_text())["architectures"]["x86_64"]
    if image_format == "iso":
        start = images.find_embed_area(Path(bases["iso"])).offset
    else:
        base_size = Path(bases["initrd"]).stat().st_size
        start = base_size + (-base_size % 4)
    return start, start + payload.stat().st_size


# Fixtures.


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis server listens on 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def catalog_path(tmp_path_factory, base_iso: Path, busybox_initramfs: Path, kernel: Path) -> Path:
    """A catalog with the mastered ISO, the busybox initramfs and the installer kernel."""
    catalog = tmp_path_factory.mktemp("farm-catalog") / "catalog.yaml"
    entry = {"iso": str(base_iso), "initrd": str(busybox_initramfs), "kernel": str(kernel)}
    catalog.write_text(yaml.safe_dump({"architectures": {"x86_64": entry}}))
    return catalog


@pytest.fixture
def farm(tmp_path, kube_api, redis_db, catalog_path) -> Iterator[Farm]:
    farm = Farm(kube=kube_api, redis=redis_db, catalog_path=catalog_path, directory=tmp_path)
    try:
        yield farm
    finally:
        farm.stop_all()


# Published images.


@pytest.mark.parametrize("name", ["worker-0", "worker-1"])
def test_farm_publishes_image_equal_to_offline_build(farm, name):
    farm.start()
    farm.create_example(name)
    image = farm.wait_usable(name)
    secret = farm.secret_of(image)
    image_url = image["status"]["imageUrl"]
    expected = build_offline(farm, name)
    start, end = payload_bounds(farm, image_url)
    size = len(expected.data)
    ranges = {
        "first bytes": (0, 99),
        "across payload start": (start - 700, start + 300),
        "inside payload": (start + 10, end - 10),
        "across payload end": (end - 50, end + 4000),
        "whole payload": (start, end - 1),
        "last byte": (size - 1, size - 1),
    }

    status_code, headers, body = fetch(image_url)
    _, head_headers, head_body = fetch(image_url, method="HEAD")
    partial = {label: fetch(image_url, byte_range=f"{low}-{high}") for label, (low, high) in
               ranges.items()}  # fmt: skip
    _, suffix_headers, suffix = fetch(image_url, byte_range="-3000")
    _, open_headers, open_ended = fetch(image_url, byte_range=f"{start - 5}-")

    assert_usable(image, secret)
    assert image_url.startswith(f"{farm.public_url}/images/{NAMESPACE}/{name}/")
    assert image["status"]["format"] == image["spec"]["acceptFormats"][0]
    assert condition(image["status"], "Ready")["message"] == "Generated image"
    assert status_code == 200
    assert sha256(body) == expected.sha256
    assert int(headers["Content-Length"]) == size
    assert int(head_headers["Content-Length"]) == size
    assert head_body == b""
    assert expected.status["format"] == image["status"]["format"]
    assert start < end <= size
    for label, (low, high) in ranges.items():
        code, range_headers, data = partial[label]
        last = min(high, size - 1)  # a range past the end is clipped to the image
        assert code == 206, label
        assert range_headers["Content-Range"] == f"bytes {low}-{last}/{size}", label
        assert data == expected.data[low : high + 1], label
    assert suffix_headers["Content-Range"] == f"bytes {size - 3000}-{size - 1}/{size}"
    assert suffix == expected.data[-3000:]
    assert open_headers["Content-Range"] == f"bytes {start - 5}-{size - 1}/{size}"
    assert sha256(open_ended) == sha256(expected.data[start - 5 :])


def test_farm_initrd_kernel_url_serves_kernel(farm, kernel):
    farm.start()
    farm.create_example("worker-1")

    image = farm.wait_usable("worker-1")

    status_code, _, body = fetch(image["status"]["kernelUrl"])
    assert image["status"]["format"] == "initrd"
    assert image["status"]["kernelUrl"] == f"{farm.public_url}/bases/x86_64/kernel"
    assert status_code == 200
    assert sha256(body) == sha256(kernel.read_bytes())


# Changes to the Secret and the spec.


def test_farm_secret_content_change_publishes_new_url(farm):
    farm.start()
    secret, _ = farm.create_example("worker-0")
    first = farm.wait_usable("worker-0")["status"]
    key, value = secret_value(secret)
    mark = farm.request_mark()

    changed = value.replace("192.0.2.21", "192.0.2.31")
    farm.kube.patch("secrets", "worker-0-network", data_patch(key, changed), namespace=NAMESPACE)
    image = farm.wait_usable("worker-0")

    live_secret = farm.secret("worker-0-network")
    status = image["status"]
    writes = farm.status_writes("worker-0", since=mark)
    first_ready = condition(writes[0], "Ready")
    assert_usable(image, live_secret)
    assert status["imageUrl"] != first["imageUrl"]
    assert status["networkData"]["version"] == live_secret["metadata"]["resourceVersion"]
    assert status["networkData"]["version"] != first["networkData"]["version"]
    assert len(writes) == 2
    assert first_ready["status"] == "False"
    assert first_ready["message"] == "Config changed"
    assert condition(writes[1], "Ready")["status"] == "True"
    assert sha256(fetch(status["imageUrl"])[2]) == build_offline(farm, "worker-0").sha256


def test_farm_secret_metadata_change_moves_only_version(farm):
    farm.start()
    farm.create_example("worker-1")
    first = farm.wait_usable("worker-1")["status"]
    records = farm.published_records("worker-1")
    mark = farm.request_mark()

    farm.kube.patch(
        "secrets", "worker-1-network",
        {"metadata": {"annotations": {"example.com/owner": "lab-east"}, "labels": {"rack": "r7"}}},
        namespace=NAMESPACE,
    )  # fmt: skip
    image = farm.wait_usable("worker-1")

    live_secret = farm.secret("worker-1-network")
    status = image["status"]
    writes = farm.status_writes("worker-1", since=mark)
    assert_usable(image, live_secret)
    assert status["imageUrl"] == first["imageUrl"]
    assert status["kernelUrl"] == first["kernelUrl"]
    assert status["networkData"]["version"] == live_secret["metadata"]["resourceVersion"]
    assert status["networkData"]["version"] != first["networkData"]["version"]
    assert len(writes) == 1
    assert condition(writes[0], "Ready")["status"] == "True"
    assert farm.published_records("worker-1") == records


def test_farm_secret_recreated_reports_missing_then_ready(farm):
    farm.start()
    secret, _ = farm.create_example("worker-0")
    first = farm.wait_usable("worker-0")["status"]

    farm.kube.delete("secrets", "worker-0-network", namespace=NAMESPACE)
    missing = farm.wait_error("worker-0", "MissingNetworkData")["status"]
    farm.create("secrets", secret)
    image = farm.wait_usable("worker-0")

    live_secret = farm.secret("worker-0-network")
    assert condition(missing, "Error")["status"] == "True"
    assert condition(missing, "Error")["message"] == "NetworkData secret not found"
    assert condition(missing, "Ready")["status"] == "False"
    assert missing.get("imageUrl") is None
    assert_usable(image, live_secret)
    assert image["status"]["networkData"]["version"] == live_secret["metadata"]["resourceVersion"]
    # Same inputs, same image: the URL is a digest of the payload and the base.
    assert image["status"]["imageUrl"] == first["imageUrl"]


@pytest.mark.parametrize(
    ("spec_change", "expected_format"),
    [({"acceptFormats": ["initrd"]}, "initrd"), ({"architecture": "amd64"}, "iso")],
    ids=["acceptFormats", "architecture-alias"],
)
def test_farm_spec_change_writes_config_changed_first(farm, spec_change, expected_format):
    farm.start()
    farm.create_example("worker-0")
    farm.wait_usable("worker-0")
    mark = farm.request_mark()

    farm.kube.patch(PPI, "worker-0", {"spec": spec_change}, namespace=NAMESPACE)
    image = farm.wait_usable("worker-0")

    writes = farm.status_writes("worker-0", since=mark)
    first_ready = condition(writes[0], "Ready")
    last_ready = condition(writes[-1], "Ready")
    assert image["metadata"]["generation"] == 2
    assert_usable(image, farm.secret("worker-0-network"))
    assert image["status"]["format"] == expected_format
    assert image["status"]["architecture"] == image["spec"]["architecture"]
    assert len(writes) == 2
    assert first_ready["status"] == "False"
    assert first_ready["reason"] == "ImageSuccess"
    assert first_ready["message"] == "Config changed"
    assert last_ready["status"] == "True"
    assert last_ready["observedGeneration"] == 2


# Coalescing.


# Spec variants cycled through by the rapid spec changes. The last change applies SPEC_VARIANTS[1].
SPEC_VARIANTS = (
    {"acceptFormats": ["iso"], "architecture": "x86_64"},
    {"acceptFormats": ["initrd", "iso"], "architecture": "amd64"},
    {"acceptFormats": ["initrd"], "architecture": "x86_64"},
    {"acceptFormats": ["iso", "initrd"], "architecture": "amd64"},
)


def planned_builds(farm: Farm, name: str) -> int:
    """Count the builds the workers started for ``name``: each plans its image once."""
    line = f"{NAMESPACE}/{name}: planned "
    return sum(worker.log_text().count(line) for worker in farm.role("worker"))


def delivered_messages(farm: Farm) -> int:
    """Count the build messages the workers received, as Celery logs them."""
    pattern = re.compile(r"Task ppimage\.build\[[0-9a-f-]+\] received")
    return sum(len(pattern.findall(worker.log_text())) for worker in farm.role("worker"))


@pytest.mark.slow
@pytest.mark.parametrize("changed", ["secret", "spec"])
def test_farm_rapid_changes_coalesce(farm, changed):
    # Builds take 2 s, and the changes arrive over about 1 s, so workers run and drop builds
    # while changes still arrive.
    farm.start(workers=3, build_delay=2)
    secret, _ = farm.create_example("worker-0")
    farm.wait_usable("worker-0")
    uid = farm.image("worker-0")["metadata"]["uid"]
    farm.wait_quiet(uid)
    builds_before = planned_builds(farm, "worker-0")
    messages_before = delivered_messages(farm)
    key, value = secret_value(secret)
    mark = farm.request_mark()

    for change in range(50):
        if changed == "secret":
            address = value.replace("192.0.2.21", f"192.0.2.{100 + change}")
            patch = data_patch(key, address)
            farm.kube.patch("secrets", "worker-0-network", patch, namespace=NAMESPACE)
        else:
            spec = SPEC_VARIANTS[change % len(SPEC_VARIANTS)]
            farm.kube.patch(PPI, "worker-0", {"spec": spec}, namespace=NAMESPACE)
        time.sleep(0.02)
    image = farm.wait_usable("worker-0", timeout=60)
    farm.wait_quiet(uid, timeout=60)

    builds = planned_builds(farm, "worker-0") - builds_before
    messages = delivered_messages(farm) - messages_before
    ready_writes = [
        write
        for write in farm.status_writes("worker-0", since=mark)
        if condition(write, "Ready")["message"] == "Generated image"
    ]
    image = farm.image("worker-0")
    live_secret = farm.secret("worker-0-network")
    assert_usable(image, live_secret)
    if changed == "secret":
        assert "192.0.2.149" in secret_value(live_secret)[1]
    else:
        assert image["metadata"]["generation"] == 51
        assert image["spec"] == {**image["spec"], **SPEC_VARIANTS[1]}
        assert image["status"]["format"] == "initrd"
        assert image["status"]["architecture"] == "amd64"
    assert 1 <= builds <= 3
    assert len(ready_writes) <= builds
    # While a build runs, changes must not each send a message that a free worker drops.
    assert messages <= 10
    assert sha256(fetch(image["status"]["imageUrl"])[2]) == build_offline(farm, "worker-0").sha256


# Killed workers.


def lease_taken(farm: Farm, uid: str) -> bool:
    return farm.redis.get(contract.lease_key(uid)) is not None


@pytest.mark.slow
def test_farm_killed_pool_child_rebuilds_at_once(farm):
    # The visibility timeout (30 s) is far longer than the rebuild may take.
    options = ("--soft-time-limit", "8", "--time-limit", "10", "--visibility-timeout", "30")
    farm.start(workers=1, build_delay=3, worker_options=options)
    farm.create_example("worker-0")
    uid = farm.image("worker-0")["metadata"]["uid"]
    (worker,) = farm.role("worker")

    wait_for(lambda: lease_taken(farm, uid), timeout=BUILD_TIMEOUT, description="a build to start")
    children = worker.pool_children()
    os.kill(children[0], signal.SIGKILL)
    killed_at = time.monotonic()
    image = farm.wait_usable("worker-0")
    elapsed = time.monotonic() - killed_at

    log_text = worker.log_text()
    token = farm.redis.get(contract.built_key(uid)).decode()
    assert len(children) == 1
    assert "WorkerLostError" in log_text or "signal 9" in log_text
    assert elapsed < 3 + 10
    assert_usable(image, farm.secret("worker-0-network"))
    assert farm.redis.get(contract.redeliveries_key(uid, token)) is None
    assert sha256(fetch(image["status"]["imageUrl"])[2]) == build_offline(farm, "worker-0").sha256


@pytest.mark.slow
def test_farm_killed_worker_redelivers_after_visibility_timeout(farm):
    visibility_timeout = 5
    options = (
        "--soft-time-limit", "3", "--time-limit", "4",
        "--visibility-timeout", str(visibility_timeout),
    )  # fmt: skip
    farm.start(workers=2, build_delay=2, worker_options=options)
    farm.create_example("worker-1")
    uid = farm.image("worker-1")["metadata"]["uid"]

    wait_for(lambda: lease_taken(farm, uid), timeout=BUILD_TIMEOUT, description="a build to start")
    delivered_at = time.monotonic()
    (busy,) = [worker for worker in farm.role("worker") if "received" in worker.log_text()]
    (idle,) = [worker for worker in farm.role("worker") if worker is not busy]
    busy.kill_group()
    redelivered_at = wait_for(
        lambda: "received" in idle.log_text() and time.monotonic(),
        timeout=BUILD_TIMEOUT, description="the other worker to receive the message again",
    )  # fmt: skip
    image = farm.wait_usable("worker-1")
    # Celery logs the task's end just after the task wrote the status.
    wait_for(lambda: "succeeded" in idle.log_text(), timeout=10, description="the task to succeed")

    assert busy.process.returncode == -signal.SIGKILL
    assert redelivered_at - delivered_at >= visibility_timeout - 1
    assert_usable(image, farm.secret("worker-1-network"))
    assert sha256(fetch(image["status"]["imageUrl"])[2]) == build_offline(farm, "worker-1").sha256


# Watcher restart.


def test_farm_watcher_restart_rebuilds_nothing(farm):
    farm.start()
    farm.create_example("worker-0")
    farm.create_example("worker-1")
    before = {name: farm.wait_usable(name) for name in ("worker-0", "worker-1")}
    for image in before.values():
        farm.wait_quiet(image["metadata"]["uid"])
    records = {name: farm.published_records(name) for name in before}
    (worker,) = farm.role("worker")
    worker_log_size = len(worker.log_text())
    (old_watcher,) = farm.role("watcher")

    old_watcher.stop()
    mark = farm.request_mark()
    watcher = farm.spawn_watcher()
    farm.wait_ready("watcher", watcher)
    for name in before:
        wait_for(
            lambda name=name: f"{NAMESPACE}/{name}: no build needed: up to date"
            in watcher.log_text(),
            timeout=BUILD_TIMEOUT, description=f"the new watcher to find {name} up to date",
        )  # fmt: skip

    watcher_log = watcher.log_text()
    assert old_watcher.process.returncode == 0
    assert "enqueued build" not in watcher_log
    assert farm.redis.llen(QUEUE) == 0
    assert "ppimage.build" not in worker.log_text()[worker_log_size:]
    for name, image in before.items():
        assert farm.status_writes(name, since=mark) == []
        assert farm.image(name)["status"] == image["status"]
        assert farm.published_records(name) == records[name]


# Secret values stay out of logs, the broker, results and Flower.


INVALID_SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {
        "name": "worker-9-network",
        "namespace": NAMESPACE,
        "labels": {"environment.metal3.io": "baremetal"},
    },
    "data": {
        "nmstate": base64.b64encode(
            b"interfaces:\n- name: canaryiface0123456789\n  type: ethernet\n  state: up\n"
            b"  mac-address: '52:54:00:cc:30:01'\n  ipv4:\n    enabled: true\n    dhcp: false\n"
            b"    address:\n    - ip: 203.0.113.99\n      prefix-length: 24\n"
        ).decode()
    },
}
INVALID_IMAGE = {
    "apiVersion": "metal3.io/v1alpha1",
    "kind": "PreprovisioningImage",
    "metadata": {"name": "worker-9", "namespace": NAMESPACE},
    "spec": {
        "architecture": "x86_64",
        "acceptFormats": ["iso"],
        "networkDataName": "worker-9-network",
    },
}
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6 = re.compile(r"\b[0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7}\b", re.IGNORECASE)
_MAC = re.compile(r"\b[0-9a-f]{2}(?::[0-9a-f]{2}){5}\b", re.IGNORECASE)
_BASE64 = re.compile(r"^[A-Za-z0-9+/]{16,}={0,2}$")
# Values taken from the Secrets that are neither addresses nor generic words.
SECRET_WORDS = (
    "eno1", "eno2", "bond0.120", "lab.example.com", "802.3ad", "layer3+4", "vlan130", "port0",
    "port1", "provisioning-v4", "provisioning-v6", "prov4", "prov6", "canaryiface0123456789",
)  # fmt: skip


def secret_markers(secrets: list[dict]) -> list[str]:
    """Return strings of 4 or more characters that only a Secret's value contains."""
    markers = set(SECRET_WORDS)
    for secret in secrets:
        for encoded in secret["data"].values():
            value = base64.b64decode(encoded).decode()
            addresses = [*_IPV4.findall(value), *_IPV6.findall(value), *_MAC.findall(value)]
            markers.update(address for address in addresses if address != "0.0.0.0")
            markers.update(address.upper() for address in _MAC.findall(value))
            markers.update(address.replace(":", "") for address in _MAC.findall(value))
            markers.update((encoded, encoded[:40], value[:40], value[-40:]))
    return sorted(marker for marker in markers if len(marker) >= 4)


def expanded_texts(text: str) -> list[str]:
    """Return ``text`` and every base64 string inside its JSON, decoded (message bodies)."""
    texts = [text]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            if _BASE64.match(node):
                try:
                    texts.extend(expanded_texts(base64.b64decode(node).decode()))
                except (ValueError, UnicodeDecodeError):
                    pass
            elif node[:1] in "[{":
                texts.extend(expanded_texts(node)[1:])

    try:
        walk(json.loads(text))
    except ValueError:
        pass
    return texts


def redis_dump(client: redis.Redis) -> dict[str, list[str]]:
    """Return every key of the database with its values as text, whatever the key's type."""
    dump: dict[str, list[str]] = {}
    for raw_key in client.scan_iter():
        kind = client.type(raw_key).decode()
        if kind == "string":
            values = [client.get(raw_key)]
        elif kind == "list":
            values = client.lrange(raw_key, 0, -1)
        elif kind == "hash":
            values = [item for pair in client.hgetall(raw_key).items() for item in pair]
        elif kind == "set":
            values = list(client.smembers(raw_key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(raw_key, 0, -1, withscores=True)]
        else:
            values = []
        dump[raw_key.decode(errors="replace")] = [
            value.decode("latin-1") for value in values if value is not None
        ]
    return dump


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode(errors="replace")


@pytest.mark.slow
def test_farm_outputs_hold_no_secret_values(farm):
    _, flower_url = farm.start_flower()
    farm.start(workers=0)
    secrets = [farm.create_example(name)[0] for name in ("worker-0", "worker-1")]
    secrets.append(farm.create("secrets", INVALID_SECRET))
    farm.create(PPI, INVALID_IMAGE)
    queued = wait_for(
        lambda: len(farm.redis.lrange(QUEUE, 0, -1)) == 3 and farm.redis.lrange(QUEUE, 0, -1),
        timeout=BUILD_TIMEOUT, description="three build messages in the queue",
    )  # fmt: skip
    workers = [farm.spawn_worker(build_delay=1) for _ in range(2)]
    wait_for(
        lambda: farm.redis.keys(f"{contract.KEY_PREFIX}lease:*"), timeout=START_TIMEOUT,
        description="a build to hold its lease",
    )  # fmt: skip
    during_builds = redis_dump(farm.redis)
    for worker in workers:
        farm.wait_ready("worker", worker)
    farm.wait_usable("worker-0")
    farm.wait_usable("worker-1")
    invalid = farm.wait_error("worker-9", "ImageBuildInvalid")

    def finished_tasks() -> dict | None:
        tasks = json.loads(get_text(f"{flower_url}/api/tasks"))
        done = {uid: task for uid, task in tasks.items() if task.get("state") == "SUCCESS"}
        return tasks if len(done) >= 3 else None

    tasks = wait_for(
        finished_tasks, timeout=BUILD_TIMEOUT, description="Flower to show three tasks"
    )
    flower_pages = [json.dumps(tasks), get_text(f"{flower_url}/tasks"),
                    get_text(f"{flower_url}/api/workers")]  # fmt: skip
    for task_id in tasks:
        flower_pages.append(get_text(f"{flower_url}/api/task/info/{task_id}"))
        flower_pages.append(get_text(f"{flower_url}/task/{task_id}"))
    at_end = redis_dump(farm.redis)
    farm.stop_all()

    sources = {f"log of {service.role} {index}": service.log_text()
               for index, service in enumerate(farm.services)}  # fmt: skip
    sources["queued messages"] = "\n".join(message.decode() for message in queued)
    for label, dump in (("Redis during builds", during_builds), ("Redis at end", at_end)):
        for key, values in dump.items():
            sources[f"{label}: key {key}"] = key
            for index, value in enumerate(values):
                sources[f"{label}: {key}[{index}]"] = value
    for index, page in enumerate(flower_pages):
        sources[f"Flower page {index}"] = page
    markers = secret_markers(secrets)
    results = {task.get("result") for task in tasks.values()}
    message = condition(invalid["status"], "Error")["message"]
    assert "canaryiface0123456789" in message
    assert results <= {"'ready'", "'error'", "'refreshed'", "'current'", "'stale'", "'busy'"}
    assert all(task["name"] == contract.TASK_NAME for task in tasks.values())
    assert len(markers) > 30
    assert any("ppimage.build" in text for text in sources.values())
    for label, text in sources.items():
        for expanded in expanded_texts(text):
            for marker in markers:
                assert marker not in expanded, f"{marker!r} found in {label}"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Return every sample of a Prometheus text exposition as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_farm_metrics_count_builds_and_enqueues(farm):
    watcher_port, worker_port = free_port(), free_port()
    farm.services.append(farm._spawn("watcher", [
        "watcher", *farm._service_options(), "--kubeconfig", str(farm.kube.kubeconfig_path),
        "--metrics-listen", f"127.0.0.1:{watcher_port}",
    ]))  # fmt: skip
    farm.wait_ready("watcher", farm.services[-1])
    farm.start(watcher=False, workers=1, server=True,
               worker_options=("--metrics-listen", f"127.0.0.1:{worker_port}"))  # fmt: skip
    farm.create_example("worker-0")
    farm.wait_usable("worker-0")

    worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
    success = frozenset({("result", "success"), ("reason", "ImageSuccess")})
    assert worker[("ppimage_builds_total", success)] == 1
    assert worker[("ppimage_build_duration_seconds_count", frozenset({("format", "iso")}))] == 1
    assert worker[("ppimage_worker_deliveries_total", frozenset({("outcome", "ready")}))] >= 1
    watcher = scrape(f"http://127.0.0.1:{watcher_port}/metrics")
    assert watcher[("ppimage_watcher_enqueues_total", frozenset({("result", "enqueued")}))] >= 1
    assert watcher[("ppimage_queue_length", frozenset({("queue", "build.x86_64")}))] == 0
    assert watcher[("ppimage_watcher_leader", frozenset())] == 1
    assert http_status(f"http://127.0.0.1:{worker_port}/healthz") == 200
    assert http_status(f"http://127.0.0.1:{watcher_port}/healthz") == 200
