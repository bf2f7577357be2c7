"""NetworkManager keyfiles from the networkmanager profile, read back by libnm 1.42."""

from __future__ import annotations

from pathlib import Path

import oracles

from builder import profiles
from builder.model import Interface, IPConfig, NetworkConfig, Vlan
from builder.profiles.base import connection_uuid


def _read_back(config, tmp_path: Path, *, profile: str = "networkmanager") -> dict[str, dict]:
    rendering = profiles.render(config, profile=profile, image_format="iso")
    paths = []
    for payload_file in rendering.files:
        path = tmp_path / Path(payload_file.path).name
        path.write_bytes(payload_file.data)
        paths.append(path)
    return oracles.read_keyfiles(paths)


def test_keyfiles_paths_and_modes():
    rendering = profiles.render(oracles.bonded_vlan(), profile="networkmanager", image_format="iso")
    paths = [payload_file.path for payload_file in rendering.files]
    assert paths == [
        "/etc/NetworkManager/system-connections/bond0.120.nmconnection",
        "/etc/NetworkManager/system-connections/bond0.nmconnection",
        "/etc/NetworkManager/system-connections/eno1.nmconnection",
        "/etc/NetworkManager/system-connections/eno2.nmconnection",
    ]
    for payload_file in rendering.files:
        assert payload_file.mode == 0o600
    assert rendering.kernel_params == ()


def test_keyfiles_parse_without_warnings(tmp_path):
    connections = _read_back(oracles.bonded_vlan(), tmp_path)
    assert len(connections) == 4
    for name, connection in connections.items():
        assert connection["warnings"] == [], name


def test_bond_mode_options_and_mtu(tmp_path):
    bond = _read_back(oracles.bonded_vlan(), tmp_path)["bond0.nmconnection"]
    assert bond["type"] == "bond"
    assert bond["interface_name"] == "bond0"
    assert bond["uuid"] == connection_uuid("bond0")
    assert bond["bond_options"] == {
        "mode": "802.3ad",
        "miimon": "100",
        "xmit_hash_policy": "layer3+4",
    }
    assert bond["mtu"] == 9000
    assert bond["ipv4"]["method"] == "disabled"
    assert bond["ipv6"]["method"] == "disabled"


def test_bond_ports_point_at_bond(tmp_path):
    connections = _read_back(oracles.bonded_vlan(), tmp_path)
    for name, mac in (("eno1", "52:54:00:00:00:01"), ("eno2", "52:54:00:00:00:02")):
        port = connections[f"{name}.nmconnection"]
        assert port["master"] == connection_uuid("bond0")
        assert port["slave_type"] == "bond"
        assert port["mac_address"] == mac.upper()
        assert port["interface_name"] is None
        assert port["mtu"] == 9000
        assert port["ipv4"] is None
        assert port["ipv6"] is None


def test_vlan_addresses_routes_dns(tmp_path):
    vlan = _read_back(oracles.bonded_vlan(), tmp_path)["bond0.120.nmconnection"]
    assert vlan["type"] == "vlan"
    assert vlan["vlan_id"] == 120
    assert vlan["vlan_parent"] == "bond0"
    assert vlan["interface_name"] == "bond0.120"
    assert vlan["ipv4"]["method"] == "manual"
    assert vlan["ipv4"]["addresses"] == ["192.0.2.10/24"]
    assert vlan["ipv4"]["routes"] == [["0.0.0.0/0", "192.0.2.1", -1]]
    assert vlan["ipv4"]["dns"] == ["192.0.2.53"]
    assert vlan["ipv4"]["dns_search"] == ["example.com"]
    assert vlan["ipv6"]["method"] == "manual"
    assert vlan["ipv6"]["addresses"] == ["2001:db8::10/64"]
    assert vlan["ipv6"]["routes"] == [["::/0", "2001:db8::1", -1]]
    assert vlan["ipv6"]["dns"] == ["2001:db8::53"]


def test_vlan_parent_uuid_for_mac_matched_nic(tmp_path):
    config = oracles.mac_ipv6_auto()
    nic = config.interfaces[0]
    vlan = Interface(
        name="nic0.7",
        type="vlan",
        device_name="nic0.7",
        vlan=Vlan(base="nic0", id=7),
        ipv4=IPConfig(enabled=True, dhcp=True),
    )
    config = NetworkConfig(source="nmstate", interfaces=(nic, vlan))
    parsed = _read_back(config, tmp_path)["nic0.7.nmconnection"]
    assert parsed["vlan_parent"] == connection_uuid("nic0")
    assert parsed["vlan_id"] == 7


def test_mac_match_ipv6_dhcp_autoconf(tmp_path):
    nic = _read_back(oracles.mac_ipv6_auto(), tmp_path)["nic0.nmconnection"]
    assert nic["mac_address"] == "52:54:00:00:00:10"
    assert nic["cloned_mac_address"] is None
    assert nic["interface_name"] is None
    assert nic["ipv4"]["method"] == "disabled"
    assert nic["ipv6"]["method"] == "auto"
    assert nic["ipv6"]["may_fail"] is False


def test_name_match_cloned_mac(tmp_path):
    nic = _read_back(oracles.by_name_cloned(), tmp_path)["eth1.nmconnection"]
    assert nic["interface_name"] == "eth1"
    assert nic["mac_address"] is None
    assert nic["cloned_mac_address"] == "52:54:00:00:00:30"
    assert nic["mtu"] == 1400
    assert nic["ipv4"]["method"] == "auto"


def test_route_metric_150(tmp_path):
    nic = _read_back(oracles.metric_route(), tmp_path)["eth0.nmconnection"]
    assert nic["ipv4"]["routes"] == [
        ["0.0.0.0/0", "198.51.100.1", 150],
        ["203.0.113.0/24", "198.51.100.254", -1],
    ]
    assert nic["ipv4"]["addresses"] == ["198.51.100.5/24"]
    assert nic["ipv4"]["dns"] == ["198.51.100.53"]


def test_keyfile_comment_names_selection_rule():
    rendering = profiles.render(oracles.by_name_cloned(), profile="networkmanager",
                                image_format="iso")
    first_line = rendering.files[0].data.decode().splitlines()[0]
    assert first_line.startswith("# Selects the NIC by interface name eth1")
    assert "cloned MAC address" in first_line
    by_mac = profiles.render(oracles.metric_route(), profile="networkmanager", image_format="iso")
    assert by_mac.files[0].data.decode().startswith("# Selects the NIC by MAC address")


def test_keyfiles_deterministic():
    first = profiles.render(oracles.bonded_vlan(), profile="networkmanager", image_format="iso")
    second = profiles.render(oracles.bonded_vlan(), profile="networkmanager", image_format="iso")
    assert first == second


def test_keyfiles_initrd_needs_no_kernel_params():
    rendering = profiles.render(oracles.bonded_vlan(), profile="networkmanager",
                                image_format="initrd")
    assert rendering.kernel_params == ()
    assert len(rendering.files) == 4
