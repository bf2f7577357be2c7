"""The dracut profile: no files, only kernel arguments in the grammar of dracut.cmdline(7).

``ip=<client-IP>:[<peer>]:<gateway-IP>:<netmask>:<hostname>:<interface>:none[:<mtu>[:<mac>]]``
for a static address, ``ip=<interface>:{dhcp|dhcp6|auto6}[:<mtu>[:<mac>]]`` otherwise,
``ifname=<name>:<mac>`` to select a NIC by MAC address, ``bond=<name>:<ports>:<options>[:<mtu>]``,
``vlan=<name>:<parent>``, ``rd.route=<net>:<gateway>:<interface>`` for other routes,
``nameserver=`` and ``rd.neednet=1``. One interface gets one ``ip=`` per address family, which
NetworkManager's initrd generator merges. The grammar has no route metric, no on-link route, no
search domain and one address per family. Bond options are separated by commas, so an option
value with ',' or ':' cannot be written. Only the initrd format carries kernel arguments.
"""

from __future__ import annotations

from builder.errors import ImageBuildInvalid
from builder.model import Interface, NetworkConfig
from builder.profiles import base
from builder.rendering import Rendering

NAME = "dracut"

SUPPORTED_FIELDS = base.ALL_FIELDS - {
    base.SEVERAL_ADDRESSES,
    base.DHCP_WITH_STATIC,
    base.ROUTE_METRICS,
    base.ONLINK_ROUTES,
    base.DNS_SEARCH,
}


def render(
    config: NetworkConfig | None, *, image_format: str, base_ignition: dict | None = None
) -> Rendering:
    """Render the kernel arguments of ``config``; ``base_ignition`` is not used.

    Raises ImageBuildInvalid for the iso format, whose boot configuration we cannot extend.
    """
    del base_ignition
    if config is None:
        return Rendering(profile=NAME)
    if image_format != "initrd":
        raise ImageBuildInvalid(
            f"profile {NAME} delivers the network configuration as kernel arguments, which only "
            "the initrd format carries; accept the initrd format or choose another profile"
        )
    base.check_ports_without_ip(config, profile=NAME)
    names = {interface.name: _kernel_name(interface) for interface in config.interfaces}
    params: list[str] = []
    for interface in config.interfaces:
        params.extend(_interface_params(config, interface, names))
    for route in config.routes:
        if not base.is_default(route):
            gateway = _bracket(str(route.gateway), route.destination.version)
            destination = _bracket(str(route.destination), route.destination.version)
            params.append(f"rd.route={destination}:{gateway}:{names[route.interface]}")
    params.extend(f"nameserver={server}" for server in config.dns_servers)
    params.append("rd.neednet=1")
    return Rendering(profile=NAME, kernel_params=tuple(params))


def _kernel_name(interface: Interface) -> str:
    # ifname= gives a NIC selected by MAC address the model's name.
    if interface.type == "ethernet" and interface.match_by_mac:
        return interface.name
    return interface.device_name


def _interface_params(
    config: NetworkConfig, interface: Interface, names: dict[str, str]
) -> list[str]:
    name = names[interface.name]
    params = []
    if interface.type == "ethernet" and interface.match_by_mac:
        params.append(f"ifname={name}:{interface.mac_address}")
    bond = base.bond_of(config, interface.name)
    if bond is not None:
        if interface.mtu is not None and interface.mtu != bond.mtu:
            raise base.unsupported(
                NAME, base.MTU, f"port {interface.name} mtu {interface.mtu} differs from its bond"
            )
        if interface.mac_address is not None and not interface.match_by_mac:
            raise base.unsupported(
                NAME, base.CLONED_MAC, f"port {interface.name} gets {interface.mac_address}"
            )
    if interface.bond is not None:
        params.append(_bond_param(interface, names))
    if interface.vlan is not None:
        params.append(_vlan_param(interface, names))
    params.extend(_ip_params(config, interface, name))
    if (
        interface.mac_address is not None
        and not interface.match_by_mac
        and interface.type != "bond"
        and not (interface.ipv4.enabled or interface.ipv6.enabled)
    ):
        raise base.unsupported(
            NAME,
            base.CLONED_MAC,
            f"interface {interface.name} gets {interface.mac_address} but has no ip= argument",
        )
    return params


def _bond_param(interface: Interface, names: dict[str, str]) -> str:
    ports = ",".join(names[port] for port in interface.bond.ports)
    options = [f"mode={interface.bond.mode}"]
    for option, value in interface.bond.options:
        if "," in value or ":" in value:
            raise base.unsupported(
                NAME, base.BOND_OPTIONS, f"interface {interface.name} {option}={value}"
            )
        options.append(f"{option}={value}")
    param = f"bond={interface.device_name}:{ports}:{','.join(options)}"
    if interface.mtu is not None:
        param += f":{interface.mtu}"
    if interface.mac_address is not None:
        raise base.unsupported(
            NAME, base.CLONED_MAC, f"bond {interface.name} gets {interface.mac_address}"
        )
    return param


def _vlan_param(interface: Interface, names: dict[str, str]) -> str:
    parent = names[interface.vlan.base]
    vlan_id = interface.vlan.id
    # dracut reads the VLAN id from the name, so only these four spellings work.
    accepted = (
        f"vlan{vlan_id:04d}",
        f"vlan{vlan_id}",
        f"{parent}.{vlan_id:04d}",
        f"{parent}.{vlan_id}",
    )
    if interface.device_name not in accepted:
        raise base.unsupported(
            NAME,
            base.VLANS,
            f"interface {interface.name} is named {interface.device_name}; dracut needs one of "
            + ", ".join(accepted),
        )
    return f"vlan={interface.device_name}:{parent}"


def _ip_params(config: NetworkConfig, interface: Interface, name: str) -> list[str]:
    params = []
    mtu = "" if interface.mtu is None else str(interface.mtu)
    mac = ""
    if interface.mac_address is not None and not interface.match_by_mac:
        mac = interface.mac_address
    # dracut's optional trailing fields: ":MTU" then ":MAC", the MAC only after the MTU field.
    tail = ""
    if mtu or mac:
        tail = f":{mtu}"
        if mac:
            tail += f":{mac}"
    for version, ip in ((4, interface.ipv4), (6, interface.ipv6)):
        if not ip.enabled:
            continue
        if not ip.addresses:
            if version == 4:
                method = "dhcp"
            elif ip.autoconf:
                method = "auto6"
            else:
                method = "dhcp6"
            params.append(f"ip={name}:{method}{tail}")
            continue
        address = ip.addresses[0]
        gateway = _default_gateway(config, interface, version)
        if version == 4:
            client, netmask = str(address.ip), str(address.netmask)
        else:
            client, netmask = f"[{address.ip}]", str(address.network.prefixlen)
        gateway_field = "" if gateway is None else _bracket(gateway, version)
        params.append(f"ip={client}::{gateway_field}:{netmask}::{name}:none{tail}")
    return params


def _default_gateway(config: NetworkConfig, interface: Interface, version: int) -> str | None:
    gateways = [
        str(route.gateway)
        for route in config.routes
        if route.interface == interface.name
        and route.destination.version == version
        and base.is_default(route)
    ]
    if len(gateways) > 1:
        raise base.unsupported(
            NAME,
            base.ROUTES,
            f"interface {interface.name} has {len(gateways)} IPv{version} default routes",
        )
    if gateways and not (interface.ipv4 if version == 4 else interface.ipv6).addresses:
        raise base.unsupported(
            NAME,
            base.ROUTES,
            f"default route via {gateways[0]} on interface {interface.name}, which gets its "
            f"IPv{version} address dynamically",
        )
    return gateways[0] if gateways else None


def _bracket(value: str, version: int) -> str:
    return f"[{value}]" if version == 6 else value
