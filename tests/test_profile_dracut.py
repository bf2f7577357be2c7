"""The dracut profile: kernel arguments checked against dracut.cmdline(7)'s grammar."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import oracles
import pytest

from builder import profiles
from builder.errors import ImageBuildInvalid, UnsupportedField

AUTOCONF = {"none", "off", "dhcp", "on", "any", "dhcp6", "auto6", "ibft"}


def _ip_fields(value: str) -> list[str]:
    """Split an ip= value at ':' outside [IPv6] brackets."""
    return re.findall(r"\[[^\]]*\]|[^:]+|(?<=:)(?=:|$)|^(?=:)", value)


def parse_ip(value: str) -> dict:
    """Parse one ip= value in either of dracut's forms; raise AssertionError when invalid."""
    fields = _ip_fields(value)
    if len(fields) >= 2 and fields[1] in AUTOCONF:
        interface, method, *rest = fields
        assert interface, value
        return {"interface": interface, "method": method, "extra": rest}
    assert 7 <= len(fields) <= 9, value
    client, peer, gateway, netmask, hostname, interface, method, *rest = fields
    assert method in AUTOCONF, value
    ipaddress.ip_address(client.strip("[]"))
    if gateway:
        ipaddress.ip_address(gateway.strip("[]"))
    if client.startswith("["):
        assert 0 <= int(netmask) <= 128, value
    else:
        ipaddress.IPv4Address(netmask)
    return {"client": client, "peer": peer, "gateway": gateway, "netmask": netmask,
            "hostname": hostname, "interface": interface, "method": method, "extra": rest}


def _params(config) -> tuple[str, ...]:
    rendering = profiles.render(config, profile="dracut", image_format="initrd")
    assert rendering.files == ()
    return rendering.kernel_params


def _bonded():
    return dataclasses.replace(oracles.bonded_vlan(), dns_search=())


def test_dracut_bond_vlan_params():
    params = _params(_bonded())
    assert "ifname=eno1:52:54:00:00:00:01" in params
    assert "ifname=eno2:52:54:00:00:00:02" in params
    assert "bond=bond0:eno1,eno2:mode=802.3ad,miimon=100,xmit_hash_policy=layer3+4:9000" in params
    assert "vlan=bond0.120:bond0" in params
    assert "nameserver=192.0.2.53" in params
    assert "nameserver=2001:db8::53" in params
    assert params[-1] == "rd.neednet=1"


def test_dracut_ip_grammar():
    ip_values = [p.removeprefix("ip=") for p in _params(_bonded()) if p.startswith("ip=")]
    parsed = [parse_ip(value) for value in ip_values]
    assert len(parsed) == 2
    assert parsed[0]["client"] == "192.0.2.10"
    assert parsed[0]["gateway"] == "192.0.2.1"
    assert parsed[0]["netmask"] == "255.255.255.0"
    assert parsed[0]["interface"] == "bond0.120"
    assert parsed[0]["method"] == "none"
    assert parsed[1]["client"] == "[2001:db8::10]"
    assert parsed[1]["gateway"] == "[2001:db8::1]"
    assert parsed[1]["netmask"] == "64"
    assert parsed[1]["interface"] == "bond0.120"


def test_dracut_ipv6_auto_by_mac():
    params = _params(oracles.mac_ipv6_auto())
    assert params == ("ifname=nic0:52:54:00:00:00:10", "ip=nic0:auto6", "rd.neednet=1")
    assert parse_ip("nic0:auto6")["method"] == "auto6"


def test_dracut_cloned_mac_and_mtu():
    params = _params(oracles.by_name_cloned())
    parsed = parse_ip(params[0].removeprefix("ip="))
    assert parsed["interface"] == "eth1"
    assert parsed["method"] == "dhcp"
    assert parsed["extra"] == ["1400", "52", "54", "00", "00", "00", "30"]


def test_dracut_static_route_without_metric():
    config = oracles.metric_route()
    config = dataclasses.replace(
        config, routes=(dataclasses.replace(config.routes[0], metric=None), config.routes[1])
    )
    params = _params(config)
    assert "rd.route=203.0.113.0/24:198.51.100.254:eth0" in params
    parsed = parse_ip(next(p for p in params if p.startswith("ip=")).removeprefix("ip="))
    assert parsed["gateway"] == "198.51.100.1"


def test_dracut_rejects_route_metric():
    with pytest.raises(UnsupportedField) as raised:
        _params(oracles.metric_route())
    message = str(raised.value)
    assert "profile dracut cannot express route metrics" in message
    assert "route to 0.0.0.0/0 via 198.51.100.1 metric 150" in message
    assert "remove the metric" in message


def test_dracut_rejects_search_domains():
    with pytest.raises(UnsupportedField, match="DNS search domains"):
        _params(oracles.bonded_vlan())


def test_dracut_rejects_several_addresses():
    config = oracles.metric_route()
    nic = config.interfaces[0]
    addresses = (*nic.ipv4.addresses, ipaddress.ip_interface("198.51.100.6/24"))
    nic = dataclasses.replace(nic, ipv4=dataclasses.replace(nic.ipv4, addresses=addresses))
    config = dataclasses.replace(config, interfaces=(nic,), routes=())
    with pytest.raises(UnsupportedField, match="several addresses"):
        _params(config)


def test_dracut_rejects_option_with_comma():
    config = _bonded()
    bond = config.interfaces[2]
    options = (("arp_ip_target", "192.0.2.1,192.0.2.2"),)
    bond = dataclasses.replace(bond, bond=dataclasses.replace(bond.bond, options=options))
    config = dataclasses.replace(config, interfaces=(*config.interfaces[:2], bond,
                                                     config.interfaces[3]))
    with pytest.raises(UnsupportedField, match="arp_ip_target"):
        _params(config)


def test_dracut_rejects_iso_format():
    with pytest.raises(ImageBuildInvalid, match="initrd"):
        profiles.render(oracles.mac_ipv6_auto(), profile="dracut", image_format="iso")
