"""The HTTP image server: GET and HEAD with single byte ranges, conditional requests and probes.

Routes: ``/images/NAMESPACE/NAME/UID/IMAGE_ID.iso|.initrd`` (a published image),
``/bases/ARCH/kernel`` (the catalog kernel, for kernelUrl), ``/healthz`` (liveness),
``/readyz`` (readiness) and ``/metrics`` (Prometheus). Anything else is 404, other methods
are 405. Paths are matched raw, before any percent-decoding: no valid name needs escaping, so an
encoded slash or dot never reaches the store. Base ranges go to the socket with sendfile(2)
and only literal segments (the payload and padding) pass through Python.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from builder import images
from server import metrics
from server.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    http_date,
    is_not_modified,
    parse_range,
    range_applies,
)
from server.resolver import OpenedResource, ResolveError, Resolver

log = logging.getLogger(__name__)

# Idle keep-alive connections and clients that stop reading are dropped after this long.
DEFAULT_TIMEOUT_SECONDS = 60.0

_IMAGE_PATH = re.compile(r"^/images/([^/]+)/([^/]+)/([^/]+)/([^/]+)\.(iso|initrd)$")
_KERNEL_PATH = re.compile(r"^/bases/([A-Za-z0-9_-]{1,32})/kernel$")
_PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
_ALLOWED_METHODS = "GET, HEAD"


class ClientDisconnected(Exception):
    """The client closed the connection or stopped reading before the body was sent."""


class TruncatedBase(Exception):
    """A base file ended before the end its layout expects, because it was truncated in place."""


class ImageServer(ThreadingHTTPServer):
    """A threaded HTTP server, one daemon thread per connection, serving what a Resolver opens."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        *,
        resolver: Resolver,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        # An IPv6 literal needs an AF_INET6 socket. TCPServer.__init__ reads this attribute.
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.resolver = resolver
        self.request_timeout = timeout
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, ImageRequestHandler)

    def handle_error(self, request: object, client_address: tuple) -> None:
        """Log an unexpected error of one connection. The server keeps running."""
        log.exception("client %s: request failed", client_address[0])

    @property
    def active_downloads(self) -> int:
        """Number of bodies being sent right now."""
        return self._active

    def download_started(self) -> None:
        with self._active_lock:
            self._active += 1
        metrics.ACTIVE_DOWNLOADS.inc()

    def download_finished(self) -> None:
        with self._active_lock:
            self._active -= 1
        metrics.ACTIVE_DOWNLOADS.dec()


class ImageRequestHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection, kept alive unless a response had to close it."""

    protocol_version = "HTTP/1.1"
    server_version = "ppimage"
    server: ImageServer

    def handle(self) -> None:
        # A reset between requests surfaces while reading the next request line.
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as error:
            log.debug("client %s disconnected: %s", self.client_address[0], error)

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._handle(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(send_body=False)

    def _reject_method(self) -> None:
        # The request may carry a body this server does not read, so the connection closes.
        self.close_connection = True
        self._start()
        try:
            self._send_text(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"method {self.command} is not allowed; use GET or HEAD\n",
                send_body=True,
                headers={"Allow": _ALLOWED_METHODS, "Connection": "close"},
            )
        except ClientDisconnected as error:
            log.debug("client %s disconnected: %s", self.client_address[0], error)
        finally:
            self._log_request()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _reject_method

    # Request handling.

    def _start(self) -> None:
        self._started = time.monotonic()
        self._status = 0
        self._sent = 0
        self._object_name: str | None = None
        self._route = "other"

    def _handle(self, *, send_body: bool) -> None:
        self._start()
        path = self.path.split("?", 1)[0]
        try:
            self._dispatch(path, send_body=send_body)
        except ClientDisconnected as error:
            self.close_connection = True
            log.debug(
                "%sclient %s disconnected after %d bytes of %s: %s",
                self._object_prefix(),
                self.client_address[0],
                self._sent,
                path,
                error,
            )
        except TruncatedBase as error:
            self.close_connection = True
            log.error("%s%s", self._object_prefix(), error)
        finally:
            self._log_request()

    def _dispatch(self, path: str, *, send_body: bool) -> None:
        if path in _PROBE_PATHS:
            self._route = "probe"
            self._answer_probe(path, send_body=send_body)
            return
        image = _IMAGE_PATH.match(path)
        kernel = _KERNEL_PATH.match(path)
        if image is None and kernel is None:
            self._send_text(HTTPStatus.NOT_FOUND, "not found\n", send_body=send_body)
            return
        try:
            if image is not None:
                namespace, name, uid, image_id, image_format = image.groups()
                self._route = "image"
                self._object_name = f"{namespace}/{name}"
                resource = self.server.resolver.open_image(
                    namespace=namespace,
                    name=name,
                    uid=uid,
                    image_id=image_id,
                    image_format=image_format,
                )
            else:
                self._route = "kernel"
                self._object_name = f"bases/{kernel.group(1)}"
                resource = self.server.resolver.open_kernel(kernel.group(1))
        except ResolveError as error:
            log.debug("%s", error)
            self._send_text(
                HTTPStatus(error.status), f"{_reason(error.status)}\n", send_body=send_body
            )
            return
        with resource:
            self._answer_resource(resource, send_body=send_body)

    def _answer_probe(self, path: str, *, send_body: bool) -> None:
        if path == "/healthz":
            self._send_text(HTTPStatus.OK, "ok\n", send_body=send_body)
        elif path == "/readyz":
            problems = self.server.resolver.readiness_problems()
            if problems:
                self._send_text(
                    HTTPStatus.SERVICE_UNAVAILABLE, "\n".join(problems) + "\n", send_body=send_body
                )
            else:
                self._send_text(HTTPStatus.OK, "ready\n", send_body=send_body)
        else:
            self._send_text(
                HTTPStatus.OK,
                generate_latest(REGISTRY),
                send_body=send_body,
                content_type=CONTENT_TYPE_LATEST,
            )

    def _answer_resource(self, resource: OpenedResource, *, send_body: bool) -> None:
        validators = {
            "ETag": resource.etag,
            "Last-Modified": http_date(resource.last_modified),
            "Cache-Control": resource.cache_control,
            "Accept-Ranges": "bytes",
        }
        not_modified = is_not_modified(
            if_none_match=self.headers.get("If-None-Match"),
            if_modified_since=self.headers.get("If-Modified-Since"),
            etag=resource.etag,
            last_modified=resource.last_modified,
        )
        if not_modified:
            self._send_headers(HTTPStatus.NOT_MODIFIED, validators)
            return

        byte_range = None
        range_header = self.headers.get("Range")
        if range_header is not None and range_applies(
            if_range=self.headers.get("If-Range"),
            etag=resource.etag,
            last_modified=resource.last_modified,
        ):
            try:
                byte_range = parse_range(range_header, resource.size)
            except RangeNotSatisfiable:
                self._send_text(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    f"range not satisfiable: the resource has {resource.size} bytes\n",
                    send_body=send_body,
                    headers={**validators, "Content-Range": f"bytes */{resource.size}"},
                )
                return

        headers = {**validators, "Content-Type": "application/octet-stream"}
        if byte_range is None:
            status = HTTPStatus.OK
            byte_range = ByteRange(first=0, last=resource.size - 1)
        else:
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = byte_range.content_range(resource.size)
        headers["Content-Length"] = str(byte_range.length)
        self._send_headers(status, headers)
        if send_body and byte_range.length > 0:
            self._stream(resource, start=byte_range.first, end=byte_range.last + 1)

    # Writing responses.

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        metrics.REQUESTS.labels(str(code)).inc()
        super().send_response(code, message)

    def _send_headers(self, status: HTTPStatus, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
        except (ConnectionError, TimeoutError) as error:
            raise ClientDisconnected(str(error)) from error

    def _send_text(
        self,
        status: HTTPStatus,
        body: str | bytes,
        *,
        send_body: bool,
        headers: dict[str, str] | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        all_headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(data)),
            "Cache-Control": "no-store",
            **(headers or {}),
        }
        self._send_headers(status, all_headers)
        if send_body:
            self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self.wfile.write(data)
        except (ConnectionError, TimeoutError) as error:
            raise ClientDisconnected(str(error)) from error
        self._sent += len(data)

    def _stream(self, resource: OpenedResource, *, start: int, end: int) -> None:
        """Send bytes ``[start, end)``: base ranges by sendfile, literal segments by write."""
        self.server.download_started()
        try:
            position = 0
            for segment in resource.layout.segments:
                segment_end = position + segment.length
                low, high = max(start, position), min(end, segment_end)
                if low < high:
                    if isinstance(segment, images.Literal):
                        before = self._sent
                        self._write(memoryview(segment.data)[low - position : high - position])
                        metrics.SENT_BYTES.labels(self._route).inc(self._sent - before)
                    else:
                        self._send_base_range(
                            resource,
                            segment,
                            offset=segment.offset + low - position,
                            count=high - low,
                        )
                position = segment_end
                if position >= end:
                    break
        finally:
            self.server.download_finished()

    def _send_base_range(
        self, resource: OpenedResource, segment: images.BaseRange, *, offset: int, count: int
    ) -> None:
        if segment.path != resource.base_path:
            raise RuntimeError(f"layout segment of {segment.path} is not from the open base file")
        # The headers are already on the socket: wfile is unbuffered, end_headers() wrote them.
        self.wfile.flush()
        try:
            sent = send_file_range(
                self.connection,
                resource.base_file.fileno(),
                offset=offset,
                count=count,
                on_progress=self._count_sent,
            )
        except (ConnectionError, TimeoutError) as error:
            raise ClientDisconnected(str(error)) from error
        if sent < count:
            raise TruncatedBase(
                f"base image {resource.base_path} ended at byte {offset + sent}, before the"
                f" {offset + count} bytes its layout expects; it was changed in place, which"
                " must not happen (replace base images by renaming a new file over them)"
            )

    def _count_sent(self, count: int) -> None:
        self._sent += count
        metrics.SENT_BYTES.labels(self._route).inc(count)

    # Logging: one line per request through the logging module, never the headers.

    def _object_prefix(self) -> str:
        return f"{self._object_name}: " if self._object_name else ""

    def _log_request(self) -> None:
        path = self.path.split("?", 1)[0]
        level = logging.DEBUG if self._route == "probe" else logging.INFO
        log.log(
            level,
            "%s%s %s %s from %s: %d bytes in %.3f s",
            self._object_prefix(),
            self.command,
            path,
            self._status,
            self.client_address[0],
            self._sent,
            time.monotonic() - self._started,
        )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Skip the standard access line: _log_request writes one with the bytes sent."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (standard name)
        log.debug("client %s: " + format, self.client_address[0], *args)


def send_file_range(
    connection: socket.socket,
    file_descriptor: int,
    *,
    offset: int,
    count: int,
    on_progress: Callable[[int], None],
) -> int:
    """Send ``count`` bytes of a file from ``offset`` to a socket with sendfile(2).

    Returns the bytes sent, fewer than ``count`` only when the file ends early. Calls
    ``on_progress`` after each sendfile call with the bytes it sent. The socket must have a
    timeout (Python then sets O_NONBLOCK); a send that makes no progress for that long raises
    TimeoutError. Unlike ``socket.sendfile``, this never falls back to copying through Python.
    """
    timeout = connection.gettimeout()
    if not timeout:
        raise ValueError("send_file_range needs a socket with a timeout")
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            # Linux sends at most 0x7ffff000 bytes per call (sendfile(2)), so ask for 1 GiB.
            chunk = os.sendfile(
                connection.fileno(), file_descriptor, offset + sent, min(count - sent, 1 << 30)
            )
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                raise TimeoutError(
                    f"timed out: the client read nothing for {timeout:g} s"
                ) from None
            continue
        if chunk == 0:
            break
        sent += chunk
        on_progress(chunk)
    return sent


def _reason(status: int) -> str:
    return HTTPStatus(status).phrase.lower()


def make_server(*, resolver: Resolver, host: str, port: int) -> ImageServer:
    """Bind an image server to ``host``:``port``, where port 0 picks a free port.

    :raises OSError: the address is in use or cannot be assigned.
    """
    return ImageServer((host, port), resolver=resolver)
