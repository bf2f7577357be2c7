"""Check every nmstate example state in tests/corpus/nmstate against its expected outcome.

Each file either parses into a model with the same meaning or raises UnsupportedField naming
the field the model cannot express. A new corpus file fails until it gets an entry below.
"""

import ipaddress
from pathlib import Path

import pytest

from builder.errors import UnsupportedField
from builder.secret import parse_secret

CORPUS = Path(__file__).resolve().parent / "corpus" / "nmstate"


def check_dns_edit_eth1(config):
    eth1 = config.interface("eth1")
    assert eth1.device_name == "eth1"
    assert eth1.ipv4.addresses == (ipaddress.ip_interface("192.0.2.10/24"),)
    assert eth1.ipv4.dhcp is False
    assert eth1.ipv6.addresses == (ipaddress.ip_interface("2001:db8:1::a/64"),)
    assert eth1.ipv6.autoconf is False
    assert [str(route.destination) for route in config.routes] == ["0.0.0.0/0", "::/0"]
    assert [str(route.gateway) for route in config.routes] == ["192.0.2.1", "2001:db8:1::1"]
    assert [route.interface for route in config.routes] == ["eth1", "eth1"]
    assert [str(server) for server in config.dns_servers] == ["2001:4860:4860::8888", "8.8.8.8"]
    assert config.dns_search == ("example.com", "example.org")


def check_eth1_add_route(config):
    eth1 = config.interface("eth1")
    assert eth1.ipv4.addresses == (ipaddress.ip_interface("192.0.2.251/24"),)
    assert eth1.ipv6.enabled is False
    assert len(config.routes) == 1
    route = config.routes[0]
    assert str(route.destination) == "0.0.0.0/0"
    assert str(route.gateway) == "192.0.2.1"
    assert route.interface == "eth1"
    assert route.metric == 150


# File name: a function checking the parsed model, or the field UnsupportedField must name.
EXPECTATIONS = {
    "bond_port_up.yml": "interfaces[0].link-aggregation.ports-config",
    "dns_edit_eth1.yml": check_dns_edit_eth1,
    "eth1_add_route.yml": check_eth1_add_route,
    "linuxbrige_eth1_up_port_vlan.yml": "linux-bridge",
}

CORPUS_FILES = sorted(path.name for path in CORPUS.iterdir() if path.suffix in (".yml", ".yaml"))


def test_corpus_is_not_empty():
    assert len(CORPUS_FILES) >= 4


@pytest.mark.parametrize("file_name", CORPUS_FILES)
def test_corpus_state_parses_or_names_unsupported_field(file_name):
    if file_name not in EXPECTATIONS:
        pytest.fail(f"{file_name} has no expectation; add it to EXPECTATIONS in this file")
    data = {"nmstate": (CORPUS / file_name).read_bytes()}
    expected = EXPECTATIONS[file_name]
    if isinstance(expected, str):
        with pytest.raises(UnsupportedField) as caught:
            parse_secret(data, secret_name="Secret corpus/test")
        assert expected in str(caught.value)
        assert "is not supported" in str(caught.value)
    else:
        config = parse_secret(data, secret_name="Secret corpus/test")
        assert config.source == "nmstate"
        expected(config)
