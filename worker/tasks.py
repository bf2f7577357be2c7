"""The ``ppimage.build`` task: build one PreprovisioningImage's image and write its status.

A message carries ``namespace``, ``name``, ``uid`` and ``token`` only. The task reads the
object and its Secret, computes the live token with ``builder.contract.live_token`` and builds
only when it equals the desired token the watcher recorded in Redis. One worker at a time holds
the per-object lease. Before each status write the task checks that its token is still the
desired one, and at the end it queues a build for a newer desired token that arrived meanwhile.
Secret contents never leave the process: logs, results and exceptions name only the object and
the condition reason.

Test-only: PPIMAGE_TEST_BUILD_DELAY (seconds) makes each build sleep after planning, so tests
can kill a worker mid-build. Production deployments must not set it.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client
import redis
from celery.exceptions import SoftTimeLimitExceeded

from builder import contract
from builder.build import MissingNetworkData, plan_image
from builder.errors import BaseImageError, BuilderError
from builder.images import digest_file
from builder.settings import ServiceSettings, service_settings
from builder.status import (
    REASON_BUILD_INVALID,
    REASON_CONFIGURATION,
    REASON_SUCCESS,
    ErrorOutcome,
    ImageOutcome,
    compute_status,
    condition,
    config_changed_status,
    status_patch,
)
from builder.store import PayloadStore, StoreError
from worker import metrics
from worker.app import QueueSettings, app, queue_settings_from_environment
from worker.kube import Conflict, KubeClient, KubeError, load_configuration

log = logging.getLogger(__name__)

TEST_BUILD_DELAY = "PPIMAGE_TEST_BUILD_DELAY"
MAX_CONFLICT_RETRIES = 5
MAX_TRANSIENT_RETRIES = 5
# Seconds before a retried message runs again. Each wait is also capped at a quarter of the
# visibility timeout, because Redis would redeliver a message that waits longer in a worker.
TRANSIENT_RETRY_DELAYS = (1, 2, 4, 8, 16)
# Redis keys of a single build live at most this long, so abandoned counters disappear.
COUNTER_TTL_SECONDS = 24 * 3600

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Runtime: settings from the command line, clients created per process after the fork.


@dataclass
class Runtime:
    """Settings of this worker and its clients; Redis and Kubernetes clients are per process."""

    settings: ServiceSettings
    queues: QueueSettings
    kube_configuration: kubernetes.client.Configuration | None = None
    _pid: int = 0
    _redis: redis.Redis | None = None
    _kube: KubeClient | None = None
    _store: PayloadStore | None = field(default=None, repr=False)

    def _check_fork(self) -> None:
        # A pool child must not share sockets with its parent: clients are created again.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._redis = None
            self._kube = None

    @property
    def redis(self) -> redis.Redis:
        self._check_fork()
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=10)
        return self._redis

    @property
    def kube(self) -> KubeClient:
        self._check_fork()
        if self._kube is None:
            if self.kube_configuration is None:
                self.kube_configuration = load_configuration()
            self._kube = KubeClient(self.kube_configuration)
        return self._kube

    @property
    def store(self) -> PayloadStore:
        if self._store is None:
            self._store = PayloadStore(self.settings.store)
        return self._store


_runtime: Runtime | None = None


def configure(runtime: Runtime | None) -> None:
    """Set the runtime the task uses; the worker command calls this before pool children fork.

    None makes the next task build its runtime from the environment again.
    """
    global _runtime
    _runtime = runtime


def current_runtime() -> Runtime:
    """Return the configured runtime, or build one from PPIMAGE_* variables (``celery -A``)."""
    global _runtime
    if _runtime is None:
        environment = os.environ
        config = environment.get("PPIMAGE_CONFIG")
        settings = service_settings(
            broker_url=environment.get("PPIMAGE_BROKER_URL") or app.conf.broker_url,
            store=Path(environment.get("PPIMAGE_STORE") or "/var/lib/ppimage"),
            public_url=environment.get("PPIMAGE_PUBLIC_URL") or "http://127.0.0.1:8080",
            config=Path(config) if config else None,
            iso=None,
            initrd=None,
            kernel=None,
            arch=None,
            profile=environment.get("PPIMAGE_PROFILE") or None,
        )
        _runtime = Runtime(settings=settings, queues=queue_settings_from_environment())
    return _runtime


# The task.


@dataclass(frozen=True)
class BuildRequest:
    """The references one build message carries."""

    namespace: str
    name: str
    uid: str
    token: str

    @property
    def object_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class TransientError(Exception):
    """A failure worth retrying soon (API or Redis unreachable, conflicts, soft time limit)."""


class BuildFailed(Exception):
    """An unexpected error, reduced to its type so that no value from a Secret is carried."""


@app.task(name=contract.TASK_NAME, bind=True, ignore_result=True, max_retries=None)
def build(self, namespace: str, name: str, uid: str, token: str) -> str:
    """Build the image of one PreprovisioningImage; return one word describing the outcome."""
    request = BuildRequest(namespace=namespace, name=name, uid=uid, token=token)
    runtime = current_runtime()
    try:
        outcome = run_build(request, runtime=runtime, delivery_id=self.request.id or "")
        metrics.record_delivery(outcome)
        return outcome
    except (TransientError, KubeError, redis.RedisError, SoftTimeLimitExceeded) as error:
        metrics.record_delivery("failed")
        retries = self.request.retries or 0
        reason = type(error).__name__
        if retries >= MAX_TRANSIENT_RETRIES:
            log.error(
                "%s: build failed after %d retries (%s); the watcher retries it later",
                request.object_name,
                retries,
                reason,
            )
            _schedule_recheck_quietly(runtime, request)
            raise BuildFailed(f"{request.object_name}: {reason}") from None
        delay = TRANSIENT_RETRY_DELAYS[min(retries, len(TRANSIENT_RETRY_DELAYS) - 1)]
        delay = max(1, min(delay, runtime.queues.visibility_timeout // 4))
        log.warning(
            "%s: build failed (%s: %s), retrying in %d s",
            request.object_name,
            reason,
            _safe_text(error),
            delay,
        )
        raise self.retry(exc=BuildFailed(reason), countdown=delay) from None
    except Exception as error:  # noqa: BLE001 (the message may quote a Secret value)
        metrics.record_delivery("failed")
        log.error("%s: build failed with %s", request.object_name, type(error).__name__)
        # The watcher queues it again; the redelivery cap ends a failure that repeats.
        _schedule_recheck_quietly(runtime, request)
        raise BuildFailed(f"{request.object_name}: {type(error).__name__}") from None


def _safe_text(error: Exception) -> str:
    # Our own KubeError and TransientError messages name objects and HTTP statuses only.
    if isinstance(error, KubeError | TransientError):
        return str(error)
    return "no detail"


def run_build(request: BuildRequest, *, runtime: Runtime, delivery_id: str) -> str:
    """Run one delivery of a build message under the object's lease."""
    client = runtime.redis

    # A change from now on must queue another message, even while this one runs.
    client.delete(contract.waiting_key(request.uid))

    lease = contract.lease_key(request.uid)
    lease_ms = (runtime.queues.time_limit + 30) * 1000
    lease_id = delivery_id or secrets.token_hex(8)
    # A redelivery of the same message takes over the lease of its killed predecessor.
    if not client.set(lease, lease_id, nx=True, px=lease_ms):
        holder = client.get(lease)
        if holder is None or holder.decode() != lease_id:
            log.info(
                "%s: another worker is building it, dropping this message", request.object_name
            )
            return "busy"
        client.pexpire(lease, lease_ms)

    try:
        result = _build_with_lease(request, runtime=runtime)
    finally:
        client.eval(_RELEASE_LEASE, 1, lease, lease_id)
    if result.handled_token is not None:
        _queue_newer(runtime, request, result=result)
    return result.outcome


@dataclass(frozen=True)
class LeaseResult:
    """The outcome word, and the token and architecture handled when the object was read."""

    outcome: str
    handled_token: str | None = None
    architecture: str = ""


@dataclass
class Inputs:
    """The inputs of one build: the object, its Secret, the live and the built token."""

    image: dict
    secret: dict | None
    live: str
    built: str | None


def _build_with_lease(request: BuildRequest, *, runtime: Runtime) -> LeaseResult:
    client = runtime.redis
    deliveries = client.incr(contract.redeliveries_key(request.uid, request.token))
    client.expire(contract.redeliveries_key(request.uid, request.token), COUNTER_TTL_SECONDS)

    try:
        inputs = _read_inputs(request, runtime=runtime)
    except BaseImageError as error:
        return LeaseResult(_write_base_image_error(request, runtime=runtime, error=error))
    if inputs is None:
        return LeaseResult("gone")
    architecture = str((inputs.image.get("spec") or {}).get("architecture") or "")

    desired = _get(client, contract.desired_key(request.uid)) or request.token
    if inputs.live != desired:
        # The watcher has not read the latest change yet and queues a build when it does. If
        # it reads the change while this run holds the lease, it only records the desired
        # token, so the token read here counts as handled and a newer one is queued after the
        # lease is released.
        log.info(
            "%s: live inputs differ from the desired token, leaving it to the watcher",
            request.object_name,
        )
        _schedule_recheck(runtime, request)
        return LeaseResult("stale", handled_token=desired, architecture=architecture)

    if deliveries > runtime.queues.max_deliveries:
        outcome = _give_up(request, runtime=runtime, inputs=inputs, deliveries=deliveries)
    else:
        outcome = _build_and_report(request, runtime=runtime, inputs=inputs)
        client.delete(contract.redeliveries_key(request.uid, request.token))
    return LeaseResult(outcome, handled_token=inputs.live, architecture=architecture)


def _read_inputs(request: BuildRequest, *, runtime: Runtime) -> Inputs | None:
    image = runtime.kube.read_image(request.namespace, request.name)
    if image is None:
        log.info("%s: PreprovisioningImage not found, dropping the build", request.object_name)
        return None
    metadata = image.get("metadata") or {}
    if metadata.get("uid") != request.uid:
        log.info(
            "%s: uid changed from %s, the object was recreated; dropping the build",
            request.object_name,
            request.uid,
        )
        return None
    if metadata.get("deletionTimestamp"):
        log.info(
            "%s: PreprovisioningImage is being deleted, dropping the build", request.object_name
        )
        return None

    secret = None
    secret_name = (image.get("spec") or {}).get("networkDataName")
    if secret_name:
        secret = runtime.kube.read_secret(request.namespace, secret_name)
    live = contract.live_token(
        image=image,
        secret=secret,
        hmac_key=_hmac_key(runtime.redis),
        catalog=runtime.settings.catalog,
        profile=runtime.settings.profile,
    )
    built = _get(runtime.redis, contract.built_key(request.uid))
    return Inputs(image=image, secret=secret, live=live, built=built)


def _build_and_report(request: BuildRequest, *, runtime: Runtime, inputs: Inputs) -> str:
    status = inputs.image.get("status") or {}
    ready = condition(status, "Ready") or {}
    was_ready = ready.get("status") == "True"

    # Same inputs as the published image: at most networkData.version or the generation moved.
    if inputs.built == inputs.live and was_ready:
        refreshed = _refresh_outcome(request, runtime=runtime, inputs=inputs)
        if refreshed is not None:
            if _is_current(inputs.image, inputs.secret):
                log.debug("%s: status is current", request.object_name)
                _clear_retry(runtime, request)
                return "current"
            written = _write(request, runtime=runtime, inputs=inputs, outcome=refreshed)
            if written is not None:
                log.info(
                    "%s: republished networkData.version without a rebuild", request.object_name
                )
            return "refreshed" if written is not None else "stale"

    # Hosts must stop using the old image before the new one exists.
    if was_ready and inputs.built is not None and inputs.built != inputs.live:
        written = _patch(request, runtime=runtime, inputs=inputs, make=config_changed_status)
        if written is None:
            return "stale"
        inputs.image = written
        log.info(
            "%s: inputs changed, wrote Ready=False until the new image is published",
            request.object_name,
        )

    started = time.monotonic()
    outcome = _plan_and_publish(request, runtime=runtime, inputs=inputs)
    if isinstance(outcome, ImageOutcome):
        metrics.observe_build_duration(
            image_format=outcome.image_format, seconds=time.monotonic() - started
        )
        metrics.record_build(result="success", reason=REASON_SUCCESS)
    else:
        metrics.record_build(result="error", reason=outcome.reason)
    if _write(request, runtime=runtime, inputs=inputs, outcome=outcome) is None:
        return "stale"

    if isinstance(outcome, ErrorOutcome) and outcome.reason == MissingNetworkData.reason:
        delay = _schedule_retry(runtime, request)
        log.info("%s: MissingNetworkData, retry in %.0f s", request.object_name, delay)
        return "error"
    runtime.redis.set(contract.built_key(request.uid), inputs.live)
    _clear_retry(runtime, request)
    if isinstance(outcome, ErrorOutcome):
        log.info(
            "%s: build failed with %s, not retried until its inputs change",
            request.object_name,
            outcome.reason,
        )
        return "error"
    log.info("%s: published %s", request.object_name, outcome.image_url)
    return "ready"


def _plan_and_publish(
    request: BuildRequest, *, runtime: Runtime, inputs: Inputs
) -> ImageOutcome | ErrorOutcome:
    settings = runtime.settings
    try:
        plan = plan_image(inputs.image, inputs.secret, settings.catalog, profile=settings.profile)
    except BaseImageError as error:
        log.error("%s: base image unusable (ConfigurationError)", request.object_name)
        return _error_outcome(inputs, reason=REASON_CONFIGURATION, message=str(error))
    except BuilderError as error:
        # The message may quote one value from the Secret: it goes to the status only.
        log.info("%s: build failed: %s", request.object_name, error.reason)
        return _error_outcome(inputs, reason=error.reason, message=str(error))

    _test_delay()
    chosen = contract.chosen_base_file(inputs.image.get("spec") or {}, settings.catalog)
    assert chosen is not None  # plan_image chose the same format.
    record = runtime.store.publish(
        namespace=plan.namespace,
        name=plan.name,
        uid=request.uid,
        image_format=plan.image_format,
        architecture=plan.base.architecture,
        base_digest=digest_file(chosen[1]),
        payload_archive=plan.payload.archive if plan.payload else None,
        payload_digest=plan.payload.digest if plan.payload else None,
    )
    kernel_url = None
    if plan.image_format == "initrd":
        kernel_url = plan.base.kernel_url or (
            f"{settings.public_url}/bases/{plan.base.architecture}/kernel"
        )
    return ImageOutcome(
        image_url=f"{settings.public_url}/{record.url_path}",
        image_format=plan.image_format,
        architecture=plan.architecture,
        network_data_name=plan.network_data_name,
        network_data_version=plan.network_data_version,
        kernel_url=kernel_url,
        extra_kernel_params=plan.extra_kernel_params,
    )


def _error_outcome(inputs: Inputs, *, reason: str, message: str) -> ErrorOutcome:
    name = (inputs.image.get("spec") or {}).get("networkDataName") or None
    version = None
    if name and inputs.secret is not None:
        version = str((inputs.secret.get("metadata") or {}).get("resourceVersion") or "")
    return ErrorOutcome(
        reason=reason, message=message, network_data_name=name, network_data_version=version
    )


def _test_delay() -> None:
    delay = os.environ.get(TEST_BUILD_DELAY)
    if delay:
        time.sleep(float(delay))


# Refreshing a published image without a rebuild.


def _refresh_outcome(
    request: BuildRequest, *, runtime: Runtime, inputs: Inputs
) -> ImageOutcome | None:
    """Return the current image with the live networkData.version, or None to rebuild.

    None when the status' image is no longer in the store (expired, or another public URL).
    """
    status = inputs.image.get("status") or {}
    image_url = status.get("imageUrl") or ""
    prefix = f"{runtime.settings.public_url}/images/{request.namespace}/{request.name}/"
    if not image_url.startswith(prefix):
        return None
    uid, _, file_name = image_url[len(prefix) :].partition("/")
    image_id, _, image_format = file_name.partition(".")
    if uid != request.uid or image_format != status.get("format"):
        return None
    try:
        record = runtime.store.lookup(request.namespace, request.name, uid, image_id)
    except StoreError:
        return None
    if record is None or record.image_format != image_format:
        return None
    spec = inputs.image.get("spec") or {}
    network_data_name = spec.get("networkDataName") or None
    version = None
    if network_data_name and inputs.secret is not None:
        version = str((inputs.secret.get("metadata") or {}).get("resourceVersion") or "")
    return ImageOutcome(
        image_url=image_url,
        image_format=image_format,
        architecture=str(status.get("architecture") or spec.get("architecture") or ""),
        network_data_name=network_data_name,
        network_data_version=version,
        kernel_url=status.get("kernelUrl"),
        extra_kernel_params=status.get("extraKernelParams"),
    )


def _is_current(image: dict, secret: dict | None) -> bool:
    """Return whether the status passes every check the BareMetalHost controller makes."""
    status = image.get("status") or {}
    spec = image.get("spec") or {}
    generation = (image.get("metadata") or {}).get("generation")
    ready = condition(status, "Ready") or {}
    error = condition(status, "Error") or {}
    network_data = status.get("networkData") or {}
    secret_version = str(((secret or {}).get("metadata") or {}).get("resourceVersion") or "")
    checks = (
        ready.get("status") == "True",
        ready.get("observedGeneration") == generation,
        error.get("status") != "True",
        error.get("observedGeneration") == generation,
        bool(status.get("imageUrl")),
        status.get("architecture") == spec.get("architecture"),
        status.get("format") in (spec.get("acceptFormats") or []),
        (network_data.get("name") or None) == (spec.get("networkDataName") or None),
        not spec.get("networkDataName") or network_data.get("version") == secret_version,
    )
    return all(checks)


# Status writes.


def _write(
    request: BuildRequest,
    *,
    runtime: Runtime,
    inputs: Inputs,
    outcome: ImageOutcome | ErrorOutcome,
) -> dict | None:
    return _patch(
        request, runtime=runtime, inputs=inputs, make=lambda image: compute_status(image, outcome)
    )


def _patch(
    request: BuildRequest, *, runtime: Runtime, inputs: Inputs, make: Callable[[dict], dict]
) -> dict | None:
    """Write ``make(image)`` as the status while our token is the desired one.

    Returns the written object, or None when the result was dropped: a newer token is desired,
    or the inputs changed (found after a 409, when the object and its Secret are read again).
    """
    image = inputs.image
    for _ in range(MAX_CONFLICT_RETRIES):
        desired = _get(runtime.redis, contract.desired_key(request.uid))
        if desired is not None and desired != inputs.live:
            log.info("%s: a newer build is desired, dropping this result", request.object_name)
            return None
        resource_version = (image.get("metadata") or {}).get("resourceVersion")
        body = status_patch(make(image), resource_version=resource_version)
        try:
            return runtime.kube.patch_image_status(request.namespace, request.name, body)
        except Conflict:
            metrics.record_conflict()
            log.info(
                "%s: status write hit a stale resourceVersion %s, reading it again",
                request.object_name,
                resource_version,
            )
        fresh = _read_inputs(request, runtime=runtime)
        if fresh is None:
            return None
        if fresh.live != inputs.live:
            log.info(
                "%s: inputs changed during the build, dropping this result", request.object_name
            )
            return None
        image = fresh.image
    raise TransientError(
        f"{request.object_name}: status write conflicted {MAX_CONFLICT_RETRIES} times"
    )


def _write_base_image_error(request: BuildRequest, *, runtime: Runtime, error: Exception) -> str:
    """Report an unreadable base image as ConfigurationError and retry later."""
    log.error("%s: base image unusable (ConfigurationError)", request.object_name)
    image = runtime.kube.read_image(request.namespace, request.name)
    if image is None or (image.get("metadata") or {}).get("uid") != request.uid:
        return "gone"
    outcome = ErrorOutcome(reason=REASON_CONFIGURATION, message=str(error))
    body = status_patch(
        compute_status(image, outcome),
        resource_version=(image.get("metadata") or {}).get("resourceVersion"),
    )
    try:
        runtime.kube.patch_image_status(request.namespace, request.name, body)
    except Conflict:
        raise TransientError(f"{request.object_name}: status write conflicted") from None
    _schedule_retry(runtime, request)
    return "error"


def _give_up(request: BuildRequest, *, runtime: Runtime, inputs: Inputs, deliveries: int) -> str:
    """Write an Error status after too many interrupted deliveries of the same build."""
    log.error(
        "%s: build interrupted %d times (worker lost or time limit), giving up",
        request.object_name,
        deliveries - 1,
    )
    message = (
        f"Cannot generate image: the build was interrupted {deliveries - 1} times (worker lost"
        " or time limit exceeded); check the worker logs, then change the inputs to retry"
    )
    outcome = _error_outcome(inputs, reason=REASON_BUILD_INVALID, message=message)
    if _write(request, runtime=runtime, inputs=inputs, outcome=outcome) is not None:
        runtime.redis.set(contract.built_key(request.uid), inputs.live)
    runtime.redis.delete(contract.redeliveries_key(request.uid, request.token))
    return "error"


# Redis coordination with the watcher.


def _get(client: redis.Redis, key: str) -> str | None:
    value = client.get(key)
    return value.decode() if value is not None else None


def _hmac_key(client: redis.Redis) -> bytes:
    """Return the shared HMAC key, creating it when no watcher or worker has yet."""
    client.set(contract.HMAC_KEY, secrets.token_bytes(32), nx=True)
    key = client.get(contract.HMAC_KEY)
    if key is None:
        raise TransientError(f"Redis key {contract.HMAC_KEY} vanished after it was set")
    return key


def _schedule_retry(runtime: Runtime, request: BuildRequest) -> float:
    """Add the object to the watcher's retry schedule with a doubled wait; return the wait."""
    client = runtime.redis
    delay_key = contract.retry_delay_key(request.uid)
    previous = client.get(delay_key)
    if previous is None:
        delay = contract.RETRY_FIRST_SECONDS
    else:
        delay = min(float(previous) * 2, contract.RETRY_MAX_SECONDS)
    client.set(delay_key, str(delay), ex=COUNTER_TTL_SECONDS)
    member = contract.retry_member(namespace=request.namespace, name=request.name, uid=request.uid)
    client.zadd(contract.RETRY_SCHEDULE, {member: time.time() + delay})
    return delay


def _schedule_recheck(runtime: Runtime, request: BuildRequest) -> None:
    """Ask the watcher to look at the object again soon, keeping an earlier due time."""
    member = contract.retry_member(namespace=request.namespace, name=request.name, uid=request.uid)
    due = time.time() + contract.RETRY_FIRST_SECONDS
    runtime.redis.zadd(contract.RETRY_SCHEDULE, {member: due}, nx=True)


def _schedule_recheck_quietly(runtime: Runtime, request: BuildRequest) -> None:
    try:
        _schedule_recheck(runtime, request)
    except redis.RedisError as error:
        log.error("%s: cannot add it to the retry schedule: %s", request.object_name, error)


def _clear_retry(runtime: Runtime, request: BuildRequest) -> None:
    member = contract.retry_member(namespace=request.namespace, name=request.name, uid=request.uid)
    runtime.redis.zrem(contract.RETRY_SCHEDULE, member)
    runtime.redis.delete(contract.retry_delay_key(request.uid))


def _queue_newer(runtime: Runtime, request: BuildRequest, *, result: LeaseResult) -> None:
    """Queue a build when a newer desired token arrived while this one ran.

    Messages dropped because this worker held the lease are covered here too. The waiting key
    keeps at most one message per object in the queue.
    """
    client = runtime.redis
    desired = _get(client, contract.desired_key(request.uid))
    built = _get(client, contract.built_key(request.uid))
    if desired is None or desired == built or desired == result.handled_token:
        return
    waiting_ttl = runtime.queues.visibility_timeout + runtime.queues.time_limit
    if not client.set(contract.waiting_key(request.uid), "1", nx=True, ex=waiting_ttl):
        return
    app.send_task(
        contract.TASK_NAME,
        kwargs=contract.task_kwargs(
            namespace=request.namespace, name=request.name, uid=request.uid, token=desired
        ),
        queue=contract.queue_name(result.architecture),
    )
    log.info("%s: queued a build for the newer desired token", request.object_name)
