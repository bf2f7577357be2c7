"""Shared parts of the profiles: the model fields a profile may express, value checks, templates.

Every profile lists the fields it can express in ``supported_fields``; ``check_supported`` raises
``UnsupportedField`` naming the first field a config uses outside that list. ``check_values``
rejects values that could break out of their line or file, even in a config that never went
through ``builder.model.validate``. Templates only format: the profiles choose files and paths.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import jinja2

from builder.errors import ImageBuildInvalid, UnsupportedField
from builder.model import Interface, IPConfig, NetworkConfig, Route, validate
from builder.rendering import Rendering

# Field names, as the error messages print them, with the change that avoids each one.
MATCH_BY_MAC = "NIC selection by MAC address"
MATCH_BY_NAME = "NIC selection by interface name"
CLONED_MAC = "cloned MAC addresses"
MTU = "MTU"
BONDS = "bonds"
BOND_OPTIONS = "bond options"
VLANS = "VLANs"
IPV4_STATIC = "static IPv4 addresses"
IPV6_STATIC = "static IPv6 addresses"
SEVERAL_ADDRESSES = "several addresses of one family per interface"
IPV4_DHCP = "IPv4 DHCP"
IPV6_DHCP = "IPv6 DHCP"
IPV6_AUTOCONF = "IPv6 autoconf"
DHCP_WITH_STATIC = "DHCP together with static addresses of the same family"
ROUTES = "static routes"
ROUTE_METRICS = "route metrics"
ONLINK_ROUTES = "routes without a gateway"
DNS_SERVERS = "DNS servers"
DNS_SEARCH = "DNS search domains"

REMEDIES = {
    MATCH_BY_MAC: "select the NIC by name",
    MATCH_BY_NAME: "select the NIC by MAC address",
    CLONED_MAC: "remove the MAC address or select the NIC by it (identifier: mac-address)",
    MTU: "remove the MTU",
    BONDS: "remove the bond",
    BOND_OPTIONS: "remove the bond option",
    VLANS: "remove or rename the VLAN",
    IPV4_STATIC: "remove the address",
    IPV6_STATIC: "remove the address",
    SEVERAL_ADDRESSES: "keep one address of the family",
    IPV4_DHCP: "disable DHCP",
    IPV6_DHCP: "disable DHCP",
    IPV6_AUTOCONF: "disable autoconf",
    DHCP_WITH_STATIC: "remove DHCP or the static addresses",
    ROUTES: "remove the route",
    ROUTE_METRICS: "remove the metric",
    ONLINK_ROUTES: "remove the route or give it a gateway",
    DNS_SERVERS: "remove the DNS servers",
    DNS_SEARCH: "remove the search domains",
}
ALL_FIELDS = frozenset(REMEDIES)

IMAGE_FORMATS = ("iso", "initrd")

# Control characters end a line in every format we write.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters allowed in a file name built from an interface name. The kernel allows more, but
# '\', '[', ']', '=', ';', '#' and spaces have a meaning in keyfiles, units or shell globs.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.@+-]+$")
# Bond option names as the bonding driver spells them in sysfs.
_BOND_OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_BOND_OPTION_VALUE = re.compile(r"^[A-Za-z0-9_.:+,/-]+$")

_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ppimage:networkmanager-connection")


@dataclass(frozen=True)
class Profile:
    """A way to hand the network configuration to the agent inside a base image."""

    name: str
    # Fields of the model this profile can express; see the constants above.
    supported_fields: frozenset[str]
    render: Callable[..., Rendering]
    summary: str


def connection_uuid(name: str) -> str:
    """Return the deterministic UUID of the connection profile of interface ``name``."""
    return str(uuid.uuid5(_UUID_NAMESPACE, name))


def unsupported(profile: str, field: str, detail: str) -> UnsupportedField:
    """Build the error for ``field``, used as ``detail`` describes, that ``profile`` lacks."""
    return UnsupportedField(
        f"profile {profile} cannot express {field} ({detail}); choose another profile in the "
        f"base image catalog or {REMEDIES[field]}"
    )


def used_fields(config: NetworkConfig) -> Iterator[tuple[str, str]]:
    """Yield (field, detail) for each field ``config`` uses, in a fixed order."""
    for interface in config.interfaces:
        yield from _interface_fields(interface)
    for route in config.routes:
        detail = describe_route(route)
        if route.destination.prefixlen != 0:
            yield ROUTES, detail
        if route.metric is not None:
            yield ROUTE_METRICS, detail
        if route.gateway is None:
            yield ONLINK_ROUTES, detail
    if config.dns_servers:
        yield DNS_SERVERS, ", ".join(str(server) for server in config.dns_servers)
    if config.dns_search:
        yield DNS_SEARCH, ", ".join(config.dns_search)


def _interface_fields(interface: Interface) -> Iterator[tuple[str, str]]:
    where = f"interface {interface.name}"
    if interface.type == "ethernet":
        if interface.match_by_mac:
            yield MATCH_BY_MAC, f"{where} by {interface.mac_address}"
        else:
            yield MATCH_BY_NAME, f"{where} by name {interface.device_name}"
    if interface.mac_address is not None and not interface.match_by_mac:
        yield CLONED_MAC, f"{where} gets {interface.mac_address}"
    if interface.mtu is not None:
        yield MTU, f"{where} mtu {interface.mtu}"
    if interface.bond is not None:
        yield BONDS, f"{where} mode {interface.bond.mode}"
        for option, value in interface.bond.options:
            yield BOND_OPTIONS, f"{where} {option}={value}"
    if interface.vlan is not None:
        yield VLANS, f"{where} id {interface.vlan.id} on {interface.vlan.base}"
    for family, ip in (("IPv4", interface.ipv4), ("IPv6", interface.ipv6)):
        if not ip.enabled:
            continue
        if ip.addresses:
            first = f"{where} {ip.addresses[0]}"
            yield (IPV4_STATIC if family == "IPv4" else IPV6_STATIC), first
        if len(ip.addresses) > 1:
            listed = ", ".join(str(address) for address in ip.addresses)
            yield SEVERAL_ADDRESSES, f"{where} {listed}"
        if ip.dhcp:
            yield (IPV4_DHCP if family == "IPv4" else IPV6_DHCP), where
        if ip.autoconf:
            yield IPV6_AUTOCONF, where
        if (ip.dhcp or ip.autoconf) and ip.addresses:
            yield DHCP_WITH_STATIC, f"{where} {family}"


def describe_route(route: Route) -> str:
    """Return a route as error messages print it."""
    text = f"route to {route.destination}"
    if route.gateway is not None:
        text += f" via {route.gateway}"
    if route.metric is not None:
        text += f" metric {route.metric}"
    return text


def check_supported(profile: Profile, config: NetworkConfig) -> None:
    """Raise UnsupportedField for the first field of ``config`` that ``profile`` cannot express."""
    for field, detail in used_fields(config):
        if field not in profile.supported_fields:
            raise unsupported(profile.name, field, detail)


def check_line_value(value: object, *, field_name: str) -> str:
    """Return ``value`` when it is a string that cannot end its line, else raise."""
    if not isinstance(value, str) or _CONTROL.search(value):
        raise ImageBuildInvalid(
            f"{field_name}: {value!r} is not a string or contains a newline or another control "
            "character; remove it"
        )
    return value


def check_file_name(name: str, *, field_name: str) -> str:
    """Return ``name`` when it is safe as a file name stem, else raise ImageBuildInvalid."""
    check_line_value(name, field_name=field_name)
    if not _FILE_NAME.match(name) or name.startswith("."):
        raise ImageBuildInvalid(
            f"{field_name}: {name!r} cannot name a configuration file; use letters, digits, "
            "'_', '.', '@', '+' and '-' only, not starting with '.'"
        )
    return name


def check_values(config: NetworkConfig) -> NetworkConfig:
    """Check ``config`` with ``validate`` and reject values that could break a rendered file.

    ``validate`` covers names, MAC addresses, references and search domains. This adds the
    address families, bond options, route values and the characters that a file format gives
    a meaning to. Raises ImageBuildInvalid naming the value.
    """
    validate(config)
    for interface in config.interfaces:
        where = f"interface {interface.name!r}"
        check_file_name(interface.name, field_name=where)
        if interface.device_name is not None:
            check_file_name(interface.device_name, field_name=where)
        if interface.type != "ethernet" and interface.match_by_mac:
            raise ImageBuildInvalid(
                f"{where}: a {interface.type} is a virtual device and cannot be selected by "
                "MAC address; select it by name"
            )
        if interface.type != "ethernet" and interface.device_name is None:
            raise ImageBuildInvalid(f"{where}: a {interface.type} needs a device name; set one")
        _check_family(interface.ipv4, version=4, where=where)
        _check_family(interface.ipv6, version=6, where=where)
        if interface.bond is not None:
            for option, value in interface.bond.options:
                if not _BOND_OPTION_NAME.match(str(option)):
                    raise ImageBuildInvalid(
                        f"{where}: bond option name {option!r} is invalid; use the bonding "
                        "driver's name such as miimon or xmit_hash_policy"
                    )
                if not isinstance(value, str) or not _BOND_OPTION_VALUE.match(value):
                    raise ImageBuildInvalid(
                        f"{where}: bond option {option}={value!r} contains characters no "
                        "bonding option uses; fix the value"
                    )
    for route in config.routes:
        _check_route(route)
        interface = config.interface(route.interface)
        ip = interface.ipv4 if route.destination.version == 4 else interface.ipv6
        if not ip.enabled:
            raise ImageBuildInvalid(
                f"routes: {describe_route(route)} goes through interface {interface.name!r}, "
                f"which has IPv{route.destination.version} disabled; enable it or move the route"
            )
    for server in config.dns_servers:
        if not isinstance(server, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise ImageBuildInvalid(f"dns servers: {server!r} is not an IP address; fix it")
    for domain in config.dns_search:
        check_line_value(domain, field_name="dns search")
    return config


def _check_family(ip: IPConfig, *, version: int, where: str) -> None:
    for address in ip.addresses:
        is_interface = isinstance(address, ipaddress.IPv4Interface | ipaddress.IPv6Interface)
        if not is_interface or address.version != version:
            raise ImageBuildInvalid(
                f"{where}: {address!r} is not an IPv{version} address with a prefix length; "
                f"move it to the IPv{version} settings or fix it"
            )
    if ip.autoconf and version == 4:
        raise ImageBuildInvalid(f"{where}: IPv4 has no autoconf; use DHCP or static addresses")
    if ip.enabled and not (ip.dhcp or ip.autoconf or ip.addresses):
        raise ImageBuildInvalid(
            f"{where}: IPv{version} is enabled with neither DHCP, autoconf nor an address; "
            f"add one or disable IPv{version}"
        )


def _check_route(route: Route) -> None:
    if not isinstance(route.destination, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise ImageBuildInvalid(f"routes: destination {route.destination!r} is not a network")
    gateway = route.gateway
    if gateway is not None and (
        not isinstance(gateway, ipaddress.IPv4Address | ipaddress.IPv6Address)
        or gateway.version != route.destination.version
    ):
        raise ImageBuildInvalid(
            f"routes: gateway {gateway!r} of the route to {route.destination} is not an "
            f"IPv{route.destination.version} address; fix the gateway"
        )
    metric = route.metric
    if metric is not None and (
        isinstance(metric, bool) or not isinstance(metric, int) or not 0 <= metric < 2**32
    ):
        raise ImageBuildInvalid(
            f"routes: metric {metric!r} of the route to {route.destination} is not an integer "
            "in 0..4294967295; fix the metric"
        )


def is_default(route: Route) -> bool:
    """Return whether ``route`` is a default route (prefix length 0)."""
    return route.destination.prefixlen == 0


def bond_of(config: NetworkConfig, name: str) -> Interface | None:
    """Return the bond that has interface ``name`` as a port, or None."""
    for interface in config.interfaces:
        if interface.bond is not None and name in interface.bond.ports:
            return interface
    return None


def check_ports_without_ip(config: NetworkConfig, *, profile: str) -> None:
    """Raise ImageBuildInvalid when a bond port has IP settings: the bond carries them."""
    for interface in config.interfaces:
        bond = bond_of(config, interface.name)
        if bond is not None and (interface.ipv4.enabled or interface.ipv6.enabled):
            raise ImageBuildInvalid(
                f"interface {interface.name!r} is a port of bond {bond.name!r} but has IP "
                f"settings, which profile {profile} cannot apply to a port; move them to the bond"
            )


def dns_carrier(config: NetworkConfig, version: int) -> Interface | None:
    """Choose the interface whose settings carry DNS for IP ``version``.

    The interface with a default route of that family comes first, then the first interface
    (in model order) with that family enabled; None when no interface has the family enabled.
    """
    candidates = [
        interface
        for interface in config.interfaces
        if (interface.ipv4 if version == 4 else interface.ipv6).enabled
    ]
    for route in config.routes:
        if is_default(route) and route.destination.version == version:
            for interface in candidates:
                if interface.name == route.interface:
                    return interface
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class DnsPlacement:
    """DNS servers and search domains placed on one interface's IPv4 or IPv6 settings."""

    servers: dict[tuple[str, int], list[str]]
    search: dict[tuple[str, int], list[str]]


def place_dns(config: NetworkConfig, *, profile: str) -> DnsPlacement:
    """Put each DNS server, and the search list, on the interface ``dns_carrier`` chooses."""
    servers: dict[tuple[str, int], list[str]] = {}
    for server in config.dns_servers:
        carrier = dns_carrier(config, server.version)
        if carrier is None:
            raise ImageBuildInvalid(
                f"dns server {server}: no interface has IPv{server.version} enabled, so "
                f"profile {profile} has nowhere to put it; enable IPv{server.version} or remove it"
            )
        servers.setdefault((carrier.name, server.version), []).append(str(server))
    search: dict[tuple[str, int], list[str]] = {}
    if config.dns_search:
        for version in (4, 6):
            carrier = dns_carrier(config, version)
            if carrier is not None:
                search[(carrier.name, version)] = list(config.dns_search)
                break
        else:
            raise ImageBuildInvalid(
                f"dns search {', '.join(config.dns_search)}: no interface has IP enabled; "
                "enable IPv4 or IPv6 on one interface or remove the search domains"
            )
    return DnsPlacement(servers=servers, search=search)


@cache
def template_environment() -> jinja2.Environment:
    """Return the Jinja2 environment that loads the repository's ``templates/`` directory."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_directory())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def templates_directory() -> Path:
    """Find ``templates/`` next to ``builder/`` (a checkout or an editable install) or installed."""
    beside = Path(__file__).resolve().parents[2] / "templates"
    if (beside / "nm_keyfile.nmconnection.j2").is_file():
        return beside
    return Path(str(resources.files("templates")))


def render_template(name: str, **context: object) -> bytes:
    """Render template ``name`` with ``context`` into UTF-8 bytes."""
    return template_environment().get_template(name).render(**context).encode()
