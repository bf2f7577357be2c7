"""The ``ppimage watcher``, ``ppimage rebuild`` and ``ppimage status`` commands.

Each command checks the broker and the Kubernetes API before it does anything else, and exits
with status 2 and a message naming the setting (--broker, --kubeconfig) when one is wrong or
unreachable. Exit status 1 from ``rebuild`` means some named objects were not enqueued.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid

import click
import kubernetes.client
import kubernetes.config
import redis
from kombu.utils.url import maybe_sanitize_url
from kubernetes.client.exceptions import ApiException

from builder import contract
from builder.settings import (
    DEFAULT_BROKER_URL,
    CommandError,
    ServiceSettings,
    check_broker_url,
    metrics_listen_option,
    parse_host_port,
    service_options,
    service_settings,
)
from builder.store import PayloadStore
from watcher import metrics
from watcher.enqueue import Enqueuer, broker_redis, celery_producer, ensure_hmac_key
from watcher.kube import GROUP, PLURAL, VERSION, KubeAccess
from watcher.lease import DEFAULT_DURATION_SECONDS, DEFAULT_LEASE_NAME, LeaderElector
from watcher.loop import DEFAULT_RESYNC_SECONDS, Controller, LoopSettings
from watcher.reconcile import Reconciler, queue_for
from watcher.service import WatcherService
from watcher.state import FOREIGN_LABEL, ObjectCache, image_state, status_view

log = logging.getLogger(__name__)

kubeconfig_option = click.option(
    "--kubeconfig",
    envvar="KUBECONFIG",
    help="Kubeconfig file. Default: the in-cluster service account when running in a pod, "
    "else ~/.kube/config. Env: KUBECONFIG.",
)
namespace_option = click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to act on (watch, list or rebuild); repeat for several. Default: all.",
)


def kube_client(kubeconfig: str | None) -> kubernetes.client.ApiClient:
    """Return an ApiClient from ``kubeconfig``, the in-cluster account or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        else:
            kubernetes.config.load_kube_config(client_configuration=configuration)
    except (kubernetes.config.ConfigException, OSError) as error:
        raise CommandError(
            f"--kubeconfig {kubeconfig or '(default)'}: cannot load the configuration: {error}"
        ) from error
    # Fail within seconds on an unreachable server instead of retrying for minutes.
    configuration.retries = 1
    return kubernetes.client.ApiClient(configuration)


def check_api(client: kubernetes.client.ApiClient, *, kubeconfig: str | None,
              namespaces: tuple[str, ...]) -> None:
    """Raise CommandError naming --kubeconfig unless PreprovisioningImages can be listed."""
    custom = kubernetes.client.CustomObjectsApi(client)
    host = client.configuration.host
    try:
        for namespace in namespaces or (None,):
            if namespace is None:
                custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, limit=1, _preload_content=False, _request_timeout=10
                )
            else:
                custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, limit=1, _preload_content=False,
                    _request_timeout=10,
                )
    except ApiException as error:
        raise CommandError(
            f"--kubeconfig {kubeconfig or '(default)'}: listing {PLURAL}.{GROUP} at {host} "
            f"failed with HTTP {error.status} {error.reason}; check the CRD and the RBAC rules"
        ) from error
    except Exception as error:
        raise CommandError(
            f"--kubeconfig {kubeconfig or '(default)'}: cannot reach the Kubernetes API at "
            f"{host}: {error}"
        ) from error


def check_broker(broker_url: str) -> redis.Redis:
    """Return a Redis client for the broker; raise CommandError naming --broker when it fails."""
    check_broker_url(broker_url)
    try:
        client = broker_redis(broker_url)
        client.ping()
    except (redis.RedisError, ValueError) as error:
        raise CommandError(
            f"--broker {maybe_sanitize_url(broker_url)}: cannot reach Redis: {error}"
        ) from error
    return client


def _identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def build_service(
    *,
    settings: ServiceSettings,
    api_client: kubernetes.client.ApiClient,
    redis_client: redis.Redis,
    loop_settings: LoopSettings,
    lease_namespace: str,
    lease_name: str = DEFAULT_LEASE_NAME,
    lease_seconds: int = DEFAULT_DURATION_SECONDS,
    identity: str | None = None,
) -> WatcherService:
    """Wire a WatcherService from checked settings and clients."""
    kube = KubeAccess(api_client)
    hmac_key = ensure_hmac_key(redis_client)
    store = PayloadStore(settings.store)

    def make_controller() -> Controller:
        cache = ObjectCache()
        enqueuer = Enqueuer(redis_client, celery_producer(settings.broker_url))
        reconciler = Reconciler(
            cache=cache, kube=kube, enqueuer=enqueuer, catalog=settings.catalog, store=store,
            hmac_key=hmac_key, profile=settings.profile,
        )
        return Controller(kube=kube, reconciler=reconciler, cache=cache, settings=loop_settings)

    elector = LeaderElector(
        api_client, namespace=lease_namespace, name=lease_name,
        identity=identity or _identity(), duration_seconds=lease_seconds,
    )
    return WatcherService(elector=elector, make_controller=make_controller)


@click.command("watcher")
@service_options
@kubeconfig_option
@namespace_option
@click.option(
    "--resync-seconds",
    type=click.FloatRange(min=1),
    default=DEFAULT_RESYNC_SECONDS,
    show_default=True,
    help="Seconds between re-evaluations of every PreprovisioningImage.",
)
@click.option(
    "--lease-namespace",
    envvar="POD_NAMESPACE",
    default="default",
    show_default=True,
    help="Namespace of the Lease that elects the active watcher. Env: POD_NAMESPACE.",
)
@click.option("--lease-name", default=DEFAULT_LEASE_NAME, show_default=True,
              help="Name of the leader election Lease.")
@metrics_listen_option
def command(kubeconfig, namespaces, resync_seconds, lease_namespace, lease_name,
            metrics_listen, **options) -> None:
    """Watch PreprovisioningImages and Secrets and enqueue the builds that are out of date."""
    settings = service_settings(**options)
    metrics_address = None
    if metrics_listen:
        metrics_address = parse_host_port(metrics_listen, option="--metrics-listen")
    redis_client = check_broker(settings.broker_url)
    api_client = kube_client(kubeconfig)
    check_api(api_client, kubeconfig=kubeconfig, namespaces=namespaces)
    if metrics_address is not None:
        queues = [contract.queue_name(name) for name in settings.catalog.architectures]
        try:
            metrics.start_exporter(host=metrics_address[0], port=metrics_address[1],
                                   client=redis_client, queues=queues)  # fmt: skip
        except OSError as error:
            raise CommandError(f"--metrics-listen {metrics_listen!r}: {error}") from None
        log.info("metrics on %s", metrics_listen)
    service = build_service(
        settings=settings, api_client=api_client, redis_client=redis_client,
        loop_settings=LoopSettings(namespaces=tuple(namespaces), resync_seconds=resync_seconds),
        lease_namespace=lease_namespace, lease_name=lease_name,
    )
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: service.stop())
    service.run()


def _parse_reference(reference: str) -> tuple[str, str]:
    namespace, separator, name = reference.partition("/")
    if not separator or not namespace or not name or "/" in name:
        raise CommandError(f"{reference!r}: expected NAMESPACE/NAME")
    return namespace, name


@click.command("rebuild")
@service_options
@kubeconfig_option
@namespace_option
@click.option("--all", "rebuild_all", is_flag=True,
              help="Rebuild every PreprovisioningImage (in the --namespace list, if given).")
@click.argument("references", nargs=-1, metavar="NAMESPACE/NAME...")
def rebuild_command(kubeconfig, namespaces, rebuild_all, references, **options) -> None:
    """Force a rebuild: forget the built token of each object and enqueue a build message."""
    if bool(references) == bool(rebuild_all):
        raise CommandError("give NAMESPACE/NAME arguments or --all, not both and not neither")
    targets = [_parse_reference(reference) for reference in references]
    settings = service_settings(**options)
    redis_client = check_broker(settings.broker_url)
    api_client = kube_client(kubeconfig)
    check_api(api_client, kubeconfig=kubeconfig, namespaces=namespaces)
    kube = KubeAccess(api_client)

    images: list[dict] = []
    failed = 0
    if rebuild_all:
        for namespace in namespaces or (None,):
            images.extend(kube.list_images(namespace)[0])
    for namespace, name in targets:
        obj = kube.read_image(namespace, name)
        if obj is None:
            click.echo(f"{namespace}/{name}: PreprovisioningImage not found", err=True)
            failed += 1
            continue
        images.append(obj)

    hmac_key = ensure_hmac_key(redis_client)
    enqueuer = Enqueuer(redis_client, celery_producer(settings.broker_url))
    catalog = settings.catalog
    for obj in images:
        state = image_state(obj)
        if state.foreign or state.deleting:
            why = f"labelled {FOREIGN_LABEL}" if state.foreign else "being deleted"
            click.echo(f"{state.display}: skipped, {why}", err=True)
            failed += 1
            continue
        secret = None
        if state.network_data_name:
            secret = kube.read_secret(state.namespace, state.network_data_name)
        token = contract.live_token(
            image=obj, secret=secret, hmac_key=hmac_key, catalog=catalog,
            profile=settings.profile,
        )
        enqueuer.forget_built(state.uid)
        # A rebuild must not wait behind a message that a dead worker still holds.
        enqueuer.forget_waiting(state.uid)
        sent = enqueuer.enqueue(
            namespace=state.namespace, name=state.name, uid=state.uid, token=token,
            queue=queue_for(catalog, state.architecture),
        )
        outcome = "enqueued" if sent else "a build message already waits"
        log.info("%s: rebuild requested: %s", state.display, outcome)
        click.echo(f"{state.display}: {outcome}")
    if failed:
        raise SystemExit(1)


def _queue_lengths(client: redis.Redis) -> dict[str, int]:
    # Celery's Redis transport keeps one list per queue and priority; priorities other than
    # the default add a suffix after "\x06\x16" to the queue name.
    lengths: dict[str, int] = {}
    for key in client.scan_iter(match=f"{contract.QUEUE_PREFIX}*", _type="list"):
        name = key.decode(errors="replace").split("\x06\x16")[0]
        lengths[name] = lengths.get(name, 0) + int(client.llen(key))
    return lengths


@click.command("status")
@click.option(
    "--broker",
    "broker_url",
    envvar="PPIMAGE_BROKER_URL",
    default=DEFAULT_BROKER_URL,
    show_default=True,
    help="Celery broker URL (Redis). Env: PPIMAGE_BROKER_URL.",
)
@kubeconfig_option
@namespace_option
def status_command(broker_url, kubeconfig, namespaces) -> None:
    """Print the build queue lengths and the PreprovisioningImages that are not Ready."""
    redis_client = check_broker(broker_url)
    api_client = kube_client(kubeconfig)
    check_api(api_client, kubeconfig=kubeconfig, namespaces=namespaces)
    kube = KubeAccess(api_client)

    lengths = _queue_lengths(redis_client)
    if not lengths:
        click.echo("build queues: all empty")
    for name in sorted(lengths):
        click.echo(f"queue {name}: {lengths[name]} messages waiting")
    click.echo(f"retry schedule: {redis_client.zcard(contract.RETRY_SCHEDULE)} objects")

    not_ready = 0
    for namespace in namespaces or (None,):
        for obj in kube.list_images(namespace)[0]:
            state = image_state(obj)
            view = status_view(obj.get("status"))
            if view.ready_status == "True" and view.ready_generation == state.generation:
                continue
            not_ready += 1
            reason, message = _not_ready_reason(obj)
            click.echo(f"{state.display}: not Ready: {reason}: {message}")
    click.echo(f"{not_ready} PreprovisioningImages not Ready")


def _not_ready_reason(obj: dict) -> tuple[str, str]:
    status = obj.get("status") or {}
    conditions = {entry.get("type"): entry for entry in status.get("conditions") or []}
    error = conditions.get("Error") or {}
    ready = conditions.get("Ready") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    if error.get("status") == "True":
        return error.get("reason") or "Error", error.get("message") or ""
    if not ready:
        return "NoStatus", "no Ready condition yet"
    if ready.get("observedGeneration") != generation:
        return (ready.get("reason") or "Stale",
                f"observedGeneration {ready.get('observedGeneration')} is not {generation}")
    return ready.get("reason") or "NotReady", ready.get("message") or ""
