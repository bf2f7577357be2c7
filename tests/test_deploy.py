"""Static checks of compose.yaml and deploy/: no Docker engine or cluster runs here.

Manifests are validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail), compose.yaml by Debian's docker-compose, the RBAC rules against the
least privilege each role needs, and every command line against the real ``ppimage`` parser.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from builder.cli import main
from builder.status import ImageOutcome, compute_status

REPOSITORY = Path(__file__).resolve().parent.parent
DEPLOY = REPOSITORY / "deploy"
KUBERNETES_VERSION = "1.32"


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def all_deploy_documents() -> list[dict]:
    return [document for path in sorted(DEPLOY.glob("*.yaml")) for document in documents(path)]


def resource_id(document: dict) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


@pytest.mark.parametrize(
    "document", all_deploy_documents(), ids=lambda document: resource_id(document)
)
def test_deploy_manifest_matches_kubernetes_schema(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def rules_of(role_name: str) -> list[dict]:
    for document in documents(DEPLOY / "rbac.yaml"):
        is_role = document["kind"] in ("ClusterRole", "Role")
        if is_role and document["metadata"]["name"] == role_name:
            return document["rules"]
    raise AssertionError(f"role {role_name} not found in deploy/rbac.yaml")


def granted(role_name: str) -> set[tuple[str, str]]:
    return {
        (resource, verb)
        for rule in rules_of(role_name)
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_worker_is_least_privilege():
    assert granted("ppimage-worker") == {
        ("preprovisioningimages", "get"),
        ("preprovisioningimages/status", "get"),
        ("preprovisioningimages/status", "patch"),
        ("secrets", "get"),
    }


def test_rbac_watcher_is_least_privilege():
    assert granted("ppimage-watcher") == {
        ("preprovisioningimages", "get"),
        ("preprovisioningimages", "list"),
        ("preprovisioningimages", "watch"),
        ("preprovisioningimages", "patch"),
        ("secrets", "get"),
        ("secrets", "list"),
        ("secrets", "watch"),
    }
    assert granted("ppimage-watcher-leader") == {
        ("leases", "get"),
        ("leases", "create"),
        ("leases", "update"),
    }


def test_rbac_grants_no_secret_writes():
    for document in documents(DEPLOY / "rbac.yaml"):
        for rule in document.get("rules", []):
            if "secrets" in rule["resources"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, resource_id(document)


def containers() -> list[tuple[str, dict]]:
    found = []
    for document in documents(DEPLOY / "farm.yaml"):
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                found.append((document["metadata"]["name"], container))
    return found


@pytest.mark.parametrize("name,container", containers(), ids=lambda value: str(value)[:40])
def test_deployment_has_probes(name, container):
    assert "livenessProbe" in container, name
    assert "readinessProbe" in container, name


def ppimage_arguments() -> list[tuple[str, list[str]]]:
    found = [
        (name, container["args"])
        for name, container in containers()
        if container["image"].startswith("ppimage")
    ]
    compose = yaml.safe_load((REPOSITORY / "compose.yaml").read_text())
    for service, definition in compose["services"].items():
        if definition.get("image", "").startswith("ppimage"):
            found.append((f"compose {service}", definition["command"]))
    return found


@pytest.mark.parametrize("name,arguments", ppimage_arguments(), ids=lambda value: str(value)[:40])
def test_deploy_commands_parse(name, arguments):
    result = CliRunner().invoke(main, [*arguments, "--help"])
    assert result.exit_code == 0, f"{name}: ppimage {' '.join(arguments)}: {result.output}"


def test_compose_config_is_valid():
    compose_binary = shutil.which("docker-compose")
    if compose_binary is None:
        pytest.fail("docker-compose is missing; install the Debian package docker-compose")
    result = subprocess.run(
        [compose_binary, "-f", str(REPOSITORY / "compose.yaml"), "config"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"redis", "watcher", "worker", "server", "flower"}
    # A worker with a fixed name or host port could not be scaled with --scale.
    assert "container_name" not in config["services"]["worker"]
    assert "ports" not in config["services"]["worker"]


def crd_schema() -> dict:
    (crd,) = documents(DEPLOY / "crd.yaml")
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    return version["schema"]["openAPIV3Schema"]


def test_crd_accepts_computed_status():
    image = yaml.safe_load_all((REPOSITORY / "examples" / "worker-1-networkdata.yaml").read_text())
    image = [document for document in image if document["kind"] == "PreprovisioningImage"][0]
    outcome = ImageOutcome(
        image_url="http://images.example/images/metal3/worker-1/uid/abc.initrd",
        image_format="initrd",
        architecture="x86_64",
        network_data_name="worker-1-network",
        network_data_version="51007",
        kernel_url="http://images.example/bases/x86_64/kernel",
        extra_kernel_params="console=ttyS0",
    )
    image["status"] = compute_status(image, outcome)
    jsonschema.validate(image, crd_schema())


def test_crd_rejects_unknown_format():
    image = {"spec": {"acceptFormats": ["qcow2"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(image, crd_schema())
