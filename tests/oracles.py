"""Run the real parsers that read our rendered files, for the profile tests.

- ``read_keyfiles``: libnm 1.42 (``NM.keyfile_read`` through /usr/bin/python3 and python3-gi)
  reads each keyfile, normalizes and verifies the connection, and returns its settings.
- ``run_glean``: glean 1.25 as ``glean --noop --skip-dns --distro debian --root DIR`` on a config
  drive and a fake sysfs under DIR; returns the files glean would write.
- ``run_networkd``: systemd-networkd 252 started in new network and mount namespaces, where
  /etc/systemd/network is our directory and /run is a tmpfs. It returns the lines networkd logs
  about our units (unknown keys, values it cannot parse). Nothing reaches the host's /etc or
  network.
Run as a script (``oracles.py nm-keyfile FILE...``) it is the libnm side of ``read_keyfiles``.
The sample configurations at the end are the models the profile tests render.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

try:
    from builder.model import Bond, Interface, IPConfig, NetworkConfig, Route, Vlan
except ImportError:  # under /usr/bin/python3 as the libnm script, which needs no model
    pass

SYSTEM_PYTHON = "/usr/bin/python3"
GLEAN = "/tmp/venv/bin/glean"
NETWORKD = "/lib/systemd/systemd-networkd"
NETWORKD_DIRECTORY = "/etc/systemd/network"


def read_keyfiles(paths: list[Path]) -> dict[str, dict]:
    """Parse keyfiles with libnm; return settings and warnings keyed by file name."""
    result = subprocess.run(
        [SYSTEM_PYTHON, __file__, "nm-keyfile", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"libnm failed to read keyfiles: {result.stderr}")
    return json.loads(result.stdout)


def run_glean(
    *, config_drive: dict[str, bytes], nics: dict[str, str], root: Path
) -> dict[str, str]:
    """Run glean on ``config_drive`` files (name → bytes) with ``nics`` (name → MAC) in sysfs.

    Returns the files glean would write, by path. Only ``--noop`` runs: it prints them.
    """
    drive = root / "mnt/config/openstack/latest"
    drive.mkdir(parents=True)
    for name, data in config_drive.items():
        (drive / name).write_bytes(data)
    for name, mac in nics.items():
        sysfs = root / "sys/class/net" / name
        sysfs.mkdir(parents=True)
        (sysfs / "address").write_text(mac + "\n")
        # 0 is a permanent address, the only kind glean configures.
        (sysfs / "addr_assign_type").write_text("0\n")
        (sysfs / "carrier").write_text("1\n")
    result = subprocess.run(
        [GLEAN, "--noop", "--skip-dns", "--distro", "debian", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"glean failed: {result.stderr}")
    return _split_glean_output(result.stdout)


def _split_glean_output(output: str) -> dict[str, str]:
    files: dict[str, str] = {}
    current = None
    for line in output.splitlines(keepends=True):
        if line.startswith("### Write "):
            current = line.removeprefix("### Write ").strip()
            files[current] = ""
        elif current is not None:
            files[current] += line
    return files


def networkd_available() -> bool:
    """Return whether run_networkd can run here (root, unshare and systemd-networkd)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and Path(NETWORKD).exists()


def run_networkd(units: Path) -> list[str]:
    """Start systemd-networkd on the units in ``units``; return its log lines about them.

    networkd reads its units after dropping to the systemd-network user, so they are copied
    into a world-readable directory. A sentinel unit with an unknown key goes next to them.
    Its warning proves that networkd read the directory, and it is left out of the result.
    """
    with tempfile.TemporaryDirectory(prefix="networkd-units-") as directory:
        readable = Path(directory)
        readable.chmod(0o755)
        for unit in units.iterdir():
            shutil.copyfile(unit, readable / unit.name)
            (readable / unit.name).chmod(0o644)
        sentinel = readable / "99-oracle-sentinel.network"
        sentinel.write_text("[Match]\nName=oracle-sentinel\n\n[Network]\nOracleSentinel=yes\n")
        sentinel.chmod(0o644)
        script = (
            "mount -t tmpfs none /run && "
            f"mount --bind {readable} {NETWORKD_DIRECTORY} && "
            f"timeout 3 {NETWORKD}; true"
        )
        result = subprocess.run(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_LOG_TARGET": "console"},
        )
    lines = (result.stdout + result.stderr).splitlines()
    if not any("OracleSentinel" in line for line in lines):
        raise AssertionError("systemd-networkd did not read the units:\n" + "\n".join(lines[-20:]))
    return [
        line
        for line in lines
        if line.startswith(NETWORKD_DIRECTORY + "/") and "oracle-sentinel" not in line
    ]


def parse_unit(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Split a systemd unit into (section, [(key, value)]) keeping repeats and order."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            sections.append((line.strip("[]"), []))
            continue
        key, _, value = line.partition("=")
        sections[-1][1].append((key, value))
    return sections


def _summarize_keyfiles(paths: list[str]) -> dict[str, dict]:
    # Runs under /usr/bin/python3, where python3-gi and gir1.2-nm-1.0 are installed.
    import gi

    gi.require_version("NM", "1.0")
    from gi.repository import NM, GLib

    summaries = {}
    for path in paths:
        warnings: list[str] = []

        def handler(keyfile, connection, handler_type, data, user_data, warnings=warnings):
            if handler_type == NM.KeyfileHandlerType.WARN:
                message, severity = data.warn_get()
                group, key = data.get_context()[:2]
                warnings.append(f"[{group}] {key}: {message} ({severity.value_nick})")
            return False

        keyfile = GLib.KeyFile()
        keyfile.load_from_file(path, GLib.KeyFileFlags.NONE)
        connection = NM.keyfile_read(
            keyfile, os.path.dirname(path), NM.KeyfileHandlerFlags.NONE, handler, None
        )
        connection.normalize()
        connection.verify()
        summaries[os.path.basename(path)] = _summarize(NM, connection, warnings)
    return summaries


def _summarize(NM, connection, warnings: list[str]) -> dict:  # noqa: N803 (the gi module)
    setting = connection.get_setting_connection()
    summary: dict = {
        "id": setting.get_id(),
        "uuid": setting.get_uuid(),
        "type": setting.get_connection_type(),
        "interface_name": setting.get_interface_name(),
        "master": setting.get_master(),
        "slave_type": setting.get_slave_type(),
        "warnings": warnings,
    }
    wired = connection.get_setting_wired()
    if wired is not None:
        summary["mac_address"] = wired.get_mac_address()
        summary["cloned_mac_address"] = wired.get_cloned_mac_address()
        summary["mtu"] = wired.get_mtu()
    bond = connection.get_setting_bond()
    if bond is not None:
        summary["bond_options"] = {
            bond.get_option(index)[1]: bond.get_option(index)[2]
            for index in range(bond.get_num_options())
        }
    vlan = connection.get_setting_vlan()
    if vlan is not None:
        summary["vlan_id"] = vlan.get_id()
        summary["vlan_parent"] = vlan.get_parent()
    for key, ip in (("ipv4", connection.get_setting_ip4_config()),
                    ("ipv6", connection.get_setting_ip6_config())):
        if ip is None:
            summary[key] = None
            continue
        summary[key] = {
            "method": ip.get_method(),
            "may_fail": ip.get_may_fail(),
            "addresses": [
                f"{ip.get_address(i).get_address()}/{ip.get_address(i).get_prefix()}"
                for i in range(ip.get_num_addresses())
            ],
            "gateway": ip.get_gateway(),
            "routes": [
                [
                    f"{ip.get_route(i).get_dest()}/{ip.get_route(i).get_prefix()}",
                    ip.get_route(i).get_next_hop(),
                    ip.get_route(i).get_metric(),
                ]
                for i in range(ip.get_num_routes())
            ],
            "dns": [ip.get_dns(i) for i in range(ip.get_num_dns())],
            "dns_search": [ip.get_dns_search(i) for i in range(ip.get_num_dns_searches())],
        }
    return summary


def bonded_vlan() -> NetworkConfig:
    """Return an 802.3ad bond of two NICs (by MAC), MTU 9000, VLAN 120 with IPv4, IPv6, DNS."""
    bond = Bond(
        mode="802.3ad",
        ports=("eno1", "eno2"),
        options=(("miimon", "100"), ("xmit_hash_policy", "layer3+4")),
    )
    return NetworkConfig(
        source="nmstate",
        interfaces=(
            Interface(name="eno1", type="ethernet", device_name=None,
                      mac_address="52:54:00:00:00:01", match_by_mac=True, mtu=9000),
            Interface(name="eno2", type="ethernet", device_name=None,
                      mac_address="52:54:00:00:00:02", match_by_mac=True, mtu=9000),
            Interface(name="bond0", type="bond", device_name="bond0", mtu=9000, bond=bond),
            Interface(
                name="bond0.120",
                type="vlan",
                device_name="bond0.120",
                vlan=Vlan(base="bond0", id=120),
                ipv4=IPConfig(enabled=True, addresses=(ip_interface("192.0.2.10/24"),)),
                ipv6=IPConfig(enabled=True, addresses=(ip_interface("2001:db8::10/64"),)),
            ),
        ),
        routes=(
            Route(destination=ip_network("0.0.0.0/0"), interface="bond0.120",
                  gateway=ip_address("192.0.2.1")),
            Route(destination=ip_network("::/0"), interface="bond0.120",
                  gateway=ip_address("2001:db8::1")),
        ),
        dns_servers=(ip_address("192.0.2.53"), ip_address("2001:db8::53")),
        dns_search=("example.com",),
    )


def mac_ipv6_auto() -> NetworkConfig:
    """Return one NIC selected by MAC address with IPv6 DHCP and autoconf, IPv4 off."""
    return NetworkConfig(
        source="networkData",
        interfaces=(
            Interface(
                name="nic0",
                type="ethernet",
                device_name=None,
                mac_address="52:54:00:00:00:10",
                match_by_mac=True,
                ipv6=IPConfig(enabled=True, dhcp=True, autoconf=True),
            ),
        ),
    )


def metric_route() -> NetworkConfig:
    """Return one NIC with a static address, a default route with metric 150 and one more."""
    return NetworkConfig(
        source="nmstate",
        interfaces=(
            Interface(
                name="eth0",
                type="ethernet",
                device_name=None,
                mac_address="52:54:00:00:00:20",
                match_by_mac=True,
                ipv4=IPConfig(enabled=True, addresses=(ip_interface("198.51.100.5/24"),)),
            ),
        ),
        routes=(
            Route(destination=ip_network("0.0.0.0/0"), interface="eth0",
                  gateway=ip_address("198.51.100.1"), metric=150),
            Route(destination=ip_network("203.0.113.0/24"), interface="eth0",
                  gateway=ip_address("198.51.100.254")),
        ),
        dns_servers=(ip_address("198.51.100.53"),),
    )


def by_name_cloned() -> NetworkConfig:
    """Return one NIC selected by name with a cloned MAC address, IPv4 DHCP and MTU 1400."""
    return NetworkConfig(
        source="nmstate",
        interfaces=(
            Interface(
                name="eth1",
                type="ethernet",
                device_name="eth1",
                mac_address="52:54:00:00:00:30",
                match_by_mac=False,
                mtu=1400,
                ipv4=IPConfig(enabled=True, dhcp=True),
            ),
        ),
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["nm-keyfile"]:
        sys.exit("usage: oracles.py nm-keyfile FILE...")
    print(json.dumps(_summarize_keyfiles(sys.argv[2:])))
