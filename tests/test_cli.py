"""Tests of the ``ppimage build`` and ``render`` commands on real base images.

Each bad input ends in a status with the exact reason, or in a command error (exit status 2)
when the command itself cannot run.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from builder import images
from builder.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_MANIFESTS = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, base_iso: Path, busybox_initramfs: Path, kernel: Path) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    entry = {"iso": str(base_iso), "initrd": str(busybox_initramfs), "kernel": str(kernel)}
    path.write_text(yaml.safe_dump({"architectures": {"x86_64": entry}}))
    return path


def run_build(*arguments: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(main, ["build", *arguments], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def statuses(stdout: str) -> dict[str, dict]:
    listing = yaml.safe_load(stdout)
    assert listing["kind"] == "List"
    return {item["metadata"]["name"]: item["status"] for item in listing["items"]}


def conditions(status: dict) -> dict[str, dict]:
    return {entry["type"]: entry for entry in status["conditions"]}


def write_objects(path: Path, *objects: dict) -> Path:
    path.write_text(yaml.safe_dump_all(objects))
    return path


def image(name: str, *, secret: str | None = "net", architecture="x86_64", formats=("iso",)):
    spec = {"architecture": architecture, "acceptFormats": list(formats)}
    if secret:
        spec["networkDataName"] = secret
    return {
        "apiVersion": "metal3.io/v1alpha1",
        "kind": "PreprovisioningImage",
        "metadata": {"name": name, "namespace": "lab", "generation": 4, "uid": f"uid-{name}"},
        "spec": spec,
    }


def secret(data: dict[str, str], *, name="net", version="900") -> dict:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "lab", "resourceVersion": version},
        "data": encoded,
    }


def test_build_examples_all_ready(catalog, tmp_path):
    code, stdout, _ = run_build(*map(str, EXAMPLE_MANIFESTS), "--config", str(catalog), "--out",
                                str(tmp_path))  # fmt: skip
    assert code == 0
    result = statuses(stdout)
    assert sorted(result) == ["worker-0", "worker-1", "worker-2", "worker-3", "worker-4"]
    for name, status in result.items():
        assert conditions(status)["Ready"]["status"] == "True", name
        assert conditions(status)["Error"]["status"] == "False", name
    assert result["worker-0"]["format"] == "iso"
    assert result["worker-0"]["networkData"] == {"name": "worker-0-network", "version": "48213"}
    assert result["worker-1"]["format"] == "initrd"
    assert conditions(result["worker-1"])["Ready"]["observedGeneration"] == 2
    assert result["worker-1"]["kernelUrl"].startswith("file://")
    assert result["worker-3"]["networkData"]["version"] == "77120"
    assert result["worker-4"]["networkData"]["version"] == "60311"
    assert (tmp_path / "metal3" / "worker-0.iso").is_file()
    assert (tmp_path / "openshift-machine-api" / "worker-3.iso").is_file()


def test_build_without_network_data_copies_base(catalog, base_iso, tmp_path):
    manifest = EXAMPLES / "worker-2-dhcp.yaml"
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    written = tmp_path / "metal3" / "worker-2.iso"
    assert (
        hashlib.sha256(written.read_bytes()).digest()
        == hashlib.sha256(base_iso.read_bytes()).digest()
    )
    assert statuses(stdout)["worker-2"]["imageUrl"] == written.resolve().as_uri()


def test_build_iso_changes_only_embed_area(catalog, base_iso, tmp_path):
    manifest = EXAMPLES / "worker-0-nmstate.yaml"
    code, _, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    area = images.find_embed_area(base_iso)
    base = base_iso.read_bytes()
    built = (tmp_path / "metal3" / "worker-0.iso").read_bytes()
    assert len(built) == len(base)
    assert built[: area.offset] == base[: area.offset]
    assert built[area.offset + area.size :] == base[area.offset + area.size :]
    assert built[area.offset : area.offset + 2] == b"\x1f\x8b"


def test_build_initrd_appends_aligned_payload(catalog, busybox_initramfs, tmp_path):
    manifest = EXAMPLES / "worker-1-networkdata.yaml"
    code, _, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    base = busybox_initramfs.read_bytes()
    built = (tmp_path / "metal3" / "worker-1.initrd").read_bytes()
    start = (len(base) + 3) // 4 * 4
    assert built[: len(base)] == base
    assert built[len(base) : start] == b"\0" * (start - len(base))
    assert built[start : start + 2] == b"\x1f\x8b"


BOND_WITH_BAD_MODE = """
interfaces:
- name: bond0
  type: bond
  state: up
  link-aggregation:
    mode: fastest
    port: [eth0]
- name: eth0
  type: ethernet
  state: up
"""

VLAN_WITHOUT_BASE = """
interfaces:
- name: eth0.5
  type: vlan
  state: up
  vlan: {base-iface: eth9, id: 5}
"""


def nmstate_with_name(name: str) -> str:
    return yaml.safe_dump({"interfaces": [{"name": name, "type": "ethernet", "state": "up"}]})


def nmstate_search(domain: str) -> str:
    return yaml.safe_dump(
        {
            "interfaces": [{"name": "eth0", "type": "ethernet", "state": "up"}],
            "dns-resolver": {"config": {"search": [domain], "server": ["192.0.2.53"]}},
        }
    )


INVALID_SECRETS = {
    "no-known-key": ({"foo": "bar"}, "nmstate"),
    "empty-nmstate-braces": ({"nmstate": "{}"}, "nmstate"),
    "empty-nmstate-dashes": ({"nmstate": "---"}, "nmstate"),
    "malformed-yaml": ({"nmstate": "interfaces: [\n"}, "line"),
    "malformed-json": ({"networkData": '{"links": [}'}, "networkData"),
    "unknown-link-type": (
        {"networkData": '{"links": [{"id": "x", "type": "infiniband"}], "networks": []}'},
        "infiniband",
    ),
    "unknown-bond-mode": ({"nmstate": BOND_WITH_BAD_MODE}, "fastest"),
    "address-without-prefix": (
        {
            "nmstate": "interfaces:\n- name: eth0\n  type: ethernet\n  state: up\n"
            "  ipv4:\n    enabled: true\n    address:\n    - ip: 192.0.2.9\n"
        },
        "prefix-length",
    ),
    "vlan-without-base": ({"nmstate": VLAN_WITHOUT_BASE}, "eth9"),
    "name-empty": ({"nmstate": nmstate_with_name("")}, "empty"),
    "name-16-bytes": ({"nmstate": nmstate_with_name("a" * 16)}, "16 bytes"),
    "name-dot": ({"nmstate": nmstate_with_name(".")}, "'.'"),
    "name-dotdot": ({"nmstate": nmstate_with_name("..")}, "'..'"),
    "name-slash": ({"nmstate": nmstate_with_name("a/b")}, "'a/b'"),
    "name-colon": ({"nmstate": nmstate_with_name("a:b")}, "'a:b'"),
    "name-space": ({"nmstate": nmstate_with_name("a b")}, "'a b'"),
    "search-newline": ({"nmstate": nmstate_search("lab.example\nevil")}, "search"),
}


@pytest.mark.parametrize("case", sorted(INVALID_SECRETS))
def test_build_invalid_secret_is_image_build_invalid(case, catalog, tmp_path):
    data, expected_text = INVALID_SECRETS[case]
    manifest = write_objects(tmp_path / "objects.yaml", image("host"), secret(data))
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out",
                                str(tmp_path / "out"))  # fmt: skip
    assert code == 0
    status = statuses(stdout)["host"]
    error = conditions(status)["Error"]
    assert error["status"] == "True"
    assert error["reason"] == "ImageBuildInvalid"
    assert error["message"].startswith("Cannot generate image: ")
    assert "Secret lab/net" in error["message"]
    assert expected_text in error["message"]
    assert conditions(status)["Ready"]["status"] == "False"
    assert "imageUrl" not in status
    assert status["networkData"] == {"name": "net", "version": "900"}
    assert not (tmp_path / "out" / "lab" / "host.iso").exists()


def test_build_invalid_base64_is_image_build_invalid(catalog, tmp_path):
    broken = secret({})
    broken["data"] = {"nmstate": "not*base64!"}
    manifest = write_objects(tmp_path / "objects.yaml", image("host"), broken)
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    error = conditions(statuses(stdout)["host"])["Error"]
    assert error["reason"] == "ImageBuildInvalid"
    assert "base64" in error["message"]


def test_build_missing_secret_is_missing_network_data(catalog, tmp_path):
    manifest = write_objects(tmp_path / "objects.yaml", image("host"))
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    status = statuses(stdout)["host"]
    assert conditions(status)["Error"]["reason"] == "MissingNetworkData"
    assert conditions(status)["Error"]["message"] == "NetworkData secret not found"
    assert conditions(status)["Ready"]["observedGeneration"] == 4


def test_build_unknown_architecture_is_configuration_error(catalog, tmp_path):
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None,
                                                              architecture="s390x"))  # fmt: skip
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    error = conditions(statuses(stdout)["host"])["Error"]
    assert error["reason"] == "ConfigurationError"
    assert error["message"] == "Architecture not supported"


def test_build_architecture_alias_kept_in_status(catalog, tmp_path):
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None,
                                                              architecture="amd64"))  # fmt: skip
    code, stdout, _ = run_build(str(manifest), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 0
    status = statuses(stdout)["host"]
    assert status["architecture"] == "amd64"
    assert conditions(status)["Ready"]["status"] == "True"


def test_build_no_acceptable_format_is_configuration_error(tmp_path, base_iso):
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None,
                                                              formats=("initrd",)))  # fmt: skip
    code, stdout, _ = run_build(str(manifest), "--iso", str(base_iso), "--arch", "x86_64",
                                "--out", str(tmp_path))  # fmt: skip
    assert code == 0
    error = conditions(statuses(stdout)["host"])["Error"]
    assert error["reason"] == "ConfigurationError"
    assert error["message"] == "No acceptable image format supported"


def test_build_payload_larger_than_embed_area(tmp_path, kernel, busybox_initramfs):
    from builder.prepare_base import master_iso

    small = tmp_path / "small.iso"
    master_iso(kernel=kernel, initrd=busybox_initramfs, dst=small, size=2048)
    # Random-looking search domains do not compress, so the payload outgrows 2 KiB.
    domains = [hashlib.sha256(str(n).encode()).hexdigest()[:60] + ".example" for n in range(60)]
    interface = {"name": "eth0", "type": "ethernet", "state": "up",
                 "ipv4": {"enabled": True, "dhcp": True}}  # fmt: skip
    document = yaml.safe_dump(
        {
            "interfaces": [interface],
            "dns-resolver": {"config": {"search": domains, "server": ["192.0.2.53"]}},
        }
    )
    manifest = write_objects(
        tmp_path / "objects.yaml", image("host"), secret({"nmstate": document})
    )
    code, stdout, _ = run_build(str(manifest), "--iso", str(small), "--arch", "x86_64",
                                "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 0
    error = conditions(statuses(stdout)["host"])["Error"]
    assert error["reason"] == "ImageBuildInvalid"
    assert error["message"].startswith("Cannot generate image: ")
    assert "embed area" in error["message"]
    assert "--embed-size" in error["message"]


def test_build_iso_without_embed_area_is_command_error(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    plain = tmp_path / "plain.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(plain), str(tree)],
                   check=True, capture_output=True)  # fmt: skip
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None))
    code, stdout, stderr = run_build(str(manifest), "--iso", str(plain), "--arch", "x86_64",
                                     "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    assert stdout == ""
    assert "prepare-base" in stderr
    assert "plain.iso" in stderr


def test_build_missing_base_file_is_command_error(tmp_path):
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None))
    code, _, stderr = run_build(str(manifest), "--iso", str(tmp_path / "nope.iso"),
                                "--out", str(tmp_path))  # fmt: skip
    assert code == 2
    assert "nope.iso does not exist" in stderr


def test_build_unreadable_manifest_is_command_error(tmp_path, catalog):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: PreprovisioningImage\nmetadata: [\n")
    code, _, stderr = run_build(str(broken), "--config", str(catalog), "--out", str(tmp_path))
    assert code == 2
    assert "broken.yaml" in stderr


def test_render_prints_keyfiles(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["render", str(EXAMPLES / "worker-0-nmstate.yaml")])
    assert result.exit_code == 0
    assert "/etc/NetworkManager/system-connections/bond0.nmconnection (mode 0600)" in result.stdout
    assert "mode=802.3ad" in result.stdout


def test_console_script_runs_build(catalog, tmp_path):
    script = Path(sys.executable).with_name("ppimage")
    if not script.exists():
        pytest.fail(f"{script} is missing; install the project with pip install -e .")
    result = subprocess.run(
        [str(script), "build", str(EXAMPLES / "worker-4-capm3-yaml.yaml"), "--config",
         str(catalog), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = statuses(result.stdout)["worker-4"]
    assert status["format"] == "initrd"
    assert conditions(status)["Ready"]["status"] == "True"


def test_build_truncated_iso_is_command_error(tmp_path, base_iso):
    truncated = tmp_path / "truncated.iso"
    truncated.write_bytes(base_iso.read_bytes()[:5_000_000])
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None))
    code, _, stderr = run_build(str(manifest), "--iso", str(truncated), "--arch", "x86_64",
                                "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    assert "truncated.iso" in stderr
    assert "Traceback" not in stderr


def test_build_name_cannot_escape_out_dir(tmp_path, catalog):
    escaping = image("host", secret=None)
    escaping["metadata"]["name"] = "../../escape"
    manifest = write_objects(tmp_path / "objects.yaml", escaping)
    code, stdout, stderr = run_build(str(manifest), "--config", str(catalog), "--out",
                                     str(tmp_path / "a" / "b"))  # fmt: skip
    assert code == 2
    assert "not a valid Kubernetes name" in stderr
    assert list(tmp_path.rglob("*.iso")) == []


def test_catalog_alias_listed_twice_is_command_error(tmp_path, base_iso, busybox_initramfs,
                                                     kernel):  # fmt: skip
    path = tmp_path / "catalog.yaml"
    entries = {
        "x86_64": {"iso": str(base_iso)},
        "amd64": {"initrd": str(busybox_initramfs), "kernel": str(kernel)},
    }
    path.write_text(yaml.safe_dump({"architectures": entries}))
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None))
    code, _, stderr = run_build(str(manifest), "--config", str(path), "--out", str(tmp_path))
    assert code == 2
    assert "listed twice" in stderr


def test_catalog_unknown_profile_is_command_error(tmp_path, base_iso):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"architectures": {"x86_64": {"iso": str(base_iso),
                                                                 "profile": "nope"}}}))  # fmt: skip
    manifest = write_objects(tmp_path / "objects.yaml", image("host", secret=None))
    code, _, stderr = run_build(str(manifest), "--config", str(path), "--out", str(tmp_path))
    assert code == 2
    assert "unknown profile 'nope'" in stderr


@pytest.mark.parametrize(
    "arguments,expected",
    [
        (["--embed-size", "99999999999999"], "embed size 99999999999999 is invalid"),
        (["--embed-size", "0"], "embed size 0 is invalid"),
    ],
    ids=["too-large", "zero"],
)
def test_prepare_base_rejects_embed_size(tmp_path, base_iso, arguments, expected):
    runner = CliRunner()
    result = runner.invoke(main, ["prepare-base", str(base_iso), "-o", str(tmp_path / "o.iso"),
                                  *arguments])  # fmt: skip
    assert result.exit_code == 2
    assert expected in result.stderr


def test_prepare_base_rejects_non_iso(tmp_path):
    not_iso = tmp_path / "notes.txt"
    not_iso.write_bytes(b"hello\n" * 10000)
    result = CliRunner().invoke(main, ["prepare-base", str(not_iso), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "is not an ISO 9660 image" in result.stderr
