"""The glean profile: config drive files, fed to glean 1.25 with a fake sysfs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import oracles
import pytest

from builder import profiles
from builder.errors import UnsupportedField

NICS = {
    "ens3": "52:54:00:00:00:01",
    "ens4": "52:54:00:00:00:02",
    "ens5": "52:54:00:00:00:10",
    "ens6": "52:54:00:00:00:20",
}


def _render(config) -> dict[str, bytes]:
    rendering = profiles.render(config, profile="glean", image_format="initrd")
    assert rendering.kernel_params == ()
    return {payload_file.path: payload_file.data for payload_file in rendering.files}


def _run_glean(config, tmp_path: Path) -> dict[str, str]:
    files = {Path(path).name: data for path, data in _render(config).items()}
    return oracles.run_glean(config_drive=files, nics=NICS, root=tmp_path)


def _bonded():
    return dataclasses.replace(oracles.bonded_vlan(), dns_search=())


def test_glean_files_paths():
    files = _render(_bonded())
    assert sorted(files) == [
        "/mnt/config/openstack/latest/meta_data.json",
        "/mnt/config/openstack/latest/network_data.json",
    ]
    meta_data = json.loads(files["/mnt/config/openstack/latest/meta_data.json"])
    assert set(meta_data) == {"uuid"}


def test_glean_network_data_links():
    files = _render(_bonded())
    network_data = json.loads(files["/mnt/config/openstack/latest/network_data.json"])
    links = {link["id"]: link for link in network_data["links"]}
    assert links["bond0"]["bond_links"] == ["eno1", "eno2"]
    assert links["bond0"]["bond_miimon"] == 100
    assert links["bond0"]["bond_xmit_hash_policy"] == "layer3+4"
    assert links["bond0"]["mtu"] == 9000
    assert links["bond0.120"]["vlan_link"] == "bond0"
    assert links["bond0.120"]["vlan_id"] == 120
    assert network_data["services"] == [
        {"type": "dns", "address": "192.0.2.53"},
        {"type": "dns", "address": "2001:db8::53"},
    ]


def test_glean_configures_bond_ports(tmp_path):
    written = _run_glean(_bonded(), tmp_path)
    for port in ("ens3", "ens4"):
        stanza = written[f"/etc/network/interfaces.d/{port}.cfg"]
        assert f"iface {port} inet manual" in stanza
        assert "bond-master bond0" in stanza
    bond = written["/etc/network/interfaces.d/bond0.cfg"]
    assert "bond-mode 802.3ad" in bond
    assert "bond-miimon 100" in bond
    assert "bond-xmit_hash_policy layer3+4" in bond
    assert "ifenslave bond0 ens3 ens4" in bond


def test_glean_configures_vlan_addresses(tmp_path):
    vlan = _run_glean(_bonded(), tmp_path)["/etc/network/interfaces.d/bond0.120.cfg"]
    assert "iface bond0.120 inet static" in vlan
    assert "vlan-raw-device bond0" in vlan
    assert "address 192.0.2.10" in vlan
    assert "netmask 255.255.255.0" in vlan
    assert "gateway 192.0.2.1" in vlan
    assert "iface bond0.120 inet6 static" in vlan
    assert "address 2001:db8::10" in vlan
    assert "netmask 64" in vlan
    assert "gateway 2001:db8::1" in vlan


def test_glean_static_routes(tmp_path):
    config = oracles.metric_route()
    without_metric = dataclasses.replace(config.routes[0], metric=None)
    config = dataclasses.replace(config, routes=(without_metric, config.routes[1]))
    nic = _run_glean(config, tmp_path)["/etc/network/interfaces.d/ens6.cfg"]
    assert "iface ens6 inet static" in nic
    assert "address 198.51.100.5" in nic
    assert "netmask 255.255.255.0" in nic
    assert "gateway 198.51.100.1" in nic
    assert "up route add -net 203.0.113.0 netmask 255.255.255.0 gw 198.51.100.254" in nic


def test_glean_ipv6_auto_nic_left_to_config_drive(tmp_path):
    written = _run_glean(oracles.mac_ipv6_auto(), tmp_path)
    # glean's Debian writer has no SLAAC or DHCPv6 stanza; it must not fall back to IPv4 DHCP.
    assert "/etc/network/interfaces.d/ens5.cfg" not in written
    assert written["/etc/network/interfaces.d/ens3.cfg"] == "auto ens3\niface ens3 inet dhcp\n"


def test_glean_ipv6_auto_network_type():
    files = _render(oracles.mac_ipv6_auto())
    network_data = json.loads(files["/mnt/config/openstack/latest/network_data.json"])
    assert network_data["networks"] == [
        {"id": "nic0-ipv6", "link": "nic0", "type": "ipv6_dhcpv6-stateless"}
    ]


def test_glean_rejects_route_metric():
    with pytest.raises(UnsupportedField, match="profile glean cannot express route metrics"):
        _render(oracles.metric_route())


def test_glean_rejects_search_domains():
    with pytest.raises(UnsupportedField, match="DNS search domains"):
        _render(oracles.bonded_vlan())


def test_glean_rejects_name_selection():
    with pytest.raises(UnsupportedField, match="NIC selection by interface name"):
        _render(oracles.by_name_cloned())


def test_glean_rejects_unknown_bond_option():
    config = _bonded()
    bond = config.interfaces[2]
    bonded = dataclasses.replace(
        bond, bond=dataclasses.replace(bond.bond, options=(("updelay", "200"),))
    )
    config = dataclasses.replace(config, interfaces=(*config.interfaces[:2], bonded,
                                                     config.interfaces[3]))
    with pytest.raises(UnsupportedField, match="updelay=200"):
        _render(config)
