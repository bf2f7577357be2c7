"""Tests of Secret decoding, key selection and document loading, on the example Secrets."""

import base64
import ipaddress
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from builder.errors import ImageBuildInvalid, UnsupportedField
from builder.secret import MAX_SECRET_BYTES, decode_secret_data, parse_secret

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "Secret metal3/test"

ETHERNET = b"interfaces:\n- name: eth0\n  type: ethernet\n  state: up\n"
NETWORK_DATA = (
    b'{"links": [{"id": "port0", "type": "phy", "ethernet_mac_address": "52:54:00:00:00:01"}],'
    b' "networks": [{"id": "n", "type": "ipv4_dhcp", "link": "port0"}]}'
)


def example_secret(file_name: str) -> dict:
    for document in yaml.safe_load_all((EXAMPLES / file_name).read_text()):
        if document["kind"] == "Secret":
            return document
    raise AssertionError(f"{file_name} has no Secret")


def parse_example(file_name: str):
    secret = example_secret(file_name)
    return parse_secret(decode_secret_data(secret), secret_name=NAME)


def test_secret_example_nmstate_bond_vlan():
    config = parse_example("worker-0-nmstate.yaml")
    assert config.source == "nmstate"
    assert [interface.name for interface in config.interfaces] == [
        "eno1",
        "eno2",
        "bond0",
        "bond0.120",
    ]
    eno1 = config.interface("eno1")
    assert eno1.mac_address == "52:54:00:aa:10:01"
    assert eno1.match_by_mac is False
    assert eno1.device_name == "eno1"
    bond = config.interface("bond0")
    assert bond.bond.mode == "802.3ad"
    assert bond.bond.ports == ("eno1", "eno2")
    assert bond.bond.options == (("miimon", "100"),)
    assert bond.mtu == 9000
    assert bond.ipv4.enabled is False
    vlan = config.interface("bond0.120")
    assert vlan.vlan.base == "bond0"
    assert vlan.vlan.id == 120
    assert vlan.ipv4.addresses == (ipaddress.ip_interface("192.0.2.21/24"),)
    assert vlan.ipv6.addresses == (ipaddress.ip_interface("2001:db8:120::21/64"),)
    assert vlan.ipv6.autoconf is False
    assert [str(route.destination) for route in config.routes] == ["0.0.0.0/0", "::/0"]
    assert [str(route.gateway) for route in config.routes] == ["192.0.2.1", "2001:db8:120::1"]
    assert {route.interface for route in config.routes} == {"bond0.120"}
    assert [str(server) for server in config.dns_servers] == ["192.0.2.53", "2001:db8::53"]
    assert config.dns_search == ("lab.example.com",)


def test_secret_example_network_data_json():
    config = parse_example("worker-1-networkdata.yaml")
    assert config.source == "networkData"
    assert [interface.name for interface in config.interfaces] == [
        "port0",
        "port1",
        "bond0",
        "bond0.130",
    ]
    port0 = config.interface("port0")
    assert port0.match_by_mac is True
    assert port0.device_name is None
    assert port0.mac_address == "52:54:00:bb:20:01"
    assert port0.mtu == 9000
    bond = config.interface("bond0")
    assert bond.device_name == "bond0"
    assert bond.bond.mode == "802.3ad"
    assert bond.bond.ports == ("port0", "port1")
    assert bond.bond.options == (("miimon", "100"), ("xmit_hash_policy", "layer3+4"))
    vlan = config.interface("bond0.130")
    assert vlan.device_name == "bond0.130"
    assert vlan.vlan.base == "bond0"
    assert vlan.vlan.id == 130
    assert vlan.ipv4.addresses == (ipaddress.ip_interface("198.51.100.22/24"),)
    assert vlan.ipv6.addresses == (ipaddress.ip_interface("2001:db8:130::22/64"),)
    assert [str(route.destination) for route in config.routes] == ["0.0.0.0/0", "::/0"]
    assert [str(route.gateway) for route in config.routes] == ["198.51.100.1", "2001:db8:130::1"]
    assert [str(server) for server in config.dns_servers] == ["198.51.100.53", "2001:db8::53"]


def test_secret_example_openshift_nmstate():
    config = parse_example("worker-3-openshift-nmstate.yaml")
    assert config.source == "nmstate"
    eno1 = config.interface("eno1")
    assert eno1.match_by_mac is True
    assert eno1.device_name is None
    assert eno1.mac_address == "52:54:00:cc:30:01"
    assert eno1.ipv4.addresses == (ipaddress.ip_interface("192.0.2.31/24"),)
    assert eno1.ipv6.dhcp is True
    assert eno1.ipv6.autoconf is True
    assert config.routes[0].interface == "eno1"
    assert str(config.routes[0].gateway) == "192.0.2.1"
    assert [str(server) for server in config.dns_servers] == ["192.0.2.53"]


def test_secret_example_capm3_yaml():
    config = parse_example("worker-4-capm3-yaml.yaml")
    assert config.source == "networkData"
    nic = config.interface("enp2s0")
    assert nic.match_by_mac is True
    assert nic.mac_address == "52:54:00:dd:40:01"
    assert nic.ipv4.addresses == (ipaddress.ip_interface("198.51.100.44/24"),)
    assert nic.ipv6.enabled is True
    assert nic.ipv6.autoconf is True
    assert nic.ipv6.dhcp is False
    assert str(config.routes[0].destination) == "0.0.0.0/0"
    assert str(config.routes[0].gateway) == "198.51.100.1"
    assert [str(server) for server in config.dns_servers] == ["198.51.100.53"]


def test_secret_example_dhcp_base_image():
    documents = list(yaml.safe_load_all((EXAMPLES / "worker-2-dhcp.yaml").read_text()))
    assert [document["kind"] for document in documents] == ["PreprovisioningImage"]
    assert "networkDataName" not in documents[0]["spec"]
    assert parse_secret(None, secret_name=NAME) is None


def test_secret_without_data_is_base_image():
    secret = {"metadata": {"name": "empty", "namespace": "metal3"}}
    assert decode_secret_data(secret) == {}
    assert parse_secret(decode_secret_data(secret), secret_name=NAME) is None
    assert parse_secret({}, secret_name=NAME) is None


def test_decode_string_data_wins():
    secret = {
        "data": {"nmstate": base64.b64encode(b"old").decode(), "other": "eA=="},
        "stringData": {"nmstate": "new"},
    }
    assert decode_secret_data(secret) == {"nmstate": b"new", "other": b"x"}


def test_decode_null_value_is_empty():
    assert decode_secret_data({"data": {"networkData": None}}) == {"networkData": b""}


def test_decode_rejects_invalid_base64():
    secret = {"metadata": {"name": "net", "namespace": "metal3"}, "data": {"nmstate": "a*b"}}
    with pytest.raises(ImageBuildInvalid) as caught:
        decode_secret_data(secret)
    message = str(caught.value)
    assert "Secret metal3/net" in message
    assert "'nmstate'" in message
    assert "re-encode" in message


def test_decode_rejects_oversized_data():
    encoded = "A" * (MAX_SECRET_BYTES // 3 * 4 + 8)
    with pytest.raises(ImageBuildInvalid) as caught:
        decode_secret_data({"data": {"nmstate": encoded}})
    assert "more than the 1048576 bytes" in str(caught.value)


def test_decode_rejects_oversized_string_data():
    with pytest.raises(ImageBuildInvalid, match="more than the 1048576 bytes"):
        decode_secret_data({"stringData": {"nmstate": "x" * (MAX_SECRET_BYTES + 1)}})


def test_secret_over_1mib_rejected_fast():
    data = {"nmstate": b"interfaces: [" + b"x, " * (MAX_SECRET_BYTES // 3) + b"]"}
    started = time.perf_counter()
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret(data, secret_name=NAME)
    assert time.perf_counter() - started < 0.5
    assert "more than the 1048576 bytes" in str(caught.value)
    assert "x, x" not in str(caught.value)


def test_secret_over_1mib_counts_all_keys():
    half = b"#" * (MAX_SECRET_BYTES // 2 + 1)
    with pytest.raises(ImageBuildInvalid, match="more than the 1048576 bytes"):
        parse_secret({"nmstate": ETHERNET + half, "networkData": half}, secret_name=NAME)


def test_secret_nmstate_wins_over_network_data():
    config = parse_secret({"nmstate": ETHERNET, "networkData": NETWORK_DATA}, secret_name=NAME)
    assert config.source == "nmstate"


def test_secret_network_data_wins_over_value():
    config = parse_secret({"networkData": NETWORK_DATA, "value": b"not: [valid"}, secret_name=NAME)
    assert config.source == "networkData"


def test_secret_value_read_without_network_data():
    config = parse_secret({"value": NETWORK_DATA}, secret_name=NAME)
    assert config.source == "value"
    assert config.interface("port0").ipv4.dhcp is True


def test_secret_whitespace_nmstate_counts_absent():
    config = parse_secret({"nmstate": b" \n\t", "networkData": NETWORK_DATA}, secret_name=NAME)
    assert config.source == "networkData"


def test_secret_value_ignored_when_network_data_empty():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"networkData": b"", "value": NETWORK_DATA}, secret_name=NAME)
    message = str(caught.value)
    assert "value is read only when the networkData key is absent" in message
    assert "found keys 'networkData', 'value'" in message


def test_secret_without_known_key_rejected():
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"userData": b"#cloud-config", "metaData": b"{}"}, secret_name=NAME)
    message = str(caught.value)
    assert message.startswith(NAME)
    assert "found keys 'metaData', 'userData'" in message
    assert "set one of nmstate, networkData, value" in message
    assert "cloud-config" not in message


def test_secret_with_only_empty_values_rejected():
    with pytest.raises(ImageBuildInvalid, match="no usable network data"):
        parse_secret({"nmstate": b"", "networkData": b"  "}, secret_name=NAME)


@pytest.mark.parametrize("document", [b"{}", b"---", b"--- \n", b"null", b"~\n", b"# comment\n"])
def test_secret_empty_nmstate_rejected(document):
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"nmstate": document}, secret_name=NAME)
    assert "key nmstate: the NMState document is empty" in str(caught.value)


def test_secret_empty_network_data_rejected():
    with pytest.raises(ImageBuildInvalid, match="network_data document is empty"):
        parse_secret({"networkData": b"{}"}, secret_name=NAME)


def test_secret_malformed_yaml_names_key_line_column():
    document = b"interfaces:\n- name: eth0\n  type: [ethernet\n  password: hunter2\n"
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"nmstate": document}, secret_name=NAME)
    message = str(caught.value)
    assert type(caught.value) is ImageBuildInvalid
    assert "key nmstate: invalid YAML" in message
    assert "invalid YAML: line 4, column 11:" in message
    assert "hunter2" not in message


def test_secret_malformed_json_names_key_line_column():
    document = b'{\n  "links": [\n    {"id": "secret-id-123" "type": "phy"}\n  ]\n}\n'
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"networkData": document}, secret_name=NAME)
    message = str(caught.value)
    assert "key networkData: invalid JSON at line 3, column 28" in message
    assert "secret-id-123" not in message


def test_secret_json_duplicate_key_rejected():
    document = b'{"links": [], "links": []}'
    with pytest.raises(ImageBuildInvalid, match="duplicate key 'links'"):
        parse_secret({"networkData": document}, secret_name=NAME)


def test_secret_yaml_duplicate_key_rejected():
    document = ETHERNET + b"interfaces: []\n"
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"nmstate": document}, secret_name=NAME)
    assert "duplicate key 'interfaces'" in str(caught.value)
    assert "line 5, column 1:" in str(caught.value)


def test_secret_alias_bomb_rejected_fast_and_small():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 12):
        previous, current = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{current}: &{current} [" + ", ".join([f"*{previous}"] * 9) + "]")
    document = "\n".join(lines).encode()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageBuildInvalid) as caught:
            parse_secret({"nmstate": document}, secret_name=NAME)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024 * 1024
    assert "anchors and aliases are not allowed" in str(caught.value)
    assert "invalid YAML: line 1, column 4:" in str(caught.value)


def test_secret_yaml_deep_nesting_rejected():
    document = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ImageBuildInvalid, match="nesting depth"):
        parse_secret({"nmstate": document}, secret_name=NAME)


def test_secret_json_deep_nesting_rejected():
    document = b'{"links": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(ImageBuildInvalid, match="nested too deeply"):
        parse_secret({"networkData": document}, secret_name=NAME)


def test_secret_python_tag_rejected():
    document = b"interfaces: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(ImageBuildInvalid, match="could not determine a constructor"):
        parse_secret({"nmstate": document}, secret_name=NAME)


def test_secret_invalid_utf8_rejected():
    with pytest.raises(ImageBuildInvalid, match="not valid UTF-8 at byte 3"):
        parse_secret({"nmstate": b"a: \xff\n"}, secret_name=NAME)


def test_secret_yaml_12_keeps_mac_a_string():
    # YAML 1.1 would read this MAC as the base-60 integer 10:20:30:40:50:51.
    document = b"interfaces:\n- name: eth0\n  type: ethernet\n  mac-address: 10:20:30:40:50:51\n"
    config = parse_secret({"nmstate": document}, secret_name=NAME)
    assert config.interface("eth0").mac_address == "10:20:30:40:50:51"


def test_secret_unsupported_field_keeps_class():
    document = ETHERNET + b"  lldp:\n    enabled: true\n"
    with pytest.raises(UnsupportedField) as caught:
        parse_secret({"nmstate": document}, secret_name=NAME)
    assert str(caught.value).startswith(f"{NAME} key nmstate: interfaces[0].lldp")


def test_secret_messages_quote_one_scalar_only():
    document = ETHERNET.replace(b"eth0", b"eth0 canary-text")
    with pytest.raises(ImageBuildInvalid) as caught:
        parse_secret({"nmstate": document}, secret_name=NAME)
    message = str(caught.value)
    assert "'eth0 canary-text'" in message
    assert "ethernet" not in message
