"""Tests of the NMState parser: supported fields, rejected fields and invalid values."""

import ipaddress

import pytest

from builder.errors import ImageBuildInvalid, UnsupportedField
from builder.nmstate import parse_nmstate
from builder.safe_yaml import load_document


def parse(text: str):
    return parse_nmstate(load_document(text))


ETHERNET = """
interfaces:
- name: eth0
  type: ethernet
  state: up
"""

BOND = """
interfaces:
- name: eth0
  type: ethernet
- name: eth1
  type: ethernet
- name: bond0
  type: bond
  state: up
  link-aggregation:
    mode: active-backup
    port: [eth0, eth1]
"""


def test_nmstate_ethernet_by_name():
    config = parse(ETHERNET)
    eth0 = config.interface("eth0")
    assert config.source == "nmstate"
    assert eth0.type == "ethernet"
    assert eth0.device_name == "eth0"
    assert eth0.mac_address is None
    assert eth0.match_by_mac is False
    assert eth0.ipv4.enabled is False
    assert eth0.ipv6.enabled is False


def test_nmstate_mac_is_cloned_by_default():
    config = parse(ETHERNET + "  mac-address: 52:54:00:AA:BB:CC\n")
    eth0 = config.interface("eth0")
    assert eth0.mac_address == "52:54:00:aa:bb:cc"
    assert eth0.match_by_mac is False
    assert eth0.device_name == "eth0"


def test_nmstate_identifier_mac_address_selects_nic():
    config = parse(ETHERNET + "  identifier: mac-address\n  mac-address: 52:54:00:aa:bb:cc\n")
    eth0 = config.interface("eth0")
    assert eth0.match_by_mac is True
    assert eth0.device_name is None
    assert eth0.mac_address == "52:54:00:aa:bb:cc"


def test_nmstate_identifier_name_is_default():
    config = parse(ETHERNET + "  identifier: name\n  mac-address: 52:54:00:aa:bb:cc\n")
    assert config.interface("eth0").match_by_mac is False


def test_nmstate_identifier_mac_address_needs_mac():
    with pytest.raises(ImageBuildInvalid, match="identifier is mac-address but mac-address is"):
        parse(ETHERNET + "  identifier: mac-address\n")


def test_nmstate_rejects_unknown_identifier():
    with pytest.raises(UnsupportedField, match=r"interfaces\[0\]\.identifier 'pci-address'"):
        parse(ETHERNET + "  identifier: pci-address\n")


def test_nmstate_rejects_invalid_mac():
    with pytest.raises(ImageBuildInvalid, match=r"interfaces\[0\]\.mac-address: '52:54:00'"):
        parse(ETHERNET + "  mac-address: '52:54:00'\n")


def test_nmstate_mtu_number_and_string():
    assert parse(ETHERNET + "  mtu: 9000\n").interface("eth0").mtu == 9000
    assert parse(ETHERNET + "  mtu: '1500'\n").interface("eth0").mtu == 1500


def test_nmstate_rejects_mtu_out_of_range():
    with pytest.raises(ImageBuildInvalid, match="mtu 40 is outside 68..65535"):
        parse(ETHERNET + "  mtu: 40\n")


def test_nmstate_static_addresses():
    config = parse(
        ETHERNET
        + """  ipv4:
    enabled: true
    dhcp: false
    address:
    - ip: 192.0.2.10
      prefix-length: 24
    - ip: 198.51.100.10
      prefix-length: 25
  ipv6:
    enabled: true
    autoconf: false
    dhcp: false
    address:
    - ip: 2001:db8::10
      prefix-length: 64
"""
    )
    eth0 = config.interface("eth0")
    assert eth0.ipv4.enabled is True
    assert eth0.ipv4.dhcp is False
    assert eth0.ipv4.addresses == (
        ipaddress.ip_interface("192.0.2.10/24"),
        ipaddress.ip_interface("198.51.100.10/25"),
    )
    assert eth0.ipv6.addresses == (ipaddress.ip_interface("2001:db8::10/64"),)
    assert eth0.ipv6.autoconf is False


def test_nmstate_dhcp_and_autoconf():
    config = parse(
        ETHERNET + "  ipv4: {enabled: true, dhcp: true}\n"
        "  ipv6: {enabled: true, dhcp: true, autoconf: true}\n"
    )
    eth0 = config.interface("eth0")
    assert eth0.ipv4.dhcp is True
    assert eth0.ipv4.autoconf is False
    assert eth0.ipv6.dhcp is True
    assert eth0.ipv6.autoconf is True


def test_nmstate_enabled_inferred_from_dhcp():
    config = parse(ETHERNET + "  ipv4: {dhcp: true}\n")
    assert config.interface("eth0").ipv4.enabled is True


def test_nmstate_rejects_address_when_disabled():
    with pytest.raises(ImageBuildInvalid, match=r"interfaces\[0\]\.ipv4: enabled is false"):
        parse(ETHERNET + "  ipv4:\n    enabled: false\n    dhcp: true\n")


def test_nmstate_rejects_address_without_prefix():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse(ETHERNET + "  ipv4:\n    enabled: true\n    address:\n    - ip: 192.0.2.10\n")
    message = str(caught.value)
    assert type(caught.value) is ImageBuildInvalid
    assert r"interfaces[0].ipv4.address[0]: address '192.0.2.10' has no prefix-length" in message


def test_nmstate_rejects_address_of_other_family():
    with pytest.raises(ImageBuildInvalid, match="is not an IPv4 address"):
        parse(ETHERNET + "  ipv4:\n    address:\n    - ip: 2001:db8::1\n      prefix-length: 64\n")


def test_nmstate_rejects_ipv4_autoconf():
    with pytest.raises(UnsupportedField, match=r"interfaces\[0\]\.ipv4\.autoconf"):
        parse(ETHERNET + "  ipv4: {enabled: true, autoconf: true}\n")


def test_nmstate_rejects_auto_dns():
    with pytest.raises(UnsupportedField) as caught:
        parse(ETHERNET + "  ipv4: {enabled: true, dhcp: true, auto-dns: false}\n")
    message = str(caught.value)
    assert "interfaces[0].ipv4.auto-dns (False) is not supported" in message
    assert "remove it or use a supported field" in message


def test_nmstate_bond_ports_mode_options():
    config = parse(
        BOND
        + """    options:
      miimon: 100
      xmit_hash_policy: layer3+4
      lacp_rate: fast
      use_carrier: true
"""
    )
    bond = config.interface("bond0")
    assert bond.type == "bond"
    assert bond.device_name == "bond0"
    assert bond.bond.mode == "active-backup"
    assert bond.bond.ports == ("eth0", "eth1")
    assert bond.bond.options == (
        ("lacp_rate", "fast"),
        ("miimon", "100"),
        ("use_carrier", "1"),
        ("xmit_hash_policy", "layer3+4"),
    )


def test_nmstate_bond_accepts_slaves():
    config = parse(BOND.replace("port:", "slaves:"))
    assert config.interface("bond0").bond.ports == ("eth0", "eth1")


def test_nmstate_bond_rejects_port_and_slaves():
    with pytest.raises(ImageBuildInvalid, match="both port and slaves are set"):
        parse(BOND + "    slaves: [eth0]\n")


def test_nmstate_bond_rejects_unknown_mode():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse(BOND.replace("active-backup", "round-robin"))
    message = str(caught.value)
    assert "interfaces[2].link-aggregation.mode 'round-robin' is not a bond mode" in message
    assert "802.3ad" in message


def test_nmstate_bond_rejects_unknown_option():
    with pytest.raises(UnsupportedField) as caught:
        parse(BOND + "    options:\n      turbo: 1\n")
    assert "interfaces[2].link-aggregation.options.turbo: bond option 'turbo'" in str(caught.value)


def test_nmstate_bond_rejects_unsafe_option_value():
    with pytest.raises(ImageBuildInvalid, match="bond option miimon has the invalid value"):
        parse(BOND + "    options:\n      miimon: '100\\nmode=0'\n")


def test_nmstate_bond_rejects_ports_config():
    with pytest.raises(UnsupportedField) as caught:
        parse(BOND + "    ports-config:\n    - name: eth0\n      priority: 1\n")
    message = str(caught.value)
    assert message.startswith("interfaces[2].link-aggregation.ports-config (a list of 1 items)")


def test_nmstate_bond_port_must_exist():
    with pytest.raises(ImageBuildInvalid, match="bond port 'eth2' is not an interface"):
        parse(BOND.replace("[eth0, eth1]", "[eth0, eth2]"))


def test_nmstate_bond_needs_link_aggregation():
    with pytest.raises(ImageBuildInvalid, match=r"interfaces\[0\]\.link-aggregation is missing"):
        parse("interfaces:\n- name: bond0\n  type: bond\n")


def test_nmstate_vlan_base_and_id():
    config = parse(
        ETHERNET + "- name: eth0.10\n  type: vlan\n  vlan:\n    base-iface: eth0\n    id: 10\n"
    )
    vlan = config.interface("eth0.10")
    assert vlan.type == "vlan"
    assert vlan.device_name == "eth0.10"
    assert vlan.vlan.base == "eth0"
    assert vlan.vlan.id == 10


def test_nmstate_vlan_rejects_missing_base():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse(ETHERNET + "- name: v10\n  type: vlan\n  vlan:\n    base-iface: eth9\n    id: 10\n")
    assert "VLAN base interface 'eth9' does not exist" in str(caught.value)


def test_nmstate_vlan_rejects_id_out_of_range():
    with pytest.raises(ImageBuildInvalid, match=r"interfaces\[1\]\.vlan\.id is 4095"):
        parse(ETHERNET + "- name: v\n  type: vlan\n  vlan:\n    base-iface: eth0\n    id: 4095\n")


def test_nmstate_vlan_rejects_protocol():
    with pytest.raises(UnsupportedField, match=r"interfaces\[1\]\.vlan\.protocol"):
        parse(
            ETHERNET
            + "- name: v\n  type: vlan\n  vlan:\n    base-iface: eth0\n    id: 5\n"
            + "    protocol: 802.1ad\n"
        )


@pytest.mark.parametrize("kind", ["linux-bridge", "ovs-bridge", "ovs-interface", "dummy", "team"])
def test_nmstate_rejects_other_interface_types(kind):
    with pytest.raises(UnsupportedField) as caught:
        parse(f"interfaces:\n- name: x0\n  type: {kind}\n")
    message = str(caught.value)
    assert f"interfaces[0].type '{kind}' is not supported" in message
    assert "ethernet, bond, vlan" in message


def test_nmstate_rejects_missing_type():
    with pytest.raises(UnsupportedField, match=r"interfaces\[0\]\.type is missing"):
        parse("interfaces:\n- name: eth0\n")


@pytest.mark.parametrize("state", ["down", "absent", "ignore"])
def test_nmstate_rejects_state_other_than_up(state):
    with pytest.raises(UnsupportedField) as caught:
        parse(ETHERNET.replace("state: up", f"state: {state}"))
    assert f"interfaces[0].state '{state}' is not supported" in str(caught.value)


@pytest.mark.parametrize(
    ("snippet", "path"),
    [
        ("  lldp:\n    enabled: true\n", "interfaces[0].lldp"),
        ("  ethtool:\n    feature:\n      tso: false\n", "interfaces[0].ethtool"),
        ("  ethernet:\n    speed: 1000\n", "interfaces[0].ethernet"),
        ("  accept-all-mac-addresses: false\n", "interfaces[0].accept-all-mac-addresses"),
        ("  vlan:\n    base-iface: eth1\n    id: 3\n", "interfaces[0].vlan"),
    ],
)
def test_nmstate_rejects_unsupported_interface_keys(snippet, path):
    with pytest.raises(UnsupportedField) as caught:
        parse(ETHERNET + snippet)
    assert str(caught.value).startswith(f"{path} (")


def test_nmstate_ignores_description():
    config = parse(ETHERNET + "  description: uplink to switch 4\n")
    assert config.interface("eth0").name == "eth0"


@pytest.mark.parametrize("key", ["route-rules", "ovs-db", "hostname", "ovn"])
def test_nmstate_rejects_unsupported_top_level_keys(key):
    with pytest.raises(UnsupportedField) as caught:
        parse(ETHERNET + f"{key}:\n  config: []\n")
    assert str(caught.value).startswith(f"{key} (a mapping with 1 keys) is not supported")


@pytest.mark.parametrize(
    "name",
    ["", "a" * 16, "é" * 8, ".", "..", "eth/0", "eth:0", "eth 0", "eth\t0", "eth\n0"],
)
def test_nmstate_rejects_invalid_interface_names(name):
    document = {"interfaces": [{"name": name, "type": "ethernet", "state": "up"}]}
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_nmstate(document)
    assert str(caught.value).startswith("interfaces[0].name: interface name")


def test_nmstate_accepts_15_byte_name():
    name = "a" * 15
    document = {"interfaces": [{"name": name, "type": "ethernet"}]}
    assert parse_nmstate(document).interfaces[0].device_name == name


def test_nmstate_routes_with_metric_and_table():
    config = parse(
        ETHERNET
        + """routes:
  config:
  - destination: 0.0.0.0/0
    next-hop-address: 192.0.2.1
    next-hop-interface: eth0
    metric: 150
    table-id: 254
  - destination: 198.51.100.0/24
    next-hop-interface: eth0
    table-id: 0
  - destination: 2001:db8:5::/48
    next-hop-address: ''
    next-hop-interface: eth0
"""
    )
    first, second, third = config.routes
    assert first.destination == ipaddress.ip_network("0.0.0.0/0")
    assert first.gateway == ipaddress.ip_address("192.0.2.1")
    assert first.interface == "eth0"
    assert first.metric == 150
    assert second.destination == ipaddress.ip_network("198.51.100.0/24")
    assert second.gateway is None
    assert second.metric is None
    assert third.gateway is None


def test_nmstate_rejects_route_state_absent():
    with pytest.raises(UnsupportedField) as caught:
        parse(
            ETHERNET
            + "routes:\n  config:\n  - destination: 0.0.0.0/0\n    next-hop-interface: eth0\n"
            + "    state: absent\n"
        )
    assert "routes.config[0].state 'absent' is not supported" in str(caught.value)


def test_nmstate_rejects_other_route_table():
    with pytest.raises(UnsupportedField, match=r"routes\.config\[0\]\.table-id 100"):
        parse(
            ETHERNET
            + "routes:\n  config:\n  - destination: 0.0.0.0/0\n    next-hop-interface: eth0\n"
            + "    table-id: 100\n"
        )


def test_nmstate_rejects_route_through_unknown_interface():
    with pytest.raises(ImageBuildInvalid, match="next-hop interface 'eth7'"):
        parse(
            ETHERNET
            + "routes:\n  config:\n  - destination: 0.0.0.0/0\n    next-hop-interface: eth7\n"
        )


def test_nmstate_rejects_route_without_interface():
    with pytest.raises(ImageBuildInvalid, match=r"routes\.config\[0\]\.next-hop-interface is"):
        parse(ETHERNET + "routes:\n  config:\n  - destination: 0.0.0.0/0\n")


def test_nmstate_rejects_route_with_host_bits():
    with pytest.raises(ImageBuildInvalid, match="'192.0.2.1/24' is not a network"):
        parse(
            ETHERNET
            + "routes:\n  config:\n  - destination: 192.0.2.1/24\n    next-hop-interface: eth0\n"
        )


def test_nmstate_rejects_gateway_of_other_family():
    with pytest.raises(ImageBuildInvalid, match="is not an IPv6 address"):
        parse(
            ETHERNET
            + "routes:\n  config:\n  - destination: ::/0\n    next-hop-interface: eth0\n"
            + "    next-hop-address: 192.0.2.1\n"
        )


def test_nmstate_dns_order_kept():
    config = parse(
        ETHERNET
        + "dns-resolver:\n  config:\n    server: [2001:db8::53, 192.0.2.53]\n"
        + "    search: [b.example, a.example]\n"
    )
    assert config.dns_servers == (
        ipaddress.ip_address("2001:db8::53"),
        ipaddress.ip_address("192.0.2.53"),
    )
    assert config.dns_search == ("b.example", "a.example")


def test_nmstate_rejects_search_domain_with_newline():
    document = {
        "interfaces": [{"name": "eth0", "type": "ethernet"}],
        "dns-resolver": {"config": {"search": ["example.com\nnameserver 203.0.113.9"]}},
    }
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_nmstate(document)
    message = str(caught.value)
    assert message.startswith("dns-resolver.config.search[0]:")
    assert "is not a valid DNS search domain" in message


def test_nmstate_rejects_scoped_dns_server():
    with pytest.raises(ImageBuildInvalid, match="'fe80::1%eth0' is not an IP address"):
        parse(ETHERNET + "dns-resolver:\n  config:\n    server: ['fe80::1%eth0']\n")


def test_nmstate_rejects_dns_options():
    with pytest.raises(UnsupportedField, match=r"dns-resolver\.config\.options"):
        parse(ETHERNET + "dns-resolver:\n  config:\n    options: [rotate]\n")


def test_nmstate_rejects_non_mapping_document():
    with pytest.raises(ImageBuildInvalid, match="the nmstate document is a list of 1 items"):
        parse_nmstate(["interfaces"])


def test_nmstate_rejects_duplicate_interface_names():
    with pytest.raises(ImageBuildInvalid, match="the name 'eth0' is used twice"):
        parse(ETHERNET + "- name: eth0\n  type: ethernet\n")


def bond(name, ports):
    return {"name": name, "type": "bond", "state": "up",
            "link-aggregation": {"mode": "active-backup", "port": ports}}  # fmt: skip


def ethernet(name):
    return {"name": name, "type": "ethernet", "state": "up"}


@pytest.mark.parametrize(
    "interfaces,expected",
    [
        ([bond("bond0", ["bond0"])], "its own port"),
        ([bond("bond0", ["bond1"]), bond("bond1", ["bond0"])], "is itself a bond"),
        ([ethernet("eth0"), bond("bond0", ["eth0"]), bond("bond1", ["eth0"])], "one bond only"),
        (
            [{"name": "v5", "type": "vlan", "state": "up", "vlan": {"base-iface": "v5", "id": 5}}],
            "its own base",
        ),
    ],
    ids=["bond-self", "bond-loop", "port-twice", "vlan-self"],
)
def test_nmstate_rejects_impossible_graph(interfaces, expected):
    with pytest.raises(ImageBuildInvalid, match=expected):
        parse_nmstate({"interfaces": interfaces})
