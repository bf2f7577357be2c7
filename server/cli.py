"""``ppimage serve``: run the image server until SIGTERM or SIGINT.

The server only reads the shared payload store and the base image catalog, so any number of
replicas can run side by side. On SIGTERM it stops accepting connections and
waits up to ``DRAIN_SECONDS`` for running downloads before it exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import click

from builder.settings import CommandError, parse_host_port, service_options, service_settings
from builder.store import PayloadStore
from server.http import DEFAULT_MAX_CONNECTIONS, ImageServer, make_server
from server.resolver import Resolver

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
DRAIN_SECONDS = 30.0


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6ADDRESS]:PORT``; raise CommandError naming --listen."""
    return parse_host_port(listen, option="--listen")


@click.command("serve")
@service_options
@click.option(
    "--listen",
    envvar="PPIMAGE_LISTEN",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Address and TCP port to listen on, HOST:PORT ([::1]:8080 for IPv6). Env: PPIMAGE_LISTEN.",
)
@click.option(
    "--max-connections",
    envvar="PPIMAGE_MAX_CONNECTIONS",
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections served at once, one thread each. More connections get 503 with"
    " Retry-After."
    " Env: PPIMAGE_MAX_CONNECTIONS.",
)
def command(listen: str, max_connections: int, **options: object) -> None:
    """Serve published images, base kernels, health probes and metrics over HTTP."""
    host, port = parse_listen(listen)
    settings = service_settings(**options, writes_store=False)
    resolver = Resolver(store=PayloadStore(settings.store), catalog=settings.catalog)
    try:
        server = make_server(
            resolver=resolver, host=host, port=port, max_connections=max_connections
        )
    except OSError as error:
        raise CommandError(f"--listen {listen!r}: cannot listen there: {error}") from error
    bound_host, bound_port = server.server_address[:2]
    log.info(
        "image server listening on %s port %d (backlog %d, at most %d connections), store %s",
        bound_host,
        bound_port,
        server.request_queue_size,
        server.max_connections,
        settings.store,
    )
    run(server, resolver)


def run(server: ImageServer, resolver: Resolver) -> None:
    """Serve until SIGTERM or SIGINT, then drain running downloads and close the socket."""

    def stop(signum: int, _frame: object) -> None:
        log.info("image server received %s, stopping", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=resolver.warm, name="warm-bases", daemon=True).start()
    try:
        server.serve_forever()
    finally:
        deadline = time.monotonic() + DRAIN_SECONDS
        while server.active_downloads and time.monotonic() < deadline:
            time.sleep(0.2)
        if server.active_downloads:
            log.warning(
                "image server stopped with %d downloads still running", server.active_downloads
            )
        server.server_close()
        log.info("image server stopped")
