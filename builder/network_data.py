"""Parse OpenStack network_data (``networkData`` or ``value`` Secret key) into the network model.

``parse_network_data`` reads ``links`` (NIC-like types, ``bond``, ``vlan``), ``networks``
(static and dynamic IPv4/IPv6 with routes and DNS) and ``services`` (DNS). Interfaces are named
as glean 1.25 (``glean/cmd.py``) names them where the name reaches the kernel:

- A NIC link is selected by its MAC address (``match_by_mac``, no ``device_name``). Its model
  name is the link id when that is a valid interface name. Real link ids are often UUIDs or
  ``tap...`` names longer than 15 bytes, so otherwise the name is ``enx`` and the 12 hex digits
  of the MAC, as in systemd's MAC-based naming scheme.
- A bond's kernel name is its link id, which must therefore be a valid interface name.
- A VLAN is named ``BASE.ID`` (``bond0.130``) after the model name of its base link, or
  ``vlanID`` when ``BASE.ID`` is 16 bytes or longer.

Unknown link types, bond modes and network types raise ImageBuildInvalid naming the link or
network id and the value. Known keys that the model cannot express raise UnsupportedField.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

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
from builder.nmstate import bond_option
from builder.safe_yaml import (
    expect_integer,
    expect_ip_address,
    expect_list,
    expect_mapping,
    quote,
    reject_unknown_keys,
)

# Link types that stand for one NIC of the host. glean treats every type other than bond and
# vlan as a NIC; this list is cloud-init's KNOWN_PHYSICAL_TYPES (OpenStack VIF types) plus
# "vdpa", so a typo is reported instead of being configured as a NIC.
NIC_LINK_TYPES = frozenset(
    {
        "bridge",
        "dvs",
        "ethernet",
        "hw_veb",
        "hyperv",
        "ovs",
        "phy",
        "tap",
        "vdpa",
        "vhostuser",
        "vif",
    }
)

# Keys that identify OpenStack objects (Neutron port and network UUIDs) and configure nothing.
_IDENTITY_KEYS = frozenset({"vif_id", "network_id"})

_NIC_KEYS = frozenset({"id", "type", "ethernet_mac_address", "mtu"})
_VLAN_KEYS = _NIC_KEYS | {"vlan_link", "vlan_id", "vlan_mac_address"}
_NETWORK_KEYS = frozenset(
    {
        "id",
        "type",
        "link",
        "ip_address",
        "netmask",
        "routes",
        "services",
        "dns_nameservers",
        "dns_search",
    }
)
_ROUTE_KEYS = frozenset({"network", "netmask", "gateway", "metric", "services"})


@dataclass
class _Link:
    """One link while parsing: its entry, the derived model name and the addressing found."""

    index: int
    entry: dict
    kind: str
    name: str = ""
    ipv4: dict = field(default_factory=lambda: {"enabled": False, "dhcp": False})
    ipv6: dict = field(default_factory=lambda: {"enabled": False, "dhcp": False, "autoconf": False})
    addresses4: list = field(default_factory=list)
    addresses6: list = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"links[{self.index}] (id {quote(self.entry['id'])})"


def parse_network_data(doc: object, *, source: str) -> NetworkConfig:
    """Build a validated NetworkConfig from parsed network_data; ``source`` is the Secret key.

    Raises ImageBuildInvalid for invalid or inconsistent data, and UnsupportedField for a key
    the model cannot express.
    """
    data = expect_mapping(doc, "the network_data document")
    _check_keys(data, "", allowed={"links", "networks", "services"})
    links = _read_links(expect_list(data.get("links"), "links"))
    if not links:
        raise ImageBuildInvalid(
            "network_data defines no links; add the host's NICs or remove the key from the Secret"
        )
    _name_links(links)

    routes: list[Route] = []
    servers = _read_services(data.get("services"), "services")
    search: list[str] = []
    for index, item in enumerate(expect_list(data.get("networks"), "networks")):
        network_servers, network_search = _read_network(item, index, links, routes)
        servers.extend(network_servers)
        search.extend(network_search)

    config = NetworkConfig(
        source=source,
        interfaces=tuple(_build_interface(link, links) for link in links.values()),
        routes=tuple(routes),
        dns_servers=tuple(dict.fromkeys(servers)),
        dns_search=tuple(dict.fromkeys(search)),
    )
    return validate(config)


def _read_links(items: list) -> dict[str, _Link]:
    links: dict[str, _Link] = {}
    for index, item in enumerate(items):
        entry = expect_mapping(item, f"links[{index}]")
        link_id = entry.get("id")
        if not isinstance(link_id, str) or not link_id:
            raise ImageBuildInvalid(f"links[{index}].id is {quote(link_id)}; set a link id")
        if link_id in links:
            raise ImageBuildInvalid(f"links[{index}]: link id {quote(link_id)} is used twice")
        kind = entry.get("type")
        if kind in NIC_LINK_TYPES:
            kind = "ethernet"
        elif kind not in ("bond", "vlan"):
            raise ImageBuildInvalid(
                f"links[{index}] (id {quote(link_id)}): link type {quote(kind)} is unknown; "
                "use phy (or another NIC type such as ethernet, vif, tap, ovs), bond or vlan"
            )
        link = _Link(index=index, entry=entry, kind=kind)
        if kind == "bond":
            allowed = _NIC_KEYS | {key for key in entry if str(key).startswith("bond_")}
        else:
            allowed = _VLAN_KEYS if kind == "vlan" else _NIC_KEYS
        _check_keys(entry, f"links[{index}]", allowed=allowed)
        links[link_id] = link
    return links


def _name_links(links: dict[str, _Link]) -> None:
    # NICs and bonds first, because a VLAN's name is built from its base link's name.
    for link_id, link in links.items():
        if link.kind == "ethernet":
            link.name = _nic_name(link_id, _link_mac(link, required=True))
        elif link.kind == "bond":
            link.name = check_interface_name(
                link_id, field_name=f"{link.where}: a bond's link id is its kernel name, so its id"
            )
    for link in links.values():
        if link.kind == "vlan":
            base = _vlan_base(link, links)
            vlan_id = expect_integer(
                link.entry.get("vlan_id"), f"{link.where}.vlan_id", low=0, high=4094
            )
            name = f"{base.name}.{vlan_id}"
            link.name = name if len(name.encode()) < 16 else f"vlan{vlan_id}"


def _nic_name(link_id: str, mac: str) -> str:
    try:
        return check_interface_name(link_id, field_name="link id")
    except ImageBuildInvalid:
        return "enx" + mac.replace(":", "")


def _vlan_base(link: _Link, links: dict[str, _Link]) -> _Link:
    base_id = link.entry.get("vlan_link")
    base = links.get(base_id) if isinstance(base_id, str) else None
    if base is None:
        raise ImageBuildInvalid(
            f"{link.where}.vlan_link {quote(base_id)} is not a link id; name an existing NIC or "
            "bond link"
        )
    if base.kind == "vlan":
        raise UnsupportedField(
            f"{link.where}.vlan_link {quote(base_id)} is a VLAN; a VLAN on a VLAN is not "
            "supported, so put it on a NIC or bond link"
        )
    return base


def _link_mac(link: _Link, *, required: bool) -> str | None:
    key = "vlan_mac_address" if "vlan_mac_address" in link.entry else "ethernet_mac_address"
    value = link.entry.get(key)
    if value in (None, ""):
        if required:
            raise ImageBuildInvalid(
                f"{link.where}.ethernet_mac_address is missing; NIC links are selected by MAC "
                "address, so add it"
            )
        return None
    # cluster-api-provider-metal3 also accepts "-" between the bytes.
    if isinstance(value, str):
        value = value.replace("-", ":")
    return check_mac_address(value, field_name=f"{link.where}.{key}")


def _build_interface(link: _Link, links: dict[str, _Link]) -> Interface:
    entry = link.entry
    mtu = None
    if entry.get("mtu") is not None:
        mtu = expect_integer(entry["mtu"], f"{link.where}.mtu", low=0, high=65535)
    is_nic = link.kind == "ethernet"
    return Interface(
        name=link.name,
        type=link.kind,  # type: ignore[arg-type]
        device_name=None if is_nic else link.name,
        # A bond's or VLAN's MAC address is applied to the device it creates.
        mac_address=_link_mac(link, required=is_nic),
        match_by_mac=is_nic,
        mtu=mtu,
        ipv4=IPConfig(addresses=tuple(link.addresses4), **link.ipv4),
        ipv6=IPConfig(addresses=tuple(link.addresses6), **link.ipv6),
        bond=_build_bond(link, links) if link.kind == "bond" else None,
        vlan=Vlan(base=_vlan_base(link, links).name, id=int(entry["vlan_id"]))
        if link.kind == "vlan"
        else None,
    )


def _build_bond(link: _Link, links: dict[str, _Link]) -> Bond:
    entry = link.entry
    mode = entry.get("bond_mode")
    if mode not in BOND_MODES:
        raise ImageBuildInvalid(
            f"{link.where}.bond_mode {quote(mode)} is not a bond mode; use one of "
            + ", ".join(BOND_MODES)
        )
    ports = []
    for index, port_id in enumerate(
        expect_list(entry.get("bond_links"), f"{link.where}.bond_links")
    ):
        port = links.get(port_id) if isinstance(port_id, str) else None
        if port is None or port.kind != "ethernet":
            raise ImageBuildInvalid(
                f"{link.where}.bond_links[{index}] {quote(port_id)} is not the id of a NIC link; "
                "list the ids of the bond's NIC links"
            )
        ports.append(port.name)
    if not ports:
        raise ImageBuildInvalid(f"{link.where}.bond_links is empty; list the bond's NIC links")
    options = []
    for key, value in entry.items():
        # cluster-api-provider-metal3 writes bond_xmit_hash_policy: "" when it is not set.
        if key in ("bond_mode", "bond_links") or value in (None, ""):
            continue
        if key.startswith("bond_"):
            option = key.removeprefix("bond_")
            options.append(bond_option(option, value, field_name=f"{link.where}.{key}"))
    return Bond(mode=mode, ports=tuple(ports), options=tuple(sorted(options)))


def _read_network(
    item: object, index: int, links: dict[str, _Link], routes: list[Route]
) -> tuple[list[IPAddress], list[str]]:
    entry = expect_mapping(item, f"networks[{index}]")
    where = f"networks[{index}] (id {quote(entry.get('id'))})"
    _check_keys(entry, f"networks[{index}]", allowed=_NETWORK_KEYS)
    link = links.get(entry["link"]) if isinstance(entry.get("link"), str) else None
    if link is None:
        raise ImageBuildInvalid(
            f"{where}.link {quote(entry.get('link'))} is not a link id; name one of the links"
        )

    kind = entry.get("type")
    version = _apply_network_type(kind, entry, link, where)
    for route_index, route in enumerate(expect_list(entry.get("routes"), f"{where}.routes")):
        routes.append(_read_route(route, f"{where}.routes[{route_index}]", link.name, version))

    servers = _read_services(entry.get("services"), f"{where}.services")
    for route_index, route in enumerate(expect_list(entry.get("routes"), f"{where}.routes")):
        servers += _read_services(route.get("services"), f"{where}.routes[{route_index}].services")
    for server_index, server in enumerate(
        expect_list(entry.get("dns_nameservers"), f"{where}.dns_nameservers")
    ):
        servers.append(expect_ip_address(server, f"{where}.dns_nameservers[{server_index}]"))
    search = [
        check_search_domain(domain, field_name=f"{where}.dns_search[{domain_index}]")
        for domain_index, domain in enumerate(
            expect_list(entry.get("dns_search"), f"{where}.dns_search")
        )
    ]
    return servers, search


def _apply_network_type(kind: object, entry: dict, link: _Link, where: str) -> int:
    # NOTE: an ip_address on a dynamic type is ignored, as cloud-init ignores it. Nova writes
    # the address that DHCP or router advertisements will assign, so it is not set statically.
    if kind == "ipv4":
        link.ipv4["enabled"] = True
        link.addresses4.append(_static_address(entry, where, version=4))
        return 4
    if kind == "ipv4_dhcp":
        link.ipv4.update(enabled=True, dhcp=True)
        return 4
    if kind == "ipv6":
        link.ipv6["enabled"] = True
        link.addresses6.append(_static_address(entry, where, version=6))
        return 6
    if kind == "ipv6_slaac":
        link.ipv6.update(enabled=True, autoconf=True)
        return 6
    if kind == "ipv6_dhcpv6-stateless":
        link.ipv6.update(enabled=True, dhcp=True, autoconf=True)
        return 6
    # "ipv6_dhcp" is the older name of stateful DHCPv6; cluster-api-provider-metal3 writes it.
    if kind in ("ipv6_dhcpv6-stateful", "ipv6_dhcp"):
        link.ipv6.update(enabled=True, dhcp=True)
        return 6
    raise ImageBuildInvalid(
        f"{where}.type {quote(kind)} is not a network type; use ipv4, ipv6, ipv4_dhcp, ipv6_dhcp, "
        "ipv6_slaac, ipv6_dhcpv6-stateless or ipv6_dhcpv6-stateful"
    )


def _static_address(entry: dict, where: str, *, version: int) -> IPInterface:
    value = entry.get("ip_address")
    if not isinstance(value, str) or "%" in value:
        raise ImageBuildInvalid(f"{where}.ip_address {quote(value)} is not an IP address")
    address_text, _, cidr_prefix = value.partition("/")
    address = expect_ip_address(address_text, f"{where}.ip_address", version=version)
    prefix = None
    if cidr_prefix:
        prefix = expect_integer(
            cidr_prefix, f"{where}.ip_address prefix", low=0, high=address.max_prefixlen
        )
    if entry.get("netmask") not in (None, ""):
        mask_prefix = _prefix(entry["netmask"], f"{where}.netmask", version=version)
        if prefix is not None and prefix != mask_prefix:
            raise ImageBuildInvalid(
                f"{where}: the prefix of ip_address ({prefix}) and netmask ({mask_prefix}) "
                "differ; keep one"
            )
        prefix = mask_prefix
    if prefix is None:
        raise ImageBuildInvalid(
            f"{where}: address {quote(value)} has no prefix; add netmask or write ip_address "
            "as ADDRESS/PREFIX"
        )
    return ipaddress.ip_interface(f"{address}/{prefix}")


def _read_route(item: object, where: str, interface: str, version: int) -> Route:
    entry = expect_mapping(item, where)
    _check_keys(entry, where, allowed=_ROUTE_KEYS)
    network = expect_ip_address(entry.get("network"), f"{where}.network", version=version)
    prefix = _prefix(entry.get("netmask"), f"{where}.netmask", version=version)
    try:
        destination = ipaddress.ip_network(f"{network}/{prefix}")
    except ValueError:
        raise ImageBuildInvalid(
            f"{where}: network {quote(entry.get('network'))} has host bits set for netmask "
            f"{quote(entry.get('netmask'))}; use the network address"
        ) from None
    gateway = None
    # An empty gateway means an on-link route (cluster-api-provider-metal3 writes "").
    if entry.get("gateway") not in (None, ""):
        gateway = expect_ip_address(entry["gateway"], f"{where}.gateway", version=version)
    metric = None
    if entry.get("metric") is not None:
        metric = expect_integer(entry["metric"], f"{where}.metric", low=0, high=2**32 - 1)
    return Route(destination=destination, interface=interface, gateway=gateway, metric=metric)


def _read_services(value: object, where: str) -> list[IPAddress]:
    servers = []
    for index, item in enumerate(expect_list(value, where)):
        entry = expect_mapping(item, f"{where}[{index}]")
        _check_keys(entry, f"{where}[{index}]", allowed={"type", "address"})
        if entry.get("type") != "dns":
            raise UnsupportedField(
                f"{where}[{index}].type {quote(entry.get('type'))} is not supported; only dns "
                "services can be configured, so remove it"
            )
        servers.append(expect_ip_address(entry.get("address"), f"{where}[{index}].address"))
    return servers


def _prefix(value: object, where: str, *, version: int) -> int:
    """Return the prefix length of a netmask written as a mask, a number or a digit string."""
    max_prefix = 32 if version == 4 else 128
    if isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        return expect_integer(value, where, low=0, high=max_prefix)
    mask = expect_ip_address(value, where, version=version)
    bits = int(mask)
    ones = bin(bits).count("1")
    # A netmask is a run of ones followed by zeros, for example 255.255.255.0.
    if bits != ((1 << max_prefix) - 1) ^ ((1 << (max_prefix - ones)) - 1):
        raise ImageBuildInvalid(f"{where} {quote(value)} is not a contiguous netmask")
    return ones


def _check_keys(entry: dict, path: str, *, allowed: set[str] | frozenset[str]) -> None:
    reject_unknown_keys(entry, path, allowed=allowed | _IDENTITY_KEYS)
