"""The ignition profile: /config.ign (Ignition spec 3.2.0) carrying NetworkManager keyfiles.

CoreOS live images read /config.ign at the initramfs root. The config contains the keyfiles as
``storage.files`` in /etc/NetworkManager/system-connections (mode 0600, base64 data URLs). It
replaces whatever config the base carried in its embed area, so the agent's own config
(``base_ignition``, from the base image catalog) is merged in. Our files replace entries with
the same path, and everything else is kept. Ignition writes files only after it has fetched its
config, so with the initrd format (the rootfs is fetched over the network) the keyfiles also go
into the payload as /etc/coreos-firstboot-network/NAME.nmconnection, which CoreOS copies into
NetworkManager's initramfs configuration, and the kernel gets ``rd.neednet=1``.
"""

from __future__ import annotations

import base64
import copy
import json

from builder.errors import ConfigurationError
from builder.model import NetworkConfig
from builder.profiles import networkmanager
from builder.rendering import PayloadFile, Rendering

NAME = "ignition"
SPEC_VERSION = "3.2.0"
CONFIG_PATH = "/config.ign"
FIRSTBOOT_NETWORK = "/etc/coreos-firstboot-network"
# A 3.x config is valid in any later 3.y spec, so these base versions are raised to 3.2.0.
MERGEABLE_VERSIONS = ("3.0.0", "3.1.0", "3.2.0")

# Keys that the 3.2.0 spec allows, by object; values are checked by _check_shape.
_TOP_KEYS = {"ignition", "passwd", "storage", "systemd"}
_IGNITION_KEYS = {"version", "config", "proxy", "security", "timeouts"}
_STORAGE_KEYS = {"directories", "disks", "files", "filesystems", "links", "luks", "raid"}
_FILE_KEYS = {"group", "overwrite", "path", "user", "append", "contents", "mode"}
_CONTENTS_KEYS = {"compression", "httpHeaders", "source", "verification"}
_NODE_LISTS = ("files", "directories", "links")


def render(
    config: NetworkConfig | None, *, image_format: str, base_ignition: dict | None = None
) -> Rendering:
    """Render /config.ign for ``config`` merged into ``base_ignition``.

    With no config and no base config there is nothing to write. Raises ConfigurationError
    when ``base_ignition`` is not an Ignition 3.0 to 3.2 config.
    """
    keyfiles = [] if config is None else networkmanager.render_keyfiles(config, profile=NAME)
    if not keyfiles and base_ignition is None:
        return Rendering(profile=NAME)

    nodes = [
        {
            "path": f"{networkmanager.SYSTEM_CONNECTIONS}/{keyfile.file_name}",
            "mode": networkmanager.KEYFILE_MODE,
            "overwrite": True,
            "contents": {"source": data_url(keyfile.data)},
        }
        for keyfile in keyfiles
    ]
    merged = merge_config(base_ignition, nodes)
    check_shape(merged)
    data = (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode()
    # The agent's config may hold secrets such as pull secrets, so only root reads it.
    files = [PayloadFile(path=CONFIG_PATH, data=data, mode=0o600)]

    params: tuple[str, ...] = ()
    if image_format == "initrd" and keyfiles:
        files.extend(
            PayloadFile(
                path=f"{FIRSTBOOT_NETWORK}/{keyfile.file_name}",
                data=keyfile.data,
                mode=networkmanager.KEYFILE_MODE,
            )
            for keyfile in keyfiles
        )
        params = ("rd.neednet=1",)
    return Rendering(profile=NAME, files=tuple(files), kernel_params=params)


def data_url(data: bytes) -> str:
    """Return ``data`` as an RFC 2397 base64 data URL, as Ignition's ``contents.source``."""
    return "data:;base64," + base64.b64encode(data).decode()


def merge_config(base_ignition: dict | None, nodes: list[dict]) -> dict:
    """Return ``base_ignition`` at spec 3.2.0 with ``nodes`` replacing same-path entries."""
    merged = copy.deepcopy(base_ignition) if base_ignition is not None else {}
    if not isinstance(merged, dict):
        raise ConfigurationError("the base Ignition config is not a JSON object; fix the catalog")
    ignition_section = merged.setdefault("ignition", {})
    if not isinstance(ignition_section, dict):
        raise ConfigurationError("the base Ignition config's 'ignition' is not an object")
    version = ignition_section.get("version", SPEC_VERSION if base_ignition is None else None)
    if version not in MERGEABLE_VERSIONS:
        raise ConfigurationError(
            f"the base Ignition config has spec version {version!r}; the ignition profile "
            f"merges only {', '.join(MERGEABLE_VERSIONS)}, so convert it to one of them"
        )
    ignition_section["version"] = SPEC_VERSION
    if not nodes:
        return merged

    storage = merged.setdefault("storage", {})
    if not isinstance(storage, dict):
        raise ConfigurationError("the base Ignition config's 'storage' is not an object")
    ours = {node["path"] for node in nodes}
    for list_name in _NODE_LISTS:
        entries = storage.get(list_name, [])
        if not isinstance(entries, list):
            raise ConfigurationError(
                f"the base Ignition config's storage.{list_name} is not a list; fix the catalog"
            )
        kept = [entry for entry in entries if not _has_path(entry, ours)]
        if kept or list_name in storage:
            storage[list_name] = kept
    storage["files"] = storage.get("files", []) + nodes
    return merged


def _has_path(entry: object, paths: set[str]) -> bool:
    return isinstance(entry, dict) and entry.get("path") in paths


def check_shape(config: dict) -> None:
    """Check ``config`` against the object keys and node fields of Ignition spec 3.2.0.

    NOTE: this checks the keys of the top level, ``ignition``, ``storage`` and file nodes and
    duplicate node paths, not the whole spec (disks, units and users pass through unchecked).
    """
    _check_keys(config, _TOP_KEYS, "the config")
    _check_keys(config["ignition"], _IGNITION_KEYS, "ignition")
    storage = config.get("storage", {})
    _check_keys(storage, _STORAGE_KEYS, "storage")
    seen: set[str] = set()
    for list_name in _NODE_LISTS:
        for entry in storage.get(list_name, []):
            where = f"storage.{list_name}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ConfigurationError(f"{where} has an entry without a path: {entry!r}")
            path = entry["path"]
            if not path.startswith("/"):
                raise ConfigurationError(f"{where}: path {path!r} is not absolute")
            if path in seen:
                raise ConfigurationError(f"{where}: path {path!r} appears twice; keep one")
            seen.add(path)
            if list_name == "files":
                _check_file_node(entry, where=f"{where} {path}")


def _check_file_node(node: dict, *, where: str) -> None:
    _check_keys(node, _FILE_KEYS, where)
    if "mode" in node and (isinstance(node["mode"], bool) or not isinstance(node["mode"], int)):
        raise ConfigurationError(f"{where}: mode {node['mode']!r} is not an integer")
    contents = node.get("contents", {})
    _check_keys(contents, _CONTENTS_KEYS, f"{where} contents")
    if "source" in contents and not isinstance(contents["source"], str | None):
        raise ConfigurationError(f"{where}: contents.source is not a string")


def _check_keys(value: object, allowed: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where} in the Ignition config is not an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigurationError(
            f"{where} in the Ignition config has keys {unknown} that spec {SPEC_VERSION} does "
            "not define; fix the base image catalog's Ignition config"
        )
