"""RFC 9110 behaviour of the proxied media response, table-driven, against both backends."""

from __future__ import annotations

import gzip
from email.utils import formatdate

import pytest

CLIP = "video/clip.bin"
SIZE = 300_000


async def fetch(media, method="GET", key=CLIP, headers=None, **params):
    response = await media.client.request(method, media.url(key, **params), headers={**media.auth(), **(headers or {})})
    body = await response.read()
    return response, body


RANGE_CASES = [
    # (Range header, expected status, expected (first, last) or None for the whole object)
    ("bytes=0-99", 206, (0, 99)),
    ("bytes=100-", 206, (100, SIZE - 1)),
    ("bytes=-500", 206, (SIZE - 500, SIZE - 1)),
    ("bytes=0-", 206, (0, SIZE - 1)),  # covering the whole object is still a 206
    ("bytes=299990-400000", 206, (299990, SIZE - 1)),  # end clamped to the size
    ("bytes=-400000", 206, (0, SIZE - 1)),  # suffix longer than the object
    ("bytes=0-9,10-19", 206, (0, 19)),  # adjacent ranges coalesce
    ("bytes=0-9,100-109", 200, None),  # disjoint ranges: the whole object
    ("items=0-9", 200, None),  # unknown unit: ignored
    ("bytes=abc", 200, None),  # invalid ranges-specifier: ignored
    ("bytes=9-5", 200, None),
    ("bytes=" + ",".join(f"{i}-{i}" for i in range(0, 400, 2)), 200, None),  # hundreds of ranges: ignored
]


@pytest.mark.parametrize(("range_header", "status", "span"), RANGE_CASES, ids=[c[0][:24] for c in RANGE_CASES])
async def test_range_requests(media, range_header, status, span):
    data = media.objects[CLIP].data
    response, body = await fetch(media, headers={"Range": range_header})
    assert response.status == status
    assert response.headers["Accept-Ranges"] == "bytes"
    if span is None:
        assert body == data
        assert "Content-Range" not in response.headers
    else:
        first, last = span
        assert body == data[first : last + 1]
        assert response.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert int(response.headers["Content-Length"]) == len(body)


@pytest.mark.parametrize("range_header", ["bytes=300000-", "bytes=400000-400010", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_size(media, range_header):
    response, body = await fetch(media, headers={"Range": range_header})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{SIZE}"
    assert b"range_not_satisfiable" in body


async def test_range_on_empty_object_is_416(media):
    response, _ = await fetch(media, key="empty.txt", headers={"Range": "bytes=0-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */0"
    response, body = await fetch(media, key="empty.txt")
    assert (response.status, body, response.headers["Content-Length"]) == (200, b"", "0")


async def test_validators_are_stable_and_conditionals_work(media):
    first, _ = await fetch(media)
    second, _ = await fetch(media)
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]
    assert etag.startswith('"') and etag == second.headers["ETag"]
    assert last_modified == second.headers["Last-Modified"]
    other_user = await media.client.get(media.url(CLIP), headers=media.auth(sub="bob"))
    assert other_user.headers["ETag"] == etag  # the object's tag, the same for every user
    later = formatdate(2_000_000_000, usegmt=True)
    cases = [
        ({"If-None-Match": etag}, 304),
        ({"If-None-Match": f'"nope", {etag}'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"nope"'}, 200),
        ({"If-None-Match": etag, "Range": "bytes=0-9"}, 304),  # also on range requests
        ({"If-Modified-Since": last_modified}, 304),
        ({"If-Modified-Since": later}, 304),
        ({"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, 200),
        ({"If-Match": '"nope"'}, 412),
        ({"If-Match": etag}, 200),
        ({"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, 412),
        ({"If-Unmodified-Since": later}, 200),
        ({"If-Range": etag, "Range": "bytes=0-9"}, 206),
        ({"If-Range": '"stale"', "Range": "bytes=0-9"}, 200),
        ({"If-Range": f"W/{etag}", "Range": "bytes=0-9"}, 200),  # weak tags never satisfy If-Range
        ({"If-Range": last_modified, "Range": "bytes=0-9"}, 206),
        ({"If-Range": "Thu, 01 Jan 1970 00:00:00 GMT", "Range": "bytes=0-9"}, 200),
    ]
    for headers, status in cases:
        response, body = await fetch(media, headers=headers)
        assert response.status == status, headers
        if status == 304:
            assert body == b"" and response.headers["ETag"] == etag
        if status == 200:
            assert body == media.objects[CLIP].data, headers


async def test_head_matches_get_without_body(media):
    get, get_body = await fetch(media)
    head, head_body = await fetch(media, method="HEAD")
    assert head.status == 200 and head_body == b""
    for name in ("ETag", "Last-Modified", "Content-Type", "Content-Length", "Content-Disposition", "Cache-Control"):
        assert head.headers[name] == get.headers[name], name
    assert int(head.headers["Content-Length"]) == len(get_body)


async def test_response_headers(media):
    response, _ = await fetch(media, key="docs/Résumé été.pdf")
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Cache-Control"] == "private, max-age=3600"
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('inline; filename="R')
    assert "filename*=UTF-8''R%C3%A9sum%C3%A9%20%C3%A9t%C3%A9.pdf" in disposition
    response, _ = await fetch(media, key="docs/Résumé été.pdf", download="1")
    assert response.headers["Content-Disposition"].startswith("attachment; ")
    assert response.headers["X-Request-ID"]


async def test_gzip_object_passes_through_as_stored(media):
    stored = media.objects["data/records.json.gz"].data
    response, body = await fetch(media, key="data/records.json.gz", headers={"Accept-Encoding": "identity"})
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Type"] == "application/json"
    assert body == stored and gzip.decompress(body).startswith(b'{"a": 1}')
    ranged, part = await fetch(media, key="data/records.json.gz", headers={"Range": "bytes=0-1"})
    assert ranged.status == 206 and part == stored[:2]


async def test_metadata_cache_answers_head_and_304_without_download(media):
    """After one GET, HEAD, 304, 412 and 416 are answered from the cached metadata."""
    from gateway import metrics

    await fetch(media)
    metrics.BATCH.flush()  # cache lookups are counted in batches: read them after a flush
    hits = metrics.METADATA_HIT._value.get()
    misses = metrics.METADATA_MISS._value.get()
    etag = (await fetch(media, method="HEAD"))[0].headers["ETag"]
    for headers, status in [
        ({"If-None-Match": etag}, 304),
        ({"If-Match": '"x"'}, 412),
        ({"Range": "bytes=999999-"}, 416),
    ]:
        assert (await fetch(media, headers=headers))[0].status == status
    metrics.BATCH.flush()
    assert metrics.METADATA_HIT._value.get() - hits == 4
    assert metrics.METADATA_MISS._value.get() == misses


@pytest.mark.parametrize("key", ["pages/evil.html", "img/evil.svg"])
async def test_active_content_is_never_rendered_in_the_gateway_origin(media, key):
    response, body = await fetch(media, key=key)
    assert response.status == 200 and body == media.objects[key].data
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["Content-Security-Policy"].startswith("sandbox")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    plain, _ = await fetch(media)
    assert plain.headers["X-Content-Type-Options"] == "nosniff"
    assert plain.headers["Referrer-Policy"] == "no-referrer"
    assert "Content-Security-Policy" not in plain.headers


async def test_stale_metadata_is_refreshed_when_the_object_shrinks_or_goes(media):
    key = "docs/Résumé été.pdf"
    await fetch(media, key=key)  # cached: 1,300 bytes
    media.replace(key, b"tiny")
    response, body = await fetch(media, key=key, headers={"Range": "bytes=10-15"})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */4"
    assert key not in body.decode()  # error texts never name the object
    response, body = await fetch(media, key=key)
    assert (response.status, body) == (200, b"tiny")
    media.replace(key, None)
    response, body = await fetch(media, key=key, headers={"Range": "bytes=0-1"})
    assert response.status == 404 and b"not_found" in body
