"""The glean profile: a config drive (OpenStack network_data.json and meta_data.json).

Where the files go, read from glean 1.25.1: ``glean-early.sh`` only mounts a block device
labelled ``config-2`` (or ``CONFIG-2``) on /mnt/config when one exists, for SSH keys and the
hostname. Networking is done per interface by ``glean@IFACE.service`` (or ``glean-nm@``),
which ``glean-udev.rules`` starts and which runs ``python-glean --interface IFACE``. glean's
``cmd.py`` reads ``/mnt/config/openstack/latest/{meta_data,network_data}.json`` below its
``--root`` (default /) and does not check that /mnt/config is a mount. So files placed at
/mnt/config/openstack/latest/ in the payload are read without a ``config-2`` label, in both
formats, by a ramdisk whose running system is its initramfs. A real config drive attached to
the host is mounted over /mnt/config and hides them.
NOTE: that diskimage-builder's ramdisk init keeps extra initramfs files in the running system
was not checked by booting one; only glean's scripts were read.

network_data.json is regenerated from the model whatever the Secret's format was. Link ids
are the model's interface names, except that a bond's id is its device name, because glean
names a bond after its link id and a VLAN on it ``LINKID.VLANID``.
"""

from __future__ import annotations

import json
import uuid

from builder.model import Interface, IPConfig, IPInterface, NetworkConfig, Route
from builder.profiles import base
from builder.rendering import PayloadFile, Rendering

NAME = "glean"
CONFIG_DRIVE = "/mnt/config/openstack/latest"

SUPPORTED_FIELDS = base.ALL_FIELDS - {
    base.MATCH_BY_NAME,
    base.CLONED_MAC,
    base.DHCP_WITH_STATIC,
    base.ROUTE_METRICS,
    base.ONLINK_ROUTES,
    base.DNS_SEARCH,
}
# The bond options OpenStack network_data defines, as the bonding driver names them.
BOND_OPTIONS = ("lacp_rate", "miimon", "xmit_hash_policy")

_META_DATA_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ppimage:config-drive")


def render(
    config: NetworkConfig | None, *, image_format: str, base_ignition: dict | None = None
) -> Rendering:
    """Render the config drive files; ``image_format`` and ``base_ignition`` are not used."""
    del image_format, base_ignition
    if config is None:
        return Rendering(profile=NAME)
    network_data = build_network_data(config)
    network_json = json.dumps(network_data, indent=2, sort_keys=True) + "\n"
    # cloud-init and glean take the instance id from "uuid"; derive one from the content.
    meta_data = {"uuid": str(uuid.uuid5(_META_DATA_NAMESPACE, network_json))}
    meta_json = json.dumps(meta_data, indent=2, sort_keys=True) + "\n"
    return Rendering(
        profile=NAME,
        files=(
            PayloadFile(path=f"{CONFIG_DRIVE}/meta_data.json", data=meta_json.encode()),
            PayloadFile(path=f"{CONFIG_DRIVE}/network_data.json", data=network_json.encode()),
        ),
    )


def build_network_data(config: NetworkConfig) -> dict:
    """Return the OpenStack network_data document that describes ``config``."""
    base.check_ports_without_ip(config, profile=NAME)
    for interface in config.interfaces:
        _check_interface(config, interface)
    links = [_link(config, interface) for interface in config.interfaces]
    networks = []
    for interface in config.interfaces:
        networks.extend(_networks(config, interface))
    services = [{"type": "dns", "address": str(server)} for server in config.dns_servers]
    return {"links": links, "networks": networks, "services": services}


def link_id(interface: Interface) -> str:
    """Return the network_data link id of ``interface``."""
    return interface.device_name if interface.type == "bond" else interface.name


def _check_interface(config: NetworkConfig, interface: Interface) -> None:
    where = f"interface {interface.name}"
    if interface.bond is not None:
        for option, value in interface.bond.options:
            if option not in BOND_OPTIONS:
                raise base.unsupported(NAME, base.BOND_OPTIONS, f"{where} {option}={value}")
    if interface.vlan is not None:
        parent = config.interface(interface.vlan.base)
        # On a NIC, glean names the VLAN after the name the NIC has at boot, so only a VLAN
        # on a bond has a name known now.
        expected = f"{parent.device_name}.{interface.vlan.id}"
        if parent.type == "bond" and interface.device_name != expected:
            raise base.unsupported(
                NAME,
                base.VLANS,
                f"{where} is named {interface.device_name}, glean names it {expected}",
            )


def _link(config: NetworkConfig, interface: Interface) -> dict:
    link: dict = {"id": link_id(interface)}
    if interface.mtu is not None:
        link["mtu"] = interface.mtu
    if interface.type == "ethernet":
        link["type"] = "phy"
        link["ethernet_mac_address"] = interface.mac_address
    elif interface.type == "bond":
        ports = [config.interface(port) for port in interface.bond.ports]
        link["type"] = "bond"
        link["bond_mode"] = interface.bond.mode
        link["bond_links"] = [port.name for port in ports]
        # glean requires the bond's MAC address; the bond takes its first port's by default.
        link["ethernet_mac_address"] = interface.mac_address or ports[0].mac_address
        for option, value in interface.bond.options:
            link[f"bond_{option}"] = int(value) if value.isdigit() else value
    else:
        parent = config.interface(interface.vlan.base)
        link["type"] = "vlan"
        link["vlan_link"] = link_id(parent)
        link["vlan_id"] = interface.vlan.id
        if interface.mac_address is not None:
            link["vlan_mac_address"] = interface.mac_address
    return link


def _networks(config: NetworkConfig, interface: Interface) -> list[dict]:
    networks: list[dict] = []
    link = link_id(interface)
    for version, ip in ((4, interface.ipv4), (6, interface.ipv6)):
        if not ip.enabled:
            continue
        routes = [
            route
            for route in config.routes
            if route.interface == interface.name and route.destination.version == version
        ]
        prefix = f"{interface.name}-ipv{version}"
        if not ip.addresses:
            if routes:
                raise base.unsupported(
                    NAME,
                    base.ROUTES,
                    f"{base.describe_route(routes[0])} on interface {interface.name}, which has "
                    f"no static IPv{version} address to attach it to",
                )
            networks.append({"id": prefix, "link": link, "type": _dynamic_type(version, ip)})
            continue
        for index, address in enumerate(ip.addresses):
            network = {
                "id": f"{prefix}-{index}",
                "link": link,
                "type": f"ipv{version}",
                "ip_address": str(address.ip),
                "netmask": str(address.netmask),
                "routes": [
                    _route(route)
                    for route in routes
                    if _attach_route(route, ip.addresses) == index
                ],
            }
            networks.append(network)
    return networks


def _dynamic_type(version: int, ip: IPConfig) -> str:
    if version == 4:
        return "ipv4_dhcp"
    if ip.dhcp and ip.autoconf:
        return "ipv6_dhcpv6-stateless"
    if ip.dhcp:
        return "ipv6_dhcpv6-stateful"
    return "ipv6_slaac"


def _attach_route(route: Route, addresses: tuple[IPInterface, ...]) -> int:
    """Return the index of the address whose network contains the gateway (0 when none does)."""
    for index, address in enumerate(addresses):
        if route.gateway is not None and route.gateway in address.network:
            return index
    return 0


def _route(route: Route) -> dict:
    return {
        "network": str(route.destination.network_address),
        "netmask": str(route.destination.netmask),
        "gateway": str(route.gateway),
    }
