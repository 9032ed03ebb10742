"""The one storage protocol every backend implements, and the errors it may raise.

Modelled on imgproxy's `storage.Reader` and rclone's backends: `stat` for metadata, `open`
for a (possibly ranged) byte stream, `check` for readiness. The media handler never knows
which backend it talks to; one conformance suite (tests/test_backend_conformance.py) holds
every backend to the same answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..httpsem import ByteRange


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    size: int
    etag: str  # a quoted strong entity tag, the same for every user
    last_modified: int  # seconds since the epoch
    content_type: str
    content_encoding: str | None = None  # as stored ("gzip"); passed through, never decoded


@dataclass(frozen=True, slots=True)
class ListedObject:
    """One object of a bucket listing; the generation changes whenever the content does."""

    key: str
    generation: str
    size: int


class ObjectReader(Protocol):
    """An open download: the object's metadata, the span it delivers, then its bytes."""

    meta: ObjectMeta
    first: int
    last: int  # inclusive; last < first for an empty body
    partial: bool  # True when the span answers a Range (206)

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None:
        """Give the upstream connection back at once (or drop it when the body is unread)."""


class Backend(Protocol):
    name: str  # "gcs" or "local": the metrics label

    async def stat(self, key: str) -> ObjectMeta: ...

    async def open(self, key: str, byte_range: ByteRange | None) -> ObjectReader: ...

    async def check(self) -> None:
        """Raise StorageError unless the bucket can be reached with the configured access."""

    async def list_page(
        self, prefix: str, recursive: bool, page_token: str | None, page_size: int
    ) -> tuple[list[ListedObject], str | None]:
        """One page of the objects under `prefix` in byte order of their keys, and the token
        of the next page (None after the last). Not recursive: only the prefix's own level."""

    async def close(self) -> None: ...


class Writer(Protocol):
    """Whole-object writes, for target storages (annotation export). Both backends implement it.

    Every method is idempotent, so a caller may retry any of them after any failure: a whole
    object written again holds the same bytes, a delete of what is gone answers False.
    """

    async def put_object(self, key: str, data: bytes, content_type: str) -> str:
        """Write (create or replace) the whole object; returns its new generation, the value
        listings report and (quoted) ETags carry. The local backend keeps no content type: its
        reads derive one from the key's extension. Raises InvalidObjectKey for a key the
        storage cannot hold, BucketNotFound, UpstreamDenied naming the missing permission."""

    async def delete_object(self, key: str) -> bool:
        """True when the object was deleted, False when it did not exist (a retry after a
        delete whose answer was lost is not an error)."""

    async def object_md5(self, key: str) -> str | None:
        """The object's MD5 as GCS's `md5Hash` (base64 of the 16-byte digest); None when the
        object does not exist or the store holds no MD5 for it (GCS composite objects)."""


class StorageError(Exception):
    """A storage failure with the HTTP status the gateway answers and a reason code."""

    status = 502
    reason = "upstream_error"
    public_message: str | None = None  # a fixed answer text where the exception's own names a key


class ObjectNotFound(StorageError):
    status = 404
    reason = "not_found"
    public_message = "the object does not exist"


class RangeNotSatisfiable(StorageError):
    status = 416
    reason = "range_not_satisfiable"
    public_message = "the requested range lies outside the object"


class InvalidObjectKey(StorageError):
    """A key a write refuses: one resolving outside a local storage's directory, or naming a
    directory rather than a file."""

    status = 400
    reason = "invalid_key"


class BucketNotFound(StorageError):
    status = 404
    reason = "bucket_not_found"


class UpstreamDenied(StorageError):
    status = 502
    reason = "upstream_denied"


class UpstreamUnavailable(StorageError):
    status = 502
    reason = "upstream_unavailable"


class UpstreamTimeout(StorageError):
    status = 504
    reason = "upstream_timeout"


class UpstreamBroken(StorageError):
    """The upstream failed after the first body byte: the client connection must be aborted."""

    status = 502
    reason = "upstream_broken"
