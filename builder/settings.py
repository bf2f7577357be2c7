"""Options and settings shared by the ``ppimage`` commands and service roles.

Every role (watcher, worker, image server) reads the same broker, store, public URL and base
image options, each with its environment variable, and checks them at start. A wrong value
raises ``CommandError``, which click prints before it exits with status 2.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import click

from builder import images
from builder.catalog import (
    PROFILE_NAMES,
    Catalog,
    host_architecture,
    load_catalog,
    single_architecture,
)
from builder.errors import BaseImageError


class CommandError(click.ClickException):
    """A failure of the command itself; click prints it and exits with status 2."""

    exit_code = 2


def catalog_from_options(
    *,
    config: Path | None,
    iso: Path | None,
    initrd: Path | None,
    kernel: Path | None,
    arch: str | None,
    profile: str | None,
) -> Catalog:
    try:
        if config is not None:
            if iso or initrd or kernel:
                raise CommandError("give either --config or --iso/--initrd/--kernel, not both")
            catalog = load_catalog(config)
        elif iso or initrd or kernel:
            architecture = host_architecture() if arch is None else arch
            base = single_architecture(
                architecture=architecture,
                iso=iso,
                initrd=initrd,
                kernel=kernel,
                profile=profile or "networkmanager",
            )
            catalog = Catalog({base.architecture: base})
        else:
            raise CommandError(
                "no base images: give --iso PATH and/or --initrd PATH --kernel PATH, "
                "or --config CATALOG.yaml"
            )
        # A base ISO without an embed area is a setup mistake, found before any object.
        for base in catalog.architectures.values():
            if base.iso is not None:
                images.find_embed_area(base.iso, embed_path=base.embed_path)
    except BaseImageError as error:
        raise CommandError(str(error)) from error
    return catalog


base_image_options = [
    click.option(
        "--config",
        "config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Base image catalog (YAML) listing base images per architecture.",
    ),
    click.option(
        "--iso",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Base ISO with an embed area (see prepare-base), for --arch.",
    ),
    click.option(
        "--initrd",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Base initramfs for the initrd format, for --arch.",
    ),
    click.option(
        "--kernel",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Kernel published with the initrd format, for --arch.",
    ),
    click.option(
        "--arch",
        help="Architecture of --iso/--initrd/--kernel. Default: this machine's.",
    ),
    click.option(
        "--profile",
        type=click.Choice(PROFILE_NAMES),
        help="Network configuration profile. Default: the catalog's, else networkmanager.",
    ),
]


def with_base_image_options(function):
    """Add the base image options shared by build, render and the service roles."""
    for option in reversed(base_image_options):
        function = option(function)
    return function


DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class ServiceSettings:
    """Settings shared by the watcher, workers and image servers."""

    broker_url: str
    store: Path
    public_url: str
    catalog: Catalog
    profile: str | None


def service_options(function):
    """Add the options every service role reads, each with its environment variable."""
    options = [
        click.option(
            "--broker",
            "broker_url",
            envvar="PPIMAGE_BROKER_URL",
            default=DEFAULT_BROKER_URL,
            show_default=True,
            help="Celery broker URL (Redis). Env: PPIMAGE_BROKER_URL.",
        ),
        click.option(
            "--store",
            envvar="PPIMAGE_STORE",
            default="/var/lib/ppimage",
            show_default=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Payload store directory shared by workers and image servers. Env: PPIMAGE_STORE.",
        ),
        click.option(
            "--public-url",
            envvar="PPIMAGE_PUBLIC_URL",
            default="http://127.0.0.1:8080",
            show_default=True,
            help="URL prefix of the image servers, written into imageUrl. Env: PPIMAGE_PUBLIC_URL.",
        ),
        click.option(
            "--config",
            "config",
            envvar="PPIMAGE_CONFIG",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Base image catalog (YAML). Env: PPIMAGE_CONFIG.",
        ),
        *base_image_options[1:],
    ]
    for option in reversed(options):
        function = option(function)
    return function


def check_broker_url(broker_url: str) -> None:
    """Raise CommandError unless ``broker_url`` is a Redis URL with a numeric database."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise CommandError(f"--broker {broker_url!r}: expected a redis:// URL")
    database = urllib.parse.urlsplit(broker_url).path.strip("/")
    if broker_url.startswith(("redis://", "rediss://")) and database and not database.isdigit():
        # redis-py would silently use database 0 for a path that is not a number.
        raise CommandError(
            f"--broker: database {database!r} is not a number; write redis://HOST:PORT/N"
        )


def service_settings(
    *,
    broker_url,
    store,
    public_url,
    config,
    iso,
    initrd,
    kernel,
    arch,
    profile,
    writes_store: bool = True,
) -> ServiceSettings:
    """Check the shared service options and return them; raise CommandError naming a bad one.

    ``writes_store`` False (the image server) accepts a read-only store that already exists.
    """
    check_broker_url(broker_url)
    if not public_url.startswith(("http://", "https://")):
        raise CommandError(f"--public-url {public_url!r}: expected an http:// or https:// URL")
    if writes_store:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(f"--store {store}: cannot create the directory: {error}") from error
        if not os.access(store, os.W_OK | os.X_OK):
            raise CommandError(f"--store {store}: directory is not writable")
    elif not os.access(store, os.R_OK | os.X_OK):
        raise CommandError(f"--store {store}: directory does not exist or is not readable")
    catalog = catalog_from_options(
        config=config, iso=iso, initrd=initrd, kernel=kernel, arch=arch, profile=profile
    )
    return ServiceSettings(
        broker_url=broker_url,
        store=store,
        public_url=public_url.rstrip("/"),
        catalog=catalog,
        profile=profile,
    )


def parse_host_port(value: str, *, option: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6ADDRESS]:PORT``; raise CommandError naming ``option``."""
    host, separator, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise CommandError(
            f"{option} {value!r}: expected HOST:PORT with a port from 0 to 65535,"
            " for example 127.0.0.1:9100 or [::1]:9100"
        )
    return host, int(port_text)


def metrics_listen_option(function):
    """Add ``--metrics-listen``, the address of a role's Prometheus ``/metrics`` endpoint."""
    return click.option(
        "--metrics-listen",
        envvar="PPIMAGE_METRICS_LISTEN",
        default=None,
        help="Serve Prometheus metrics (and /healthz) on HOST:PORT. Default: off. "
        "Env: PPIMAGE_METRICS_LISTEN.",
    )(function)
