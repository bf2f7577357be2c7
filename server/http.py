"""The HTTP image server: GET and HEAD with single byte ranges, conditional requests and probes.

Routes: ``/images/NAMESPACE/NAME/UID/IMAGE_ID.iso|.initrd`` (a published image),
``/bases/ARCH/kernel`` (the catalog kernel, for kernelUrl), ``/healthz`` (liveness),
``/readyz`` (readiness) and ``/metrics`` (Prometheus). Anything else is 404, other methods
are 405. Paths are matched raw, before any percent-decoding: no valid name needs escaping, so an
encoded slash or dot never reaches the store. Base ranges go to the socket with sendfile(2)
and only literal segments (the payload and padding) pass through Python.

Each connection gets a thread, up to ``max_connections``. A connection over that limit gets
503 with Retry-After from one shared thread, so a flood of connections adds no threads.
Requests carry no body: a small one is read and dropped, a larger or chunked one is rejected
and the connection closed, so a body is never parsed as the next request.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import select
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
# Connections served at once, one thread each. More connections get 503 until one closes.
DEFAULT_MAX_CONNECTIONS = 1024
# Listen backlog requested from listen(2). Linux caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024
RETRY_AFTER_SECONDS = 2
# A GET or HEAD body up to this size is read and dropped, and a larger one gets 413.
MAX_DISCARDED_BODY = 64 * 1024
# A rejected connection is read until the client closes it, or for this long, before it closes.
# Closing with unread request bytes would send a reset that can destroy the 503 in flight.
_REJECT_LINGER_SECONDS = 2.0
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
# Printable ASCII logged as it is. Other bytes of a request target are logged percent-encoded.
_LOG_SAFE_CHARACTERS = "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"

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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        # An IPv6 literal needs an AF_INET6 socket. TCPServer.__init__ reads both attributes.
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.request_queue_size = listen_backlog()
        self.resolver = resolver
        self.request_timeout = timeout
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._rejecter = OverloadRejecter()
        super().__init__(address, ImageRequestHandler)

    def handle_error(self, request: object, client_address: tuple) -> None:
        """Log an unexpected error of one connection. The server keeps running."""
        log.exception("client %s: request failed", client_address[0])

    @property
    def open_connections(self) -> int:
        """Number of connections that have a handler thread right now."""
        return self._connections

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Start a handler thread for the connection, or hand it to the rejecter when full."""
        with self._connections_lock:
            accepted = self._connections < self.max_connections
            if accepted:
                self._connections += 1
        if not accepted:
            self._rejecter.reject(request, client_address, limit=self.max_connections)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def server_close(self) -> None:
        super().server_close()
        self._rejecter.close()

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
    # The base class writes no status line for this version; errors always get one.
    default_request_version = "HTTP/1.0"
    server_version = "ppimage"
    server: ImageServer

    def version_string(self) -> str:
        """Return the Server header value: the product name, without Python's version."""
        return self.server_version

    def handle(self) -> None:
        # A reset between requests surfaces while reading the next request line.
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as error:
            log.debug("client %s disconnected: %s", self.client_address[0], error)

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    def handle_one_request(self) -> None:
        # The base class sets none of these when the request line is too long (414).
        self.command = None
        self.path = ""
        self.request_version = self.default_request_version
        self._start()
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Parse the request line and headers, then read and drop a request body.

        Returns False after sending an error response, which closes the connection.
        """
        # An HTTP/0.9 request line has no version, and no headers follow it. The base class
        # would wait for a blank line that never comes until the timeout.
        if len(self.raw_requestline.split()) == 2:
            return self._reject_http_0_9()
        if not super().parse_request():
            return False
        return self._discard_body()

    def _reject_http_0_9(self) -> bool:
        # The client shows the status line and headers as text, which still explains the error.
        self.command, self.path = str(self.raw_requestline, "iso-8859-1").split()
        self.send_error(
            HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 requests are not supported"
        )
        return False

    def _discard_body(self) -> bool:
        # A body left unread would be parsed as the next request of the connection.
        if "Transfer-Encoding" in self.headers:
            self.send_error(
                HTTPStatus.BAD_REQUEST,
                f"a {self.command} request must not have a Transfer-Encoding header;"
                " send it without a body",
            )
            return False
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            return True
        text = lengths.pop().strip()
        if lengths or not text.isdigit() or not text.isascii():
            self.send_error(HTTPStatus.BAD_REQUEST, "invalid Content-Length header")
            return False
        length = int(text)
        if length > MAX_DISCARDED_BODY:
            self.send_error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"a {self.command} request body of {length} bytes is too large; send at most"
                f" {MAX_DISCARDED_BODY} bytes, or none, because the server ignores it",
            )
            return False
        remaining = length
        while remaining:
            chunk = self.rfile.read(remaining)
            if not chunk:
                self.close_connection = True
                return False
            remaining -= len(chunk)
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Send an error as text/plain, close the connection and log the request.

        The base class calls this for requests it cannot parse (400, 414, 431, 501, 505).
        ``explain`` is ignored, because the base class fills it with generic text.
        """
        status = HTTPStatus(code)
        text = f"{status.phrase.lower()}: {message}\n" if message else f"{_reason(code)}\n"
        try:
            self._send_text(
                status,
                text,
                send_body=self.command != "HEAD",
                headers={"Connection": "close"},
            )
        except ClientDisconnected as error:
            log.debug("client %s disconnected: %s", self.client_address[0], error)
        finally:
            self.close_connection = True
            self._log_request()

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._handle(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(send_body=False)

    def _reject_method(self) -> None:
        # The request may carry a body this server does not read, so the connection closes.
        self.close_connection = True
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
                escape_for_log(path),
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
        # Several Range fields cannot be combined into one value, so none of them counts.
        range_fields = self.headers.get_all("Range") or []
        range_header = range_fields[0] if len(range_fields) == 1 else None
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
        if not send_body or byte_range.length == 0:
            self._send_headers(status, headers)
            return
        with self._corked():
            self._send_headers(status, headers)
            self._stream(resource, start=byte_range.first, end=byte_range.last + 1)

    @contextlib.contextmanager
    def _corked(self) -> Iterator[None]:
        """Hold back partial TCP segments while a response is written (TCP_CORK, Linux).

        Without the cork, the headers and the payload leave as small packets of their own, and
        each write or sendfile call pushes its last, partly filled segment. With it, segments
        leave full, and removing the cork sends what remains. docs/benchmarks.md has the
        throughput measured with and without it.
        """
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            yield
        finally:
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            except OSError as error:
                log.debug("client %s disconnected: %s", self.client_address[0], error)

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
        command = self.command or "-"
        path = (self.path or "-").split("?", 1)[0]
        level = logging.DEBUG if self._route == "probe" else logging.INFO
        log.log(
            level,
            "%s%s %s %s from %s: %d bytes in %.3f s",
            self._object_prefix(),
            escape_for_log(command),
            escape_for_log(path),
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


class OverloadRejecter:
    """Rejecter of connections over the limit, which sends 503 and Retry-After from one thread.

    The response goes out as soon as the connection arrives, before its request is read, so no
    parsing is needed. The connection is then read until the client closes it, or for
    ``linger`` seconds, and closed. At most ``max_pending`` connections wait in that state at
    once, and more are closed right after the response.
    """

    def __init__(
        self, *, linger: float = _REJECT_LINGER_SECONDS, max_pending: int = DEFAULT_BACKLOG
    ) -> None:
        self.linger = linger
        self.max_pending = max_pending
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._incoming: list[socket.socket] = []
        self._deadlines: dict[socket.socket, float] = {}
        self._rejected = 0
        self._last_warning = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    def reject(self, connection: socket.socket, client_address: tuple, *, limit: int) -> None:
        """Send 503 on ``connection`` without blocking, and queue it to be read and closed.

        The response is about 230 bytes and the send buffer of a new connection is empty, so a
        non-blocking send takes it whole.
        """
        metrics.REJECTED_CONNECTIONS.inc()
        self._warn(client_address, limit)
        try:
            connection.setblocking(False)
            connection.send(_overload_response())
            connection.shutdown(socket.SHUT_WR)
        except OSError as error:
            log.debug("client %s disconnected: %s", client_address[0], error)
            connection.close()
            return
        with self._lock:
            if self._closed or len(self._deadlines) + len(self._incoming) >= self.max_pending:
                connection.close()
                return
            self._incoming.append(connection)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="overload-rejecter", daemon=True
                )
                self._thread.start()
        self._wake()

    def close(self) -> None:
        """Stop the thread and close every connection it still reads."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            for connection in [*self._incoming, *self._deadlines]:
                connection.close()
            self._incoming.clear()
            self._deadlines.clear()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _warn(self, client_address: tuple, limit: int) -> None:
        # One warning per minute at most, with the count since the previous one.
        self._rejected += 1
        now = time.monotonic()
        if now - self._last_warning < 60 and self._last_warning:
            return
        log.warning(
            "connection from %s rejected with 503: all %d connections (--max-connections) are"
            " in use; %d rejected since the previous warning",
            client_address[0],
            limit,
            self._rejected,
        )
        self._rejected = 0
        self._last_warning = now

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the rejecter is closed

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                for connection in self._incoming:
                    self._deadlines[connection] = time.monotonic() + self.linger
                    self._selector.register(connection, selectors.EVENT_READ)
                self._incoming.clear()
            now = time.monotonic()
            timeout = min(self._deadlines.values(), default=now + self.linger) - now
            for key, _ in self._selector.select(timeout=max(0.0, timeout)):
                if key.fileobj is self._wake_reader:
                    self._drain(self._wake_reader)
                elif not self._drain(key.fileobj):
                    self._finish(key.fileobj)
            now = time.monotonic()
            for connection, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    self._finish(connection)

    @staticmethod
    def _drain(connection: socket.socket) -> bool:
        """Read and drop what is buffered. Return False once the peer closed or reset.

        One recv per call, so a client that keeps sending cannot hold the thread.
        """
        try:
            return bool(connection.recv(65536))
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _finish(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        with self._lock:
            self._deadlines.pop(connection, None)
        connection.close()


@functools.cache
def _overload_response() -> bytes:
    body = (
        f"service unavailable: too many connections; retry in {RETRY_AFTER_SECONDS} s\n"
    ).encode()
    return (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Server: {ImageRequestHandler.server_version}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER_SECONDS}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def listen_backlog() -> int:
    """Return the listen backlog to request: DEFAULT_BACKLOG, or somaxconn when lower."""
    try:
        somaxconn = int(_SOMAXCONN.read_text())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG
    return max(1, min(DEFAULT_BACKLOG, somaxconn))


def escape_for_log(text: str) -> str:
    """Percent-encode the raw bytes of a request-line field that are not printable ASCII.

    The base class decodes the request line as ISO-8859-1, so encoding back recovers its bytes.
    """
    return urllib.parse.quote(text.encode("iso-8859-1", "replace"), safe=_LOG_SAFE_CHARACTERS)


def _reason(status: int) -> str:
    return HTTPStatus(status).phrase.lower()


def make_server(
    *, resolver: Resolver, host: str, port: int, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> ImageServer:
    """Bind an image server to ``host``:``port``, where port 0 picks a free port.

    :raises OSError: the address is in use or cannot be assigned.
    """
    return ImageServer((host, port), resolver=resolver, max_connections=max_connections)
