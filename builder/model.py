"""The normalized network model that every Secret format parses into and every profile renders.

Parsers (``builder.nmstate``, ``builder.network_data``) build these frozen values and validate
them with ``validate``; profiles only read them. Anything a parser cannot map onto this model is
an ``UnsupportedField`` error, never silently dropped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from builder.errors import ImageBuildInvalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

InterfaceType = Literal["ethernet", "bond", "vlan"]

# Bond modes as the Linux bonding driver names them.
BOND_MODES = (
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
)

MAC_ADDRESS = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class IPConfig:
    """One address family of one interface."""

    enabled: bool = False
    dhcp: bool = False
    # IPv6 router advertisements (SLAAC); always False for IPv4.
    autoconf: bool = False
    addresses: tuple[IPInterface, ...] = ()


@dataclass(frozen=True)
class Bond:
    """Bond settings: the port interface names, the mode and driver options such as miimon."""

    mode: str
    ports: tuple[str, ...]
    # Sorted (option, value) pairs as the bonding driver spells them, for example
    # ("miimon", "100") or ("xmit_hash_policy", "layer3+4").
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Vlan:
    """VLAN settings: the name of the base interface (another ``Interface.name``) and the id."""

    base: str
    id: int


@dataclass(frozen=True)
class Interface:
    """One interface to configure.

    ``name`` identifies the interface inside the model (bond ports and VLAN bases refer to it)
    and names its connection profile. ``device_name`` is the kernel interface name when the
    interface is selected by name or created (bonds, VLANs), and None when only the MAC address
    selects the NIC. ``mac_address`` is lower-case; ``match_by_mac`` is True when it selects the
    NIC (True) or is applied to it as a cloned MAC address (False), as nmstate does without
    ``identifier: mac-address``.
    """

    name: str
    type: InterfaceType
    device_name: str | None
    mac_address: str | None = None
    match_by_mac: bool = False
    mtu: int | None = None
    ipv4: IPConfig = field(default_factory=IPConfig)
    ipv6: IPConfig = field(default_factory=IPConfig)
    bond: Bond | None = None
    vlan: Vlan | None = None


@dataclass(frozen=True)
class Route:
    """A static route. ``interface`` is an ``Interface.name``; ``gateway`` None means on-link."""

    destination: IPNetwork
    interface: str
    gateway: IPAddress | None = None
    metric: int | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """The whole network configuration of one host, parsed from one Secret key."""

    # The Secret key it came from: "nmstate", "networkData" or "value".
    source: str
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()

    def interface(self, name: str) -> Interface | None:
        """Return the interface called ``name``, or None when the model has none."""
        for interface in self.interfaces:
            if interface.name == name:
                return interface
        return None


# Characters that could break out of a line, a quoted value or a path in any rendered file.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_DOMAIN = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def check_interface_name(name: object, *, field_name: str) -> str:
    """Return ``name`` when it is a valid Linux interface name, else raise ImageBuildInvalid.

    The kernel's rule (``dev_valid_name``): not empty, under 16 bytes, not ``.`` or ``..``,
    and no ``/``, ``:`` or whitespace.
    """
    if not isinstance(name, str) or not name:
        raise ImageBuildInvalid(
            f"{field_name}: interface name {name!r} is empty or not a string; "
            "set a name of 1 to 15 bytes"
        )
    problem = None
    if len(name.encode()) >= 16:
        problem = f"is {len(name.encode())} bytes long, the kernel allows at most 15"
    elif name in (".", ".."):
        problem = "is a reserved path name"
    elif re.search(r"[/:\s]", name) or _UNSAFE.search(name):
        problem = "contains '/', ':', whitespace or a control character"
    if problem:
        raise ImageBuildInvalid(
            f"{field_name}: interface name {name!r} {problem}; rename the interface"
        )
    return name


def check_search_domain(domain: object, *, field_name: str) -> str:
    """Return ``domain`` when it is a DNS name fit for a search list, else raise."""
    if not isinstance(domain, str) or not _DOMAIN.match(domain) or len(domain) > 253:
        raise ImageBuildInvalid(
            f"{field_name}: {domain!r} is not a valid DNS search domain; use labels of "
            "letters, digits and hyphens separated by dots, with no spaces or newlines"
        )
    return domain


def check_mac_address(mac: object, *, field_name: str) -> str:
    """Return ``mac`` in lower case when it is a colon-separated Ethernet address, else raise."""
    if isinstance(mac, str) and MAC_ADDRESS.match(mac.lower()):
        return mac.lower()
    raise ImageBuildInvalid(
        f"{field_name}: {mac!r} is not a MAC address; write six hex bytes separated by colons"
    )


def validate(config: NetworkConfig) -> NetworkConfig:
    """Check the references and values inside ``config`` and return it unchanged.

    Raises ImageBuildInvalid naming the first problem found. The checks cover bond ports and
    VLAN bases that are not interfaces of the model (or form loops), routes through unknown
    interfaces, duplicate names, unsafe device names or search domains, and MTUs or VLAN ids
    out of range.
    """
    names = [interface.name for interface in config.interfaces]
    for name in names:
        if names.count(name) > 1:
            raise ImageBuildInvalid(f"interfaces: the name {name!r} is used twice; rename one")
    bond_of: dict[str, str] = {}
    for interface in config.interfaces:
        where = f"interface {interface.name!r}"
        check_interface_name(interface.name, field_name=where)
        if interface.device_name is not None:
            check_interface_name(interface.device_name, field_name=where)
        if interface.mac_address is not None:
            check_mac_address(interface.mac_address, field_name=f"{where} mac-address")
        if interface.match_by_mac and interface.mac_address is None:
            raise ImageBuildInvalid(f"{where}: selected by MAC address but has none; add it")
        if interface.mtu is not None and not 68 <= interface.mtu <= 65535:
            raise ImageBuildInvalid(f"{where}: mtu {interface.mtu} is outside 68..65535")
        if interface.bond is not None:
            if interface.bond.mode not in BOND_MODES:
                raise ImageBuildInvalid(
                    f"{where}: bond mode {interface.bond.mode!r} is unknown; use one of "
                    + ", ".join(BOND_MODES)
                )
            for port in interface.bond.ports:
                if port not in names:
                    raise ImageBuildInvalid(
                        f"{where}: bond port {port!r} is not an interface; define it"
                    )
                if port == interface.name:
                    raise ImageBuildInvalid(f"{where}: a bond cannot be its own port; remove it")
                if config.interface(port).type == "bond":
                    raise ImageBuildInvalid(
                        f"{where}: bond port {port!r} is itself a bond, which Linux bonding "
                        "does not support; use Ethernet interfaces as ports"
                    )
                if port in bond_of:
                    raise ImageBuildInvalid(
                        f"{where}: port {port!r} is already a port of bond {bond_of[port]!r}; "
                        "an interface can be in one bond only"
                    )
                bond_of[port] = interface.name
        if interface.vlan is not None:
            if interface.vlan.base == interface.name:
                raise ImageBuildInvalid(f"{where}: a VLAN cannot be its own base interface")
            if interface.vlan.base not in names:
                raise ImageBuildInvalid(
                    f"{where}: VLAN base interface {interface.vlan.base!r} does not exist; "
                    "define it or fix base-iface"
                )
            if not 0 <= interface.vlan.id <= 4094:
                raise ImageBuildInvalid(f"{where}: VLAN id {interface.vlan.id} is outside 0..4094")
    for route in config.routes:
        if route.interface not in names:
            raise ImageBuildInvalid(
                f"routes: next-hop interface {route.interface!r} of route to "
                f"{route.destination} is not an interface; define it or fix the route"
            )
    for domain in config.dns_search:
        check_search_domain(domain, field_name="dns search")
    return config
