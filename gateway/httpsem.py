"""Pure RFC 9110 helpers: Range, If-Range and the validator preconditions.

No I/O and no framework types: the media handler asks `plan_response` what to answer for an
object's validators and size, and these functions are tested on their own, case by case.

Choices RFC 9110 leaves to the server, made once here:
* a Range header with another unit or an invalid ranges-specifier is ignored (full 200);
* several ranges are coalesced; if they become one range it is served as 206, otherwise the
  whole object is served as 200 (no multipart/byteranges); more than `MAX_RANGES` ranges make
  the header ignored, so a request with hundreds of ranges costs nothing;
* a range covering the whole object is still a 206.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

MAX_RANGES = 16
_CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One byte-range-spec as written: `start-end`, `start-` (end None) or `-suffix` (start None)."""

    start: int | None
    end: int | None

    def resolve(self, size: int) -> tuple[int, int] | None:
        """Inclusive (first, last) within an object of `size` bytes, or None if unsatisfiable."""
        if self.start is None:
            assert self.end is not None
            if self.end == 0 or size == 0:
                return None
            return max(0, size - self.end), size - 1
        if self.start >= size:
            return None
        last = size - 1 if self.end is None else min(self.end, size - 1)
        return self.start, last

    def header_value(self) -> str:
        if self.start is None:
            return f"bytes=-{self.end}"
        return f"bytes={self.start}-" + ("" if self.end is None else str(self.end))


def parse_range(value: str | None) -> list[ByteRange] | None:
    """The byte ranges of a Range header, or None when the header is to be ignored."""
    if not value:
        return None
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = spec.split(",")
    if len(parts) > MAX_RANGES:
        return None
    ranges = []
    for part in parts:
        part = part.strip()
        if not part:
            continue  # RFC 9110 list syntax tolerates empty elements
        first, dash, last = part.partition("-")
        if not dash or not _is_digits(first or "0") or not _is_digits(last or "0"):
            return None
        if not first:
            if not last:
                return None
            ranges.append(ByteRange(None, int(last)))
            continue
        start, end = int(first), int(last) if last else None
        if end is not None and end < start:
            return None
        ranges.append(ByteRange(start, end))
    return ranges or None


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 19


def coalesce(ranges: list[ByteRange], size: int) -> tuple[int, int] | bool | None:
    """One inclusive span covering the satisfiable ranges if they touch or overlap.

    Returns the span, None when nothing is satisfiable, or False when the satisfiable ranges
    are disjoint (served as the whole object).
    """
    spans = sorted(r for r in (br.resolve(size) for br in ranges) if r is not None)
    if not spans:
        return None
    first, last = spans[0]
    for a, b in spans[1:]:
        if a > last + 1:
            return False
        last = max(last, b)
    return first, last


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """Entity tags of an If-Match / If-None-Match list as (weak, opaque); None means `*`."""
    if value.strip() == "*":
        return None
    tags = []
    for item in value.split(","):
        item = item.strip()
        weak = item.startswith("W/")
        if weak:
            item = item[2:]
        if len(item) >= 2 and item[0] == item[-1] == '"':
            tags.append((weak, item[1:-1]))
    return tags


def _opaque(etag: str) -> str:
    return etag[2:].strip('"') if etag.startswith("W/") else etag.strip('"')


def _strong_match(header: str, etag: str) -> bool:
    tags = parse_etags(header)
    return tags is None or any(not weak and tag == _opaque(etag) for weak, tag in tags)


def _weak_match(header: str, etag: str) -> bool:
    if header == etag:  # a browser revalidating sends back the ETag it was given: no parsing needed
        return True
    tags = parse_etags(header)
    return tags is None or any(tag == _opaque(etag) for _, tag in tags)


def parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch of an HTTP-date, or None if absent or invalid."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # asctime carries no zone; RFC 9110 §5.6.7 says it is GMT
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def format_http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def is_conditional(headers: Mapping[str, str]) -> bool:
    return any(name in headers for name in _CONDITIONAL)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to answer: a status and, for 200/206, the inclusive byte span to send."""

    status: int
    first: int = 0
    last: int = -1

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def plan_response(method: str, headers: Mapping[str, str], etag: str, last_modified: int, size: int) -> Plan:
    """RFC 9110 §13.2.2: preconditions in order, then Range / If-Range."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not _strong_match(if_match, etag):
            return Plan(412)
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and last_modified > since:
            return Plan(412)
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if _weak_match(if_none_match, etag):
            return Plan(304 if method in ("GET", "HEAD") else 412)
    elif method in ("GET", "HEAD"):
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and last_modified <= since:
            return Plan(304)
    whole = Plan(200, 0, size - 1)
    if method != "GET":
        return whole
    ranges = parse_range(headers.get("Range"))
    if ranges is None or not _if_range_holds(headers.get("If-Range"), etag, last_modified):
        return whole
    span = coalesce(ranges, size)
    if span is None:
        return Plan(416)
    if span is False:
        return whole
    return Plan(206, span[0], span[1])


def _if_range_holds(value: str | None, etag: str, last_modified: int) -> bool:
    """If-Range: a strong ETag that matches, or the exact Last-Modified date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"'):
        return value[1:-1] == _opaque(etag) and not etag.startswith("W/")
    if value.startswith("W/"):
        return False
    return parse_http_date(value) == last_modified


def content_disposition(filename: str, attachment: bool) -> str:
    """RFC 6266: an ASCII fallback `filename` and, when needed, an RFC 8187 `filename*`."""
    kind = "attachment" if attachment else "inline"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    header = f'{kind}; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header
