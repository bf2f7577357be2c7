"""Tests of the build worker against a real Redis (db 13) and the Kubernetes API emulator.

Most tests call ``worker.tasks.run_build``, the body of the Celery task, in this process. The
tests that use ``start_worker`` run ``ppimage worker`` as a real prefork Celery worker in a
subprocess, so they can kill its pool child or the whole worker and read everything it logs.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from builder import contract, images
from builder.build import plan_image
from builder.catalog import Catalog, load_catalog
from builder.settings import service_settings
from builder.status import condition
from worker import tasks
from worker.app import QueueSettings

if __package__:
    from . import kube_fixtures
else:
    import kube_fixtures

kube_api = kube_fixtures.kube_api

REPOSITORY = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/13"
PUBLIC_URL = "http://127.0.0.1:8080"
PPI = "preprovisioningimages"
NAMESPACE = "metal3"
NAME = "host-0"
SECRET_NAME = "host-0-network"
MAC = "52:54:00:ab:cd:ef"
ADDRESS = "192.0.2.77"
SECRET_IFACE = "verysecretiface0x"
STATUS_PATH = f"/apis/metal3.io/v1alpha1/namespaces/{NAMESPACE}/{PPI}/{NAME}/status"


def network_data(address: str = ADDRESS) -> bytes:
    document = {
        "links": [{"id": "eth0", "type": "phy", "ethernet_mac_address": MAC}],
        "networks": [
            {
                "id": "n0",
                "type": "ipv4",
                "link": "eth0",
                "ip_address": address,
                "netmask": "255.255.255.0",
                "routes": [
                    {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "192.0.2.1"}
                ],
            }
        ],
        "services": [{"type": "dns", "address": "192.0.2.53"}],
    }
    return json.dumps(document).encode()


def encoded(value: bytes) -> str:
    return base64.b64encode(value).decode()


# Fixtures.


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    """A real ISO with a 256 KiB embed area, a gzip newc initramfs and a random kernel."""
    bases = tmp_path / "bases"
    tree = bases / "tree"
    (tree / "images").mkdir(parents=True)
    (tree / "images" / "ignition.img").write_bytes(bytes(256 * 1024))
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-o", str(bases / "base.iso"), "-V", "TEST", str(tree)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    root = bases / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc" / "hostname").write_text("base\n")
    listing = subprocess.run(
        ["find", "."], cwd=root, check=True, capture_output=True, timeout=30
    ).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc"], cwd=root, input=listing, check=True,
        capture_output=True, timeout=30,
    ).stdout  # fmt: skip
    (bases / "initrd.img").write_bytes(archive + b"\0")  # an odd size, so padding is needed
    (bases / "vmlinuz").write_bytes(os.urandom(3000))
    catalog = bases / "catalog.yaml"
    catalog.write_text(
        "architectures:\n  x86_64:\n    iso: base.iso\n    initrd: initrd.img\n"
        "    kernel: vmlinuz\n"
    )
    return catalog


@dataclass
class Env:
    """One test's Redis, emulator, catalog and in-process worker runtime."""

    redis: redis.Redis
    kube: kube_fixtures.KubeApi
    catalog: Catalog
    catalog_path: Path
    store: Path
    runtime: tasks.Runtime

    def create_image(self, *, accept_formats=("iso",), architecture="x86_64", secret=True):
        spec = {"architecture": architecture, "acceptFormats": list(accept_formats)}
        if secret:
            spec["networkDataName"] = SECRET_NAME
        body = {"metadata": {"name": NAME, "namespace": NAMESPACE}, "spec": spec}
        return self.kube.create(PPI, body, namespace=NAMESPACE)

    def create_secret(self, data: dict[str, bytes] | None = None) -> dict:
        values = data if data is not None else {"networkData": network_data()}
        body = {
            "metadata": {"name": SECRET_NAME, "namespace": NAMESPACE},
            "data": {key: encoded(value) for key, value in values.items()},
        }
        return self.kube.create("secrets", body, namespace=NAMESPACE)

    def image(self) -> dict:
        return self.kube.get(PPI, NAME, namespace=NAMESPACE)

    def secret(self) -> dict | None:
        try:
            return self.kube.get("secrets", SECRET_NAME, namespace=NAMESPACE)
        except Exception:  # noqa: BLE001 (the emulator raises its ApiError for 404)
            return None

    def desire(self) -> str:
        """Do the watcher's part: record the desired token of the live objects."""
        self.redis.set(contract.HMAC_KEY, os.urandom(32), nx=True)
        image = self.image()
        token = contract.live_token(
            image=image,
            secret=self.secret(),
            hmac_key=self.redis.get(contract.HMAC_KEY),
            catalog=self.catalog,
        )
        self.redis.set(contract.desired_key(image["metadata"]["uid"]), token)
        return token

    def build(self, token: str | None = None, *, delivery_id: str = "delivery-1") -> str:
        image = self.image()
        request = tasks.BuildRequest(
            namespace=NAMESPACE,
            name=NAME,
            uid=image["metadata"]["uid"],
            token=token or self.desire(),
        )
        return tasks.run_build(request, runtime=self.runtime, delivery_id=delivery_id)

    def status_writes(self) -> list[dict]:
        return [
            record.body
            for record in self.kube.emulator.request_log()
            if record.method == "PATCH" and record.path == STATUS_PATH
        ]


@pytest.fixture
def env(tmp_path, redis_db, kube_api, catalog_path) -> Iterator[Env]:
    settings = service_settings(
        broker_url=REDIS_URL,
        store=tmp_path / "store",
        public_url=PUBLIC_URL,
        config=catalog_path,
        iso=None,
        initrd=None,
        kernel=None,
        arch=None,
        profile=None,
    )
    runtime = tasks.Runtime(
        settings=settings,
        queues=QueueSettings(max_deliveries=3),
        kube_configuration=kube_api.configuration(),
    )
    tasks.configure(runtime)
    yield Env(
        redis=redis_db,
        kube=kube_api,
        catalog=load_catalog(catalog_path),
        catalog_path=catalog_path,
        store=tmp_path / "store",
        runtime=runtime,
    )
    if runtime._kube is not None:
        runtime._kube.close()
    tasks.configure(None)


def published_bytes(env: Env, image_url: str) -> bytes:
    """Rebuild the served image from the store record and the base, as an image server does."""
    path = image_url.removeprefix(PUBLIC_URL + "/images/")
    namespace, name, uid, file_name = path.split("/")
    image_id, image_format = file_name.split(".")
    record = tasks.PayloadStore(env.store).lookup(namespace, name, uid, image_id)
    assert record is not None
    base = env.catalog.lookup("x86_64")
    payload = record.payload_path.read_bytes()
    if image_format == "iso":
        area = images.find_embed_area(base.iso)
        layout = images.iso_layout(base.iso, area, payload)
    else:
        layout = images.initrd_layout(base.initrd, payload)
    return layout.read(0, layout.size)


# In-process builds.


def test_build_writes_ready_status(env):
    env.create_secret()
    env.create_image()

    outcome = env.build()

    image = env.image()
    status = image["status"]
    secret = env.secret()
    ready = condition(status, "Ready")
    error = condition(status, "Error")
    assert outcome == "ready"
    assert status["imageUrl"].startswith(f"{PUBLIC_URL}/images/{NAMESPACE}/{NAME}/")
    assert status["imageUrl"].endswith(".iso")
    assert status["format"] == "iso"
    assert status["architecture"] == "x86_64"
    assert status["networkData"] == {
        "name": SECRET_NAME,
        "version": secret["metadata"]["resourceVersion"],
    }
    assert ready["status"] == "True"
    assert ready["reason"] == "ImageSuccess"
    assert ready["observedGeneration"] == image["metadata"]["generation"]
    assert error["status"] == "False"
    assert error["observedGeneration"] == image["metadata"]["generation"]
    assert "kernelUrl" not in status
    assert env.redis.get(contract.built_key(image["metadata"]["uid"])).decode() == env.desire()


def test_build_initrd_reports_kernel_url(env):
    env.create_secret()
    env.create_image(accept_formats=("initrd", "iso"), architecture="amd64")

    outcome = env.build()

    status = env.image()["status"]
    assert outcome == "ready"
    assert status["format"] == "initrd"
    assert status["architecture"] == "amd64"
    assert status["kernelUrl"] == f"{PUBLIC_URL}/bases/x86_64/kernel"
    assert status["imageUrl"].endswith(".initrd")


@pytest.mark.parametrize("accept_formats", [("iso",), ("initrd",)])
def test_published_image_equals_materialized(env, tmp_path, accept_formats):
    env.create_secret()
    env.create_image(accept_formats=accept_formats)

    env.build()

    plan = plan_image(env.image(), env.secret(), env.catalog)
    expected = tmp_path / "expected.img"
    images.materialize(plan.layout, expected)
    assert published_bytes(env, env.image()["status"]["imageUrl"]) == expected.read_bytes()


def test_secret_content_change_builds_new_image(env):
    env.create_secret()
    env.create_image()
    env.build()
    first = env.image()["status"]

    env.kube.patch(
        "secrets", SECRET_NAME, {"data": {"networkData": encoded(network_data("192.0.2.78"))}},
        namespace=NAMESPACE,
    )  # fmt: skip
    env.kube.emulator.clear_request_log()
    outcome = env.build()

    second = env.image()["status"]
    writes = env.status_writes()
    assert outcome == "ready"
    assert second["imageUrl"] != first["imageUrl"]
    assert second["networkData"]["version"] == env.secret()["metadata"]["resourceVersion"]
    assert second["networkData"]["version"] != first["networkData"]["version"]
    assert len(writes) == 2
    assert condition(writes[0]["status"], "Ready")["message"] == "Config changed"
    assert condition(writes[1]["status"], "Ready")["status"] == "True"


def test_secret_metadata_change_moves_only_version(env):
    env.create_secret()
    env.create_image()
    env.build()
    first = env.image()["status"]
    payloads = sorted(env.store.rglob("*.cpio.gz"))

    env.kube.patch(
        "secrets", SECRET_NAME, {"metadata": {"labels": {"environment.metal3.io": "baremetal"}}},
        namespace=NAMESPACE,
    )  # fmt: skip
    env.kube.emulator.clear_request_log()
    outcome = env.build()

    second = env.image()["status"]
    writes = env.status_writes()
    assert outcome == "refreshed"
    assert second["imageUrl"] == first["imageUrl"]
    assert second["networkData"]["version"] == env.secret()["metadata"]["resourceVersion"]
    assert second["networkData"]["version"] != first["networkData"]["version"]
    assert len(writes) == 1
    assert condition(second, "Ready")["status"] == "True"
    assert sorted(env.store.rglob("*.cpio.gz")) == payloads


def test_current_status_is_not_written_again(env):
    env.create_secret()
    env.create_image()
    env.build()
    env.kube.emulator.clear_request_log()

    outcome = env.build()

    assert outcome == "current"
    assert env.status_writes() == []


def test_missing_secret_reports_and_schedules_retry(env):
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    member = contract.retry_member(namespace=NAMESPACE, name=NAME, uid=uid)

    before = time.time()
    outcome = env.build()
    first_due = env.redis.zscore(contract.RETRY_SCHEDULE, member)
    before_second = time.time()
    env.build()
    second_due = env.redis.zscore(contract.RETRY_SCHEDULE, member)

    status = env.image()["status"]
    error = condition(status, "Error")
    assert outcome == "error"
    assert error["status"] == "True"
    assert error["reason"] == "MissingNetworkData"
    assert error["message"] == "NetworkData secret not found"
    assert condition(status, "Ready")["status"] == "False"
    assert status.get("imageUrl") is None
    assert before + 10 <= first_due <= time.time() + 10
    assert before_second + 20 <= second_due <= time.time() + 20
    assert float(env.redis.get(contract.retry_delay_key(uid))) == 20.0
    assert env.redis.get(contract.built_key(uid)) is None


def test_missing_secret_then_created_builds(env):
    env.create_image()
    env.build()
    uid = env.image()["metadata"]["uid"]

    env.create_secret()
    outcome = env.build()

    member = contract.retry_member(namespace=NAMESPACE, name=NAME, uid=uid)
    assert outcome == "ready"
    assert condition(env.image()["status"], "Ready")["status"] == "True"
    assert env.redis.zscore(contract.RETRY_SCHEDULE, member) is None
    assert env.redis.get(contract.retry_delay_key(uid)) is None


def test_invalid_network_data_not_retried(env):
    env.create_secret({"other": b"x"})
    env.create_image()
    uid = env.image()["metadata"]["uid"]

    outcome = env.build()

    error = condition(env.image()["status"], "Error")
    member = contract.retry_member(namespace=NAMESPACE, name=NAME, uid=uid)
    assert outcome == "error"
    assert error["reason"] == "ImageBuildInvalid"
    assert error["message"].startswith("Cannot generate image")
    assert env.redis.zscore(contract.RETRY_SCHEDULE, member) is None
    assert env.redis.get(contract.built_key(uid)).decode() == env.desire()


def test_unsupported_architecture_is_configuration_error(env):
    env.create_secret()
    env.create_image(architecture="s390x")

    env.build()

    error = condition(env.image()["status"], "Error")
    assert error["reason"] == "ConfigurationError"
    assert error["message"] == "Architecture not supported"


def test_spec_change_writes_config_changed_first(env):
    env.create_secret()
    env.create_image()
    env.build()
    env.kube.patch(PPI, NAME, {"spec": {"acceptFormats": ["initrd"]}}, namespace=NAMESPACE)
    env.kube.emulator.clear_request_log()

    env.build()

    image = env.image()
    writes = env.status_writes()
    first_ready = condition(writes[0]["status"], "Ready")
    last_ready = condition(writes[-1]["status"], "Ready")
    assert len(writes) == 2
    assert first_ready["status"] == "False"
    assert first_ready["reason"] == "ImageSuccess"
    assert first_ready["message"] == "Config changed"
    assert first_ready["observedGeneration"] == 2
    assert last_ready["status"] == "True"
    assert last_ready["observedGeneration"] == image["metadata"]["generation"]
    assert image["metadata"]["generation"] == 2
    assert image["status"]["format"] == "initrd"


def test_stale_resource_version_is_retried(env, monkeypatch):
    env.create_secret()
    env.create_image()

    def touch_labels() -> None:
        # Changes the resourceVersion while the build runs, as another controller would.
        env.kube.patch(PPI, NAME, {"metadata": {"labels": {"a": "b"}}}, namespace=NAMESPACE)

    monkeypatch.setattr(tasks, "_test_delay", touch_labels)
    outcome = env.build()

    statuses = [
        record.status
        for record in env.kube.emulator.request_log()
        if record.method == "PATCH" and record.path == STATUS_PATH
    ]
    assert outcome == "ready"
    assert statuses == [409, 200]
    assert condition(env.image()["status"], "Ready")["status"] == "True"


def test_newer_desired_token_drops_result(env, monkeypatch):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]

    def newer_change() -> None:
        env.redis.set(contract.desired_key(uid), "f" * 32)

    monkeypatch.setattr(tasks, "_test_delay", newer_change)
    outcome = env.build()

    assert outcome == "stale"
    assert env.status_writes() == []
    assert env.redis.get(contract.built_key(uid)) is None


def test_live_token_ahead_of_desired_writes_nothing(env):
    env.create_secret()
    env.create_image()
    token = env.desire()
    uid = env.image()["metadata"]["uid"]
    env.kube.patch(
        "secrets", SECRET_NAME, {"data": {"networkData": encoded(network_data("192.0.2.99"))}},
        namespace=NAMESPACE,
    )  # fmt: skip

    outcome = env.build(token)

    member = contract.retry_member(namespace=NAMESPACE, name=NAME, uid=uid)
    assert outcome == "stale"
    assert env.status_writes() == []
    assert env.redis.zscore(contract.RETRY_SCHEDULE, member) is not None


def test_lease_held_by_other_worker_drops(env):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    env.redis.set(contract.lease_key(uid), "other-delivery", px=60_000)

    outcome = env.build()

    assert outcome == "busy"
    assert env.status_writes() == []


def test_lease_of_same_delivery_is_taken_over(env):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    env.redis.set(contract.lease_key(uid), "delivery-1", px=60_000)

    outcome = env.build(delivery_id="delivery-1")

    assert outcome == "ready"
    assert env.redis.get(contract.lease_key(uid)) is None


def test_too_many_deliveries_write_error(env):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    token = env.desire()
    env.redis.set(contract.redeliveries_key(uid, token), 3)

    outcome = env.build(token)

    error = condition(env.image()["status"], "Error")
    assert outcome == "error"
    assert error["reason"] == "ImageBuildInvalid"
    assert "interrupted 3 times" in error["message"]
    assert env.redis.get(contract.built_key(uid)).decode() == token


def test_recreated_object_is_dropped(env):
    env.create_secret()
    env.create_image()
    request = tasks.BuildRequest(
        namespace=NAMESPACE, name=NAME, uid="00000000-0000-0000-0000-000000000000", token="t"
    )

    outcome = tasks.run_build(request, runtime=env.runtime, delivery_id="d")

    assert outcome == "gone"
    assert env.status_writes() == []


def test_newer_token_is_queued_at_end(env, monkeypatch):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    sent: list[dict] = []
    monkeypatch.setattr(
        tasks.app, "send_task", lambda name, **options: sent.append({"name": name, **options})
    )

    def newer_change() -> None:
        env.redis.set(contract.desired_key(uid), "e" * 32)

    monkeypatch.setattr(tasks, "_test_delay", newer_change)
    env.build()

    assert len(sent) == 1
    assert sent[0]["name"] == "ppimage.build"
    assert sent[0]["kwargs"]["token"] == "e" * 32
    assert sent[0]["queue"] == "build.x86_64"
    assert env.redis.get(contract.waiting_key(uid)) is not None


def test_task_retries_transient_api_error(env):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    env.kube.emulator.inject_fault(
        f"/apis/metal3.io/v1alpha1/namespaces/{NAMESPACE}/{PPI}/{NAME}", status=503, method="GET"
    )
    kwargs = contract.task_kwargs(namespace=NAMESPACE, name=NAME, uid=uid, token=env.desire())

    started = time.monotonic()
    result = tasks.build.apply(kwargs=kwargs)

    assert result.get() == "ready"
    assert time.monotonic() - started < 10
    assert condition(env.image()["status"], "Ready")["status"] == "True"


def test_in_process_logs_hold_no_secret_values(env, caplog):
    caplog.set_level("DEBUG")
    nmstate = f"interfaces:\n- name: {SECRET_IFACE}\n  type: ethernet\n  state: up\n"
    env.create_secret({"networkData": network_data(), "nmstate": nmstate.encode()})
    env.create_image()

    env.build()

    message = condition(env.image()["status"], "Error")["message"]
    assert SECRET_IFACE in message
    for forbidden in secret_markers(nmstate):
        assert forbidden not in caplog.text


def secret_markers(nmstate: str = "") -> list[str]:
    values = [network_data(), nmstate.encode()] if nmstate else [network_data()]
    markers = [MAC, ADDRESS, encoded(network_data())]
    if nmstate:
        markers += [SECRET_IFACE, encoded(nmstate.encode())]
    return markers + [value.decode()[:40] for value in values]


# A real prefork worker in a subprocess.


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_worker(env: Env, tmp_path: Path, *, extra_env=None, options=()) -> WorkerProcess:
    log_path = tmp_path / f"worker-{time.monotonic_ns()}.log"
    environment = dict(os.environ)
    environment.update(
        KUBECONFIG=str(env.kube.kubeconfig_path),
        PYTHONPATH=str(REPOSITORY),
        **(extra_env or {}),
    )
    command = [
        sys.executable, "-m", "builder.cli", "-vv", "worker", "--broker", REDIS_URL,
        "--store", str(env.store), "--public-url", PUBLIC_URL, "--config", str(env.catalog_path),
        "--concurrency", "1", "--loglevel", "DEBUG", *options,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, env=environment, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    worker = WorkerProcess(process=process, log_path=log_path)
    deadline = time.monotonic() + 30
    while " ready." not in worker.log_text():
        if process.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            pytest.fail(f"worker did not start:\n{worker.log_text()[-3000:]}")
        time.sleep(0.1)
    return worker


@pytest.fixture
def producer() -> Iterator[Celery]:
    app = Celery("test-producer", broker=REDIS_URL, set_as_current=False)
    app.conf.task_serializer = "json"
    yield app
    app.close()


def enqueue(env: Env, producer: Celery) -> str:
    image = env.image()
    uid = image["metadata"]["uid"]
    token = env.desire()
    env.redis.set(contract.waiting_key(uid), "1")
    producer.send_task(
        contract.TASK_NAME,
        kwargs=contract.task_kwargs(namespace=NAMESPACE, name=NAME, uid=uid, token=token),
        queue=contract.queue_name("x86_64"),
    )
    return token


def wait_ready(env: Env, *, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = env.image().get("status") or {}
        ready = condition(status, "Ready") or {}
        if ready.get("status") == "True":
            return status
        time.sleep(0.1)
    pytest.fail(f"no Ready=True within {timeout} s")


def test_worker_process_builds_queued_message(env, tmp_path, producer):
    env.create_secret()
    env.create_image()
    enqueue(env, producer)
    queued = [json.loads(raw) for raw in env.redis.lrange("build.x86_64", 0, -1)]

    worker = start_worker(env, tmp_path)
    try:
        status = wait_ready(env, timeout=30)
    finally:
        worker.stop()

    log_text = worker.log_text()
    assert len(queued) == 1
    assert json.loads(base64.b64decode(queued[0]["body"]))[1] == contract.task_kwargs(
        namespace=NAMESPACE, name=NAME, uid=env.image()["metadata"]["uid"], token=env.desire()
    )
    assert status["imageUrl"].startswith(PUBLIC_URL)
    for forbidden in secret_markers():
        assert forbidden not in log_text
        assert forbidden not in json.dumps(queued)


def test_worker_process_logs_no_secret_values(env, tmp_path, producer):
    nmstate = f"interfaces:\n- name: {SECRET_IFACE}\n  type: ethernet\n  state: up\n"
    env.create_secret({"networkData": network_data(), "nmstate": nmstate.encode()})
    env.create_image()
    enqueue(env, producer)

    worker = start_worker(env, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (env.image().get("status") or {}).get("conditions"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # let the worker log the task's end
    finally:
        worker.stop()

    log_text = worker.log_text()
    assert condition(env.image()["status"], "Error")["reason"] == "ImageBuildInvalid"
    assert "ppimage.build" in log_text
    for forbidden in secret_markers(nmstate):
        assert forbidden not in log_text


def test_killed_pool_child_requeues_at_once(env, tmp_path, producer):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    worker = start_worker(env, tmp_path, extra_env={tasks.TEST_BUILD_DELAY: "3"})
    try:
        token = enqueue(env, producer)
        deadline = time.monotonic() + 20
        while env.redis.get(contract.lease_key(uid)) is None:
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            time.sleep(0.05)
        children = worker.pool_children()
        os.kill(children[0], signal.SIGKILL)
        killed_at = time.monotonic()

        status = wait_ready(env, timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        worker.stop()

    assert len(children) == 1
    assert status["imageUrl"].startswith(PUBLIC_URL)
    # The build sleeps 3 s: a redelivery after the 3600 s visibility timeout would not fit.
    assert elapsed < 15
    assert "WorkerLostError" in worker.log_text() or "signal 9" in worker.log_text()
    assert env.redis.get(contract.redeliveries_key(uid, token)) is None


def test_killed_worker_redelivers_after_visibility_timeout(env, tmp_path, producer):
    env.create_secret()
    env.create_image()
    uid = env.image()["metadata"]["uid"]
    options = ("--soft-time-limit", "4", "--time-limit", "5", "--visibility-timeout", "6")
    slow = {tasks.TEST_BUILD_DELAY: "2"}
    first = start_worker(env, tmp_path, extra_env=slow, options=options)
    try:
        enqueue(env, producer)
        deadline = time.monotonic() + 20
        while env.redis.get(contract.lease_key(uid)) is None:
            assert time.monotonic() < deadline, first.log_text()[-3000:]
            time.sleep(0.05)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = time.monotonic()
    finally:
        first.stop()
    second = start_worker(env, tmp_path, extra_env=slow, options=options)
    try:
        status = wait_ready(env, timeout=40)
        elapsed = time.monotonic() - killed_at
    finally:
        second.stop()

    assert status["imageUrl"].startswith(PUBLIC_URL)
    assert elapsed >= 6 - 1
    assert "succeeded" in second.log_text()


def test_worker_command_rejects_unreachable_broker(env, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "builder.cli", "worker", "--broker", "redis://127.0.0.1:1/13",
            "--store", str(tmp_path / "store"), "--config", str(env.catalog_path),
        ],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": str(env.kube.kubeconfig_path)},
    )  # fmt: skip

    assert result.returncode == 2
    assert "--broker redis://127.0.0.1:1/13" in result.stderr
    assert "PING" in result.stderr


def test_worker_command_rejects_unreachable_api(env, tmp_path):
    kubeconfig = kube_fixtures.write_kubeconfig(tmp_path / "dead", "http://127.0.0.1:1")
    result = subprocess.run(
        [
            sys.executable, "-m", "builder.cli", "worker", "--broker", REDIS_URL,
            "--store", str(tmp_path / "store"), "--config", str(env.catalog_path),
        ],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip

    assert result.returncode == 2
    assert "Kubernetes API" in result.stderr
    assert str(kubeconfig) in result.stderr


def test_worker_command_rejects_short_visibility_timeout(env, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "builder.cli", "worker", "--broker", REDIS_URL,
            "--store", str(tmp_path / "store"), "--config", str(env.catalog_path),
            "--time-limit", "300", "--visibility-timeout", "60",
        ],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 2
    assert "--visibility-timeout 60 must exceed --time-limit 300" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("flag", "expected"), [((), 401), (("--unauthenticated-api",), 200)])
def test_flower_api_open_only_when_asked(redis_db, tmp_path, flag, expected):
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop("FLOWER_UNAUTHENTICATED_API", None)
    with open(tmp_path / "flower.log", "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "builder.cli", "flower", "--broker", REDIS_URL,
             "--port", str(port), *flag],
            cwd=REPOSITORY, env=environment, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        code = None
        deadline = time.monotonic() + 30
        while code is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=5):
                    code = 200
            except urllib.error.HTTPError as error:
                code = error.code
            except OSError:
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=15)

    assert code == expected
