"""Tests of the OpenStack network_data parser, with glean as the oracle for interface names."""

import copy
import ipaddress
import json
import re
import subprocess
import sys

import pytest

from builder.errors import ImageBuildInvalid, UnsupportedField
from builder.network_data import NIC_LINK_TYPES, parse_network_data
from builder.safe_yaml import load_json_or_yaml

MAC0 = "52:54:00:bb:20:01"
MAC1 = "52:54:00:bb:20:02"

BONDED = {
    "links": [
        {"id": "port0", "type": "phy", "ethernet_mac_address": MAC0, "mtu": 9000},
        {"id": "port1", "type": "phy", "ethernet_mac_address": MAC1, "mtu": 9000},
        {
            "id": "bond0",
            "type": "bond",
            "bond_links": ["port0", "port1"],
            "bond_mode": "802.3ad",
            "bond_miimon": 100,
            "bond_xmit_hash_policy": "layer3+4",
            "ethernet_mac_address": MAC0,
            "mtu": 9000,
        },
        {
            "id": "vlan130",
            "type": "vlan",
            "vlan_link": "bond0",
            "vlan_id": 130,
            "vlan_mac_address": MAC0,
        },
    ],
    "networks": [
        {
            "id": "prov-v4",
            "type": "ipv4",
            "link": "vlan130",
            "ip_address": "198.51.100.22",
            "netmask": "255.255.255.0",
            "network_id": "0d9e8a4c-1234-4f5e-9a7b-0c1d2e3f4a5b",
            "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "198.51.100.1"}],
        },
        {
            "id": "prov-v6",
            "type": "ipv6",
            "link": "vlan130",
            "ip_address": "2001:db8:130::22",
            "netmask": "ffff:ffff:ffff:ffff::",
            "routes": [{"network": "::", "netmask": "::", "gateway": "2001:db8:130::1"}],
        },
    ],
    "services": [
        {"type": "dns", "address": "198.51.100.53"},
        {"type": "dns", "address": "2001:db8::53"},
    ],
}


def one_nic(**network) -> dict:
    network = {"id": "net", "link": "nic", **network}
    return {
        "links": [{"id": "nic", "type": "phy", "ethernet_mac_address": MAC0}],
        "networks": [network],
    }


def test_network_data_bond_vlan_names():
    config = parse_network_data(BONDED, source="networkData")
    assert config.source == "networkData"
    assert [interface.name for interface in config.interfaces] == [
        "port0",
        "port1",
        "bond0",
        "bond0.130",
    ]
    assert [interface.type for interface in config.interfaces] == [
        "ethernet",
        "ethernet",
        "bond",
        "vlan",
    ]


def test_network_data_nic_selected_by_mac():
    port0 = parse_network_data(BONDED, source="networkData").interface("port0")
    assert port0.match_by_mac is True
    assert port0.device_name is None
    assert port0.mac_address == MAC0
    assert port0.mtu == 9000


def test_network_data_bond_settings():
    bond = parse_network_data(BONDED, source="networkData").interface("bond0")
    assert bond.device_name == "bond0"
    assert bond.match_by_mac is False
    assert bond.mac_address == MAC0
    assert bond.bond.mode == "802.3ad"
    assert bond.bond.ports == ("port0", "port1")
    assert bond.bond.options == (("miimon", "100"), ("xmit_hash_policy", "layer3+4"))
    assert bond.mtu == 9000


def test_network_data_vlan_addresses_routes_dns():
    config = parse_network_data(BONDED, source="value")
    vlan = config.interface("bond0.130")
    assert config.source == "value"
    assert vlan.device_name == "bond0.130"
    assert vlan.vlan.base == "bond0"
    assert vlan.vlan.id == 130
    assert vlan.ipv4.enabled is True
    assert vlan.ipv4.addresses == (ipaddress.ip_interface("198.51.100.22/24"),)
    assert vlan.ipv6.addresses == (ipaddress.ip_interface("2001:db8:130::22/64"),)
    assert vlan.ipv6.autoconf is False
    assert [str(route.destination) for route in config.routes] == ["0.0.0.0/0", "::/0"]
    assert [str(route.gateway) for route in config.routes] == ["198.51.100.1", "2001:db8:130::1"]
    assert {route.interface for route in config.routes} == {"bond0.130"}
    assert [str(server) for server in config.dns_servers] == ["198.51.100.53", "2001:db8::53"]


def test_network_data_yaml_from_capm3():
    text = """
links:
- id: enp2s0
  type: phy
  ethernet_mac_address: 52-54-00-DD-40-01
  mtu: 1500
networks:
- id: provisioning
  type: ipv4
  link: enp2s0
  ip_address: 198.51.100.44
  netmask: 255.255.255.0
  routes:
  - network: 203.0.113.0
    netmask: 255.255.255.0
    gateway: ""
    services:
    - type: dns
      address: 198.51.100.54
services:
- type: dns
  address: 198.51.100.53
"""
    config = parse_network_data(load_json_or_yaml(text, source="networkData"), source="networkData")
    nic = config.interface("enp2s0")
    assert nic.mac_address == "52:54:00:dd:40:01"
    assert nic.mtu == 1500
    assert config.routes[0].destination == ipaddress.ip_network("203.0.113.0/24")
    assert config.routes[0].gateway is None
    assert [str(server) for server in config.dns_servers] == ["198.51.100.53", "198.51.100.54"]


@pytest.mark.parametrize(
    "link_id",
    ["tap06bf7927-e2d5-418e", "06bf7927-e2d5-418e-877d-bbf1352588d2", ".", "eth:0", "a b"],
)
def test_network_data_long_link_id_gets_mac_name(link_id):
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["id"] = link_id
    document["networks"][0]["link"] = link_id
    nic = parse_network_data(document, source="networkData").interfaces[0]
    assert nic.name == "enx525400bb2001"
    assert nic.device_name is None
    assert nic.match_by_mac is True


def test_network_data_valid_link_id_is_name():
    nic = parse_network_data(one_nic(type="ipv4_dhcp"), source="networkData").interfaces[0]
    assert nic.name == "nic"


@pytest.mark.parametrize("link_type", sorted(NIC_LINK_TYPES))
def test_network_data_nic_types_are_ethernet(link_type):
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["type"] = link_type
    assert parse_network_data(document, source="networkData").interfaces[0].type == "ethernet"


@pytest.mark.parametrize("link_type", ["infiniband", "Phy", "", None, "linux_bridge"])
def test_network_data_rejects_unknown_link_type(link_type):
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["type"] = link_type
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(document, source="networkData")
    message = str(caught.value)
    assert f"links[0] (id 'nic'): link type {link_type!r} is unknown" in message


def test_network_data_nic_needs_mac():
    document = one_nic(type="ipv4_dhcp")
    del document["links"][0]["ethernet_mac_address"]
    with pytest.raises(ImageBuildInvalid, match="ethernet_mac_address is missing"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_bad_mac():
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["ethernet_mac_address"] = "52:54:00:bb:20"
    with pytest.raises(ImageBuildInvalid, match="'52:54:00:bb:20' is not a MAC address"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_unknown_bond_mode():
    document = copy.deepcopy(BONDED)
    document["links"][2]["bond_mode"] = "lacp"
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(document, source="networkData")
    assert "links[2] (id 'bond0').bond_mode 'lacp' is not a bond mode" in str(caught.value)


def test_network_data_rejects_invalid_bond_id():
    document = copy.deepcopy(BONDED)
    document["links"][2]["id"] = "bond-uplink-primary"
    document["links"][3]["vlan_link"] = "bond-uplink-primary"
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(document, source="networkData")
    message = str(caught.value)
    assert "a bond's link id is its kernel name" in message
    assert "'bond-uplink-primary' is 19 bytes long" in message


def test_network_data_bond_parameters_from_capm3():
    document = copy.deepcopy(BONDED)
    document["links"][2].update(bond_xmit_hash_policy="", bond_lacp_rate="fast", bond_updelay=200)
    bond = parse_network_data(document, source="networkData").interface("bond0")
    assert bond.bond.options == (("lacp_rate", "fast"), ("miimon", "100"), ("updelay", "200"))


def test_network_data_rejects_unknown_bond_option():
    document = copy.deepcopy(BONDED)
    document["links"][2]["bond_turbo"] = "on"
    with pytest.raises(UnsupportedField, match="bond option 'turbo' is not supported"):
        parse_network_data(document, source="networkData")


def test_network_data_bond_port_must_be_nic():
    document = copy.deepcopy(BONDED)
    document["links"][2]["bond_links"] = ["port0", "vlan130"]
    with pytest.raises(ImageBuildInvalid, match=r"bond_links\[1\] 'vlan130' is not the id of a"):
        parse_network_data(document, source="networkData")


def test_network_data_vlan_on_nic_named_after_nic():
    document = one_nic(type="ipv4_dhcp")
    document["links"].append({"id": "v", "type": "vlan", "vlan_link": "nic", "vlan_id": 100})
    vlan = parse_network_data(document, source="networkData").interface("nic.100")
    assert vlan.device_name == "nic.100"
    assert vlan.vlan.base == "nic"
    assert vlan.mac_address is None


def test_network_data_vlan_name_falls_back_when_long():
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["id"] = "tap06bf7927-e2d5"
    document["networks"][0]["link"] = "tap06bf7927-e2d5"
    document["links"].append(
        {"id": "v", "type": "vlan", "vlan_link": "tap06bf7927-e2d5", "vlan_id": 100}
    )
    config = parse_network_data(document, source="networkData")
    assert [interface.name for interface in config.interfaces] == ["enx525400bb2001", "vlan100"]
    assert config.interface("vlan100").vlan.base == "enx525400bb2001"


def test_network_data_rejects_vlan_without_base():
    document = one_nic(type="ipv4_dhcp")
    document["links"].append({"id": "v", "type": "vlan", "vlan_link": "bond9", "vlan_id": 100})
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(document, source="networkData")
    assert "links[1] (id 'v').vlan_link 'bond9' is not a link id" in str(caught.value)


def test_network_data_rejects_vlan_on_vlan():
    document = copy.deepcopy(BONDED)
    document["links"].append({"id": "q", "type": "vlan", "vlan_link": "vlan130", "vlan_id": 5})
    with pytest.raises(UnsupportedField, match="a VLAN on a VLAN is not supported"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_vlan_id_out_of_range():
    document = copy.deepcopy(BONDED)
    document["links"][3]["vlan_id"] = 5000
    with pytest.raises(ImageBuildInvalid, match="vlan_id is 5000, outside 0..4094"):
        parse_network_data(document, source="networkData")


@pytest.mark.parametrize(
    ("network_type", "family", "dhcp", "autoconf"),
    [
        ("ipv4_dhcp", "ipv4", True, False),
        ("ipv6_slaac", "ipv6", False, True),
        ("ipv6_dhcpv6-stateless", "ipv6", True, True),
        ("ipv6_dhcpv6-stateful", "ipv6", True, False),
        ("ipv6_dhcp", "ipv6", True, False),
    ],
)
def test_network_data_dynamic_network_types(network_type, family, dhcp, autoconf):
    nic = parse_network_data(one_nic(type=network_type), source="networkData").interfaces[0]
    settings = getattr(nic, family)
    assert settings.enabled is True
    assert settings.dhcp is dhcp
    assert settings.autoconf is autoconf
    assert settings.addresses == ()


def test_network_data_rejects_unknown_network_type():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(one_nic(type="ipv4_static"), source="networkData")
    assert "networks[0] (id 'net').type 'ipv4_static' is not a network type" in str(caught.value)


def test_network_data_cidr_address():
    nic = parse_network_data(
        one_nic(type="ipv4", ip_address="192.0.2.7/26"), source="networkData"
    ).interfaces[0]
    assert nic.ipv4.addresses == (ipaddress.ip_interface("192.0.2.7/26"),)


def test_network_data_prefix_as_netmask_number():
    nic = parse_network_data(
        one_nic(type="ipv6", ip_address="2001:db8::7", netmask=64), source="networkData"
    ).interfaces[0]
    assert nic.ipv6.addresses == (ipaddress.ip_interface("2001:db8::7/64"),)


def test_network_data_rejects_address_without_prefix():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_network_data(one_nic(type="ipv4", ip_address="192.0.2.7"), source="networkData")
    assert "networks[0] (id 'net'): address '192.0.2.7' has no prefix" in str(caught.value)


def test_network_data_rejects_conflicting_prefix():
    document = one_nic(type="ipv4", ip_address="192.0.2.7/26", netmask="255.255.255.0")
    with pytest.raises(ImageBuildInvalid, match=r"ip_address \(26\) and netmask \(24\) differ"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_non_contiguous_netmask():
    document = one_nic(type="ipv4", ip_address="192.0.2.7", netmask="255.0.255.0")
    with pytest.raises(ImageBuildInvalid, match="'255.0.255.0' is not a contiguous netmask"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_address_of_other_family():
    document = one_nic(type="ipv6", ip_address="192.0.2.7", netmask="64")
    with pytest.raises(ImageBuildInvalid, match="'192.0.2.7' is not an IPv6 address"):
        parse_network_data(document, source="networkData")


def test_network_data_route_metric_and_default():
    document = one_nic(
        type="ipv4",
        ip_address="192.0.2.7",
        netmask="255.255.255.0",
        routes=[
            {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "192.0.2.1", "metric": 50},
            {"network": "10.0.0.0", "netmask": "255.0.0.0", "gateway": "192.0.2.254"},
        ],
    )
    config = parse_network_data(document, source="networkData")
    assert config.routes[0].destination == ipaddress.ip_network("0.0.0.0/0")
    assert config.routes[0].metric == 50
    assert config.routes[0].interface == "nic"
    assert config.routes[1].destination == ipaddress.ip_network("10.0.0.0/8")
    assert config.routes[1].metric is None


def test_network_data_rejects_route_with_host_bits():
    document = one_nic(
        type="ipv4_dhcp",
        routes=[{"network": "10.0.0.1", "netmask": "255.0.0.0", "gateway": "192.0.2.1"}],
    )
    with pytest.raises(ImageBuildInvalid, match="network '10.0.0.1' has host bits set"):
        parse_network_data(document, source="networkData")


def test_network_data_network_dns_merged_in_order():
    document = one_nic(
        type="ipv4_dhcp",
        dns_nameservers=["192.0.2.53", "192.0.2.54"],
        dns_search=["lab.example", "example.org"],
        services=[{"type": "dns", "address": "192.0.2.55"}],
    )
    document["services"] = [{"type": "dns", "address": "192.0.2.54"}]
    config = parse_network_data(document, source="networkData")
    assert [str(server) for server in config.dns_servers] == [
        "192.0.2.54",
        "192.0.2.55",
        "192.0.2.53",
    ]
    assert config.dns_search == ("lab.example", "example.org")


def test_network_data_rejects_search_domain_with_newline():
    document = one_nic(type="ipv4_dhcp", dns_search=["lab.example\noptions ndots:9"])
    with pytest.raises(ImageBuildInvalid, match="is not a valid DNS search domain"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_other_services():
    document = one_nic(type="ipv4_dhcp")
    document["services"] = [{"type": "ntp", "address": "192.0.2.123"}]
    with pytest.raises(UnsupportedField, match=r"services\[0\]\.type 'ntp' is not supported"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_network_on_unknown_link():
    document = one_nic(type="ipv4_dhcp")
    document["networks"][0]["link"] = "nic9"
    with pytest.raises(ImageBuildInvalid, match=r"networks\[0\] \(id 'net'\)\.link 'nic9'"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_unknown_link_key():
    document = one_nic(type="ipv4_dhcp")
    document["links"][0]["name"] = "eth0"
    with pytest.raises(UnsupportedField, match=r"links\[0\]\.name \('eth0'\) is not supported"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_duplicate_link_id():
    document = one_nic(type="ipv4_dhcp")
    document["links"].append(dict(document["links"][0], ethernet_mac_address=MAC1))
    with pytest.raises(ImageBuildInvalid, match="link id 'nic' is used twice"):
        parse_network_data(document, source="networkData")


def test_network_data_rejects_no_links():
    with pytest.raises(ImageBuildInvalid, match="defines no links"):
        parse_network_data({"links": [], "networks": []}, source="networkData")


def glean_files(document: dict, tmp_path) -> dict[str, str]:
    """Run glean 1.25 without writing (--noop) on a fake root; return its files by path."""
    drive = tmp_path / "mnt/config/openstack/latest"
    drive.mkdir(parents=True)
    (drive / "network_data.json").write_text(json.dumps(document))
    for name, mac in (("eth0", MAC0), ("eth1", MAC1)):
        device = tmp_path / "sys/class/net" / name
        device.mkdir(parents=True)
        (device / "address").write_text(mac + "\n")
        (device / "addr_assign_type").write_text("0\n")
        (device / "carrier").write_text("1\n")
    command = [sys.executable, "-m", "glean.cmd", "--noop", "--skip-dns", "--distro", "debian"]
    result = subprocess.run(
        [*command, "--root", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    parts = re.split(r"^### Write (\S+)\n", result.stdout, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_network_data_names_match_glean(tmp_path):
    pytest.importorskip("glean.cmd")
    files = glean_files(BONDED, tmp_path)
    config = parse_network_data(BONDED, source="networkData")
    created = [i.device_name for i in config.interfaces if i.type in ("bond", "vlan")]
    assert created == ["bond0", "bond0.130"]
    for name in created:
        assert f"/etc/network/interfaces.d/{name}.cfg" in files
    vlan_file = files["/etc/network/interfaces.d/bond0.130.cfg"]
    assert "vlan-raw-device bond0" in vlan_file
    assert "address 198.51.100.22\n    netmask 255.255.255.0" in vlan_file
    assert "address 2001:db8:130::22\n    netmask 64" in vlan_file
    bond_file = files["/etc/network/interfaces.d/bond0.cfg"]
    assert "bond-mode 802.3ad" in bond_file
    assert f"hwaddress {MAC0}" in bond_file
    assert "ifenslave bond0 eth0 eth1" in bond_file
