"""Tests of the image server over real HTTP on 127.0.0.1, with a real payload store, a base ISO
mastered by xorriso, random initrd and kernel files, and payloads packed by the builder."""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import images
from builder.catalog import Catalog, single_architecture
from builder.payload import pack_payload
from builder.rendering import PayloadFile
from builder.settings import CommandError
from builder.store import ImageRecord, PayloadStore
from server.cli import command as serve_command
from server.cli import parse_listen
from server.http import (
    MAX_DISCARDED_BODY,
    RETRY_AFTER_SECONDS,
    ImageServer,
    listen_backlog,
    make_server,
)
from server.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    http_date,
    is_not_modified,
    parse_range,
    range_applies,
)
from server.resolver import Resolver

EMBED_SIZE = 256 * 1024
UID = "6f1c2d3e-0000-4000-8000-000000000001"


@dataclass(frozen=True)
class Bases:
    iso: Path
    initrd: Path
    kernel: Path


@dataclass(frozen=True)
class Published:
    record: ImageRecord
    expected: Path  # the image written by images.materialize
    payload_offset: int
    payload_length: int


def make_bases(directory: Path) -> Bases:
    if shutil.which("xorriso") is None:
        pytest.skip("xorriso is missing")
    tree = directory / "tree"
    (tree / "images").mkdir(parents=True)
    (tree / "images" / "ignition.img").write_bytes(b"\0" * EMBED_SIZE)
    (tree / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    iso = directory / "base.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-o", str(iso), "-V", "TEST", "-R", "-J", str(tree)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    initrd = directory / "initrd.img"
    initrd.write_bytes(os.urandom(3 * 1024 * 1024 + 3))
    kernel = directory / "vmlinuz"
    kernel.write_bytes(os.urandom(1024 * 1024))
    return Bases(iso=iso, initrd=initrd, kernel=kernel)


def make_catalog(bases: Bases) -> Catalog:
    base = single_architecture(
        architecture="x86_64", iso=bases.iso, initrd=bases.initrd, kernel=bases.kernel
    )
    return Catalog({base.architecture: base})


def publish(
    store: PayloadStore, bases: Bases, *, name: str, image_format: str, with_payload: bool = True
) -> Published:
    base = bases.iso if image_format == "iso" else bases.initrd
    payload = None
    if with_payload:
        keyfile = PayloadFile(
            path="/etc/NetworkManager/system-connections/eth0.nmconnection",
            data=b"[connection]\nid=eth0\ntype=ethernet\n",
            mode=0o600,
        )
        # Random bytes do not compress, so the payload spans several TCP segments.
        filler = PayloadFile(path="/etc/filler.bin", data=os.urandom(40_000))
        payload = pack_payload([keyfile, filler])
    record = store.publish(
        namespace="metal3",
        name=name,
        uid=UID,
        image_format=image_format,
        architecture="x86_64",
        base_digest=images.digest_file(base),
        payload_archive=payload.archive if payload else None,
        payload_digest=payload.digest if payload else None,
    )
    if payload is None:
        layout = images.base_layout(base)
        offset = length = 0
    elif image_format == "iso":
        area = images.find_embed_area(base, embed_path="/images/ignition.img")
        layout = images.iso_layout(base, area, payload.archive)
        offset, length = area.offset, len(payload.archive)
    else:
        layout = images.initrd_layout(base, payload.archive)
        size = base.stat().st_size
        offset, length = size + (-size % 4), len(payload.archive)
    expected = store.root.parent / f"{name}.{image_format}.expected"
    images.materialize(layout, expected)
    return Published(record=record, expected=expected, payload_offset=offset, payload_length=length)


@contextmanager
def serving(server: ImageServer) -> Iterator[ImageServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def running(resolver: Resolver, *, max_connections: int = 1024) -> Iterator[ImageServer]:
    resolver.warm()
    server = make_server(
        resolver=resolver, host="127.0.0.1", port=0, max_connections=max_connections
    )
    with serving(server):
        yield server


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(
    server: ImageServer, path: str, *, method: str = "GET", headers: dict | None = None
) -> Response:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


class _RecordedSocket:
    """The socket interface http.client.HTTPResponse reads from, over bytes already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes) -> Response:
    response = http.client.HTTPResponse(_RecordedSocket(data))  # type: ignore[arg-type]
    response.begin()
    return Response(response.status, response.headers, response.read())


def exchange(server: ImageServer, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw request bytes and return everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout) as client:
        client.sendall(request)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url(published: Published) -> str:
    return "/" + published.record.url_path


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    return make_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PayloadStore:
    root = tmp_path_factory.mktemp("served") / "store"
    root.mkdir()
    return PayloadStore(root)


@pytest.fixture(scope="module")
def iso_image(store: PayloadStore, bases: Bases) -> Published:
    return publish(store, bases, name="worker-0", image_format="iso")


@pytest.fixture(scope="module")
def initrd_image(store: PayloadStore, bases: Bases) -> Published:
    return publish(store, bases, name="worker-1", image_format="initrd")


@pytest.fixture(scope="module")
def plain_iso_image(store: PayloadStore, bases: Bases) -> Published:
    return publish(store, bases, name="worker-2", image_format="iso", with_payload=False)


@pytest.fixture(scope="module")
def server(store: PayloadStore, bases: Bases) -> Iterator[ImageServer]:
    with running(Resolver(store=store, catalog=make_catalog(bases))) as image_server:
        yield image_server


# Full downloads.


def test_iso_get_matches_materialize(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image))
    expected = iso_image.expected.read_bytes()
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == len(expected)
    assert sha256(response.body) == sha256(expected)
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Accept-Ranges"] == "bytes"


def test_iso_get_contains_payload(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image))
    start = iso_image.payload_offset
    payload = iso_image.record.payload_path.read_bytes()
    assert response.body[start : start + len(payload)] == payload


def test_initrd_get_matches_materialize(server: ImageServer, initrd_image: Published) -> None:
    response = fetch(server, url(initrd_image))
    assert response.status == 200
    assert sha256(response.body) == sha256(initrd_image.expected.read_bytes())


def test_base_without_payload_served_unchanged(
    server: ImageServer, plain_iso_image: Published, bases: Bases
) -> None:
    response = fetch(server, url(plain_iso_image))
    assert response.status == 200
    assert sha256(response.body) == sha256(bases.iso.read_bytes())


def test_get_sets_validators(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image))
    record = iso_image.record
    assert response.headers["ETag"] == f'"{record.image_id}-{record.base_digest[:16]}"'
    assert response.headers["Last-Modified"] == http_date(record.published_at)
    assert response.headers["Cache-Control"] == "private, max-age=3600"


# Ranges.


@pytest.mark.parametrize(
    "where",
    ["start", "middle", "end", "into-payload", "out-of-payload", "whole-payload", "one-byte"],
)
def test_range_returns_slice(server: ImageServer, iso_image: Published, where: str) -> None:
    expected = iso_image.expected.read_bytes()
    size = len(expected)
    offset, length = iso_image.payload_offset, iso_image.payload_length
    first, last = {
        "start": (0, 4095),
        "middle": (size // 2 - 1000, size // 2 + 1000),
        "end": (size - 5000, size - 1),
        "into-payload": (offset - 3000, offset + 100),
        "out-of-payload": (offset + length - 100, offset + length + 3000),
        "whole-payload": (offset - 1, offset + length),
        "one-byte": (offset, offset),
    }[where]
    response = fetch(server, url(iso_image), headers={"Range": f"bytes={first}-{last}"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert int(response.headers["Content-Length"]) == last - first + 1
    assert response.body == expected[first : last + 1]


def test_range_open_ended(server: ImageServer, iso_image: Published) -> None:
    expected = iso_image.expected.read_bytes()
    first = iso_image.payload_offset + 10
    response = fetch(server, url(iso_image), headers={"Range": f"bytes={first}-"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes {first}-{len(expected) - 1}/{len(expected)}"
    assert response.body == expected[first:]


def test_range_suffix(server: ImageServer, initrd_image: Published) -> None:
    expected = initrd_image.expected.read_bytes()
    response = fetch(server, url(initrd_image), headers={"Range": "bytes=-70000"})
    assert response.status == 206
    assert response.body == expected[-70000:]
    assert response.headers["Content-Range"] == (
        f"bytes {len(expected) - 70000}-{len(expected) - 1}/{len(expected)}"
    )


def test_range_past_end_is_clipped(server: ImageServer, initrd_image: Published) -> None:
    expected = initrd_image.expected.read_bytes()
    first = len(expected) - 10
    response = fetch(server, url(initrd_image), headers={"Range": f"bytes={first}-99999999999"})
    assert response.status == 206
    assert response.body == expected[first:]


@pytest.mark.parametrize("digits", [11, 19, 20, 40, 5000])
def test_range_long_end_is_clipped(
    server: ImageServer, initrd_image: Published, digits: int
) -> None:
    size = initrd_image.expected.stat().st_size
    response = fetch(server, url(initrd_image), headers={"Range": f"bytes=100-{'9' * digits}"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    assert len(response.body) == size - 100


def test_range_unsatisfiable_is_416(server: ImageServer, iso_image: Published) -> None:
    size = iso_image.expected.stat().st_size
    response = fetch(server, url(iso_image), headers={"Range": f"bytes={size}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"


def test_range_multiple_serves_whole(server: ImageServer, iso_image: Published) -> None:
    expected = iso_image.expected.read_bytes()
    response = fetch(server, url(iso_image), headers={"Range": "bytes=0-10,20-30"})
    assert response.status == 200
    assert "Content-Range" not in response.headers
    assert sha256(response.body) == sha256(expected)


def test_range_two_fields_serve_whole(server: ImageServer, initrd_image: Published) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        connection.putrequest("GET", url(initrd_image))
        connection.putheader("Range", "bytes=0-9")
        connection.putheader("Range", "bytes=10-19")
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200
    assert "Content-Range" not in response.headers
    assert len(body) == initrd_image.expected.stat().st_size


def test_range_invalid_serves_whole(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image), headers={"Range": "bytes=30-10"})
    assert response.status == 200
    assert len(response.body) == iso_image.expected.stat().st_size


def test_if_range_matching_etag_honours_range(server: ImageServer, iso_image: Published) -> None:
    etag = fetch(server, url(iso_image), method="HEAD").headers["ETag"]
    response = fetch(server, url(iso_image), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert response.status == 206
    assert len(response.body) == 10


def test_if_range_stale_etag_serves_whole(server: ImageServer, iso_image: Published) -> None:
    headers = {"Range": "bytes=0-9", "If-Range": '"stale"'}
    response = fetch(server, url(iso_image), headers=headers)
    assert response.status == 200
    assert len(response.body) == iso_image.expected.stat().st_size


# HEAD and conditional requests.


def test_head_has_length_and_no_body(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image), method="HEAD")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == iso_image.expected.stat().st_size
    assert response.body == b""


def test_head_then_get_on_one_connection(server: ImageServer, initrd_image: Published) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        connection.request("HEAD", url(initrd_image))
        head = connection.getresponse()
        head.read()
        connection.request("GET", url(initrd_image), headers={"Range": "bytes=0-99"})
        get = connection.getresponse()
        body = get.read()
    finally:
        connection.close()
    assert head.status == 200
    assert get.status == 206
    assert body == initrd_image.expected.read_bytes()[:100]


def test_if_none_match_returns_304(server: ImageServer, iso_image: Published) -> None:
    etag = fetch(server, url(iso_image), method="HEAD").headers["ETag"]
    response = fetch(server, url(iso_image), headers={"If-None-Match": f'"other", {etag}'})
    assert response.status == 304
    assert response.body == b""
    assert response.headers["ETag"] == etag


def test_if_none_match_other_returns_200(server: ImageServer, iso_image: Published) -> None:
    response = fetch(server, url(iso_image), headers={"If-None-Match": '"other"'})
    assert response.status == 200


def test_if_modified_since_returns_304(server: ImageServer, iso_image: Published) -> None:
    since = http_date(iso_image.record.published_at + 60)
    response = fetch(server, url(iso_image), headers={"If-Modified-Since": since})
    assert response.status == 304


def test_if_modified_since_older_returns_200(server: ImageServer, iso_image: Published) -> None:
    since = http_date(iso_image.record.published_at - 3600)
    response = fetch(server, url(iso_image), method="HEAD", headers={"If-Modified-Since": since})
    assert response.status == 200


# Kernel.


@pytest.mark.parametrize("architecture", ["x86_64", "amd64"])
def test_kernel_served_by_architecture(
    server: ImageServer, bases: Bases, architecture: str
) -> None:
    response = fetch(server, f"/bases/{architecture}/kernel")
    assert response.status == 200
    assert sha256(response.body) == sha256(bases.kernel.read_bytes())
    assert response.headers["ETag"].startswith('"kernel-')


def test_kernel_range(server: ImageServer, bases: Bases) -> None:
    response = fetch(server, "/bases/x86_64/kernel", headers={"Range": "bytes=100-199"})
    assert response.status == 206
    assert response.body == bases.kernel.read_bytes()[100:200]


def test_kernel_unknown_architecture_404(server: ImageServer) -> None:
    assert fetch(server, "/bases/riscv64/kernel").status == 404


# Paths that must not resolve.


def test_unknown_image_id_404(server: ImageServer, iso_image: Published) -> None:
    path = url(iso_image).replace(iso_image.record.image_id, "0" * 32)
    assert fetch(server, path).status == 404


def test_wrong_format_404(server: ImageServer, iso_image: Published) -> None:
    path = url(iso_image).removesuffix(".iso") + ".initrd"
    assert fetch(server, path).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/images/",
        "/images/metal3/",
        "/store/images",
        "/secret.txt",
        "/../secret.txt",
        "/images/../secret.txt",
        "/images/metal3/worker-0/../../../secret.txt",
        "/images/metal3/..%2f..%2fsecret/x/0123456789abcdef0123456789abcdef.iso",
        "/images/%2e%2e/%2e%2e/uid/0123456789abcdef0123456789abcdef.iso",
        "/images/../worker-0/uid/0123456789abcdef0123456789abcdef.iso",
        "/images/metal3/worker-0/../0123456789abcdef0123456789abcdef.iso",
        "/images/metal3/worker-0/uid/..%2fsecret.iso",
        "//secret.txt",
        "/bases/../kernel",
        "/bases/x86_64/../../secret.txt",
        "/bases/%2e%2e/kernel",
    ],
)
def test_traversal_attempt_404(server: ImageServer, store: PayloadStore, path: str) -> None:
    (store.root / "secret.txt").write_text("secret")
    response = fetch(server, path)
    assert response.status == 404
    assert b"secret" not in response.body


def test_record_json_not_served(server: ImageServer, iso_image: Published) -> None:
    assert fetch(server, url(iso_image).removesuffix(".iso") + ".json").status == 404


def test_encoded_valid_path_404(server: ImageServer, iso_image: Published) -> None:
    path = url(iso_image).replace("worker-0", "worker%2D0")
    assert fetch(server, path).status == 404


def test_query_string_ignored(server: ImageServer, initrd_image: Published) -> None:
    response = fetch(server, url(initrd_image) + "?token=x", headers={"Range": "bytes=0-0"})
    assert response.status == 206


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_405(server: ImageServer, iso_image: Published, method: str) -> None:
    response = fetch(server, url(iso_image), method=method)
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"


# Request bodies, old protocol versions and errors the base class raises.


def test_get_body_read_and_dropped(server: ImageServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        # The body looks like a request, so a server that leaves it unread responds to it next.
        connection.request("GET", "/healthz", body=b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        first = connection.getresponse()
        first_body = first.read()
        connection.request("GET", "/readyz")
        second = connection.getresponse()
        second_body = second.read()
    finally:
        connection.close()
    assert first.status == 200
    assert first_body == b"ok\n"
    assert second.status == 200
    assert second_body == b"ready\n"


def test_get_body_too_large_413(server: ImageServer) -> None:
    length = MAX_DISCARDED_BODY + 1
    request = f"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    started = time.monotonic()
    response = parse_response(exchange(server, request.encode()))
    assert response.status == 413
    assert response.headers["Connection"] == "close"
    assert str(MAX_DISCARDED_BODY) in response.body.decode()
    assert time.monotonic() - started < 5


def test_get_chunked_body_400(server: ImageServer) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    response = parse_response(exchange(server, request))
    assert response.status == 400
    assert response.headers["Connection"] == "close"
    assert b"Transfer-Encoding" in response.body


@pytest.mark.parametrize("value", ["abc", "-1", "1, 2"])
def test_get_invalid_content_length_400(server: ImageServer, value: str) -> None:
    request = f"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n"
    response = parse_response(exchange(server, request.encode()))
    assert response.status == 400
    assert response.body == b"bad request: invalid Content-Length header\n"


def test_http_0_9_request_rejected_promptly(
    server: ImageServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.http")
    started = time.monotonic()
    response = parse_response(exchange(server, b"GET /healthz\r\n"))
    assert time.monotonic() - started < 5
    assert response.status == 505
    assert b"HTTP/0.9" in response.body
    messages = [record.getMessage() for record in caplog.records]
    assert any("GET /healthz 505 from 127.0.0.1" in message for message in messages)
    assert not any(" 200 " in message for message in messages)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/x\r\n\r\n", 400),
        (b"FOO / HTTP/1.1\r\n\r\n", 501),
        # Exactly as many bytes as the base class reads, so none are left unread at close.
        (b"GET /" + b"a" * 65532, 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 65534, 431),
    ],
    ids=["505", "400", "501", "414", "431"],
)
def test_base_class_errors_are_text(server: ImageServer, request_bytes: bytes, status: int) -> None:
    response = parse_response(exchange(server, request_bytes))
    assert response.status == status
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Server"] == "ppimage"
    assert response.headers["Connection"] == "close"
    assert b"<" not in response.body
    assert int(response.headers["Content-Length"]) == len(response.body)


def test_server_header_is_product_name(server: ImageServer, initrd_image: Published) -> None:
    assert fetch(server, "/healthz").headers["Server"] == "ppimage"
    assert fetch(server, url(initrd_image), method="HEAD").headers["Server"] == "ppimage"


def test_log_escapes_non_ascii_path(server: ImageServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.http")
    request = b"GET /caf\xc3\xa9/\x1b[31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response = parse_response(exchange(server, request))
    messages = [record.getMessage() for record in caplog.records]
    assert response.status == 404
    assert any("GET /caf%C3%A9/%1B[31m 404" in message for message in messages)
    assert not any("\x1b" in message for message in messages)


# Connection limits.


def test_listen_backlog_within_somaxconn(server: ImageServer) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert server.request_queue_size == listen_backlog()
    assert listen_backlog() == min(1024, somaxconn)


def test_connect_burst_all_answered(store: PayloadStore, bases: Bases) -> None:
    resolver = Resolver(store=store, catalog=make_catalog(bases))
    image_server = make_server(resolver=resolver, host="127.0.0.1", port=0)
    address = ("127.0.0.1", image_server.server_address[1])
    clients = []
    try:
        # The server accepts nothing yet, so every connection must wait in the listen backlog.
        for _ in range(200):
            clients.append(socket.create_connection(address, timeout=2))
        with serving(image_server):
            for client in clients:
                client.settimeout(30)
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

            def receive(client: socket.socket) -> int:
                chunks = []
                while chunk := client.recv(4096):
                    chunks.append(chunk)
                return parse_response(b"".join(chunks)).status

            with ThreadPoolExecutor(max_workers=32) as pool:
                statuses = list(pool.map(receive, clients))
    finally:
        for client in clients:
            client.close()
    assert len(statuses) == 200
    assert set(statuses) == {200}


def test_connections_over_limit_503(store: PayloadStore, bases: Bases) -> None:
    resolver = Resolver(store=store, catalog=make_catalog(bases))
    with running(resolver, max_connections=2) as image_server:
        port = image_server.server_address[1]
        kept_open = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(2)]
        for connection in kept_open:
            connection.request("GET", "/healthz")
            connection.getresponse().read()
        rejected = fetch(image_server, "/healthz")
        open_while_full = image_server.open_connections
        kept_open[0].close()
        deadline = time.monotonic() + 10
        while image_server.open_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        accepted = fetch(image_server, "/healthz")
        kept_open[1].close()
    assert open_while_full == 2
    assert rejected.status == 503
    assert rejected.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert rejected.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert rejected.headers["Connection"] == "close"
    assert accepted.status == 200


def test_serve_max_connections_zero_exits_2(tmp_path: Path, bases: Bases) -> None:
    result = CliRunner().invoke(
        serve_command,
        ["--max-connections", "0", "--store", str(tmp_path / "store"), "--iso", str(bases.iso)],
    )
    assert result.exit_code == 2
    assert "--max-connections" in result.output


# Probes and metrics.


def test_healthz_ok(server: ImageServer) -> None:
    assert fetch(server, "/healthz").status == 200


def test_readyz_ok(server: ImageServer) -> None:
    response = fetch(server, "/readyz")
    assert response.status == 200
    assert response.body == b"ready\n"


def test_metrics_count_bytes(server: ImageServer, initrd_image: Published) -> None:
    fetch(server, url(initrd_image), headers={"Range": "bytes=0-99"})
    response = fetch(server, "/metrics")
    text = response.body.decode()
    assert response.status == 200
    assert 'ppimage_server_sent_bytes_total{route="image"}' in text
    assert 'ppimage_server_requests_total{code="206"}' in text
    assert "ppimage_server_active_downloads 0.0" in text


# Base changes and missing files.


def test_base_changed_returns_410(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bases = make_bases(tmp_path / "bases")
    store = PayloadStore(tmp_path / "store")
    published = publish(store, bases, name="worker-9", image_format="initrd")
    with running(Resolver(store=store, catalog=make_catalog(bases))) as image_server:
        assert fetch(image_server, url(published)).status == 200
        replacement = tmp_path / "bases" / "initrd.new"
        replacement.write_bytes(os.urandom(1024 * 1024))
        os.replace(replacement, bases.initrd)
        with caplog.at_level(logging.WARNING, logger="server.resolver"):
            first = fetch(image_server, url(published))
            second = fetch(image_server, url(published), method="HEAD")
    assert first.status == 410
    assert second.status == 410
    warnings = [record.getMessage() for record in caplog.records if "changed" in record.message]
    assert len(warnings) == 1
    assert "metal3/worker-9" in warnings[0]
    assert "ppimage rebuild --all" in warnings[0]


def test_expired_payload_404(tmp_path: Path) -> None:
    bases = make_bases(tmp_path / "bases")
    store = PayloadStore(tmp_path / "store")
    published = publish(store, bases, name="worker-8", image_format="iso")
    published.record.payload_path.unlink()
    with running(Resolver(store=store, catalog=make_catalog(bases))) as image_server:
        assert fetch(image_server, url(published)).status == 404


def test_readyz_missing_base_503(tmp_path: Path) -> None:
    bases = make_bases(tmp_path / "bases")
    store = PayloadStore(tmp_path / "store")
    store.root.mkdir()
    catalog = make_catalog(bases)
    bases.kernel.unlink()
    with running(Resolver(store=store, catalog=catalog)) as image_server:
        response = fetch(image_server, "/readyz")
        kernel = fetch(image_server, "/bases/x86_64/kernel")
    assert response.status == 503
    assert str(bases.kernel) in response.body.decode()
    assert kernel.status == 503


# Concurrency and disconnects.


def test_concurrent_downloads_all_correct(
    server: ImageServer, iso_image: Published, initrd_image: Published
) -> None:
    targets = [iso_image, initrd_image] * 8
    digests = {id(target): sha256(target.expected.read_bytes()) for target in targets}

    def download(target: Published) -> bool:
        return sha256(fetch(server, url(target)).body) == digests[id(target)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(download, targets))
    assert len(results) == 16
    assert all(results)


def test_client_disconnect_mid_stream(
    server: ImageServer, iso_image: Published, caplog: pytest.LogCaptureFixture
) -> None:
    request = f"GET {url(iso_image)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    caplog.set_level(logging.DEBUG, logger="server.http")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(request)
            client.recv(1024)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    deadline = time.monotonic() + 10
    while server.active_downloads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.active_downloads == 0
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert any("disconnected" in record.getMessage() for record in caplog.records)
    response = fetch(server, url(iso_image))
    assert sha256(response.body) == sha256(iso_image.expected.read_bytes())


# Range and conditional header parsing.


def test_parse_range_forms() -> None:
    assert parse_range("bytes=0-9", 100) == ByteRange(0, 9)
    assert parse_range("bytes=90-", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-1000", 100) == ByteRange(0, 99)
    assert parse_range(" bytes = 5-5 ", 100) == ByteRange(5, 5)


def test_parse_range_long_positions() -> None:
    assert parse_range("bytes=0-99999999999999999999", 100) == ByteRange(0, 99)
    assert parse_range("bytes=0-" + "9" * 5000, 100) == ByteRange(0, 99)
    assert parse_range("bytes=-" + "9" * 5000, 100) == ByteRange(0, 99)
    assert parse_range("bytes=" + "0" * 30 + "5-" + "0" * 30 + "9", 100) == ByteRange(5, 9)
    assert parse_range("bytes=" + "9" * 30 + "-" + "9" * 29, 100) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=" + "9" * 5000 + "-", 100)


def test_parse_range_ignored_forms() -> None:
    assert parse_range("items=0-9", 100) is None
    assert parse_range("bytes=0-9,20-29", 100) is None
    assert parse_range("bytes=9-0", 100) is None
    assert parse_range("bytes=-", 100) is None
    assert parse_range("bytes=a-b", 100) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_not_modified_prefers_if_none_match() -> None:
    stale = http_date(0)
    assert not is_not_modified(
        if_none_match='"a"', if_modified_since=http_date(10**10), etag='"b"', last_modified=5
    )
    assert is_not_modified(if_none_match="*", if_modified_since=stale, etag='"b"', last_modified=5)
    assert is_not_modified(
        if_none_match='W/"b"', if_modified_since=None, etag='"b"', last_modified=5
    )


def test_range_applies_with_dates() -> None:
    assert range_applies(if_range=http_date(1000), etag='"a"', last_modified=1000.5)
    assert not range_applies(if_range=http_date(999), etag='"a"', last_modified=1000.5)
    assert not range_applies(if_range='W/"a"', etag='"a"', last_modified=1000)


# Command line.


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:", "127.0.0.1:70000", ":8080"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(CommandError, match="--listen"):
        parse_listen(listen)


def test_parse_listen_ipv6() -> None:
    assert parse_listen("[::1]:8080") == ("::1", 8080)


def test_serve_bad_listen_exits_2(tmp_path: Path, bases: Bases) -> None:
    result = CliRunner().invoke(
        serve_command,
        ["--listen", "127.0.0.1:http", "--store", str(tmp_path / "store"), "--iso", str(bases.iso)],
    )
    assert result.exit_code == 2
    assert "--listen '127.0.0.1:http'" in result.output


def test_serve_command_serves_image(tmp_path: Path, bases: Bases) -> None:
    store = PayloadStore(tmp_path / "store")
    published = publish(store, bases, name="worker-7", image_format="iso")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "builder.cli",
            "-v",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            str(store.root),
            "--iso",
            str(bases.iso),
            "--initrd",
            str(bases.initrd),
            "--kernel",
            str(bases.kernel),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and status != 200:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/readyz")
                status = connection.getresponse().status
                connection.close()
            except OSError:
                time.sleep(0.1)
        assert status == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", url(published))
        body = connection.getresponse().read()
        connection.close()
        assert sha256(body) == sha256(published.expected.read_bytes())
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "metal3/worker-7: GET" in output
    assert "image server stopped" in output
