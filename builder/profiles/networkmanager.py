"""The networkmanager profile: one NetworkManager keyfile per interface of the model.

Keyfiles go to /etc/NetworkManager/system-connections/NAME.nmconnection with mode 0600, because
NetworkManager ignores a keyfile with group or other permission bits. Keys follow the keyfile
format read by NetworkManager 1.42 (ports use ``master``/``slave-type``; the ``controller`` and
``port-type`` aliases came later). Connection UUIDs are uuid5 of the interface name, so the
output is the same for the same model. The agents that read these keyfiles run from the
initramfs itself, so the initrd format needs no kernel arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.model import Interface, IPConfig, NetworkConfig, Route
from builder.profiles import base
from builder.rendering import PayloadFile, Rendering

NAME = "networkmanager"
SYSTEM_CONNECTIONS = "/etc/NetworkManager/system-connections"
KEYFILE_MODE = 0o600

_NM_TYPES = {"ethernet": "ethernet", "bond": "bond", "vlan": "vlan"}


@dataclass(frozen=True)
class Keyfile:
    """One rendered keyfile: its file name inside a connections directory and its contents."""

    file_name: str
    data: bytes


def render(
    config: NetworkConfig | None, *, image_format: str, base_ignition: dict | None = None
) -> Rendering:
    """Render one keyfile per interface of ``config``; ``base_ignition`` is not used."""
    del image_format, base_ignition
    if config is None:
        return Rendering(profile=NAME)
    files = tuple(
        PayloadFile(
            path=f"{SYSTEM_CONNECTIONS}/{keyfile.file_name}", data=keyfile.data, mode=KEYFILE_MODE
        )
        for keyfile in render_keyfiles(config, profile=NAME)
    )
    return Rendering(profile=NAME, files=files)


def render_keyfiles(config: NetworkConfig, *, profile: str) -> list[Keyfile]:
    """Render the keyfiles of ``config``, sorted by file name; ``profile`` names the caller."""
    base.check_ports_without_ip(config, profile=profile)
    dns = base.place_dns(config, profile=profile)
    keyfiles = []
    for interface in config.interfaces:
        context = {
            "selection": _selection_comment(interface),
            "id": interface.name,
            "uuid": base.connection_uuid(interface.name),
            "type": _NM_TYPES[interface.type],
            "interface_name": _interface_name(interface),
            "master": _master(config, interface),
            "bond_options": _bond_options(interface),
            "vlan": _vlan(config, interface),
            "ethernet": _ethernet(interface),
            "ip_sections": _ip_sections(config, interface, dns),
        }
        data = base.render_template("nm_keyfile.nmconnection.j2", **context)
        keyfiles.append(Keyfile(file_name=f"{interface.name}.nmconnection", data=data))
    return sorted(keyfiles, key=lambda keyfile: keyfile.file_name)


def _selection_comment(interface: Interface) -> str:
    if interface.type == "bond":
        return f"Creates the bond {interface.device_name}."
    if interface.type == "vlan":
        return f"Creates the VLAN {interface.device_name} on {interface.vlan.base}."
    if interface.match_by_mac:
        return f"Selects the NIC by MAC address {interface.mac_address} ([ethernet] mac-address)."
    text = f"Selects the NIC by interface name {interface.device_name}"
    if interface.mac_address is not None:
        text += (
            f"; {interface.mac_address} is its cloned MAC address, set on the NIC and not used to"
            " select it"
        )
    return text + "."


def _interface_name(interface: Interface) -> str | None:
    if interface.type == "ethernet" and interface.match_by_mac:
        return None
    return interface.device_name


def _master(config: NetworkConfig, interface: Interface) -> str | None:
    bond = base.bond_of(config, interface.name)
    return None if bond is None else base.connection_uuid(bond.name)


def _bond_options(interface: Interface) -> list[tuple[str, str]]:
    if interface.bond is None:
        return []
    options = dict(interface.bond.options)
    options["mode"] = interface.bond.mode
    return sorted(options.items())


def _vlan(config: NetworkConfig, interface: Interface) -> dict | None:
    if interface.vlan is None:
        return None
    parent = config.interface(interface.vlan.base)
    # A NIC selected only by its MAC address has no stable name, so the parent is its UUID.
    if parent.device_name is None or (parent.type == "ethernet" and parent.match_by_mac):
        parent_reference = base.connection_uuid(parent.name)
    else:
        parent_reference = parent.device_name
    return {"id": interface.vlan.id, "parent": parent_reference}


def _ethernet(interface: Interface) -> list[tuple[str, str]]:
    keys = []
    if interface.mac_address is not None:
        if interface.type == "ethernet" and interface.match_by_mac:
            keys.append(("mac-address", interface.mac_address.upper()))
        else:
            keys.append(("cloned-mac-address", interface.mac_address.upper()))
    if interface.mtu is not None:
        keys.append(("mtu", str(interface.mtu)))
    return keys


def _ip_sections(
    config: NetworkConfig, interface: Interface, dns: base.DnsPlacement
) -> list[dict]:
    # NetworkManager keeps no IP settings on a bond port: the bond carries them.
    if base.bond_of(config, interface.name) is not None:
        return []
    sections = []
    for version, ip in ((4, interface.ipv4), (6, interface.ipv6)):
        other = interface.ipv6 if version == 4 else interface.ipv4
        routes = [
            route
            for route in config.routes
            if route.interface == interface.name and route.destination.version == version
        ]
        sections.append(
            {
                "name": f"ipv{version}",
                "keys": _ip_keys(ip, version=version, other=other, routes=routes),
                "dns": dns.servers.get((interface.name, version), []),
                "dns_search": dns.search.get((interface.name, version), []),
            }
        )
    return sections


def _ip_keys(
    ip: IPConfig, *, version: int, other: IPConfig, routes: list[Route]
) -> list[tuple[str, str]]:
    if not ip.enabled:
        return [("method", "disabled")]
    if ip.dhcp or ip.autoconf:
        # IPv6 "auto" runs SLAAC and starts DHCPv6 when router advertisements ask for it.
        method = "auto" if version == 4 or ip.autoconf else "dhcp"
    else:
        method = "manual"
    keys = [("method", method)]
    for index, address in enumerate(ip.addresses, start=1):
        keys.append((f"address{index}", str(address)))
    for index, route in enumerate(routes, start=1):
        keys.append((f"route{index}", _route_value(route)))
    # With both families enabled, either one may fail and the connection still activates;
    # with one family, its failure fails the connection.
    keys.append(("may-fail", "true" if other.enabled else "false"))
    return keys


def _route_value(route: Route) -> str:
    value = str(route.destination)
    if route.gateway is not None or route.metric is not None:
        unspecified = "0.0.0.0" if route.destination.version == 4 else "::"
        value += f",{route.gateway if route.gateway is not None else unspecified}"
    if route.metric is not None:
        value += f",{route.metric}"
    return value
