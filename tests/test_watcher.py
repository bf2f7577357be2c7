"""Tests of the watcher: its pure decision, and the running controller against real Redis
(database 14, flushed around each test) and the Kubernetes API emulator over real HTTP.

Build messages are read straight from the Redis list of the Celery queue, as a worker would.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from builder import contract
from builder.catalog import Catalog, single_architecture
from builder.cli import main
from builder.store import PayloadStore
from watcher.decide import decide, status_mismatch
from watcher.enqueue import Enqueuer, celery_producer, ensure_hmac_key
from watcher.kube import KubeAccess
from watcher.lease import LeaderElector
from watcher.loop import Controller, LoopSettings
from watcher.reconcile import Reconciler
from watcher.service import WatcherService
from watcher.state import (
    FOREIGN_LABEL,
    MISSING_SECRET,
    OUR_FINALIZER,
    ObjectCache,
    SecretState,
    image_state,
)

if __package__:
    from . import kube_fixtures
else:
    import kube_fixtures

KubeApi = kube_fixtures.KubeApi
kube_api = kube_fixtures.kube_api

REDIS_DB = 14
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
QUEUE = "build.x86_64"
NAMESPACE = "metal3"
PLURAL = "preprovisioningimages"
SECRET_VALUE = "interfaces: [{name: eth0, type: ethernet, secret-marker-5f1e}]"
OTHER_FINALIZER = "baremetalhost.metal3.io/preprovisioningImage"


# -- fixtures and helpers


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis server listens on 127.0.0.1:6379")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    iso = tmp_path / "base.iso"
    iso.write_bytes(b"base iso bytes " * 100)
    return Catalog({"x86_64": single_architecture(architecture="x86_64", iso=iso)})


class Harness:
    """A Controller wired like the service, without leader election."""

    def __init__(self, kube_api: KubeApi, redis_client: redis.Redis, catalog: Catalog,
                 store: Path, settings: LoopSettings) -> None:
        self.kube_api = kube_api
        self.redis = redis_client
        self.catalog = catalog
        self.store = PayloadStore(store)
        self.settings = settings
        self.hmac_key = ensure_hmac_key(redis_client)
        self.controllers: list[Controller] = []

    def make_controller(self) -> Controller:
        cache = ObjectCache()
        kube = KubeAccess(self.kube_api.api_client())
        enqueuer = Enqueuer(self.redis, celery_producer(BROKER_URL))
        reconciler = Reconciler(
            cache=cache, kube=kube, enqueuer=enqueuer, catalog=self.catalog, store=self.store,
            hmac_key=self.hmac_key, recheck_seconds=0.2,
        )
        controller = Controller(kube=kube, reconciler=reconciler, cache=cache,
                                settings=self.settings)
        self.controllers.append(controller)
        return controller

    def start(self) -> Controller:
        controller = self.make_controller()
        controller.start()
        assert controller.wait_idle(10)
        return controller

    def stop_all(self) -> None:
        for controller in self.controllers:
            controller.stop()

    def token(self, name: str) -> str:
        image = self.kube_api.get(PLURAL, name, namespace=NAMESPACE)
        secret_name = image["spec"].get("networkDataName")
        secret = None
        if secret_name:
            try:
                secret = self.kube_api.get("secrets", secret_name, namespace=NAMESPACE)
            except Exception:
                secret = None
        return contract.live_token(
            image=image, secret=secret, hmac_key=self.hmac_key, catalog=self.catalog
        )


@pytest.fixture
def harness(kube_api: KubeApi, redis_client: redis.Redis, catalog: Catalog,
            tmp_path: Path) -> Iterator[Harness]:
    settings = LoopSettings(resync_seconds=600, retry_poll_seconds=0.1, watch_timeout_seconds=5)
    harness = Harness(kube_api, redis_client, catalog, tmp_path / "store", settings)
    yield harness
    harness.stop_all()


def messages(client: redis.Redis, queue: str = QUEUE) -> list[dict]:
    """Return the Celery messages waiting in ``queue``: headers plus decoded kwargs."""
    decoded = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        decoded.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs,
                        "raw": raw})
    return decoded


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def make_secret(kube_api: KubeApi, name: str, *, value: str = SECRET_VALUE,
                labelled: bool = True) -> dict:
    labels = {"environment.metal3.io": "baremetal"} if labelled else {}
    body = {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "data": {"nmstate": base64.b64encode(value.encode()).decode()},
    }
    return kube_api.create("secrets", body, namespace=NAMESPACE)


def make_image(kube_api: KubeApi, name: str, *, secret: str | None = "nd",
               labels: dict | None = None, finalizers: list[str] | None = None) -> dict:
    spec = {"architecture": "x86_64", "acceptFormats": ["iso"]}
    if secret:
        spec["networkDataName"] = secret
    metadata: dict = {"name": name, "namespace": NAMESPACE, "labels": labels or {}}
    if finalizers:
        metadata["finalizers"] = finalizers
    body = {"apiVersion": "metal3.io/v1alpha1", "kind": "PreprovisioningImage",
            "metadata": metadata, "spec": spec}
    return kube_api.create(PLURAL, body, namespace=NAMESPACE)


def ready_status(image: dict, *, secret_version: str | None) -> dict:
    generation = image["metadata"]["generation"]
    status: dict = {
        "imageUrl": "http://127.0.0.1:8080/images/x.iso",
        "format": "iso",
        "architecture": "x86_64",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "ImageSuccess",
             "message": "Generated image", "observedGeneration": generation,
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Error", "status": "False", "reason": "ImageSuccess", "message": "",
             "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
    }
    if image["spec"].get("networkDataName"):
        status["networkData"] = {"name": image["spec"]["networkDataName"],
                                 "version": secret_version or ""}
    return status


def error_status(image: dict, *, reason: str, message: str) -> dict:
    generation = image["metadata"]["generation"]
    return {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": reason, "message": "",
             "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Error", "status": "True", "reason": reason, "message": message,
             "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
    }


def make_up_to_date(harness: Harness, name: str) -> dict:
    """Give an image the status and built token of a finished build; return the image."""
    image = harness.kube_api.get(PLURAL, name, namespace=NAMESPACE)
    secret = harness.kube_api.get("secrets", image["spec"]["networkDataName"],
                                  namespace=NAMESPACE)
    harness.kube_api.patch(
        PLURAL, name,
        {"status": ready_status(image, secret_version=secret["metadata"]["resourceVersion"])},
        namespace=NAMESPACE, subresource="status",
    )
    harness.redis.set(contract.built_key(image["metadata"]["uid"]), harness.token(name))
    return harness.kube_api.get(PLURAL, name, namespace=NAMESPACE)


def state_of(status: dict | None = None, *, generation: int = 1, **spec) -> object:
    """Return an ImageState for the pure decision tests."""
    obj = {
        "metadata": {"name": "host-0", "namespace": NAMESPACE, "uid": "u-1",
                     "resourceVersion": "7", "generation": generation},
        "spec": {"architecture": "x86_64", "acceptFormats": ["iso"],
                 "networkDataName": "nd", **spec},
        "status": status or {},
    }
    return image_state(obj)


SECRET_RECORD = SecretState(resource_version="42", hmac="h", labelled=True)
READY = ready_status({"metadata": {"generation": 1}, "spec": {"networkDataName": "nd"}},
                     secret_version="42")


# -- the pure decision


def test_decide_new_image_enqueues() -> None:
    decision = decide(image=state_of(), secret=SECRET_RECORD, desired_token="t",
                      built_token=None)
    assert decision.enqueue
    assert decision.reason == "no image built yet"


def test_decide_up_to_date_skips() -> None:
    decision = decide(image=state_of(READY), secret=SECRET_RECORD, desired_token="t",
                      built_token="t")
    assert not decision.enqueue
    assert decision.reason == "up to date"


def test_decide_changed_token_enqueues() -> None:
    decision = decide(image=state_of(READY), secret=SECRET_RECORD, desired_token="new",
                      built_token="old")
    assert decision.enqueue
    assert decision.reason == "inputs changed"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"architecture": "aarch64"}, "status architecture"),
        ({"format": "initrd"}, "status format"),
        ({"networkData": {"name": "other", "version": "42"}}, "status networkData.name"),
        ({"networkData": {"name": "nd", "version": "41"}}, "status networkData.version"),
        ({"imageUrl": None}, "Ready is not True"),
    ],
)
def test_status_mismatch_names_failed_check(change: dict, expected: str) -> None:
    status = {**READY, **change}
    mismatch = status_mismatch(state_of(status), SECRET_RECORD)
    assert mismatch is not None
    assert mismatch.startswith(expected)


def test_status_mismatch_stale_generation() -> None:
    mismatch = status_mismatch(state_of(READY, generation=2), SECRET_RECORD)
    assert mismatch == "Ready observedGeneration 1 is not generation 2"


def test_status_mismatch_error_true() -> None:
    status = {**READY, "conditions": error_status(
        {"metadata": {"generation": 1}}, reason="ImageBuildInvalid", message="m")["conditions"]}
    assert status_mismatch(state_of(status), SECRET_RECORD) == "Error is True (ImageBuildInvalid)"


def test_decide_permanent_error_waits_for_new_inputs() -> None:
    status = error_status({"metadata": {"generation": 1}}, reason="ImageBuildInvalid",
                          message="Cannot generate image")
    same = decide(image=state_of(status), secret=SECRET_RECORD, desired_token="t",
                  built_token="t")
    changed = decide(image=state_of(status), secret=SECRET_RECORD, desired_token="t2",
                     built_token="t")
    newer = decide(image=state_of(status, generation=2), secret=SECRET_RECORD,
                   desired_token="t", built_token="t")
    assert not same.enqueue
    assert changed.enqueue
    assert newer.enqueue


def test_decide_missing_secret_waits_for_retry() -> None:
    status = error_status({"metadata": {"generation": 1}}, reason="MissingNetworkData",
                          message="NetworkData secret not found")
    waiting = decide(image=state_of(status), secret=MISSING_SECRET, desired_token="t",
                     built_token=None)
    due = decide(image=state_of(status), secret=MISSING_SECRET, desired_token="t",
                 built_token=None, retry_due=True)
    found = decide(image=state_of(status), secret=SECRET_RECORD, desired_token="t",
                   built_token=None)
    assert not waiting.enqueue
    assert due.enqueue
    assert found.enqueue


def test_token_from_parts_equals_live_token(catalog: Catalog) -> None:
    secret = {"metadata": {"name": "nd", "resourceVersion": "3"},
              "data": {"nmstate": base64.b64encode(b"x: 1").decode()}}
    image = {"spec": {"architecture": "amd64", "acceptFormats": ["initrd", "iso"],
                      "networkDataName": "nd"}}
    key = b"k" * 32
    parts = contract.token_from_parts(
        spec=image["spec"], secret_hmac=contract.secret_hmac(secret, hmac_key=key),
        catalog=catalog,
    )
    assert parts == contract.live_token(image=image, secret=secret, hmac_key=key,
                                        catalog=catalog)


def test_cache_secret_change_reaches_its_images() -> None:
    cache = ObjectCache()
    cache.put_image(state_of())
    first = cache.put_secret((NAMESPACE, "nd"), SECRET_RECORD)
    same = cache.put_secret((NAMESPACE, "nd"), SECRET_RECORD)
    unrelated = cache.put_secret((NAMESPACE, "other"), SECRET_RECORD)
    assert first == [(NAMESPACE, "host-0")]
    assert same == []
    assert unrelated == []


# -- the running controller


def test_new_image_enqueues_one_message(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0")
    harness.start()
    sent = messages(harness.redis)
    assert len(sent) == 1
    assert sent[0]["task"] == contract.TASK_NAME
    assert sent[0]["args"] == []
    assert sent[0]["kwargs"] == {"namespace": NAMESPACE, "name": "host-0",
                                 "uid": created["metadata"]["uid"],
                                 "token": harness.token("host-0")}


def test_new_image_gets_finalizer(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "host-0", finalizers=[OTHER_FINALIZER])
    harness.start()
    assert wait_for(lambda: OUR_FINALIZER in harness.kube_api.get(
        PLURAL, "host-0", namespace=NAMESPACE)["metadata"].get("finalizers", []))
    finalizers = harness.kube_api.get(PLURAL, "host-0", namespace=NAMESPACE)["metadata"][
        "finalizers"]
    assert finalizers == [OTHER_FINALIZER, OUR_FINALIZER]


def test_up_to_date_image_enqueues_nothing_after_restart(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    make_up_to_date(harness, "host-0")
    first = harness.start()
    assert messages(harness.redis) == []
    first.stop()
    second = harness.start()
    assert messages(harness.redis) == []
    assert second.counters["skipped"] >= 1


def test_rapid_spec_changes_coalesce(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0")
    uid = created["metadata"]["uid"]
    harness.start()
    for index in range(50):
        formats = ["iso"] + ["initrd"] * (index % 7) + ["iso"] * (index // 7)
        harness.kube_api.patch(PLURAL, "host-0", {"spec": {"acceptFormats": formats}},
                               namespace=NAMESPACE)
    last = harness.token("host-0")
    assert wait_for(lambda: harness.redis.get(contract.desired_key(uid)) == last.encode())
    assert len(messages(harness.redis)) == 1
    assert harness.controllers[0].reconciler.enqueuer.counters["coalesced"] >= 1


def test_secret_change_reaches_its_image(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    make_up_to_date(harness, "host-0")
    harness.start()
    assert messages(harness.redis) == []
    changed = base64.b64encode(b"interfaces: []").decode()
    harness.kube_api.patch("secrets", "nd", {"data": {"nmstate": changed}}, namespace=NAMESPACE)
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    kwargs = messages(harness.redis)[0]["kwargs"]
    assert kwargs["uid"] == uid
    assert kwargs["token"] == harness.token("host-0")
    assert kwargs["token"] != harness.redis.get(contract.built_key(uid)).decode()


def test_change_during_build_records_token_only(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    make_up_to_date(harness, "host-0")
    harness.redis.set(contract.lease_key(uid), "delivery-of-a-worker", px=60_000)
    controller = harness.start()
    changed = base64.b64encode(b"interfaces: []").decode()

    harness.kube_api.patch("secrets", "nd", {"data": {"nmstate": changed}}, namespace=NAMESPACE)

    last = harness.token("host-0")
    assert wait_for(lambda: harness.redis.get(contract.desired_key(uid)) == last.encode())
    assert wait_for(lambda: controller.counters["building"] >= 1)
    assert messages(harness.redis) == []
    harness.redis.delete(contract.lease_key(uid))
    # The recheck after the lease is gone sends the message a dead worker never queued.
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    assert messages(harness.redis)[0]["kwargs"]["token"] == last


def test_secret_metadata_change_enqueues_same_token(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    make_up_to_date(harness, "host-0")
    built = harness.redis.get(contract.built_key(uid)).decode()
    harness.start()
    harness.kube_api.patch("secrets", "nd", {"metadata": {"annotations": {"note": "x"}}},
                           namespace=NAMESPACE)
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    assert messages(harness.redis)[0]["kwargs"]["token"] == built


def test_unlabelled_secret_read_directly(harness: Harness) -> None:
    make_secret(harness.kube_api, "plain", labelled=False)
    make_image(harness.kube_api, "host-0", secret="plain")
    harness.start()
    sent = messages(harness.redis)
    assert len(sent) == 1
    assert sent[0]["kwargs"]["token"] == harness.token("host-0")
    assert sent[0]["kwargs"]["token"] != contract.token_from_parts(
        spec=harness.kube_api.get(PLURAL, "host-0", namespace=NAMESPACE)["spec"],
        secret_hmac="none", catalog=harness.catalog,
    )


def test_resync_finds_redis_only_change(harness: Harness) -> None:
    harness.settings = LoopSettings(resync_seconds=1, retry_poll_seconds=0.1)
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    make_up_to_date(harness, "host-0")
    harness.start()
    assert messages(harness.redis) == []
    harness.redis.delete(contract.built_key(created["metadata"]["uid"]))
    assert wait_for(lambda: len(messages(harness.redis)) == 1, timeout=5)


def test_deleted_secret_enqueues(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    make_up_to_date(harness, "host-0")
    harness.start()
    harness.kube_api.delete("secrets", "nd", namespace=NAMESPACE)
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    assert messages(harness.redis)[0]["kwargs"]["token"] == harness.token("host-0")


def test_missing_secret_waits_until_retry_due(harness: Harness) -> None:
    created = make_image(harness.kube_api, "host-0", secret="late",
                         finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    harness.kube_api.patch(
        PLURAL, "host-0",
        {"status": error_status(created, reason="MissingNetworkData",
                                message="NetworkData secret not found")},
        namespace=NAMESPACE, subresource="status",
    )
    controller = harness.start()
    assert messages(harness.redis) == []

    # An unlabelled Secret is invisible to the watch: only the retry schedule finds it.
    make_secret(harness.kube_api, "late", labelled=False)
    member = contract.retry_member(namespace=NAMESPACE, name="host-0", uid=uid)
    harness.redis.zadd(contract.RETRY_SCHEDULE, {member: time.time() + 3600})
    time.sleep(0.5)
    assert messages(harness.redis) == []

    harness.redis.zadd(contract.RETRY_SCHEDULE, {member: time.time() - 1})
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    assert messages(harness.redis)[0]["kwargs"]["token"] == harness.token("host-0")
    assert harness.redis.zscore(contract.RETRY_SCHEDULE, member) is None
    assert controller.counters["enqueued"] == 1


def test_deletion_waits_for_other_finalizer(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0",
                         finalizers=[OTHER_FINALIZER, OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    stored = harness.store.root / "images" / NAMESPACE / "host-0" / uid
    stored.mkdir(parents=True)
    (stored / "payload.cpio.gz").write_bytes(b"payload")
    controller = harness.start()
    harness.kube_api.delete(PLURAL, "host-0", namespace=NAMESPACE)
    assert wait_for(lambda: controller.counters["deletion waits"] >= 1)
    assert controller.wait_idle(5)
    assert stored.is_dir()
    remaining = harness.kube_api.get(PLURAL, "host-0", namespace=NAMESPACE)
    assert OUR_FINALIZER in remaining["metadata"]["finalizers"]

    harness.kube_api.patch(PLURAL, "host-0", {"metadata": {"finalizers": [OUR_FINALIZER]}},
                           namespace=NAMESPACE)

    def gone() -> bool:
        try:
            harness.kube_api.get(PLURAL, "host-0", namespace=NAMESPACE)
        except Exception:
            return True
        return False

    assert wait_for(gone)
    assert not stored.exists()
    assert harness.redis.get(contract.desired_key(uid)) is None
    assert harness.redis.get(contract.built_key(uid)) is None


def test_foreign_image_skipped_and_finalizer_released(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "agent-0", labels={FOREIGN_LABEL: "infraenv"})
    make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    harness.start()
    sent = [message["kwargs"]["name"] for message in messages(harness.redis)]
    assert sent == ["host-0"]
    foreign = harness.kube_api.get(PLURAL, "agent-0", namespace=NAMESPACE)
    assert OUR_FINALIZER not in foreign["metadata"].get("finalizers", [])

    harness.kube_api.patch(PLURAL, "host-0", {"metadata": {"labels": {FOREIGN_LABEL: "x"}}},
                           namespace=NAMESPACE)
    assert wait_for(lambda: OUR_FINALIZER not in harness.kube_api.get(
        PLURAL, "host-0", namespace=NAMESPACE)["metadata"].get("finalizers", []))


def test_expired_watch_relists(harness: Harness) -> None:
    harness.settings = LoopSettings(retry_poll_seconds=0.1, watch_timeout_seconds=1)
    make_secret(harness.kube_api, "nd")
    controller = harness.start()
    emulator = harness.kube_api.emulator
    watch_path = re.compile(rf"/apis/metal3.io/v1alpha1/{PLURAL}")
    fault = emulator.inject_fault(watch_path, status=500, count=10**6, method="GET")
    assert wait_for(lambda: controller.counters["watch_errors"] >= 1)

    # Events made while the watch is down are compacted away: resuming must get 410.
    make_image(harness.kube_api, "late-0")
    emulator.compact_history()
    fault.path = "/no-such-path"
    assert wait_for(lambda: controller.counters["relists"] >= 1, timeout=40)
    assert wait_for(lambda: len(messages(harness.redis)) == 1)
    make_image(harness.kube_api, "late-1")
    assert wait_for(lambda: len(messages(harness.redis)) == 2)
    names = sorted(message["kwargs"]["name"] for message in messages(harness.redis))
    assert names == ["late-0", "late-1"]


def test_lease_lets_one_watcher_enqueue(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")

    def service(identity: str) -> WatcherService:
        elector = LeaderElector(harness.kube_api.api_client(), namespace=NAMESPACE,
                                identity=identity, duration_seconds=2)
        return WatcherService(elector=elector, make_controller=harness.make_controller,
                              renew_seconds=0.2)

    first, second = service("watcher-a"), service("watcher-b")
    threads = [threading.Thread(target=item.run, daemon=True) for item in (first, second)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: first.leading.is_set() or second.leading.is_set())
        time.sleep(1)
        leaders = [item for item in (first, second) if item.leading.is_set()]
        assert len(leaders) == 1
        make_image(harness.kube_api, "host-0")
        assert wait_for(lambda: len(messages(harness.redis)) == 1)
        time.sleep(0.5)
        assert len(messages(harness.redis)) == 1
        assert len(harness.controllers) == 1

        # The leader steps down and releases the Lease: the other one takes over.
        leader = leaders[0]
        follower = second if leader is first else first
        leader.stop()
        assert wait_for(lambda: follower.leading.is_set())
        lease = harness.kube_api.get("leases", "ppimage-watcher", namespace=NAMESPACE)
        assert lease["spec"]["holderIdentity"] == follower.elector.identity
    finally:
        first.stop()
        second.stop()
        for thread in threads:
            thread.join(10)


def test_secret_values_never_leave_the_api(harness: Harness,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "host-0")
    harness.start()
    assert len(messages(harness.redis)) == 1
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    for value in (SECRET_VALUE, "secret-marker-5f1e", encoded):
        assert value not in caplog.text
        for message in messages(harness.redis):
            assert value.encode() not in message["raw"]
            assert value not in json.dumps(message["kwargs"])
        for key in harness.redis.scan_iter():
            assert value.encode() not in key
            if harness.redis.type(key) == b"string":
                assert value.encode() not in harness.redis.get(key)


# -- command line


def initrd_options(tmp_path: Path) -> tuple[list[str], Catalog]:
    """Return base image options for the commands, and the catalog they describe.

    The commands check an ISO's embed area at start, so they get the initrd format here.
    """
    initrd, kernel = tmp_path / "initrd.img", tmp_path / "vmlinuz"
    initrd.write_bytes(b"initramfs " * 100)
    kernel.write_bytes(b"kernel " * 100)
    base = single_architecture(architecture="x86_64", initrd=initrd, kernel=kernel)
    options = ["--initrd", str(initrd), "--kernel", str(kernel), "--arch", "x86_64",
               "--store", str(tmp_path / "store")]
    return options, Catalog({"x86_64": base})


def test_watcher_command_rejects_unreachable_broker(tmp_path: Path) -> None:
    options, _ = initrd_options(tmp_path)
    result = CliRunner().invoke(main, ["watcher", "--broker", "redis://127.0.0.1:1/0", *options])
    assert result.exit_code == 2
    assert "--broker redis://127.0.0.1:1/0: cannot reach Redis" in result.output


def test_watcher_command_rejects_unreachable_api(tmp_path: Path,
                                                 redis_client: redis.Redis) -> None:
    kubeconfig = kube_fixtures.write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    options, _ = initrd_options(tmp_path)
    result = CliRunner().invoke(main, [
        "watcher", "--broker", BROKER_URL, "--kubeconfig", str(kubeconfig), *options,
    ])
    assert result.exit_code == 2
    assert f"--kubeconfig {kubeconfig}: cannot reach the Kubernetes API" in result.output


def test_rebuild_command_forgets_built_token(harness: Harness, tmp_path: Path) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    make_up_to_date(harness, "host-0")
    options, catalog = initrd_options(tmp_path)
    harness.kube_api.patch(PLURAL, "host-0", {"spec": {"acceptFormats": ["initrd"]}},
                           namespace=NAMESPACE)
    harness.catalog = catalog
    result = CliRunner().invoke(main, [
        "rebuild", "--broker", BROKER_URL, *options,
        "--kubeconfig", str(harness.kube_api.kubeconfig_path), f"{NAMESPACE}/host-0",
    ])
    assert result.exit_code == 0, result.output
    assert result.output == f"{NAMESPACE}/host-0: enqueued\n"
    assert harness.redis.get(contract.built_key(uid)) is None
    sent = messages(harness.redis)
    assert len(sent) == 1
    assert sent[0]["kwargs"]["token"] == harness.token("host-0")


def test_status_command_lists_queues_and_not_ready(harness: Harness) -> None:
    make_secret(harness.kube_api, "nd")
    make_image(harness.kube_api, "host-0")
    make_image(harness.kube_api, "host-1", finalizers=[OUR_FINALIZER])
    make_up_to_date(harness, "host-1")
    created = make_image(harness.kube_api, "host-2", secret="absent")
    harness.kube_api.patch(
        PLURAL, "host-2",
        {"status": error_status(created, reason="MissingNetworkData",
                                message="NetworkData secret not found")},
        namespace=NAMESPACE, subresource="status",
    )
    harness.start()
    result = CliRunner().invoke(main, [
        "status", "--broker", BROKER_URL,
        "--kubeconfig", str(harness.kube_api.kubeconfig_path),
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "queue build.x86_64: 1 messages waiting" in lines
    assert f"{NAMESPACE}/host-0: not Ready: NoStatus: no Ready condition yet" in lines
    assert (f"{NAMESPACE}/host-2: not Ready: MissingNetworkData: NetworkData secret not found"
            in lines)
    assert "2 PreprovisioningImages not Ready" in lines


def test_rebuild_command_ignores_stuck_waiting_key(harness: Harness, tmp_path: Path) -> None:
    make_secret(harness.kube_api, "nd")
    created = make_image(harness.kube_api, "host-0", finalizers=[OUR_FINALIZER])
    uid = created["metadata"]["uid"]
    make_up_to_date(harness, "host-0")
    # A worker that died with the message leaves the waiting key set until it expires.
    harness.redis.set(contract.waiting_key(uid), "lost", ex=600)
    options, catalog = initrd_options(tmp_path)
    harness.catalog = catalog
    result = CliRunner().invoke(main, [
        "rebuild", "--broker", BROKER_URL, *options,
        "--kubeconfig", str(harness.kube_api.kubeconfig_path), f"{NAMESPACE}/host-0",
    ])
    assert result.exit_code == 0, result.output
    assert result.output == f"{NAMESPACE}/host-0: enqueued\n"
    assert len(messages(harness.redis)) == 1


def test_token_same_for_missing_and_empty_architecture() -> None:
    # The watcher stores a missing architecture as "", the worker hashes the live spec.
    catalog = Catalog({})
    image = {"metadata": {"name": "host-0"}, "spec": {"acceptFormats": ["iso"]}}
    worker_token = contract.live_token(image=image, secret=None, hmac_key=b"k", catalog=catalog)
    watcher_token = contract.token_from_parts(
        spec={"architecture": "", "acceptFormats": ["iso"], "networkDataName": None},
        secret_hmac="none",
        catalog=catalog,
    )
    assert worker_token == watcher_token


def test_status_command_rejects_non_numeric_database(harness: Harness) -> None:
    result = CliRunner().invoke(main, [
        "status", "--broker", "redis://127.0.0.1:6379/notanumber",
        "--kubeconfig", str(harness.kube_api.kubeconfig_path),
    ])
    assert result.exit_code == 2
    assert "database 'notanumber' is not a number" in result.output
