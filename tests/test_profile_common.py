"""What every profile shares: unsafe values rejected, None config, profile table, templates."""

from __future__ import annotations

import dataclasses

import oracles
import pytest

from builder import profiles
from builder.errors import ConfigurationError, ImageBuildInvalid, UnsupportedField
from builder.profiles import base

FILE_PROFILES = ("networkmanager", "ignition", "glean", "networkd")


@pytest.mark.parametrize("profile", sorted(profiles.PROFILES))
def test_render_none_config_no_files(profile):
    rendering = profiles.render(None, profile=profile, image_format="initrd")
    assert rendering.files == ()
    assert rendering.kernel_params == ()
    assert rendering.profile == profile


def test_profiles_table_names():
    assert sorted(profiles.PROFILES) == ["dracut", "glean", "ignition", "networkd",
                                         "networkmanager"]
    assert profiles.DEFAULT_PROFILE == "networkmanager"
    for name, profile in profiles.PROFILES.items():
        assert profile.name == name
        assert profile.supported_fields <= base.ALL_FIELDS


def test_dracut_supports_no_route_metrics():
    assert base.ROUTE_METRICS not in profiles.PROFILES["dracut"].supported_fields
    assert base.ROUTE_METRICS in profiles.PROFILES["networkmanager"].supported_fields


def test_render_unknown_profile():
    with pytest.raises(ConfigurationError, match="networkmanager"):
        profiles.render(oracles.mac_ipv6_auto(), profile="netplan", image_format="iso")


@pytest.mark.parametrize("profile", sorted(profiles.PROFILES))
def test_search_domain_newline_rejected(profile):
    # The model's frozen values can be built without validate(); render checks again.
    config = dataclasses.replace(oracles.metric_route(),
                                 dns_search=("example.com\n[ipv4]\nmethod=disabled",))
    with pytest.raises(ImageBuildInvalid, match="search domain") as raised:
        profiles.render(config, profile=profile, image_format="initrd")
    assert not isinstance(raised.value, UnsupportedField)


@pytest.mark.parametrize(
    "name",
    ["eth0\n[ipv4]", "../etc", "eth/0", "eth0 x", "[eth0]", "eth=0", ".hidden"],
)
def test_interface_name_unsafe_rejected(name):
    config = oracles.by_name_cloned()
    nic = dataclasses.replace(config.interfaces[0], name=name, device_name="eth1")
    config = dataclasses.replace(config, interfaces=(nic,))
    with pytest.raises(ImageBuildInvalid):
        profiles.render(config, profile="networkmanager", image_format="iso")


def test_bond_option_newline_rejected():
    config = oracles.bonded_vlan()
    bond = config.interfaces[2]
    options = (("miimon", "100\n[ipv4]\nmethod=auto"),)
    bond = dataclasses.replace(bond, bond=dataclasses.replace(bond.bond, options=options))
    config = dataclasses.replace(config, interfaces=(*config.interfaces[:2], bond,
                                                     config.interfaces[3]))
    with pytest.raises(ImageBuildInvalid, match="miimon"):
        profiles.render(config, profile="networkd", image_format="iso")


def test_bond_option_name_with_equals_rejected():
    config = oracles.bonded_vlan()
    bond = config.interfaces[2]
    options = (("mode=balance-rr\nmiimon", "100"),)
    bond = dataclasses.replace(bond, bond=dataclasses.replace(bond.bond, options=options))
    config = dataclasses.replace(config, interfaces=(*config.interfaces[:2], bond,
                                                     config.interfaces[3]))
    with pytest.raises(ImageBuildInvalid, match="bond option name"):
        profiles.render(config, profile="networkmanager", image_format="iso")


def test_address_in_wrong_family_rejected():
    config = oracles.metric_route()
    nic = config.interfaces[0]
    nic = dataclasses.replace(nic, ipv6=dataclasses.replace(nic.ipv4))
    config = dataclasses.replace(config, interfaces=(nic,))
    with pytest.raises(ImageBuildInvalid, match="not an IPv6 address"):
        profiles.render(config, profile="networkmanager", image_format="iso")


def test_route_through_disabled_family_rejected():
    config = oracles.mac_ipv6_auto()
    route = oracles.metric_route().routes[1]
    config = dataclasses.replace(config, routes=(dataclasses.replace(route, interface="nic0"),))
    with pytest.raises(ImageBuildInvalid, match="IPv4 disabled"):
        profiles.render(config, profile="networkmanager", image_format="iso")


def test_bond_port_with_ip_rejected():
    config = oracles.bonded_vlan()
    port = dataclasses.replace(config.interfaces[0], ipv4=config.interfaces[3].ipv4)
    config = dataclasses.replace(config, interfaces=(port, *config.interfaces[1:]))
    with pytest.raises(ImageBuildInvalid, match="port of bond"):
        profiles.render(config, profile="networkmanager", image_format="iso")


def test_unsupported_message_names_field_and_profile():
    error = base.unsupported("dracut", base.ROUTE_METRICS,
                             "route to 0.0.0.0/0 metric 150")
    assert str(error) == (
        "profile dracut cannot express route metrics (route to 0.0.0.0/0 metric 150); "
        "choose another profile in the base image catalog or remove the metric"
    )


@pytest.mark.parametrize("profile", FILE_PROFILES)
def test_render_deterministic(profile):
    config = dataclasses.replace(oracles.bonded_vlan(), dns_search=())
    first = profiles.render(config, profile=profile, image_format="initrd")
    second = profiles.render(config, profile=profile, image_format="initrd")
    assert first == second


def test_templates_directory_found():
    directory = base.templates_directory()
    assert (directory / "nm_keyfile.nmconnection.j2").is_file()
    assert (directory / "networkd_unit.j2").is_file()
