"""`gs://bucket/key` references: decoding the `fileuri` parameter and finding URIs in task data."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .config import BUCKET_RE

# Inside free text (HTML, captions …) a URI ends at whitespace, a quote or an angle bracket.
_EMBEDDED_URI = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/[^\s\"'<>]+")
_MAX_FILEURI = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadFileUri(ValueError):
    """A `fileuri` that is not the URL-safe base64 of a plain `gs://bucket/key`."""


@dataclass(frozen=True, slots=True)
class GsUri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.key}"

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@lru_cache(maxsize=4096)
def parse_fileuri(value: str | None) -> GsUri:
    """Decode Label Studio's `fileuri` (URL-safe base64, padding optional) into a GsUri.

    Pure, and asked for the same few URIs over and over (every range of a video): cached.
    Refusals are exceptions, which lru_cache never stores.
    """
    if not value:
        raise BadFileUri("fileuri is missing")
    if len(value) > _MAX_FILEURI:
        raise BadFileUri("fileuri is too long")
    if "+" in value or "/" in value:
        raise BadFileUri("fileuri must use the URL-safe base64 alphabet ('-' and '_')")
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadFileUri("fileuri is not URL-safe base64 of a UTF-8 string") from None
    return parse_gs_uri(text)


def parse_gs_uri(text: str) -> GsUri:
    if not text.startswith("gs://"):
        raise BadFileUri("fileuri must decode to a gs://bucket/key URI")
    bucket, slash, key = text[5:].partition("/")
    if not BUCKET_RE.fullmatch(bucket):
        raise BadFileUri("fileuri names an invalid bucket")
    if not slash or not key:
        raise BadFileUri("fileuri names no object key")
    if _CONTROL.search(key):
        raise BadFileUri("fileuri object key contains control characters")
    if any(part in (".", "..") for part in key.split("/")):
        raise BadFileUri("fileuri object key contains '.' or '..' segments")
    return GsUri(bucket, key)


def encode_fileuri(uri: str) -> str:
    """The `fileuri` parameter for a URI, without padding (as Label Studio emits it)."""
    return base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii").rstrip("=")


def _whole_uri(text: str) -> bool:
    """A string that is one URI and nothing else (its key may hold spaces, quotes or brackets:
    cutting it at such a character would name, and grant, another object)."""
    return text.startswith("gs://") and text.count("gs://") == 1 and "\n" not in text and "\r" not in text


def find_gs_uris(data: Any) -> set[str]:
    """Every gs:// URI anywhere in task data: nested lists and dicts, and inside strings."""
    return set(_walk(data))


def _walk(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        stripped = value.strip()
        if _whole_uri(stripped):
            yield stripped  # a whole-string URI may contain spaces in its key
        else:
            # In prose a URI is often followed by punctuation: "see gs://b/a.png, then …".
            yield from (uri.rstrip(".,;:)]}") for uri in _EMBEDDED_URI.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def resolve_uris(data: Any, url_for: Callable[[str], str]) -> Any:
    """A copy of task data with every gs:// URI (those `find_gs_uris` finds) replaced by `url_for(uri)`."""
    if isinstance(data, str):
        stripped = data.strip()
        if _whole_uri(stripped):
            return url_for(stripped)

        def replace(match: re.Match[str]) -> str:
            uri = match.group(0)
            bare = uri.rstrip(".,;:)]}")
            return url_for(bare) + uri[len(bare) :]

        return _EMBEDDED_URI.sub(replace, data)
    if isinstance(data, dict):
        return {key: resolve_uris(value, url_for) for key, value in data.items()}
    if isinstance(data, list):
        return [resolve_uris(item, url_for) for item in data]
    return data
