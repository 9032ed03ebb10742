"""Table-driven tests of the pure RFC 9110 helpers in `gateway.httpsem` (no I/O, no server)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from multidict import CIMultiDict

from gateway.httpsem import (
    MAX_RANGES,
    ByteRange,
    Plan,
    coalesce,
    content_disposition,
    format_http_date,
    is_conditional,
    parse_etags,
    parse_http_date,
    parse_range,
    plan_response,
)

ETAG = '"v1"'
SIZE = 1000
LAST_MODIFIED = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT, the RFC 9110 example date
LM_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
EARLIER = "Sat, 05 Nov 1994 08:49:37 GMT"
LATER = "Mon, 07 Nov 1994 08:49:37 GMT"
WHOLE = Plan(200, 0, SIZE - 1)


def plan(headers: dict[str, str], method: str = "GET", size: int = SIZE) -> Plan:
    return plan_response(method, headers, ETAG, LAST_MODIFIED, size)


def spans(*pairs: tuple[int, int]) -> str:
    return "bytes=" + ",".join(f"{a}-{b}" for a, b in pairs)


# --------------------------------------------------------------------------- Range header


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("bytes=0-9", [ByteRange(0, 9)], id="first-last"),
        pytest.param("bytes=5-", [ByteRange(5, None)], id="open-ended"),
        pytest.param("bytes=-5", [ByteRange(None, 5)], id="suffix"),
        pytest.param("bytes=0-0", [ByteRange(0, 0)], id="single-byte"),
        pytest.param("bytes=0-1,-3,7-", [ByteRange(0, 1), ByteRange(None, 3), ByteRange(7, None)], id="several"),
        pytest.param("BYTES=0-9", [ByteRange(0, 9)], id="unit-case-insensitive"),
        pytest.param(" bytes = 0-9 ,\t10-19 ", [ByteRange(0, 9), ByteRange(10, 19)], id="optional-whitespace"),
        pytest.param("bytes=0-9,,10-19,", [ByteRange(0, 9), ByteRange(10, 19)], id="empty-list-elements"),
        pytest.param("bytes=0-" + "9" * 19, [ByteRange(0, 10**19 - 1)], id="19-digits-accepted"),
        pytest.param("items=0-1", None, id="unknown-unit"),
        pytest.param("bytes", None, id="no-equals"),
        pytest.param("0-9", None, id="no-unit"),
        pytest.param("bytes=", None, id="no-ranges"),
        pytest.param("bytes=,", None, id="only-commas"),
        pytest.param("bytes=-", None, id="dash-only"),
        pytest.param("bytes=abc", None, id="not-a-range"),
        pytest.param("bytes=5", None, id="no-dash"),
        pytest.param("bytes=5-2", None, id="last-before-first"),
        pytest.param("bytes=1-2-3", None, id="two-dashes"),
        pytest.param("bytes=+1-2", None, id="signed-number"),
        pytest.param("bytes=0x10-20", None, id="hex-number"),
        pytest.param("bytes=\u0663-5", None, id="non-ascii-digit"),
        pytest.param("bytes=0 - 9", None, id="whitespace-inside-range"),
        pytest.param("bytes=0-9,abc", None, id="one-bad-range-spoils-all"),
        pytest.param("bytes=" + "9" * 20 + "-", None, id="huge-first"),
        pytest.param("bytes=0-" + "9" * 20, None, id="huge-last"),
        pytest.param("bytes=-" + "9" * 20, None, id="huge-suffix"),
        pytest.param(spans(*[(i, i) for i in range(MAX_RANGES + 1)]), None, id="too-many-ranges"),
    ],
)
def test_parse_range(value: str | None, expected: list[ByteRange] | None) -> None:
    assert parse_range(value) == expected


def test_parse_range_accepts_exactly_max_ranges() -> None:
    assert parse_range(spans(*[(i, i) for i in range(MAX_RANGES)])) == [ByteRange(i, i) for i in range(MAX_RANGES)]


@pytest.mark.parametrize(
    ("byte_range", "size", "expected"),
    [
        pytest.param(ByteRange(0, 9), 100, (0, 9), id="inside"),
        pytest.param(ByteRange(0, None), 100, (0, 99), id="open-from-zero"),
        pytest.param(ByteRange(90, None), 100, (90, 99), id="open-ended"),
        pytest.param(ByteRange(50, 500), 100, (50, 99), id="end-clamped"),
        pytest.param(ByteRange(99, 99), 100, (99, 99), id="last-byte"),
        pytest.param(ByteRange(100, None), 100, None, id="start-at-size"),
        pytest.param(ByteRange(101, 200), 100, None, id="start-beyond-size"),
        pytest.param(ByteRange(None, 10), 100, (90, 99), id="suffix"),
        pytest.param(ByteRange(None, 100), 100, (0, 99), id="suffix-equals-size"),
        pytest.param(ByteRange(None, 1000), 100, (0, 99), id="suffix-longer-than-size"),
        pytest.param(ByteRange(None, 0), 100, None, id="suffix-zero"),
        pytest.param(ByteRange(0, None), 0, None, id="empty-object-open"),
        pytest.param(ByteRange(0, 0), 0, None, id="empty-object-first-byte"),
        pytest.param(ByteRange(None, 1), 0, None, id="empty-object-suffix"),
    ],
)
def test_byte_range_resolve(byte_range: ByteRange, size: int, expected: tuple[int, int] | None) -> None:
    assert byte_range.resolve(size) == expected


@pytest.mark.parametrize(
    ("byte_range", "expected"),
    [
        pytest.param(ByteRange(0, 9), "bytes=0-9", id="first-last"),
        pytest.param(ByteRange(5, None), "bytes=5-", id="open-ended"),
        pytest.param(ByteRange(None, 5), "bytes=-5", id="suffix"),
    ],
)
def test_byte_range_header_value_round_trips(byte_range: ByteRange, expected: str) -> None:
    assert byte_range.header_value() == expected
    assert parse_range(expected) == [byte_range]


@pytest.mark.parametrize(
    ("ranges", "size", "expected"),
    [
        pytest.param([ByteRange(0, 9)], 100, (0, 9), id="single"),
        pytest.param([ByteRange(0, 49), ByteRange(50, 99)], 100, (0, 99), id="adjacent"),
        pytest.param([ByteRange(0, 60), ByteRange(40, 99)], 100, (0, 99), id="overlapping"),
        pytest.param([ByteRange(50, 99), ByteRange(0, 49)], 100, (0, 99), id="unsorted"),
        pytest.param([ByteRange(0, 99), ByteRange(10, 20)], 100, (0, 99), id="contained"),
        pytest.param([ByteRange(None, 10), ByteRange(80, 89)], 100, (80, 99), id="suffix-and-adjacent"),
        pytest.param([ByteRange(0, 9), ByteRange(500, 600)], 100, (0, 9), id="unsatisfiable-dropped"),
        pytest.param([ByteRange(0, 9), ByteRange(11, 20)], 100, False, id="one-byte-gap-is-disjoint"),
        pytest.param([ByteRange(0, 9), ByteRange(None, 10)], 100, False, id="head-and-tail-disjoint"),
        pytest.param([ByteRange(100, None), ByteRange(None, 0)], 100, None, id="nothing-satisfiable"),
        pytest.param([ByteRange(0, None)], 0, None, id="empty-object"),
    ],
)
def test_coalesce(ranges: list[ByteRange], size: int, expected: tuple[int, int] | bool | None) -> None:
    assert coalesce(ranges, size) == expected


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        pytest.param("bytes=0-99", SIZE, Plan(206, 0, 99), id="first-last"),
        pytest.param("bytes=100-", SIZE, Plan(206, 100, 999), id="open-ended"),
        pytest.param("bytes=-100", SIZE, Plan(206, 900, 999), id="suffix"),
        pytest.param("bytes=0-", SIZE, Plan(206, 0, 999), id="whole-object-is-still-206"),
        pytest.param("bytes=0-999", SIZE, Plan(206, 0, 999), id="whole-object-explicit"),
        pytest.param("bytes=999-999", SIZE, Plan(206, 999, 999), id="last-byte"),
        pytest.param("bytes=500-5000", SIZE, Plan(206, 500, 999), id="end-beyond-size-clamped"),
        pytest.param("bytes=0-" + "9" * 19, SIZE, Plan(206, 0, 999), id="19-digit-end-clamped"),
        pytest.param("bytes=-5000", SIZE, Plan(206, 0, 999), id="suffix-longer-than-size"),
        pytest.param("bytes=1000-", SIZE, Plan(416), id="start-at-size"),
        pytest.param("bytes=5000-6000", SIZE, Plan(416), id="start-beyond-size"),
        pytest.param("bytes=-0", SIZE, Plan(416), id="suffix-zero"),
        pytest.param("bytes=0-", 0, Plan(416), id="empty-object-open"),
        pytest.param("bytes=0-0", 0, Plan(416), id="empty-object-first-byte"),
        pytest.param("bytes=-1", 0, Plan(416), id="empty-object-suffix"),
        pytest.param("items=0-1", SIZE, WHOLE, id="unknown-unit-ignored"),
        pytest.param("bytes=abc", SIZE, WHOLE, id="malformed-ignored"),
        pytest.param("bytes=5-2", SIZE, WHOLE, id="reversed-ignored"),
        pytest.param("bytes=-", SIZE, WHOLE, id="dash-only-ignored"),
        pytest.param("bytes=", SIZE, WHOLE, id="empty-set-ignored"),
        pytest.param("bytes", SIZE, WHOLE, id="missing-equals-ignored"),
        pytest.param(" Bytes = 0-9 , 10-19 ", SIZE, Plan(206, 0, 19), id="whitespace-tolerated"),
        pytest.param("bytes=" + "9" * 20 + "-", SIZE, WHOLE, id="huge-number-ignored"),
        pytest.param("bytes=0-49,50-99", SIZE, Plan(206, 0, 99), id="adjacent-coalesced"),
        pytest.param("bytes=0-60,40-99", SIZE, Plan(206, 0, 99), id="overlapping-coalesced"),
        pytest.param("bytes=900-,-50", SIZE, Plan(206, 900, 999), id="open-and-suffix-coalesced"),
        pytest.param("bytes=0-9,20-29", SIZE, WHOLE, id="disjoint-served-whole"),
        pytest.param("bytes=0-9,5000-6000", SIZE, Plan(206, 0, 9), id="mixed-unsatisfiable-dropped"),
        pytest.param("bytes=0-9,5000-,-0", SIZE, Plan(206, 0, 9), id="mixed-several-unsatisfiable"),
        pytest.param("bytes=5000-,-0", SIZE, Plan(416), id="all-unsatisfiable"),
        pytest.param(spans(*[(10 * i, 10 * i + 9) for i in range(MAX_RANGES)]), SIZE, Plan(206, 0, 159), id="max"),
        pytest.param(spans(*[(10 * i, 10 * i + 9) for i in range(MAX_RANGES + 1)]), SIZE, WHOLE, id="too-many"),
    ],
)
def test_range_request(value: str, size: int, expected: Plan) -> None:
    expected = Plan(200, 0, size - 1) if expected == WHOLE else expected
    assert plan({"Range": value}, size=size) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Range": "bytes=0-9"}, WHOLE, id="range-ignored"),
        pytest.param({"Range": "bytes=5000-"}, WHOLE, id="unsatisfiable-range-ignored"),
        pytest.param({"Range": "bytes=0-9", "If-Range": ETAG}, WHOLE, id="range-with-if-range-ignored"),
        pytest.param({"If-None-Match": ETAG, "Range": "bytes=0-9"}, Plan(304), id="not-modified-still-304"),
    ],
)
def test_head_never_gets_206(headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers, method="HEAD") == expected


def test_no_headers_serves_whole_object() -> None:
    assert plan({}) == WHOLE


def test_empty_object_without_range_is_200_of_nothing() -> None:
    result = plan({}, size=0)
    assert (result.status, result.length) == (200, 0)


@pytest.mark.parametrize(
    ("result", "length"),
    [
        pytest.param(Plan(206, 10, 19), 10, id="span"),
        pytest.param(Plan(206, 5, 5), 1, id="one-byte"),
        pytest.param(Plan(200, 0, -1), 0, id="empty"),
    ],
)
def test_plan_length(result: Plan, length: int) -> None:
    assert result.length == length


# --------------------------------------------------------------------------- validators and preconditions


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param('"a"', [(False, "a")], id="strong"),
        pytest.param('W/"a"', [(True, "a")], id="weak"),
        pytest.param('""', [(False, "")], id="empty-opaque"),
        pytest.param(' "a" ,W/"b",  "c"', [(False, "a"), (True, "b"), (False, "c")], id="list"),
        pytest.param("*", None, id="star"),
        pytest.param("  *  ", None, id="star-with-whitespace"),
        pytest.param("a", [], id="unquoted-dropped"),
        pytest.param('"a', [], id="unterminated-dropped"),
        pytest.param("", [], id="empty"),
    ],
)
def test_parse_etags(value: str, expected: list[tuple[bool, str]] | None) -> None:
    assert parse_etags(value) == expected


RANGE_0_9 = {"Range": "bytes=0-9"}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({**RANGE_0_9, "If-Range": ETAG}, Plan(206, 0, 9), id="strong-etag-match"),
        pytest.param({**RANGE_0_9, "If-Range": f" {ETAG} "}, Plan(206, 0, 9), id="strong-etag-whitespace"),
        pytest.param({**RANGE_0_9, "If-Range": '"v2"'}, WHOLE, id="etag-mismatch"),
        pytest.param({**RANGE_0_9, "If-Range": f"W/{ETAG}"}, WHOLE, id="weak-etag-never-matches"),
        pytest.param({**RANGE_0_9, "If-Range": LM_DATE}, Plan(206, 0, 9), id="exact-date"),
        pytest.param({**RANGE_0_9, "If-Range": EARLIER}, WHOLE, id="earlier-date"),
        pytest.param({**RANGE_0_9, "If-Range": LATER}, WHOLE, id="later-date"),
        pytest.param({**RANGE_0_9, "If-Range": "yesterday"}, WHOLE, id="invalid-date"),
        pytest.param({"If-Range": ETAG}, WHOLE, id="without-range-ignored"),
        pytest.param({"Range": "bytes=5000-", "If-Range": '"v2"'}, WHOLE, id="mismatch-beats-416"),
        pytest.param({"Range": "bytes=5000-", "If-Range": ETAG}, Plan(416), id="match-then-416"),
    ],
)
def test_if_range(headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers) == expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param("GET", {"If-None-Match": ETAG}, Plan(304), id="match"),
        pytest.param("HEAD", {"If-None-Match": ETAG}, Plan(304), id="match-head"),
        pytest.param("GET", {"If-None-Match": ETAG, **RANGE_0_9}, Plan(304), id="match-with-range"),
        pytest.param("GET", {"If-None-Match": ETAG, "Range": "bytes=5000-"}, Plan(304), id="304-beats-416"),
        pytest.param("GET", {"If-None-Match": "*"}, Plan(304), id="star"),
        pytest.param("GET", {"If-None-Match": f"W/{ETAG}"}, Plan(304), id="weak-comparison"),
        pytest.param("GET", {"If-None-Match": f'"x", W/"y", {ETAG}'}, Plan(304), id="match-in-list"),
        pytest.param("GET", {"If-None-Match": '"x", "y"'}, WHOLE, id="no-match"),
        pytest.param("GET", {"If-None-Match": '"x"', **RANGE_0_9}, Plan(206, 0, 9), id="no-match-range"),
        pytest.param("POST", {"If-None-Match": ETAG}, Plan(412), id="match-unsafe-method-412"),
        pytest.param("DELETE", {"If-None-Match": "*"}, Plan(412), id="star-unsafe-method-412"),
    ],
)
def test_if_none_match(method: str, headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers, method=method) == expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param("GET", {"If-Modified-Since": LM_DATE}, Plan(304), id="same-date"),
        pytest.param("GET", {"If-Modified-Since": LATER}, Plan(304), id="later-date"),
        pytest.param("HEAD", {"If-Modified-Since": LM_DATE}, Plan(304), id="head"),
        pytest.param("GET", {"If-Modified-Since": "Sunday, 06-Nov-94 08:49:37 GMT"}, Plan(304), id="rfc850-date"),
        pytest.param("GET", {"If-Modified-Since": "Sun Nov  6 08:49:37 1994"}, Plan(304), id="asctime-date"),
        pytest.param("GET", {"If-Modified-Since": EARLIER}, WHOLE, id="modified"),
        pytest.param("GET", {"If-Modified-Since": EARLIER, **RANGE_0_9}, Plan(206, 0, 9), id="modified-range"),
        pytest.param("GET", {"If-Modified-Since": "not a date"}, WHOLE, id="invalid-date-ignored"),
        pytest.param("GET", {"If-Modified-Since": LM_DATE, "If-None-Match": '"x"'}, WHOLE, id="ignored-with-inm"),
        pytest.param("POST", {"If-Modified-Since": LATER}, WHOLE, id="ignored-for-post"),
        pytest.param("PUT", {"If-Modified-Since": LATER}, WHOLE, id="ignored-for-put"),
    ],
)
def test_if_modified_since(method: str, headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers, method=method) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"If-Match": ETAG}, WHOLE, id="match"),
        pytest.param({"If-Match": ETAG, **RANGE_0_9}, Plan(206, 0, 9), id="match-with-range"),
        pytest.param({"If-Match": "*"}, WHOLE, id="star"),
        pytest.param({"If-Match": f'"x", {ETAG}'}, WHOLE, id="match-in-list"),
        pytest.param({"If-Match": '"x"'}, Plan(412), id="mismatch"),
        pytest.param({"If-Match": ""}, Plan(412), id="empty-list"),
        pytest.param({"If-Match": f"W/{ETAG}"}, Plan(412), id="weak-never-matches-strongly"),
        pytest.param({"If-Match": f'W/{ETAG}, "x"'}, Plan(412), id="weak-in-list"),
        pytest.param({"If-Match": '"x"', "Range": "bytes=5000-"}, Plan(412), id="412-beats-416"),
    ],
)
def test_if_match(headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"If-Unmodified-Since": EARLIER}, Plan(412), id="modified-since"),
        pytest.param({"If-Unmodified-Since": LM_DATE}, WHOLE, id="same-date"),
        pytest.param({"If-Unmodified-Since": LATER}, WHOLE, id="later-date"),
        pytest.param({"If-Unmodified-Since": LATER, **RANGE_0_9}, Plan(206, 0, 9), id="unmodified-range"),
        pytest.param({"If-Unmodified-Since": "garbage"}, WHOLE, id="invalid-date-ignored"),
        pytest.param({"If-Unmodified-Since": EARLIER, "If-Match": ETAG}, WHOLE, id="ignored-with-if-match"),
    ],
)
def test_if_unmodified_since(headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"If-Match": '"x"', "If-None-Match": ETAG}, Plan(412), id="if-match-before-if-none-match"),
        pytest.param({"If-Match": '"x"', "If-Modified-Since": LATER}, Plan(412), id="if-match-before-ims"),
        pytest.param({"If-Unmodified-Since": EARLIER, "If-None-Match": ETAG}, Plan(412), id="ius-before-inm"),
        pytest.param({"If-Unmodified-Since": EARLIER, "If-Modified-Since": LATER}, Plan(412), id="ius-before-ims"),
        pytest.param({"If-Match": ETAG, "If-None-Match": ETAG}, Plan(304), id="if-match-pass-then-304"),
        pytest.param({"If-Match": ETAG, "If-Modified-Since": LATER}, Plan(304), id="if-match-pass-then-ims"),
        pytest.param({"If-None-Match": ETAG, **RANGE_0_9, "If-Range": '"v2"'}, Plan(304), id="304-before-if-range"),
        pytest.param({"If-None-Match": '"x"', "If-Modified-Since": LATER}, WHOLE, id="inm-overrides-ims"),
    ],
)
def test_precondition_precedence(headers: dict[str, str], expected: Plan) -> None:
    assert plan(headers) == expected


def test_plan_response_reads_case_insensitive_headers() -> None:
    headers = CIMultiDict({"if-none-match": ETAG, "range": "bytes=0-9"})
    assert plan(headers) == Plan(304)
    del headers["if-none-match"]
    assert plan(headers) == Plan(206, 0, 9)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, False, id="none"),
        pytest.param({"Range": "bytes=0-1", "Accept": "*/*"}, False, id="range-only"),
        pytest.param({"If-Match": "*"}, True, id="if-match"),
        pytest.param({"If-None-Match": "*"}, True, id="if-none-match"),
        pytest.param({"If-Modified-Since": LM_DATE}, True, id="if-modified-since"),
        pytest.param({"If-Unmodified-Since": LM_DATE}, True, id="if-unmodified-since"),
        pytest.param({"If-Range": ETAG}, True, id="if-range"),
        pytest.param(CIMultiDict({"if-none-match": ETAG}), True, id="case-insensitive-mapping"),
    ],
)
def test_is_conditional(headers: dict[str, str], expected: bool) -> None:
    assert is_conditional(headers) is expected


# --------------------------------------------------------------------------- HTTP dates


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(LM_DATE, LAST_MODIFIED, id="imf-fixdate"),
        pytest.param("Sunday, 06-Nov-94 08:49:37 GMT", LAST_MODIFIED, id="rfc850"),
        pytest.param("Sun Nov  6 08:49:37 1994", LAST_MODIFIED, id="asctime"),
        pytest.param("Thu, 01 Jan 1970 00:00:00 GMT", 0, id="epoch"),
        pytest.param("Tue, 29 Feb 2000 12:00:00 GMT", 951825600, id="leap-day"),
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("yesterday", None, id="garbage"),
        pytest.param("Sun, 32 Nov 1994 08:49:37 GMT", None, id="day-out-of-range"),
        pytest.param("Sun, 06 Nov 1994 25:49:37 GMT", None, id="hour-out-of-range"),
        pytest.param("Sun, 06 Nov 99999 08:49:37 GMT", None, id="year-out-of-range"),
        pytest.param("784111777", None, id="bare-number"),
    ],
)
def test_parse_http_date(value: str | None, expected: int | None) -> None:
    assert parse_http_date(value) == expected


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        pytest.param(0, "Thu, 01 Jan 1970 00:00:00 GMT", id="epoch"),
        pytest.param(LAST_MODIFIED, LM_DATE, id="rfc-example"),
        pytest.param(LAST_MODIFIED + 0.999, LM_DATE, id="fraction-truncated"),
    ],
)
def test_format_http_date(timestamp: float, expected: str) -> None:
    assert format_http_date(timestamp) == expected


@pytest.mark.parametrize("timestamp", [0, 1, LAST_MODIFIED, 951825600, 1_700_000_000.75, 4_102_444_800])
def test_http_date_round_trip(timestamp: float) -> None:
    assert parse_http_date(format_http_date(timestamp)) == int(timestamp)


# --------------------------------------------------------------------------- Content-Disposition

# RFC 6266 filename="quoted-string" then optional RFC 8187 filename*=UTF-8''<attr-char / pct-encoded>
_DISPOSITION = re.compile(
    r"^(?P<kind>inline|attachment); filename=\"(?P<ascii>[ !#-\[\]-~]*)\""
    r"(?:; filename\*=UTF-8''(?P<ext>(?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+))?$"
)


@pytest.mark.parametrize(
    ("filename", "attachment", "expected"),
    [
        pytest.param("a.pdf", False, 'inline; filename="a.pdf"', id="ascii-inline"),
        pytest.param("a.pdf", True, 'attachment; filename="a.pdf"', id="ascii-attachment"),
        pytest.param("my file (1).pdf", False, 'inline; filename="my file (1).pdf"', id="ascii-spaces"),
        pytest.param(
            "Résumé été.pdf",
            False,
            "inline; filename=\"R_sum_ _t_.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%20%C3%A9t%C3%A9.pdf",
            id="latin1",
        ),
        pytest.param(
            "日本語.png",
            True,
            "attachment; filename=\"___.png\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.png",
            id="cjk-attachment",
        ),
        pytest.param("😀.png", False, "inline; filename=\"_.png\"; filename*=UTF-8''%F0%9F%98%80.png", id="emoji"),
        pytest.param(
            'say "hi".txt', False, "inline; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt", id="quotes"
        ),
        pytest.param(
            "back\\slash.txt", False, "inline; filename=\"back_slash.txt\"; filename*=UTF-8''back%5Cslash.txt", id="bs"
        ),
    ],
)
def test_content_disposition(filename: str, attachment: bool, expected: str) -> None:
    assert content_disposition(filename, attachment) == expected


@pytest.mark.parametrize(
    "filename",
    [
        "a.pdf",
        'q"u"o"t"e.txt',
        "trailing\\",
        '\\"',
        "line\r\nInjected: header.txt",
        "tab\there\x00nul\x7fdel.bin",
        "semi;colon,comma=eq.txt",
        "100%25 sure.txt",
        'Ünïcödé "and" \\ ✓.pdf',
    ],
)
def test_content_disposition_is_a_safe_single_header(filename: str) -> None:
    header = content_disposition(filename, attachment=True)
    match = _DISPOSITION.match(header)
    assert match is not None, header
    assert header.isascii() and not any(c in header for c in "\r\n\x00\x7f")
    assert match["kind"] == "attachment"
    assert len(match["ascii"]) == len(filename)
    if match["ext"] is None:
        assert match["ascii"] == filename
    else:
        assert unquote(match["ext"], encoding="utf-8", errors="strict") == filename
