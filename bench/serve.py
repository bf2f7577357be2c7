"""Measure download throughput of ``ppimage serve`` against nginx serving the same bytes.

``ppimage serve`` streams the 1 GiB base ISO with one host's payload spliced in (sendfile for
the base ranges, the payload through Python). nginx from Debian serves a materialized copy of
the same image with ``sendfile on``. Both listen on 127.0.0.1, and the same client (curl,
writing to /dev/null) downloads the image with 1 and with 16 concurrent transfers. Rounds
rotate the order of the servers, so a change of machine load hits all of them. Each server's CPU
time comes from /proc/PID/stat and the clients' CPU time from getrusage of the curl processes.
TCP segments are the machine's OutSegs counter (/proc/net/snmp) over a round: data segments and
the client's ACKs both count, and so does any other TCP traffic of the machine at the time.

``--compare-with DIR`` also runs ``ppimage serve`` from another copy of this repository (an
older version, say) on the same store, so a change is measured against its baseline and nginx
in one run.

Usage: .venv/bin/python bench/serve.py [--quick] [--bases DIR] [--compare-with DIR ...]
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GIB  # noqa: E402

from builder.build import plan_image  # noqa: E402
from builder.catalog import load_catalog  # noqa: E402
from builder.images import digest_file, materialize  # noqa: E402
from builder.store import PayloadStore  # noqa: E402

TARGET_RATIO = 0.80
SERVE_LABEL = "ppimage serve"
NGINX_LABEL = "nginx"
NGINX_CONFIG = """\
daemon off;
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log;
{user_line}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
    }}
}}
"""


@dataclass
class Round:
    server: str
    concurrency: int
    seconds: float
    total_bytes: int
    client_cpu: float
    server_cpu: float
    segments: int

    @property
    def throughput(self) -> float:
        return self.total_bytes / self.seconds


def publish_one(catalog_path: Path, store_root: Path) -> tuple[str, object]:
    """Publish one example host's ISO payload; return its URL path and its layout."""
    catalog = load_catalog(catalog_path)
    image, secret = next(
        common.generate_hosts(1, namespace="bench", with_finalizer=True, accept_formats=["iso"])
    )
    image, secret = common.with_identity(image, secret, 0)
    plan = plan_image(image, secret, catalog)
    record = PayloadStore(store_root).publish(
        namespace=plan.namespace, name=plan.name, uid=image["metadata"]["uid"],
        image_format=plan.image_format, architecture=plan.architecture,
        base_digest=digest_file(plan.base.iso), payload_archive=plan.payload.archive,
        payload_digest=plan.payload.digest,
    )  # fmt: skip
    return record.url_path, plan.layout


def start_nginx(processes: common.Processes, root: Path, port: int):
    """Start nginx in the foreground with a config of its own under ``root``."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / "temp" / name).mkdir(parents=True, exist_ok=True)
    # As root, nginx workers would switch to nobody; keep the current user instead.
    user_line = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    config = root / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(root=root, port=port, user_line=user_line))
    command = ["nginx", "-p", str(root), "-e", str(root / "error.log"), "-c", str(config)]
    subprocess.run([*command, "-t"], check=True, capture_output=True, timeout=30)
    return processes.start("nginx", command, log_path=root / "nginx.out")


def server_cpu(pid: int) -> float:
    return common.cpu_seconds(pid) + sum(common.cpu_seconds(child) for child in
                                         common.children_of(pid))  # fmt: skip


def tcp_segments_sent() -> int:
    """Return the machine's count of TCP segments sent (Tcp OutSegs in /proc/net/snmp)."""
    with open("/proc/net/snmp") as handle:
        names, values = [line.split() for line in handle if line.startswith("Tcp:")]
    return int(values[names.index("OutSegs")])


def download_round(url: str, concurrency: int, server_pid: int, label: str) -> Round:
    command = ["curl", "-s", "-S", "-f", "-o", "/dev/null", "-w", "%{size_download}\n", url]
    cpu_before = common.children_cpu_seconds()
    server_before = server_cpu(server_pid)
    segments_before = tcp_segments_sent()
    started = time.perf_counter()
    clients = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(concurrency)
    ]
    sizes = []
    for client in clients:
        output, _ = client.communicate(timeout=900)
        if client.returncode != 0:
            raise RuntimeError(f"curl {url} failed with exit status {client.returncode}")
        sizes.append(int(output.strip()))
    elapsed = time.perf_counter() - started
    return Round(
        server=label, concurrency=concurrency, seconds=elapsed, total_bytes=sum(sizes),
        client_cpu=common.children_cpu_seconds() - cpu_before,
        server_cpu=server_cpu(server_pid) - server_before,
        segments=tcp_segments_sent() - segments_before,
    )  # fmt: skip


def sha256_of_url(url: str) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def report(rounds: list[Round], labels: list[str]) -> None:
    width = max(len(label) for label in labels)
    print(f"  {'server':<{width}} {'conc.':>5} {'runs':>4} {'median MB/s':>12} {'min':>9}"
          f" {'max':>9} {'server CPU s':>13} {'client CPU s':>13}"
          f" {'TCP segments/GiB':>17}")  # fmt: skip
    for concurrency in sorted({entry.concurrency for entry in rounds}):
        medians = {}
        for label in labels:
            chosen = [r for r in rounds if r.server == label and r.concurrency == concurrency]
            rates = [r.throughput / 1e6 for r in chosen]
            medians[label] = common.median(rates)
            print(
                f"  {label:<{width}} {concurrency:>5} {len(chosen):>4} {medians[label]:>12,.0f}"
                f" {min(rates):>9,.0f} {max(rates):>9,.0f}"
                f" {common.median([r.server_cpu for r in chosen]):>13.2f}"
                f" {common.median([r.client_cpu for r in chosen]):>13.2f}"
                f" {common.median([r.segments / (r.total_bytes / GIB) for r in chosen]):>17,.0f}"
            )
        for label in labels:
            if label == NGINX_LABEL:
                continue
            ratio = medians[label] / medians[NGINX_LABEL]
            verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
            print(f"  {concurrency} concurrent: {label} reaches {ratio:.0%} of nginx;"
                  f" target >= {TARGET_RATIO:.0%}: {verdict}")  # fmt: skip


def compare_label(directory: Path) -> str:
    return f"{SERVE_LABEL} ({directory.name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round per case (~1 min)")
    parser.add_argument("--bases", type=Path, help="directory that keeps the base images")
    parser.add_argument("--iso-size", type=int, default=GIB, help="ISO size in bytes")
    parser.add_argument("--rounds", type=int, help="rounds per server and concurrency")
    parser.add_argument(
        "--compare-with", type=Path, action="append", default=[], metavar="DIR",
        help="also run ppimage serve from this copy of the repository; repeatable",
    )  # fmt: skip
    arguments = parser.parse_args()
    for directory in arguments.compare_with:
        if not (directory / "server" / "http.py").is_file():
            parser.error(f"--compare-with {directory}: no server/http.py there")
    common.require_tools("nginx", "curl", "xorriso")
    rounds = arguments.rounds or (1 if arguments.quick else 3)

    workdir = Path(tempfile.mkdtemp(prefix="ppimage-bench-serve-", dir="/var/tmp"))
    workdir.chmod(0o755)
    processes = common.Processes()
    try:
        for line in common.describe_machine(workdir):
            print(line)
        curl_version = subprocess.run(
            ["curl", "--version"], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        nginx_version = subprocess.run(
            ["nginx", "-v"], capture_output=True, text=True, check=True
        ).stderr.strip()
        print(f"client curl {curl_version}; {nginx_version}")
        bases = arguments.bases or workdir / "bases"
        iso = common.make_big_iso(bases, size=arguments.iso_size, log_path=workdir / "bases.log")
        catalog_path = common.write_catalog(
            workdir / "catalog.yaml", iso=iso, initrd=common.INSTALLER_INITRD,
            kernel=common.INSTALLER_KERNEL,
        )  # fmt: skip
        store = workdir / "store"
        url_path, layout = publish_one(catalog_path, store)
        materialized = workdir / "nginx" / "www" / url_path
        materialized.parent.mkdir(parents=True)
        materialize(layout, materialized)

        serve_arguments = ["serve", "--store", str(store), "--config", str(catalog_path)]
        ports = {SERVE_LABEL: common.free_port()}
        serve = processes.start(
            SERVE_LABEL,
            [common.PPIMAGE, *serve_arguments, "--listen", f"127.0.0.1:{ports[SERVE_LABEL]}"],
            log_path=workdir / "serve.log",
        )  # fmt: skip
        pids = {SERVE_LABEL: serve.pid}
        for index, directory in enumerate(arguments.compare_with):
            label = compare_label(directory)
            ports[label] = common.free_port()
            # -P keeps the working directory (this repository) off sys.path, so PYTHONPATH wins.
            process = processes.start(
                label,
                [common.PYTHON, "-P", "-m", "builder.cli", *serve_arguments, "--listen",
                 f"127.0.0.1:{ports[label]}"],
                log_path=workdir / f"serve-compare-{index}.log",
                env={"PYTHONPATH": str(directory.resolve())},
            )  # fmt: skip
            pids[label] = process.pid
        ports[NGINX_LABEL] = common.free_port()
        nginx = start_nginx(processes, workdir / "nginx", ports[NGINX_LABEL])
        pids[NGINX_LABEL] = nginx.pid
        urls = {label: f"http://127.0.0.1:{port}/{url_path}" for label, port in ports.items()}
        labels = list(urls)

        def ready(url: str) -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        for label in labels:
            if label == NGINX_LABEL:
                continue
            common.wait_for(lambda port=ports[label]: ready(f"http://127.0.0.1:{port}/readyz"),
                            timeout=120, what=f"{label} /readyz")  # fmt: skip
        common.wait_for(lambda: nginx.poll() is None and ready(urls[NGINX_LABEL]), timeout=30,
                        what="nginx")  # fmt: skip

        # All servers must send the same bytes. This also puts the files in the page cache.
        digests = {label: sha256_of_url(url) for label, url in urls.items()}
        if len(set(digests.values())) != 1:
            raise SystemExit(f"the servers sent different bytes: {digests}")
        print(f"image: {layout.size:,} bytes, sha256 {digests[NGINX_LABEL][:16]}... from all"
              f" {len(labels)} servers")  # fmt: skip
        print(f"mode {'quick' if arguments.quick else 'full'}: {rounds} rounds per case;"
              f" load average before downloads: {common.load_average()}")  # fmt: skip

        results: list[Round] = []
        for round_index in range(rounds):
            for concurrency in (1, 16):
                shift = round_index % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    results.append(download_round(urls[label], concurrency, pids[label], label))
        report(results, labels)
        print(f"load average at end: {common.load_average()}")
        print(f"ppimage serve peak RSS {common.read_status_kib(serve.pid, 'VmHWM') / 1024:.1f} MiB")
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
