"""Parse an NMState desired state (the ``nmstate`` Secret key) into the network model.

``parse_nmstate`` accepts ethernet, bond and VLAN interfaces in state ``up`` with MAC address,
MTU, static or dynamic IPv4/IPv6, main-table routes and the DNS resolver. Every other key that
nmstate allows raises UnsupportedField naming its path (``interfaces[0].lldp``), so nothing is
dropped silently. The only keys skipped are those in ``IGNORED_KEYS``, which carry no network
meaning. Values that are wrong for nmstate too raise ImageBuildInvalid.
"""

from __future__ import annotations

import ipaddress
import re

from builder.errors import ImageBuildInvalid, UnsupportedField
from builder.model import (
    BOND_MODES,
    Bond,
    Interface,
    IPAddress,
    IPConfig,
    IPInterface,
    NetworkConfig,
    Route,
    Vlan,
    check_interface_name,
    check_mac_address,
    check_search_domain,
    validate,
)
from builder.safe_yaml import (
    expect_integer,
    expect_ip_address,
    expect_list,
    expect_mapping,
    quote,
    reject_unknown_keys,
)

SOURCE = "nmstate"

# Free-text descriptions, which nmstate copies into the connection profile. They configure nothing.
IGNORED_KEYS = frozenset({"description"})

INTERFACE_TYPES = ("ethernet", "bond", "vlan")

# Options of the Linux bonding driver as /sys/class/net/BOND/bonding/ names them; nmstate's
# link-aggregation.options and network_data's bond_* keys use the same names.
BOND_OPTIONS = frozenset(
    {
        "ad_actor_sys_prio",
        "ad_actor_system",
        "ad_select",
        "ad_user_port_key",
        "all_slaves_active",
        "arp_all_targets",
        "arp_interval",
        "arp_ip_target",
        "arp_missed_max",
        "arp_validate",
        "downdelay",
        "fail_over_mac",
        "lacp_active",
        "lacp_rate",
        "lp_interval",
        "miimon",
        "min_links",
        "num_grat_arp",
        "num_unsol_na",
        "packets_per_slave",
        "peer_notif_delay",
        "primary",
        "primary_reselect",
        "resend_igmp",
        "tlb_dynamic_lb",
        "updelay",
        "use_carrier",
        "xmit_hash_policy",
    }
)

# Characters a bonding option value may contain: names, numbers, MAC addresses, "layer3+4" and
# comma-separated IPv4 lists. Anything else could break out of a rendered file.
_BOND_VALUE = re.compile(r"^[A-Za-z0-9_.:,+-]{1,128}$")

_COMMON_KEYS = frozenset(
    {"name", "type", "state", "identifier", "mac-address", "mtu", "ipv4", "ipv6"}
)
_TYPE_KEYS = {
    "ethernet": frozenset(),
    "bond": frozenset({"link-aggregation"}),
    "vlan": frozenset({"vlan"}),
}


def parse_nmstate(doc: object) -> NetworkConfig:
    """Build a validated NetworkConfig from a parsed NMState document.

    Raises UnsupportedField for a field nmstate allows but the model cannot express, and
    ImageBuildInvalid for a value that is invalid or inconsistent.
    """
    state = expect_mapping(doc, "the nmstate document")
    _check_keys(state, "", allowed={"interfaces", "routes", "dns-resolver"})

    items = expect_list(state.get("interfaces"), "interfaces")
    interfaces = tuple(
        _parse_interface(item, f"interfaces[{index}]") for index, item in enumerate(items)
    )
    routes = _parse_routes(state.get("routes"))
    servers, search = _parse_dns(state.get("dns-resolver"))
    config = NetworkConfig(
        source=SOURCE,
        interfaces=interfaces,
        routes=routes,
        dns_servers=servers,
        dns_search=search,
    )
    return validate(config)


def bond_option(name: object, value: object, *, field_name: str) -> tuple[str, str]:
    """Return a bonding driver option as the (name, value) strings the model stores.

    Booleans become "1" and "0", as the driver and NetworkManager spell them. Raises
    UnsupportedField for an option the driver does not have and ImageBuildInvalid for a value
    that is not a plain string or number.
    """
    if not isinstance(name, str) or name not in BOND_OPTIONS:
        raise UnsupportedField(
            f"{field_name}: bond option {quote(name)} is not supported; remove it or use one "
            "of " + ", ".join(sorted(BOND_OPTIONS))
        )
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = ""
    if not _BOND_VALUE.match(text):
        raise ImageBuildInvalid(
            f"{field_name}: bond option {name} has the invalid value {quote(value)}; "
            "use a number, a word or a comma-separated list without spaces"
        )
    return name, text


def _parse_interface(item: object, path: str) -> Interface:
    entry = expect_mapping(item, path)
    name = check_interface_name(entry.get("name"), field_name=f"{path}.name")

    kind = entry.get("type")
    if kind is None:
        raise UnsupportedField(
            f"{path}.type is missing; nmstate would apply the entry to an existing interface "
            "of any type, which an image cannot know. Set type to ethernet, bond or vlan"
        )
    if kind not in INTERFACE_TYPES:
        raise UnsupportedField(
            f"{path}.type {quote(kind)} is not supported; remove the interface or use one of "
            + ", ".join(INTERFACE_TYPES)
        )
    _check_keys(entry, path, allowed=_COMMON_KEYS | _TYPE_KEYS[kind])

    state = entry.get("state", "up")
    if state != "up":
        raise UnsupportedField(
            f"{path}.state {quote(state)} is not supported; an image only brings interfaces "
            "up, so remove the interface or set state: up"
        )

    mac = entry.get("mac-address")
    if mac is not None:
        mac = check_mac_address(mac, field_name=f"{path}.mac-address")
    match_by_mac = _parse_identifier(entry.get("identifier"), path, kind=kind, mac=mac)

    mtu = None
    if entry.get("mtu") is not None:
        mtu = expect_integer(entry["mtu"], f"{path}.mtu", low=0, high=65535)

    return Interface(
        name=name,
        type=kind,
        # With identifier: mac-address, "name" only names the profile and the MAC selects
        # the NIC; otherwise the name selects it and nmstate applies the MAC as cloned MAC.
        device_name=None if match_by_mac else name,
        mac_address=mac,
        match_by_mac=match_by_mac,
        mtu=mtu,
        ipv4=_parse_ip(entry.get("ipv4"), f"{path}.ipv4", version=4),
        ipv6=_parse_ip(entry.get("ipv6"), f"{path}.ipv6", version=6),
        bond=_parse_bond(entry.get("link-aggregation"), path) if kind == "bond" else None,
        vlan=_parse_vlan(entry.get("vlan"), path) if kind == "vlan" else None,
    )


def _parse_identifier(identifier: object, path: str, *, kind: str, mac: str | None) -> bool:
    if identifier in (None, "name"):
        return False
    if identifier != "mac-address":
        raise UnsupportedField(
            f"{path}.identifier {quote(identifier)} is not supported; remove it or use "
            "name or mac-address"
        )
    if kind != "ethernet":
        raise UnsupportedField(
            f"{path}.identifier mac-address is supported only for ethernet interfaces; remove it"
        )
    if mac is None:
        raise ImageBuildInvalid(
            f"{path}: identifier is mac-address but mac-address is missing; add the NIC's MAC"
        )
    return True


def _parse_ip(section: object, path: str, *, version: int) -> IPConfig:
    if section is None:
        return IPConfig()
    entry = expect_mapping(section, path)
    allowed = {"enabled", "dhcp", "address"} | ({"autoconf"} if version == 6 else set())
    _check_keys(entry, path, allowed=allowed)

    dhcp = _boolean(entry.get("dhcp", False), f"{path}.dhcp")
    autoconf = _boolean(entry.get("autoconf", False), f"{path}.autoconf")
    items = expect_list(entry.get("address"), f"{path}.address")
    addresses = tuple(
        _parse_address(item, f"{path}.address[{index}]", version=version)
        for index, item in enumerate(items)
    )
    # An omitted "enabled" is taken as true when dhcp, autoconf or an address is set.
    enabled = _boolean(entry.get("enabled", dhcp or autoconf or bool(addresses)), f"{path}.enabled")
    if not enabled and (dhcp or autoconf or addresses):
        raise ImageBuildInvalid(
            f"{path}: enabled is false but dhcp, autoconf or address is set; set enabled: true "
            "or remove them"
        )
    return IPConfig(enabled=enabled, dhcp=dhcp, autoconf=autoconf, addresses=addresses)


def _parse_address(item: object, path: str, *, version: int) -> IPInterface:
    entry = expect_mapping(item, path)
    _check_keys(entry, path, allowed={"ip", "prefix-length"})
    ip = entry.get("ip")
    if "prefix-length" not in entry:
        raise ImageBuildInvalid(
            f"{path}: address {quote(ip)} has no prefix-length; add prefix-length "
            f"(for example {24 if version == 4 else 64})"
        )
    address = expect_ip_address(ip, f"{path}.ip", version=version)
    prefix = expect_integer(
        entry["prefix-length"], f"{path}.prefix-length", low=0, high=address.max_prefixlen
    )
    return ipaddress.ip_interface(f"{address}/{prefix}")


def _parse_bond(section: object, path: str) -> Bond:
    where = f"{path}.link-aggregation"
    if section is None:
        raise ImageBuildInvalid(f"{where} is missing; a bond needs its mode and ports")
    entry = expect_mapping(section, where)
    _check_keys(entry, where, allowed={"mode", "port", "slaves", "options"})

    mode = entry.get("mode")
    if mode not in BOND_MODES:
        raise ImageBuildInvalid(
            f"{where}.mode {quote(mode)} is not a bond mode; use one of " + ", ".join(BOND_MODES)
        )
    # "slaves" is the older name of "port", which nmstate still accepts.
    if "port" in entry and "slaves" in entry:
        raise ImageBuildInvalid(f"{where}: both port and slaves are set; keep only port")
    key = "slaves" if "slaves" in entry else "port"
    ports = tuple(
        check_interface_name(port, field_name=f"{where}.{key}[{index}]")
        for index, port in enumerate(expect_list(entry.get(key), f"{where}.{key}"))
    )
    options = entry.get("options")
    pairs = []
    if options is not None:
        for option, value in expect_mapping(options, f"{where}.options").items():
            pairs.append(bond_option(option, value, field_name=f"{where}.options.{option}"))
    return Bond(mode=mode, ports=ports, options=tuple(sorted(pairs)))


def _parse_vlan(section: object, path: str) -> Vlan:
    where = f"{path}.vlan"
    if section is None:
        raise ImageBuildInvalid(f"{where} is missing; a VLAN needs base-iface and id")
    entry = expect_mapping(section, where)
    _check_keys(entry, where, allowed={"base-iface", "id"})
    base = check_interface_name(entry.get("base-iface"), field_name=f"{where}.base-iface")
    if "id" not in entry:
        raise ImageBuildInvalid(f"{where}.id is missing; set the VLAN id (0 to 4094)")
    return Vlan(base=base, id=expect_integer(entry["id"], f"{where}.id", low=0, high=4094))


def _parse_routes(section: object) -> tuple[Route, ...]:
    if section is None:
        return ()
    entry = expect_mapping(section, "routes")
    _check_keys(entry, "routes", allowed={"config"})
    items = expect_list(entry.get("config"), "routes.config")
    return tuple(_parse_route(item, f"routes.config[{index}]") for index, item in enumerate(items))


def _parse_route(item: object, path: str) -> Route:
    entry = expect_mapping(item, path)
    if "state" in entry:
        raise UnsupportedField(
            f"{path}.state {quote(entry['state'])} is not supported; an image starts with no "
            "routes to remove, so remove the route entry"
        )
    _check_keys(
        entry,
        path,
        allowed={"destination", "next-hop-address", "next-hop-interface", "metric", "table-id"},
    )
    table = entry.get("table-id")
    if table is not None:
        table = expect_integer(table, f"{path}.table-id", low=0, high=2**32 - 1)
    # nmstate reads table-id 0 as "the default table", which is main (254).
    if table not in (None, 0, 254):
        raise UnsupportedField(
            f"{path}.table-id {quote(table)} is not supported; remove it to use the main table"
        )

    destination = entry.get("destination")
    if not isinstance(destination, str) or "%" in destination:
        raise ImageBuildInvalid(
            f"{path}.destination {quote(destination)} is not a network; write it as ADDRESS/PREFIX"
        )
    try:
        network = ipaddress.ip_network(destination)
    except ValueError:
        raise ImageBuildInvalid(
            f"{path}.destination {quote(destination)} is not a network (host bits must be zero); "
            "write it as ADDRESS/PREFIX, for example 192.0.2.0/24"
        ) from None

    gateway = None
    if entry.get("next-hop-address") not in (None, ""):
        gateway = expect_ip_address(
            entry["next-hop-address"], f"{path}.next-hop-address", version=network.version
        )
    interface = entry.get("next-hop-interface")
    if interface is None:
        raise ImageBuildInvalid(
            f"{path}.next-hop-interface is missing; name the interface the route leaves through"
        )
    interface = check_interface_name(interface, field_name=f"{path}.next-hop-interface")
    metric = None
    if entry.get("metric") is not None:
        metric = expect_integer(entry["metric"], f"{path}.metric", low=0, high=2**32 - 1)
    return Route(destination=network, interface=interface, gateway=gateway, metric=metric)


def _parse_dns(section: object) -> tuple[tuple[IPAddress, ...], tuple[str, ...]]:
    if section is None:
        return (), ()
    entry = expect_mapping(section, "dns-resolver")
    _check_keys(entry, "dns-resolver", allowed={"config"})
    if entry.get("config") is None:
        return (), ()
    config = expect_mapping(entry["config"], "dns-resolver.config")
    _check_keys(config, "dns-resolver.config", allowed={"server", "search"})
    servers = tuple(
        expect_ip_address(server, f"dns-resolver.config.server[{index}]", version=None)
        for index, server in enumerate(
            expect_list(config.get("server"), "dns-resolver.config.server")
        )
    )
    search = tuple(
        check_search_domain(domain, field_name=f"dns-resolver.config.search[{index}]")
        for index, domain in enumerate(
            expect_list(config.get("search"), "dns-resolver.config.search")
        )
    )
    return servers, search


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ImageBuildInvalid(f"{path} is {quote(value)}; write true or false")
    return value


def _check_keys(entry: dict, path: str, *, allowed: set[str] | frozenset[str]) -> None:
    reject_unknown_keys(entry, path, allowed=allowed | IGNORED_KEYS)
