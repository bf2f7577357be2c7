"""HTTP byte ranges and conditional requests (RFC 9110, sections 13 and 14) for one resource.

A single byte range gets 206 Partial Content. A multi-range request or a Range header that
does not parse gets the whole representation (200), as RFC 9110 allows. Entity tags are
strong, so ``If-Range`` and byte ranges can rely on them.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")
# Positions with more significant digits than this are past the end of any file (2**63 has 19),
# and are not converted, because int() rejects strings of more than 4300 digits.
_MAX_POSITION_DIGITS = 19
_PAST_ANY_END = 1 << 64


class RangeNotSatisfiable(ValueError):
    """The single range of a Range header starts past the end of the representation."""


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte positions ``first``..``last``, as a Content-Range header writes them."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        """Return the Content-Range header value of this range of a ``size``-byte resource."""
        return f"bytes {self.first}-{self.last}/{size}"


def parse_range(header: str, size: int) -> ByteRange | None:
    """Return the single byte range of a Range header, or None to serve the whole resource.

    None covers a header in another unit, a syntax error and a request for several ranges.

    :raises RangeNotSatisfiable: the range starts at or past ``size``, or is an empty suffix.
    """
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in specs.split(",") if part.strip()]
    if len(parts) != 1:
        return None
    match = _RANGE_SPEC.match(parts[0])
    if match is None:
        return None
    first_text, last_text = match.groups()

    # "-N" requests the last N bytes, and N larger than the resource means all of it.
    if not first_text:
        if not last_text:
            return None
        suffix = _position(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(first=max(0, size - suffix), last=size - 1)

    if last_text and _digits_key(last_text) < _digits_key(first_text):
        return None
    first = _position(first_text)
    if first >= size:
        raise RangeNotSatisfiable(header)
    # A last position at or past the end means the end, however many digits it has.
    last = _position(last_text) if last_text else _PAST_ANY_END
    return ByteRange(first=first, last=min(last, size - 1))


def _digits_key(digits: str) -> tuple[int, str]:
    """Return a key that orders decimal strings by value without converting them."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    if len(significant) > _MAX_POSITION_DIGITS:
        return _PAST_ANY_END
    return int(significant or "0")


def http_date(timestamp: float) -> str:
    """Format a POSIX timestamp as an HTTP date (IMF-fixdate)."""
    return email.utils.formatdate(timestamp, usegmt=True)


def _parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def _entity_tags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def is_not_modified(
    *, if_none_match: str | None, if_modified_since: str | None, etag: str, last_modified: float
) -> bool:
    """Return whether a GET or HEAD gets 304 Not Modified.

    ``If-None-Match`` uses the weak comparison; ``If-Modified-Since`` counts only without it,
    and compares whole seconds because HTTP dates carry no fraction.
    """
    if if_none_match is not None:
        tags = _entity_tags(if_none_match)
        return "*" in tags or _opaque(etag) in {_opaque(tag) for tag in tags}
    if if_modified_since is not None:
        since = _parse_http_date(if_modified_since)
        return since is not None and int(last_modified) <= since
    return False


def range_applies(*, if_range: str | None, etag: str, last_modified: float) -> bool:
    """Return whether the Range header counts, given ``If-Range`` (strong comparison only)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(("W/", '"')):
        return value == etag
    since = _parse_http_date(value)
    return since is not None and since == int(last_modified)
