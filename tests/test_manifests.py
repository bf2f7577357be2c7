"""Tests of manifest loading: multi-document YAML, kind List, JSON and bad files."""

import json
from pathlib import Path

import pytest
import yaml

from builder.manifests import ManifestError, load_manifests

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_examples_load_images_and_secrets():
    manifests = load_manifests(sorted(EXAMPLES.glob("*.yaml")))
    names = [image["metadata"]["name"] for image in manifests.images]
    assert names == ["worker-0", "worker-1", "worker-2", "worker-3", "worker-4"]
    assert ("metal3", "worker-0-network") in manifests.secrets
    assert ("openshift-machine-api", "worker-3-network-config-secret") in manifests.secrets


def test_secret_matched_by_namespace_and_name():
    manifests = load_manifests(sorted(EXAMPLES.glob("*.yaml")))
    by_name = {image["metadata"]["name"]: image for image in manifests.images}
    secret = manifests.secret_for(by_name["worker-3"])
    assert secret["metadata"]["name"] == "worker-3-network-config-secret"
    assert manifests.secret_for(by_name["worker-2"]) is None


def test_secret_in_other_namespace_not_matched(tmp_path):
    image = {
        "apiVersion": "metal3.io/v1alpha1",
        "kind": "PreprovisioningImage",
        "metadata": {"name": "a", "namespace": "one"},
        "spec": {"networkDataName": "net"},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "net", "namespace": "two"}}
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all([image, secret]))
    manifests = load_manifests([path])
    assert manifests.secret_for(manifests.images[0]) is None


def test_kind_list_and_json(tmp_path):
    documents = list(yaml.safe_load_all((EXAMPLES / "worker-0-nmstate.yaml").read_text()))
    listing = {"apiVersion": "v1", "kind": "List", "items": documents}
    path = tmp_path / "list.json"
    path.write_text(json.dumps(listing))
    manifests = load_manifests([path])
    assert len(manifests.images) == 1
    assert len(manifests.secrets) == 1


def test_missing_namespace_means_default(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(
        "kind: PreprovisioningImage\napiVersion: metal3.io/v1alpha1\nmetadata:\n  name: x\n"
    )
    manifests = load_manifests([path])
    assert manifests.images[0]["metadata"]["name"] == "x"


def test_non_object_document_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match="not a Kubernetes object"):
        load_manifests([path])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Secret\nmetadata: {name: [\n")
    with pytest.raises(ManifestError) as caught:
        load_manifests([path])
    assert "broken.yaml" in str(caught.value)
    assert "line" in str(caught.value)


def test_alias_bomb_rejected(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for index in range(1, 9):
        previous = chr(ord("a") + index - 1)
        current = chr(ord("a") + index)
        lines.append(f"{current}: &{current} [*{previous}, *{previous}, *{previous}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("kind: Secret\n" + "\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match="anchors and aliases"):
        load_manifests([path])


def write_image(tmp_path, *, name="host", namespace="lab", generation=1):
    path = tmp_path / "image.yaml"
    metadata = {"name": name, "namespace": namespace, "generation": generation}
    path.write_text(yaml.safe_dump({"kind": "PreprovisioningImage", "metadata": metadata}))
    return path


@pytest.mark.parametrize("name", ["../../tmp/escape", "/abs", "Upper", "a_b", "", "x" * 254])
def test_invalid_name_rejected(tmp_path, name):
    with pytest.raises(ManifestError) as caught:
        load_manifests([write_image(tmp_path, name=name)])
    assert "image.yaml" in str(caught.value)


@pytest.mark.parametrize("namespace", ["../..", "/tmp/absdir", "a.b", ["a"], 7])
def test_invalid_namespace_rejected(tmp_path, namespace):
    with pytest.raises(ManifestError, match="namespace"):
        load_manifests([write_image(tmp_path, namespace=namespace)])


def test_non_integer_generation_rejected(tmp_path):
    with pytest.raises(ManifestError, match="metadata.generation 'abc' is not an integer"):
        load_manifests([write_image(tmp_path, generation="abc")])


def test_duplicate_image_rejected(tmp_path):
    path = write_image(tmp_path)
    with pytest.raises(ManifestError, match="appears twice"):
        load_manifests([path, path])


def test_nested_list_rejected(tmp_path):
    inner = {"kind": "List", "items": []}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump({"kind": "List", "items": [inner]}))
    with pytest.raises(ManifestError, match="nests a List inside a List"):
        load_manifests([path])


def test_deep_json_rejected(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifests([path])
