"""Read PreprovisioningImage and Secret manifests from YAML or JSON files.

A file may hold one document, many (``---``) or a ``kind: List`` as ``kubectl get -o yaml``
prints it. Objects without a namespace are in ``default``, as ``kubectl apply`` would put them.
Documents of other kinds are skipped; a document that is not a Kubernetes object is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from builder.safe_yaml import YAMLError, load_all_documents

PPI_API_VERSION = "metal3.io/v1alpha1"
PPI_KIND = "PreprovisioningImage"

# Manifest files larger than this are rejected before parsing: a real list of 10,000 hosts
# with their Secrets stays well under it.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class ManifestError(Exception):
    """A manifest file cannot be read or holds something that is not a Kubernetes object."""


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

    Raises ManifestError naming the file when it cannot be read or parsed, or when a
    PreprovisioningImage has no name.
    """
    manifests = Manifests()
    for path in paths:
        for obj in _objects_in(path):
            kind = obj.get("kind")
            metadata = obj.get("metadata")
            if not isinstance(metadata, dict) or not metadata.get("name"):
                raise ManifestError(f"{path}: a {kind} has no metadata.name; add one")
            if kind == PPI_KIND:
                manifests.images.append(obj)
            elif kind == "Secret" and obj.get("apiVersion", "v1") == "v1":
                manifests.secrets[(namespace_of(obj), metadata["name"])] = obj
    return manifests


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
    except (json.JSONDecodeError, YAMLError, yaml.YAMLError) as error:
        raise ManifestError(f"{path}: invalid YAML or JSON: {error}") from error
    for index, document in enumerate(documents):
        if document is None:
            continue
        if not isinstance(document, dict) or "kind" not in document:
            raise ManifestError(
                f"{path}: document {index + 1} is not a Kubernetes object (no 'kind' field)"
            )
        if document["kind"] == "List" or document["kind"].endswith("List"):
            for item in document.get("items") or []:
                if not isinstance(item, dict) or "kind" not in item:
                    raise ManifestError(f"{path}: an item of document {index + 1} has no 'kind'")
                yield item
        else:
            yield document
