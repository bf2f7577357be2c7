"""Read PreprovisioningImage and Secret manifests from YAML or JSON files.

A file may hold one document, many (``---``) or a ``kind: List`` as ``kubectl get -o yaml``
prints it. Objects without a namespace are in ``default``, as ``kubectl apply`` would put them.
Documents of other kinds are skipped; a document that is not a Kubernetes object is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from builder.safe_yaml import YAMLError, load_all_documents

log = logging.getLogger(__name__)

PPI_API_VERSION = "metal3.io/v1alpha1"
PPI_KIND = "PreprovisioningImage"

# Manifest files larger than this are rejected before parsing: a real list of 10,000 hosts
# with their Secrets stays well under it.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


# Kubernetes name rules: object names are DNS-1123 subdomains, namespaces DNS-1123 labels.
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ManifestError(Exception):
    """A manifest file cannot be read or contains something that is not a Kubernetes object."""


@dataclass
class Manifests:
    """PreprovisioningImages in file order and Secrets keyed by (namespace, name)."""

    images: list[dict] = field(default_factory=list)
    secrets: dict[tuple[str, str], dict] = field(default_factory=dict)

    def secret_for(self, image: dict) -> dict | None:
        """Return the Secret named by the image's ``spec.networkDataName``, or None if absent."""
        name = (image.get("spec") or {}).get("networkDataName")
        if not name:
            return None
        return self.secrets.get((namespace_of(image), name))


def namespace_of(obj: dict) -> str:
    """Return the object's namespace, ``default`` when the manifest leaves it out."""
    return (obj.get("metadata") or {}).get("namespace") or "default"


def name_of(obj: dict) -> str:
    """Return ``namespace/name`` for log lines and messages."""
    return f"{namespace_of(obj)}/{(obj.get('metadata') or {}).get('name', '?')}"


def load_manifests(paths: Iterable[Path]) -> Manifests:
    """Read every file in ``paths`` and collect PreprovisioningImages and Secrets.

    Raises ManifestError naming the file when it cannot be read or parsed, when an object's
    name or namespace is not a valid Kubernetes name (they become output paths), or when a
    PreprovisioningImage's generation is not an integer.
    """
    manifests = Manifests()
    seen_images: set[tuple[str, str]] = set()
    for path in paths:
        for obj in _objects_in(path):
            kind = obj.get("kind")
            if kind not in (PPI_KIND, "Secret"):
                continue
            _check_metadata(obj, path=path)
            key = (namespace_of(obj), obj["metadata"]["name"])
            if kind == PPI_KIND:
                if key in seen_images:
                    raise ManifestError(
                        f"{path}: PreprovisioningImage {key[0]}/{key[1]} appears twice; "
                        "keep one of them"
                    )
                seen_images.add(key)
                manifests.images.append(obj)
            elif obj.get("apiVersion", "v1") == "v1":
                if key in manifests.secrets:
                    log.warning("%s: Secret %s/%s appears twice; the last one is used",
                                path, key[0], key[1])  # fmt: skip
                manifests.secrets[key] = obj
    return manifests


def _check_metadata(obj: dict, *, path: Path) -> None:
    kind = obj.get("kind")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        raise ManifestError(f"{path}: a {kind} has no metadata.name; add one")
    name = metadata["name"]
    namespace = metadata.get("namespace", "default")
    if not isinstance(name, str) or not _SUBDOMAIN.match(name) or len(name) > 253:
        raise ManifestError(
            f"{path}: {kind} name {name!r} is not a valid Kubernetes name; use lower-case "
            "letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    if not isinstance(namespace, str) or not _LABEL.match(namespace):
        raise ManifestError(
            f"{path}: {kind} {name}: namespace {namespace!r} is not a valid Kubernetes "
            "namespace; use up to 63 lower-case letters, digits and '-'"
        )
    generation = metadata.get("generation", 0)
    if kind == PPI_KIND and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise ManifestError(
            f"{path}: {kind} {namespace}/{name}: metadata.generation {generation!r} is not "
            "an integer; remove it or write the object's generation"
        )


def _objects_in(path: Path) -> Iterator[dict]:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path}: file is {size} bytes, more than the {MAX_MANIFEST_BYTES} accepted; "
                "split it into several files"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from error
    try:
        if path.suffix == ".json":
            documents: list = [json.loads(text)]
        else:
            documents = list(load_all_documents(text))
    except RecursionError:
        raise ManifestError(f"{path}: the document is nested too deeply to read") from None
    except (json.JSONDecodeError, YAMLError, yaml.YAMLError) as error:
        raise ManifestError(f"{path}: invalid YAML or JSON: {error}") from error
    for index, document in enumerate(documents):
        if document is None:
            continue
        if not isinstance(document, dict) or "kind" not in document:
            raise ManifestError(
                f"{path}: document {index + 1} is not a Kubernetes object (no 'kind' field)"
            )
        kind = document["kind"]
        if isinstance(kind, str) and kind.endswith("List"):
            items = document.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{path}: items of document {index + 1} is not a list")
            for item in items:
                if not isinstance(item, dict) or "kind" not in item:
                    raise ManifestError(f"{path}: an item of document {index + 1} has no 'kind'")
                if isinstance(item["kind"], str) and item["kind"].endswith("List"):
                    raise ManifestError(
                        f"{path}: document {index + 1} nests a {item['kind']} inside a "
                        f"{kind}; kubectl never writes that, so put the items in one list"
                    )
                yield item
        else:
            yield document
