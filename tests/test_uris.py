"""Table-driven tests of `gateway.uris`: decoding `fileuri`, encoding it, and finding gs:// URIs in task data."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from gateway.uris import BadFileUri, GsUri, encode_fileuri, find_gs_uris, parse_fileuri

BUCKET = "media-bucket"


def b64(raw: str | bytes, *, padded: bool = False, alphabet: str = "urlsafe") -> str:
    """Base64 of `raw` in the URL-safe or standard alphabet, with or without `=` padding."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    encoder = base64.urlsafe_b64encode if alphabet == "urlsafe" else base64.standard_b64encode
    text = encoder(data).decode("ascii")
    return text if padded else text.rstrip("=")


# `gs://media-bucket/a?b>c~` encodes to `...P-mN-` / `...PmN+`: it differs between the two alphabets.
ALPHABET_SENSITIVE = f"gs://{BUCKET}/a?b>c~"


# --------------------------------------------------------------------------- parse_fileuri: accepted


@pytest.mark.parametrize(
    ("fileuri", "expected"),
    [
        pytest.param(b64(f"gs://{BUCKET}/a.png"), GsUri(BUCKET, "a.png"), id="unpadded"),
        pytest.param(b64(f"gs://{BUCKET}/a.png", padded=True), GsUri(BUCKET, "a.png"), id="padded"),
        pytest.param(b64(f"gs://{BUCKET}/ab.png", padded=True), GsUri(BUCKET, "ab.png"), id="padded-two"),
        pytest.param(b64(ALPHABET_SENSITIVE), GsUri(BUCKET, "a?b>c~"), id="url-safe-alphabet"),
        pytest.param(b64(f"gs://{BUCKET}/dir/sub/v.mp4"), GsUri(BUCKET, "dir/sub/v.mp4"), id="nested-key"),
        pytest.param(b64(f"gs://{BUCKET}/my file.png"), GsUri(BUCKET, "my file.png"), id="space-in-key"),
        pytest.param(b64(f"gs://{BUCKET}/Résumé été.pdf"), GsUri(BUCKET, "Résumé été.pdf"), id="unicode-key"),
        pytest.param(b64(f"gs://{BUCKET}/日本/語.png"), GsUri(BUCKET, "日本/語.png"), id="cjk-key"),
        pytest.param(b64(f"gs://{BUCKET}/a%2Fb.png"), GsUri(BUCKET, "a%2Fb.png"), id="encoded-slash-stays-literal"),
        pytest.param(b64(f"gs://{BUCKET}/a%2E%2E/b"), GsUri(BUCKET, "a%2E%2E/b"), id="encoded-dots-stay-literal"),
        pytest.param(b64(f"gs://{BUCKET}/a..b/..c/.d"), GsUri(BUCKET, "a..b/..c/.d"), id="dots-inside-names"),
        pytest.param(b64(f"gs://{BUCKET}/dir/"), GsUri(BUCKET, "dir/"), id="trailing-slash"),
        pytest.param(b64("gs://a.b-c_d/k"), GsUri("a.b-c_d", "k"), id="bucket-with-dot-dash-underscore"),
        pytest.param(b64("gs://abc/k"), GsUri("abc", "k"), id="bucket-three-chars"),
    ],
)
def test_parse_fileuri_accepts(fileuri: str, expected: GsUri) -> None:
    assert parse_fileuri(fileuri) == expected


PREFIX = f"gs://{BUCKET}/"
LONGEST_KEY = 4096 * 3 // 4 - len(PREFIX)  # 3072 bytes encode to exactly 4096 characters


@pytest.mark.parametrize(
    ("key_length", "encoded_length", "accepted"),
    [
        pytest.param(LONGEST_KEY, 4096, True, id="4096-accepted"),
        pytest.param(LONGEST_KEY + 1, 4098, False, id="4098-refused"),
    ],
)
def test_fileuri_length_limit(key_length: int, encoded_length: int, accepted: bool) -> None:
    fileuri = b64(PREFIX + "k" * key_length)
    assert len(fileuri) == encoded_length
    if accepted:
        assert parse_fileuri(fileuri) == GsUri(BUCKET, "k" * key_length)
    else:
        with pytest.raises(BadFileUri, match="too long"):
            parse_fileuri(fileuri)


# --------------------------------------------------------------------------- parse_fileuri: refused


@pytest.mark.parametrize(
    "fileuri",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param(b64(ALPHABET_SENSITIVE, alphabet="standard"), id="standard-alphabet-plus"),
        pytest.param(b64(f"gs://{BUCKET}/??>", alphabet="standard"), id="standard-alphabet-slash"),
        pytest.param("!!!!", id="not-base64"),
        pytest.param("Z3M6Ly9i$", id="bad-character"),
        pytest.param("Z3M6 Ly9i", id="inner-space"),
        pytest.param("a", id="impossible-length"),
        pytest.param(b64(f"gs://{BUCKET}/a.png", padded=True) + "==", id="excess-padding"),
        pytest.param("Z3M6=Ly9i", id="padding-in-the-middle"),
        pytest.param("Z3M6Ly9iüYQ", id="non-ascii-input"),
        pytest.param(b64(b"gs://media-bucket/\xff\xfe.png"), id="not-utf8"),
        pytest.param(b64(f"https://{BUCKET}/a.png"), id="https-scheme"),
        pytest.param(b64(f"s3://{BUCKET}/a.png"), id="s3-scheme"),
        pytest.param(b64(f"GS://{BUCKET}/a.png"), id="uppercase-scheme"),
        pytest.param(b64(f"gs:/{BUCKET}/a.png"), id="one-slash"),
        pytest.param(b64(f" gs://{BUCKET}/a.png"), id="leading-space"),
        pytest.param(b64("gs://Media-Bucket/a.png"), id="uppercase-bucket"),
        pytest.param(b64("gs://ab/a.png"), id="bucket-too-short"),
        pytest.param(b64("gs://_bucket/a.png"), id="bucket-starts-with-underscore"),
        pytest.param(b64("gs://bucket-/a.png"), id="bucket-ends-with-dash"),
        pytest.param(b64(f"gs://{'b' * 223}/a.png"), id="bucket-too-long"),
        pytest.param(b64("gs://bu cket/a.png"), id="bucket-with-space"),
        pytest.param(b64(f"gs://{BUCKET}\n/a.png"), id="bucket-with-trailing-newline"),
        pytest.param(b64("gs:///a.png"), id="no-bucket"),
        pytest.param(b64(f"gs://{BUCKET}"), id="no-key"),
        pytest.param(b64(f"gs://{BUCKET}/"), id="empty-key"),
        pytest.param(b64(f"gs://{BUCKET}/.."), id="dotdot-key"),
        pytest.param(b64(f"gs://{BUCKET}/../other/a.png"), id="leading-dotdot"),
        pytest.param(b64(f"gs://{BUCKET}/a/../../b.png"), id="inner-dotdot"),
        pytest.param(b64(f"gs://{BUCKET}/a/.."), id="trailing-dotdot"),
        pytest.param(b64(f"gs://{BUCKET}/./a.png"), id="leading-dot"),
        pytest.param(b64(f"gs://{BUCKET}/a/./b.png"), id="inner-dot"),
        pytest.param(b64(f"gs://{BUCKET}/a\x00.png"), id="nul-in-key"),
        pytest.param(b64(f"gs://{BUCKET}/a\n.png"), id="newline-in-key"),
        pytest.param(b64(f"gs://{BUCKET}/a.png\r"), id="carriage-return-in-key"),
        pytest.param(b64(f"gs://{BUCKET}/a\t.png"), id="tab-in-key"),
        pytest.param(b64(f"gs://{BUCKET}/a\x7f.png"), id="del-in-key"),
        pytest.param("A" * 100_000, id="much-too-long"),
    ],
)
def test_parse_fileuri_refuses(fileuri: str | None) -> None:
    with pytest.raises(BadFileUri):
        parse_fileuri(fileuri)


def test_standard_alphabet_case_really_differs() -> None:
    """Guards the table above: the standard encoding must contain `+` or `/` to test anything."""
    assert set("+/") & set(b64(ALPHABET_SENSITIVE, alphabet="standard"))
    assert set("+/") & set(b64(f"gs://{BUCKET}/??>", alphabet="standard"))


def test_bad_file_uri_is_a_value_error() -> None:
    assert issubclass(BadFileUri, ValueError)


# --------------------------------------------------------------------------- encode_fileuri


@pytest.mark.parametrize(
    "uri",
    [
        f"gs://{BUCKET}/a.png",
        f"gs://{BUCKET}/ab.png",
        f"gs://{BUCKET}/abc.png",
        ALPHABET_SENSITIVE,
        f"gs://{BUCKET}/dir/my file (1).png",
        f"gs://{BUCKET}/Résumé été.pdf",
        f"gs://{BUCKET}/😀/a%2Fb?x=1&y=2#frag",
    ],
)
def test_encode_fileuri_round_trip(uri: str) -> None:
    fileuri = encode_fileuri(uri)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", fileuri), "URL-safe alphabet, no padding"
    assert str(parse_fileuri(fileuri)) == uri


# --------------------------------------------------------------------------- GsUri


@pytest.mark.parametrize(
    ("key", "filename"),
    [
        pytest.param("a.png", "a.png", id="top-level"),
        pytest.param("dir/sub/clip.mp4", "clip.mp4", id="nested"),
        pytest.param("docs/Résumé été.pdf", "Résumé été.pdf", id="unicode"),
        pytest.param("a%2Fb.png", "a%2Fb.png", id="encoded-slash-is-not-a-separator"),
        pytest.param("dir/", "", id="folder-marker"),
    ],
)
def test_gs_uri_filename(key: str, filename: str) -> None:
    uri = GsUri(BUCKET, key)
    assert uri.filename == filename
    assert str(uri) == f"gs://{BUCKET}/{key}"


# --------------------------------------------------------------------------- find_gs_uris

A = f"gs://{BUCKET}/a.png"
B = f"gs://{BUCKET}/dir/b.mp4"
SPACED = f"gs://{BUCKET}/my dir/my file.png"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(A, {A}, id="plain-string"),
        pytest.param(f"  {A}\n", {A}, id="surrounding-whitespace"),
        pytest.param(SPACED, {SPACED}, id="whole-string-with-spaces-in-key"),
        pytest.param({"image": A, "video": B}, {A, B}, id="flat-dict"),
        pytest.param({"a": [{"b": [A]}], "c": {"d": {"e": B}}}, {A, B}, id="nested-dicts-and-lists"),
        pytest.param([A, [A, {"again": A}]], {A}, id="duplicates-collapsed"),
        pytest.param(f'<img src="{A}"/>', {A}, id="html-double-quotes"),
        pytest.param(f"<img src='{A}'/>", {A}, id="html-single-quotes"),
        pytest.param(f"<p>{A}</p>", {A}, id="html-angle-brackets"),
        pytest.param(f'<a href="{A}">x</a> and <video src="{B}">', {A, B}, id="two-in-html"),
        pytest.param(f"compare {A} with {B} please", {A, B}, id="two-in-text"),
        pytest.param(f"{A}\n{B}", {A, B}, id="one-per-line"),
        pytest.param({"html": f"<b>{SPACED}</b>"}, {f"gs://{BUCKET}/my"}, id="embedded-uri-ends-at-space"),
        pytest.param(
            {"text": "s3://bucket/a.png https://x.example/a.png gs:// gs:/bucket/a"}, set(), id="non-gs-strings"
        ),
        pytest.param({"n": 1, "f": 1.5, "none": None, "flag": True, "empty": "", "list": []}, set(), id="non-strings"),
        pytest.param(None, set(), id="none"),
        pytest.param(42, set(), id="number"),
    ],
)
def test_find_gs_uris(data: Any, expected: set[str]) -> None:
    assert find_gs_uris(data) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"{A} {B}", id="space-separated"),
        pytest.param(f"{A}, {B}", id="comma-separated"),
    ],
)
def test_find_gs_uris_finds_every_uri_of_a_string_starting_with_one(text: str) -> None:
    assert {A, B} <= find_gs_uris({"images": text})
