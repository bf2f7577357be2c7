"""systemd-networkd units: parsed here and, where it can run, by systemd-networkd 252 itself."""

from __future__ import annotations

from pathlib import Path

import oracles
import pytest

from builder import profiles

needs_networkd = pytest.mark.skipif(
    not oracles.networkd_available(), reason="needs root, unshare and systemd-networkd"
)


def _units(config) -> dict[str, list]:
    rendering = profiles.render(config, profile="networkd", image_format="initrd")
    assert rendering.kernel_params == ()
    return {
        payload_file.path: oracles.parse_unit(payload_file.data.decode())
        for payload_file in rendering.files
    }


def _section(unit: list, name: str) -> list[tuple[str, str]]:
    sections = [keys for section, keys in unit if section == name]
    assert len(sections) == 1, name
    return sections[0]


def _write(config, directory: Path) -> None:
    rendering = profiles.render(config, profile="networkd", image_format="iso")
    for payload_file in rendering.files:
        (directory / Path(payload_file.path).name).write_bytes(payload_file.data)


def test_networkd_unit_paths():
    units = _units(oracles.bonded_vlan())
    assert sorted(units) == [
        "/etc/systemd/network/10-bond0.120.netdev",
        "/etc/systemd/network/10-bond0.120.network",
        "/etc/systemd/network/10-bond0.netdev",
        "/etc/systemd/network/10-bond0.network",
        "/etc/systemd/network/20-eno1.network",
        "/etc/systemd/network/20-eno2.network",
    ]


def test_networkd_bond_netdev():
    netdev = _units(oracles.bonded_vlan())["/etc/systemd/network/10-bond0.netdev"]
    assert _section(netdev, "NetDev") == [("Name", "bond0"), ("Kind", "bond"), ("MTUBytes", "9000")]
    assert _section(netdev, "Bond") == [
        ("Mode", "802.3ad"),
        ("MIIMonitorSec", "100ms"),
        ("TransmitHashPolicy", "layer3+4"),
    ]


def test_networkd_ports_match_by_mac():
    port = _units(oracles.bonded_vlan())["/etc/systemd/network/20-eno1.network"]
    assert _section(port, "Match") == [("MACAddress", "52:54:00:00:00:01")]
    assert _section(port, "Link") == [("MTUBytes", "9000")]
    assert _section(port, "Network") == [("Bond", "bond0")]


def test_networkd_vlan_addresses_routes_dns():
    units = _units(oracles.bonded_vlan())
    assert _section(units["/etc/systemd/network/10-bond0.120.netdev"], "VLAN") == [("Id", "120")]
    assert ("VLAN", "bond0.120") in _section(units["/etc/systemd/network/10-bond0.network"],
                                             "Network")
    vlan = units["/etc/systemd/network/10-bond0.120.network"]
    network = _section(vlan, "Network")
    assert ("Address", "192.0.2.10/24") in network
    assert ("Address", "2001:db8::10/64") in network
    assert ("DNS", "192.0.2.53") in network
    assert ("DNS", "2001:db8::53") in network
    assert ("Domains", "example.com") in network
    assert ("DHCP", "no") in network
    routes = [keys for section, keys in vlan if section == "Route"]
    assert routes == [
        [("Destination", "0.0.0.0/0"), ("Gateway", "192.0.2.1")],
        [("Destination", "::/0"), ("Gateway", "2001:db8::1")],
    ]


def test_networkd_route_metric():
    unit = _units(oracles.metric_route())["/etc/systemd/network/20-eth0.network"]
    routes = [keys for section, keys in unit if section == "Route"]
    assert routes[0] == [("Destination", "0.0.0.0/0"), ("Gateway", "198.51.100.1"),
                         ("Metric", "150")]
    assert routes[1] == [("Destination", "203.0.113.0/24"), ("Gateway", "198.51.100.254")]


def test_networkd_ipv6_dhcp_autoconf():
    network = _section(_units(oracles.mac_ipv6_auto())["/etc/systemd/network/20-nic0.network"],
                       "Network")
    assert ("DHCP", "ipv6") in network
    assert ("IPv6AcceptRA", "yes") in network
    assert ("LinkLocalAddressing", "ipv6") in network


def test_networkd_cloned_mac_and_mtu():
    unit = _units(oracles.by_name_cloned())["/etc/systemd/network/10-eth1.network"]
    assert _section(unit, "Match") == [("Name", "eth1")]
    assert _section(unit, "Link") == [("MACAddress", "52:54:00:00:00:30"), ("MTUBytes", "1400")]
    assert ("DHCP", "ipv4") in _section(unit, "Network")


@needs_networkd
def test_networkd_reports_broken_unit(tmp_path):
    # The oracle must be able to fail: networkd logs a key it does not know.
    (tmp_path / "50-broken.network").write_text("[Match]\nName=x\n\n[Network]\nDHCPP=yes\n")
    messages = oracles.run_networkd(tmp_path)
    assert any("Unknown key 'DHCPP'" in message for message in messages)


@needs_networkd
@pytest.mark.parametrize(
    "config",
    [oracles.bonded_vlan(), oracles.metric_route(), oracles.mac_ipv6_auto(),
     oracles.by_name_cloned()],
    ids=["bonded_vlan", "metric_route", "mac_ipv6_auto", "by_name_cloned"],
)
def test_networkd_accepts_units(tmp_path, config):
    _write(config, tmp_path)
    assert oracles.run_networkd(tmp_path) == []
