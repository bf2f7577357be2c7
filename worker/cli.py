"""The ``ppimage worker`` and ``ppimage flower`` commands.

``worker`` checks its settings, reaches Redis (PING) and the Kubernetes API (a discovery read)
and only then starts ``celery worker`` with the prefork pool on one queue per architecture of
the catalog, or the queues given with ``--queues``. A wrong or unreachable broker or API exits
with status 2 and a message naming the setting. ``flower`` starts Flower on the same broker; its
HTTP API stays closed unless ``--unauthenticated-api`` is given.
"""

from __future__ import annotations

import logging
import os

import click
import redis
from kombu.utils.url import maybe_sanitize_url

from builder import contract
from builder.build import base_symlinked_dirs
from builder.errors import BuilderError
from builder.images import digest_file
from builder.settings import (
    DEFAULT_BROKER_URL,
    CommandError,
    ServiceSettings,
    metrics_listen_option,
    parse_host_port,
    service_options,
    service_settings,
)
from worker import metrics, tasks
from worker.app import (
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_SOFT_TIME_LIMIT,
    DEFAULT_TIME_LIMIT,
    DEFAULT_VISIBILITY_TIMEOUT,
    QueueSettings,
    SettingsError,
    app,
    configure_app,
)
from worker.kube import KubeClient, KubeError, load_configuration

log = logging.getLogger(__name__)


def check_broker(broker_url: str) -> None:
    """Send PING to the Redis broker; raise CommandError naming --broker when it fails."""
    shown = maybe_sanitize_url(broker_url)
    try:
        client = redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=5)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as error:
        raise CommandError(
            f"--broker {shown} (PPIMAGE_BROKER_URL): Redis PING failed:"
            f" {type(error).__name__}: {error}"
        ) from None


def check_kubernetes():
    """Load the Kubernetes configuration and read the PPI discovery document once.

    Returns the client configuration; raises CommandError naming KUBECONFIG on failure.
    """
    try:
        configuration = load_configuration()
    except KubeError as error:
        raise CommandError(str(error)) from None
    client = KubeClient(configuration)
    try:
        client.check_access()
    except KubeError as error:
        source = os.environ.get("KUBECONFIG") or "~/.kube/config or the in-cluster account"
        raise CommandError(f"Kubernetes API from {source}: {error}") from None
    finally:
        client.close()
    return configuration


def warm_base_caches(settings: ServiceSettings) -> None:
    """Hash every base image and scan every base initramfs once, before the pool forks.

    The caches live in process memory, so children forked afterwards start with them instead
    of each hashing a 1 GB ISO on its first build.
    """
    for base in settings.catalog.architectures.values():
        for path in (base.iso, base.initrd):
            if path is not None:
                digest_file(path)
        try:
            base_symlinked_dirs(base)
        except BuilderError as error:
            raise CommandError(f"base images for {base.architecture}: {error}") from None


@click.command("worker")
@service_options
@click.option(
    "--queues",
    help="Comma-separated queues to consume, for example build.x86_64. "
    "Default: one per architecture of the catalog.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Pool child processes, each building one image at a time. Default: CPU count.",
)
@click.option(
    "--soft-time-limit",
    type=int,
    envvar="PPIMAGE_SOFT_TIME_LIMIT",
    default=DEFAULT_SOFT_TIME_LIMIT,
    show_default=True,
    help="Seconds after which a build is interrupted and retried. Env: PPIMAGE_SOFT_TIME_LIMIT.",
)
@click.option(
    "--time-limit",
    type=int,
    envvar="PPIMAGE_TIME_LIMIT",
    default=DEFAULT_TIME_LIMIT,
    show_default=True,
    help="Seconds after which a build's process is killed and the message requeued. "
    "Env: PPIMAGE_TIME_LIMIT.",
)
@click.option(
    "--visibility-timeout",
    type=int,
    envvar="PPIMAGE_VISIBILITY_TIMEOUT",
    default=DEFAULT_VISIBILITY_TIMEOUT,
    show_default=True,
    help="Seconds before Redis redelivers the unacknowledged messages of a dead worker; "
    "must exceed --time-limit. Env: PPIMAGE_VISIBILITY_TIMEOUT.",
)
@click.option(
    "--max-deliveries",
    type=int,
    envvar="PPIMAGE_MAX_DELIVERIES",
    default=DEFAULT_MAX_DELIVERIES,
    show_default=True,
    help="Deliveries of one build (same object and inputs) before it is reported as an "
    "Error. Env: PPIMAGE_MAX_DELIVERIES.",
)
@click.option(
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(("DEBUG", "INFO", "WARNING", "ERROR"), case_sensitive=False),
    help="Log level of the worker.",
)
@metrics_listen_option
def command(
    broker_url,
    store,
    public_url,
    config,
    iso,
    initrd,
    kernel,
    arch,
    profile,
    queues,
    concurrency,
    soft_time_limit,
    time_limit,
    visibility_timeout,
    max_deliveries,
    loglevel,
    metrics_listen,
) -> None:
    """Run a build worker: consume build messages and write PreprovisioningImage statuses."""
    settings = service_settings(
        broker_url=broker_url,
        store=store,
        public_url=public_url,
        config=config,
        iso=iso,
        initrd=initrd,
        kernel=kernel,
        arch=arch,
        profile=profile,
    )
    try:
        queue_settings = QueueSettings(
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            visibility_timeout=visibility_timeout,
            max_deliveries=max_deliveries,
        ).check()
    except SettingsError as error:
        raise CommandError(str(error)) from None
    if queues:
        queue_names = [name.strip() for name in queues.split(",") if name.strip()]
    else:
        queue_names = sorted({contract.queue_name(name) for name in settings.catalog.architectures})
    if not queue_names:
        raise CommandError("--queues: no queue names given")

    metrics_address = None
    if metrics_listen:
        metrics_address = parse_host_port(metrics_listen, option="--metrics-listen")

    check_broker(settings.broker_url)
    kube_configuration = check_kubernetes()
    warm_base_caches(settings)

    if metrics_address is not None:
        directory = metrics.prepare_multiprocess_directory()
        try:
            metrics.start_exporter(host=metrics_address[0], port=metrics_address[1])
        except OSError as error:
            raise CommandError(f"--metrics-listen {metrics_listen!r}: {error}") from None
        log.info("metrics on %s (values in %s)", metrics_listen, directory)

    configure_app(app, broker_url=settings.broker_url, queues=queue_settings)
    tasks.configure(
        tasks.Runtime(
            settings=settings, queues=queue_settings, kube_configuration=kube_configuration
        )
    )
    log.info(
        "starting worker on %s, queues %s, time limits %d/%d s, visibility timeout %d s",
        maybe_sanitize_url(settings.broker_url),
        ",".join(queue_names),
        queue_settings.soft_time_limit,
        queue_settings.time_limit,
        queue_settings.visibility_timeout,
    )
    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency or os.cpu_count() or 1}",
        f"--queues={','.join(queue_names)}",
        f"--loglevel={loglevel.upper()}",
        # Several workers on one host need distinct node names for Flower and remote control.
        f"--hostname=ppimage-{os.getpid()}@%h",
        "--task-events",
    ]
    app.worker_main(argv=argv)


@click.command("flower")
@click.option(
    "--broker",
    "broker_url",
    envvar="PPIMAGE_BROKER_URL",
    default=DEFAULT_BROKER_URL,
    show_default=True,
    help="Celery broker URL (Redis) of the workers. Env: PPIMAGE_BROKER_URL.",
)
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="Address Flower listens on."
)
@click.option("--port", type=int, default=5555, show_default=True, help="Port Flower listens on.")
@click.option(
    "--unauthenticated-api",
    is_flag=True,
    help="Open Flower's HTTP API without authentication (sets FLOWER_UNAUTHENTICATED_API).",
)
def flower_command(broker_url, address, port, unauthenticated_api) -> None:
    """Run Flower, the Celery monitor, against the workers' broker."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise CommandError(f"--broker {broker_url!r}: expected a redis:// URL")
    check_broker(broker_url)
    if unauthenticated_api:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    else:
        os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    app.conf.broker_url = broker_url
    app.start(argv=["flower", f"--address={address}", f"--port={port}"])
