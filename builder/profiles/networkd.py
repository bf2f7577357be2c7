"""The networkd profile: systemd-networkd units in /etc/systemd/network (keys of systemd 252).

Each interface gets a .network unit, and bonds and VLANs also get a .netdev unit that creates
them. networkd applies the first .network file, in lexical order, whose [Match] fits a device.
A bond or VLAN carries its port's MAC address, so units that match by name are numbered 10-
and units that match by MAC address 20-, and a bond never picks up its port's unit. Cloned MAC
addresses and MTUs go into [Link] (ethernet) or [NetDev] (bonds, VLANs). The agents that read
these units run from the initramfs itself, so the initrd format needs no kernel arguments.
"""

from __future__ import annotations

from builder.model import Interface, IPConfig, NetworkConfig, Route
from builder.profiles import base
from builder.rendering import PayloadFile, Rendering

NAME = "networkd"
NETWORK_DIRECTORY = "/etc/systemd/network"

# Bonding driver option → (systemd.netdev [Bond] key, unit appended to the driver's value).
BOND_KEYS = {
    "ad_actor_sys_prio": ("AdActorSystemPriority", ""),
    "ad_actor_system": ("AdActorSystem", ""),
    "ad_select": ("AdSelect", ""),
    "ad_user_port_key": ("AdUserPortKey", ""),
    "all_slaves_active": ("AllSlavesActive", ""),
    "arp_all_targets": ("ARPAllTargets", ""),
    "arp_interval": ("ARPIntervalSec", "ms"),
    "arp_ip_target": ("ARPIPTargets", ""),
    "arp_validate": ("ARPValidate", ""),
    "downdelay": ("DownDelaySec", "ms"),
    "fail_over_mac": ("FailOverMACPolicy", ""),
    "lacp_rate": ("LACPTransmitRate", ""),
    "lp_interval": ("LearnPacketIntervalSec", "s"),
    "miimon": ("MIIMonitorSec", "ms"),
    "min_links": ("MinLinks", ""),
    "num_grat_arp": ("GratuitousARP", ""),
    "packets_per_slave": ("PacketsPerSlave", ""),
    "primary_reselect": ("PrimaryReselectPolicy", ""),
    "resend_igmp": ("ResendIGMP", ""),
    "updelay": ("UpDelaySec", "ms"),
    "xmit_hash_policy": ("TransmitHashPolicy", ""),
}
# "primary" names a port; networkd sets it with PrimarySlave= in that port's .network unit.
PRIMARY_OPTION = "primary"


def render(
    config: NetworkConfig | None, *, image_format: str, base_ignition: dict | None = None
) -> Rendering:
    """Render the units of ``config``; ``image_format`` and ``base_ignition`` are not used."""
    del image_format, base_ignition
    if config is None:
        return Rendering(profile=NAME)
    base.check_ports_without_ip(config, profile=NAME)
    dns = base.place_dns(config, profile=NAME)
    files = []
    for interface in config.interfaces:
        prefix = "20" if interface.type == "ethernet" and interface.match_by_mac else "10"
        stem = f"{NETWORK_DIRECTORY}/{prefix}-{interface.name}"
        if interface.type != "ethernet":
            netdev = base.render_template("networkd_unit.j2", **_netdev_context(interface))
            files.append(PayloadFile(path=f"{stem}.netdev", data=netdev))
        context = _network_context(config, interface, dns)
        network = base.render_template("networkd_unit.j2", **context)
        files.append(PayloadFile(path=f"{stem}.network", data=network))
    return Rendering(profile=NAME, files=tuple(sorted(files, key=lambda item: item.path)))


def _netdev_context(interface: Interface) -> dict:
    netdev = [("Name", interface.device_name), ("Kind", interface.type)]
    if interface.mac_address is not None:
        netdev.append(("MACAddress", interface.mac_address))
    if interface.mtu is not None:
        netdev.append(("MTUBytes", str(interface.mtu)))
    sections = [("NetDev", netdev)]
    if interface.bond is not None:
        sections.append(("Bond", _bond_keys(interface)))
    elif interface.vlan is not None:
        sections.append(("VLAN", [("Id", str(interface.vlan.id))]))
    comment = f"Creates the {interface.type} {interface.device_name}."
    return {"comment": comment, "sections": sections}


def _bond_keys(interface: Interface) -> list[tuple[str, str]]:
    keys = [("Mode", interface.bond.mode)]
    for option, value in interface.bond.options:
        if option == PRIMARY_OPTION:
            continue
        if option not in BOND_KEYS:
            raise base.unsupported(
                NAME, base.BOND_OPTIONS, f"interface {interface.name} {option}={value}"
            )
        key, unit = BOND_KEYS[option]
        # The driver separates ARP targets with commas, networkd with spaces.
        keys.append((key, value.replace(",", " ") + unit))
    return keys


def _network_context(config: NetworkConfig, interface: Interface, dns: base.DnsPlacement) -> dict:
    if interface.type == "ethernet" and interface.match_by_mac:
        match = [("MACAddress", interface.mac_address)]
        comment = f"Selects the NIC by MAC address {interface.mac_address}."
    else:
        match = [("Name", interface.device_name)]
        comment = f"Selects {interface.device_name} by interface name."
    link = []
    if interface.type == "ethernet" and interface.mac_address is not None:
        if not interface.match_by_mac:
            link.append(("MACAddress", interface.mac_address))
            comment += f" {interface.mac_address} is set on it as its cloned MAC address."
    if interface.mtu is not None:
        link.append(("MTUBytes", str(interface.mtu)))
    sections = [("Match", match)]
    if link:
        sections.append(("Link", link))
    sections.append(("Network", _network_keys(config, interface, dns)))
    if interface.ipv6.enabled and interface.ipv6.dhcp and not interface.ipv6.autoconf:
        # Without router advertisements, start DHCPv6 by itself.
        sections.append(("DHCPv6", [("WithoutRA", "solicit")]))
    for route in config.routes:
        if route.interface == interface.name:
            sections.append(("Route", _route_keys(route)))
    return {"comment": comment, "sections": sections}


def _network_keys(
    config: NetworkConfig, interface: Interface, dns: base.DnsPlacement
) -> list[tuple[str, str]]:
    keys = []
    bond = base.bond_of(config, interface.name)
    if bond is not None:
        keys.append(("Bond", bond.device_name))
        if (PRIMARY_OPTION, interface.device_name) in bond.bond.options:
            keys.append(("PrimarySlave", "yes"))
        return keys
    keys.append(("DHCP", _dhcp_value(interface.ipv4, interface.ipv6)))
    keys.append(("LinkLocalAddressing", "ipv6" if interface.ipv6.enabled else "no"))
    keys.append(("IPv6AcceptRA", "yes" if interface.ipv6.autoconf else "no"))
    for ip in (interface.ipv4, interface.ipv6):
        if ip.enabled:
            keys.extend(("Address", str(address)) for address in ip.addresses)
    for version in (4, 6):
        keys.extend(("DNS", server) for server in dns.servers.get((interface.name, version), []))
        search = dns.search.get((interface.name, version), [])
        if search:
            keys.append(("Domains", " ".join(search)))
    for vlan in config.interfaces:
        if vlan.vlan is not None and vlan.vlan.base == interface.name:
            keys.append(("VLAN", vlan.device_name))
    return keys


def _dhcp_value(ipv4: IPConfig, ipv6: IPConfig) -> str:
    dhcp4 = ipv4.enabled and ipv4.dhcp
    dhcp6 = ipv6.enabled and ipv6.dhcp
    if dhcp4 and dhcp6:
        return "yes"
    if dhcp4:
        return "ipv4"
    return "ipv6" if dhcp6 else "no"


def _route_keys(route: Route) -> list[tuple[str, str]]:
    keys = [("Destination", str(route.destination))]
    if route.gateway is not None:
        keys.append(("Gateway", str(route.gateway)))
    if route.metric is not None:
        keys.append(("Metric", str(route.metric)))
    return keys
