"""Run the Kubernetes API emulator of tests/ in its own process, controlled over stdin.

The benchmarks run the emulator apart from themselves so that its CPU time and memory are its
own. It prints one JSON line ``{"url": ...}`` once it listens, then reads one JSON command per
line on stdin and replies to each with one JSON line on stdout:

- ``{"op": "create", "path": FILE}``: create the objects of a JSON list file (``[[resource,
  object], ...]``) in order, directly in the store, with the checks and watch events of a POST;
- ``{"op": "mark-ready", "url": URL}``: write a Ready status to every PreprovisioningImage, as
  a worker would after a successful build (networkData.version is the Secret's
  resourceVersion, observedGeneration the generation), and return their uids;
- ``{"op": "patch", "resource": R, "namespace": N, "name": NAME, "patch": {...}}``: apply a
  JSON merge patch and return the new resourceVersion;
- ``{"op": "get", "resource": R, "namespace": N, "name": NAME}``: return the object.

Usage: python bench/emulator_process.py [--history-limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tests"))

from kube_emulator import EmulatorServer, KubeEmulator  # noqa: E402

PPI = "preprovisioningimages"


def ready_status(image: dict, secret_version: str, url: str) -> dict:
    spec = image.get("spec") or {}
    generation = image["metadata"].get("generation", 1)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [
        {"type": "Ready", "status": "True", "reason": "ImageSuccess", "message": "Generated image",
         "observedGeneration": generation, "lastTransitionTime": now},
        {"type": "Error", "status": "False", "reason": "ImageSuccess", "message": "",
         "observedGeneration": generation, "lastTransitionTime": now},
    ]  # fmt: skip
    return {
        "status": {
            "imageUrl": f"{url}/images/{image['metadata']['name']}.iso",
            "format": (spec.get("acceptFormats") or ["iso"])[0],
            "architecture": spec.get("architecture"),
            "networkData": {"name": spec.get("networkDataName"), "version": secret_version},
            "conditions": conditions,
        }
    }


def handle(emulator: KubeEmulator, command: dict) -> dict:
    operation = command["op"]
    if operation == "create":
        started = time.perf_counter()
        pairs = json.loads(Path(command["path"]).read_text())
        for resource, body in pairs:
            emulator.create_object(resource, body)
        return {"count": len(pairs), "seconds": time.perf_counter() - started}
    if operation == "mark-ready":
        images, _ = emulator.store.list(_selection(emulator, PPI))
        uids = []
        for image in images:
            metadata = image["metadata"]
            secret = emulator.get_object(
                "secrets", image["spec"]["networkDataName"], namespace=metadata["namespace"]
            )
            patch = ready_status(image, secret["metadata"]["resourceVersion"], command["url"])
            emulator.patch_object(
                PPI, metadata["name"], patch, namespace=metadata["namespace"], subresource="status"
            )
            uids.append(metadata["uid"])
        return {"uids": uids}
    if operation == "patch":
        updated = emulator.patch_object(
            command["resource"], command["name"], command["patch"], namespace=command["namespace"]
        )
        return {"resourceVersion": updated["metadata"]["resourceVersion"]}
    if operation == "get":
        return {
            "object": emulator.get_object(
                command["resource"], command["name"], namespace=command["namespace"]
            )
        }
    raise ValueError(f"unknown command {operation!r}")


def _selection(emulator: KubeEmulator, resource: str):
    from kube_emulator import Selection

    return Selection(resource=emulator.store.resource(resource), namespace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--history-limit",
        type=int,
        default=1000,
        help="watch events kept before the oldest are dropped (410 after that)",
    )
    parser.add_argument("--bookmark-interval", type=float, default=60.0,
                        help="seconds between watch bookmarks")  # fmt: skip
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    emulator = KubeEmulator(
        history_limit=arguments.history_limit, bookmark_interval=arguments.bookmark_interval
    )
    with EmulatorServer(emulator) as server:
        print(json.dumps({"url": server.url}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = handle(emulator, json.loads(line))
            except Exception as error:  # noqa: BLE001 (the caller reads the error)
                answer = {"error": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
