"""The ignition profile: /config.ign shape, the merge with the agent's config, and keyfiles."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import oracles
import pytest

from builder import profiles
from builder.errors import ConfigurationError
from builder.profiles import ignition

AGENT_CONFIG = {
    "ignition": {"version": "3.1.0"},
    "passwd": {"users": [{"name": "core", "sshAuthorizedKeys": ["ssh-ed25519 AAAA test"]}]},
    "storage": {
        "files": [
            {"path": "/etc/agent.conf", "mode": 420,
             "contents": {"source": "data:,agent%3Dyes"}},
            {"path": "/etc/NetworkManager/system-connections/eno1.nmconnection", "mode": 384,
             "contents": {"source": "data:,stale"}},
        ]
    },
    "systemd": {"units": [{"name": "agent.service", "enabled": True}]},
}


def _config_ign(rendering) -> dict:
    by_path = {payload_file.path: payload_file for payload_file in rendering.files}
    return json.loads(by_path["/config.ign"].data)


def _decode(source: str) -> bytes:
    prefix = "data:;base64,"
    assert source.startswith(prefix)
    return base64.b64decode(source.removeprefix(prefix))


def test_ignition_iso_carries_keyfiles():
    rendering = profiles.render(oracles.bonded_vlan(), profile="ignition", image_format="iso")
    assert [payload_file.path for payload_file in rendering.files] == ["/config.ign"]
    assert rendering.files[0].mode == 0o600
    assert rendering.kernel_params == ()
    config = _config_ign(rendering)
    assert config["ignition"]["version"] == "3.2.0"
    paths = [node["path"] for node in config["storage"]["files"]]
    assert "/etc/NetworkManager/system-connections/bond0.nmconnection" in paths
    assert len(paths) == 4
    for node in config["storage"]["files"]:
        assert node["mode"] == 0o600
        assert node["overwrite"] is True


def test_ignition_keyfiles_parse_with_libnm(tmp_path):
    rendering = profiles.render(oracles.bonded_vlan(), profile="ignition", image_format="iso")
    paths = []
    for node in _config_ign(rendering)["storage"]["files"]:
        path = tmp_path / Path(node["path"]).name
        path.write_bytes(_decode(node["contents"]["source"]))
        paths.append(path)
    parsed = oracles.read_keyfiles(paths)
    assert parsed["bond0.nmconnection"]["bond_options"]["mode"] == "802.3ad"
    assert parsed["bond0.120.nmconnection"]["vlan_id"] == 120
    assert parsed["bond0.120.nmconnection"]["ipv4"]["addresses"] == ["192.0.2.10/24"]
    assert parsed["eno1.nmconnection"]["slave_type"] == "bond"
    for connection in parsed.values():
        assert connection["warnings"] == []


def test_ignition_initrd_adds_firstboot_keyfiles():
    rendering = profiles.render(oracles.bonded_vlan(), profile="ignition", image_format="initrd")
    firstboot = [f for f in rendering.files if f.path.startswith("/etc/coreos-firstboot-network/")]
    assert len(firstboot) == 4
    for payload_file in firstboot:
        assert payload_file.mode == 0o600
    assert rendering.kernel_params == ("rd.neednet=1",)
    config = _config_ign(rendering)
    node = next(n for n in config["storage"]["files"] if n["path"].endswith("/bond0.nmconnection"))
    firstboot_bond = next(f for f in firstboot if f.path.endswith("/bond0.nmconnection"))
    assert _decode(node["contents"]["source"]) == firstboot_bond.data


def test_ignition_merge_keeps_agent_config():
    rendering = profiles.render(oracles.bonded_vlan(), profile="ignition", image_format="iso",
                                base_ignition=AGENT_CONFIG)
    config = _config_ign(rendering)
    assert config["ignition"]["version"] == "3.2.0"
    assert config["passwd"] == AGENT_CONFIG["passwd"]
    assert config["systemd"] == AGENT_CONFIG["systemd"]
    by_path = {node["path"]: node for node in config["storage"]["files"]}
    assert by_path["/etc/agent.conf"]["contents"]["source"] == "data:,agent%3Dyes"
    ours = by_path["/etc/NetworkManager/system-connections/eno1.nmconnection"]
    assert ours["contents"]["source"] != "data:,stale"
    assert len(by_path) == len(config["storage"]["files"])
    assert AGENT_CONFIG["ignition"]["version"] == "3.1.0"


def test_ignition_no_network_keeps_agent_config():
    rendering = profiles.render(None, profile="ignition", image_format="iso",
                                base_ignition=AGENT_CONFIG)
    config = _config_ign(rendering)
    assert len(config["storage"]["files"]) == 2
    assert rendering.kernel_params == ()


def test_ignition_no_network_no_base():
    rendering = profiles.render(None, profile="ignition", image_format="initrd")
    assert rendering.files == ()
    assert rendering.kernel_params == ()


def test_ignition_rejects_newer_base_version():
    newer = {"ignition": {"version": "3.4.0"}}
    with pytest.raises(ConfigurationError, match="3.4.0"):
        profiles.render(oracles.mac_ipv6_auto(), profile="ignition", image_format="iso",
                        base_ignition=newer)


def test_ignition_rejects_unknown_keys():
    broken = {"ignition": {"version": "3.2.0"}, "storag": {}}
    with pytest.raises(ConfigurationError, match="storag"):
        profiles.render(oracles.mac_ipv6_auto(), profile="ignition", image_format="iso",
                        base_ignition=broken)


def test_ignition_replaces_same_path_link():
    base = {
        "ignition": {"version": "3.2.0"},
        "storage": {"links": [{"path": "/etc/NetworkManager/system-connections/nic0.nmconnection",
                               "target": "/dev/null"}]},
    }
    rendering = profiles.render(oracles.mac_ipv6_auto(), profile="ignition", image_format="iso",
                                base_ignition=base)
    config = _config_ign(rendering)
    assert config["storage"]["links"] == []
    assert len(config["storage"]["files"]) == 1


def test_check_shape_rejects_duplicate_paths():
    config = {
        "ignition": {"version": "3.2.0"},
        "storage": {"files": [{"path": "/a"}], "directories": [{"path": "/a"}]},
    }
    with pytest.raises(ConfigurationError, match="appears twice"):
        ignition.check_shape(config)
