"""Choose and parse the network data of a Secret named by a PreprovisioningImage.

``decode_secret_data`` merges a Secret's base64 ``data`` and its ``stringData`` into bytes.
``parse_secret`` picks the first usable key (``nmstate``, then ``networkData``, then ``value``
only when ``networkData`` is absent, as baremetal-operator reads it) and returns the normalized
NetworkConfig. It returns None for a Secret without data (the base image). Every error is
ImageBuildInvalid, or its subclass UnsupportedField, and its message quotes at most a field name
and one scalar value, never the document.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from builder.errors import ImageBuildInvalid
from builder.model import NetworkConfig
from builder.network_data import parse_network_data
from builder.nmstate import parse_nmstate
from builder.safe_yaml import load_json_or_yaml, load_yaml, quote

# Kubernetes limits a Secret to 1 MiB, so larger data cannot come from a real Secret. It is
# rejected before it is decoded or parsed.
MAX_SECRET_BYTES = 1024 * 1024

KEYS = ("nmstate", "networkData", "value")


def decode_secret_data(secret: dict) -> dict[str, bytes]:
    """Return the Secret's values as bytes: base64 ``data`` overlaid with ``stringData``.

    ``stringData`` wins over ``data`` for the same key, as the API server merges them. Raises
    ImageBuildInvalid for a value that is not valid base64 or for data over MAX_SECRET_BYTES.
    """
    where = _secret_label(secret)
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    if not isinstance(data, Mapping) or not isinstance(string_data, Mapping):
        raise ImageBuildInvalid(f"{where}: data and stringData must be mappings of key to value")

    values: dict[str, bytes] = {}
    for key, encoded in data.items():
        if encoded is None:
            values[key] = b""
            continue
        if not isinstance(encoded, str):
            raise ImageBuildInvalid(f"{where}: data key {quote(key)} is not a base64 string")
        # Reject by the encoded length first, so an oversized value is never decoded.
        if len(encoded) // 4 * 3 > MAX_SECRET_BYTES:
            raise _too_large(where, len(encoded) // 4 * 3)
        try:
            values[key] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ImageBuildInvalid(
                f"{where}: data key {quote(key)} is not valid base64; re-encode the value "
                "(for example with base64 -w0) or put the plain text under stringData"
            ) from None
    for key, text in string_data.items():
        if not isinstance(text, str):
            raise ImageBuildInvalid(f"{where}: stringData key {quote(key)} is not a string")
        values[key] = text.encode()

    total = sum(len(value) for value in values.values())
    if total > MAX_SECRET_BYTES:
        raise _too_large(where, total)
    return values


def parse_secret(data: Mapping[str, bytes] | None, *, secret_name: str) -> NetworkConfig | None:
    """Return the network configuration of a Secret's decoded values, or None without data.

    ``secret_name`` (for example "Secret metal3/worker-0-network") starts every error message.
    Empty or whitespace-only values count as absent. Raises ImageBuildInvalid when no key is
    usable, when a value is too large or malformed, and UnsupportedField for a field the model
    cannot express.
    """
    if not data:
        return None
    total = sum(len(value) for value in data.values())
    if total > MAX_SECRET_BYTES:
        raise _too_large(secret_name, total)

    present = {key: value for key, value in data.items() if value.strip()}
    if "nmstate" in present:
        return _parse_key(present, "nmstate", secret_name=secret_name)
    # baremetal-operator reads "value" only when the "networkData" key is missing, so an empty
    # networkData next to a value still means "no network data".
    if "networkData" in present:
        return _parse_key(present, "networkData", secret_name=secret_name)
    if "value" in present and "networkData" not in data:
        return _parse_key(present, "value", secret_name=secret_name)

    found = ", ".join(quote(key) for key in sorted(data)) or "none"
    hint = ""
    if "value" in present:
        hint = " (value is read only when the networkData key is absent)"
    raise ImageBuildInvalid(
        f"{secret_name}: no usable network data: found keys {found}, and empty values count as "
        f"absent{hint}; set one of {', '.join(KEYS)}, or remove networkDataName"
    )


def _parse_key(data: Mapping[str, bytes], key: str, *, secret_name: str) -> NetworkConfig:
    source = f"{secret_name} key {key}"
    try:
        text = data[key].decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ImageBuildInvalid(
            f"{source}: not valid UTF-8 at byte {error.start}; save the document as UTF-8"
        ) from None

    if key == "nmstate":
        document = load_yaml(text, source=source)
        if not document:
            raise ImageBuildInvalid(
                f"{source}: the NMState document is empty; add interfaces or remove the key"
            )
    else:
        document = load_json_or_yaml(text, source=source)
        if not document:
            raise ImageBuildInvalid(
                f"{source}: the network_data document is empty; add links or remove the key"
            )

    try:
        if key == "nmstate":
            return parse_nmstate(document)
        return parse_network_data(document, source=key)
    except ImageBuildInvalid as error:
        # Keep the class (UnsupportedField stays UnsupportedField) and add where it came from.
        raise type(error)(f"{source}: {error}") from None


def _secret_label(secret: dict) -> str:
    metadata = secret.get("metadata") or {}
    return f"Secret {metadata.get('namespace', 'default')}/{metadata.get('name', '')}"


def _too_large(where: str, size: int) -> ImageBuildInvalid:
    return ImageBuildInvalid(
        f"{where}: the data is {size} bytes, more than the {MAX_SECRET_BYTES} bytes a Secret "
        "may hold; shorten the network data"
    )
