"""Load YAML and JSON documents safely, and quote their values in error messages.

Every loader here returns plain data (dict, list, str, int, float, bool, None). YAML is read with
the YAML 1.2 core schema, which nmstate's serde_yaml and Go's YAML libraries use, so ``on``,
``yes`` and ``10:20:30`` stay strings. Aliases are rejected when the constructor meets a node a
second time. libyaml composes an alias as a shared node, so an alias bomb (billion laughs) is
rejected before anything is expanded. Duplicate keys are rejected instead of the last one
winning silently. ``load_document`` and ``load_all_documents`` raise ``YAMLError``.
``load_yaml`` and ``load_json_or_yaml`` read Secret values and raise ImageBuildInvalid naming
the Secret key and the line and column. The ``expect_*`` readers check values of a parsed
document and raise ImageBuildInvalid naming the value's path.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Set

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from builder.errors import ImageBuildInvalid, UnsupportedField

# Maximum length of a scalar quoted in a message. Longer values are cut so a message stays short.
_QUOTE_LIMIT = 64

# libyaml's parser also stops at 1000 nested levels ("exceeded maximum nesting depth").
_BaseLoader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


class YAMLError(ValueError):
    """A document is not valid YAML or uses a YAML feature this package rejects."""


class _Yaml12Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader with the YAML 1.2 core schema that rejects aliases and duplicate keys."""

    # Start from no implicit resolvers, then add the core schema's below. SafeLoader's YAML 1.1
    # set would turn `yes` into True, `10:20` into 620 and `2024-01-01` into a date.
    yaml_implicit_resolvers: dict = {}

    def construct_object(self, node, deep=False):  # type: ignore[no-untyped-def]
        # A node reached twice is the target of an alias, because composing shares the node.
        if node in self.constructed_objects:
            raise ConstructorError(
                None,
                None,
                "YAML anchors and aliases are not allowed, but an alias (*name) refers to the "
                "node here; write the values out in full",
                node.start_mark,
            )
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode):
                    continue
                if key_node.value in seen:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key {quote(key_node.value)}; keep one of them",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):  # type: ignore[no-untyped-def]
        # YAML 1.2 integers: decimal, 0o octal and 0x hex. SafeLoader reads "010" as octal 8.
        text = self.construct_scalar(node)
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)


def quote(value: object) -> str:
    """Return ``value`` for an error message: a scalar quoted and cut short, else its kind.

    Lists and mappings are described by kind and size only, so a message never carries a
    whole section of a Secret.
    """
    if isinstance(value, dict):
        return f"a mapping with {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    text = str(value)
    if len(text) > _QUOTE_LIMIT:
        return repr(text[:_QUOTE_LIMIT]) + f" (cut, {len(text)} characters)"
    return repr(text)


def load_document(text: str) -> object:
    """Parse one YAML document; raise YAMLError with the line and column of the problem."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as error:
        raise YAMLError(_describe(error)) from None


def load_all_documents(text: str) -> Iterator[object]:
    """Parse every document of a YAML stream (``---`` separated); raise YAMLError."""
    try:
        yield from yaml.load_all(text, Loader=_Yaml12Loader)  # noqa: S506
    except (yaml.YAMLError, ValueError) as error:
        raise YAMLError(_describe(error)) from None


def load_yaml(text: str, *, source: str) -> object:
    """Parse one YAML Secret value; ``source`` (the Secret key) names it in error messages."""
    try:
        return load_document(text)
    except YAMLError as error:
        raise ImageBuildInvalid(
            f"{source}: invalid YAML: {error}; fix the document and update the Secret"
        ) from None


def load_json_or_yaml(text: str, *, source: str) -> object:
    """Parse a JSON Secret value, or a YAML one when the text does not look like JSON.

    Text that starts with ``{`` or ``[`` is read as JSON first. When that fails it is read as
    YAML (a YAML flow mapping also starts with ``{``), and when both fail the JSON error is
    reported, because the author most likely wrote JSON.
    """
    if not text.lstrip().startswith(("{", "[")):
        return load_yaml(text, source=source)
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        json_error = error
    except _DuplicateKey as error:
        raise ImageBuildInvalid(
            f"{source}: invalid JSON: duplicate key {quote(error.key)}; keep one of them"
        ) from None
    except RecursionError:
        raise ImageBuildInvalid(
            f"{source}: the JSON document is nested too deeply to read; flatten it"
        ) from None
    except ValueError as error:
        # For example Python's int() rejects numbers of more than 4300 digits.
        raise ImageBuildInvalid(f"{source}: invalid JSON value: {_cut(str(error))}") from None
    try:
        return load_document(text)
    except YAMLError:
        raise ImageBuildInvalid(
            f"{source}: invalid JSON at line {json_error.lineno}, column {json_error.colno}: "
            f"{json_error.msg}; fix the document and update the Secret"
        ) from None


def _describe(error: Exception) -> str:
    # Only the problem and its position: str(error) of a MarkedYAMLError quotes the offending
    # line of the document, which may hold secret values.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = _cut(error.problem or error.context or "syntax error")
        if mark is None:
            return problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return _cut(str(error))


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _cut(text: str) -> str:
    return text if len(text) <= 160 else text[:160] + "..."


# Readers of parsed documents. ``path`` names the value in messages, for example
# "interfaces[0].mtu"; a message quotes only a scalar value, never a whole section.


def expect_mapping(value: object, path: str) -> dict:
    """Return ``value`` when it is a mapping, else raise ImageBuildInvalid."""
    if not isinstance(value, dict):
        raise ImageBuildInvalid(f"{path} is {quote(value)}, expected a mapping")
    return value


def expect_list(value: object, path: str) -> list:
    """Return ``value`` when it is a list, an empty list for None, else raise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImageBuildInvalid(f"{path} is {quote(value)}, expected a list")
    return value


def expect_integer(value: object, path: str, *, low: int, high: int) -> int:
    """Return a whole number in ``low..high``, also written as a digit string ("9000")."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ImageBuildInvalid(f"{path} is {quote(value)}; write a whole number")
    if not low <= number <= high:
        raise ImageBuildInvalid(f"{path} is {number}, outside {low}..{high}")
    return number


def expect_ip_address(
    value: object, path: str, *, version: int | None = None
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return an IP address of the given version (4, 6 or None for either), else raise.

    A scope ("fe80::1%eth0") is rejected, because ipaddress keeps any text after the "%".
    """
    if not isinstance(value, str) or "%" in value:
        raise ImageBuildInvalid(f"{path} {quote(value)} is not an IP address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ImageBuildInvalid(f"{path} {quote(value)} is not an IP address") from None
    if version is not None and address.version != version:
        raise ImageBuildInvalid(f"{path} {quote(value)} is not an IPv{version} address")
    return address


def reject_unknown_keys(entry: dict, path: str, *, allowed: Set[str]) -> None:
    """Raise UnsupportedField naming the first key of ``entry`` that is not in ``allowed``."""
    for key, value in entry.items():
        if key in allowed:
            continue
        where = f"{path}.{key}" if path else str(key)
        raise UnsupportedField(
            f"{where} ({quote(value)}) is not supported; remove it or use a supported field"
        )
