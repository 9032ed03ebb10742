"""A local directory served as a bucket: the demo's default and a fast test double of GCS.

Keys map to paths below `root`; a key that resolves outside it (symlinks included) does not
exist. (The resolve-then-open check is not atomic against someone swapping symlinks inside
`root` concurrently: the local backend serves directories the operator controls.) Reads happen
in the default thread pool, one chunk at a time, so memory stays constant.

Writes (`put_object`) go to a temporary file beside the target, flushed to disk, then
`os.replace`d over it: a reader sees the old bytes or the new, never a part. The temporary
files are named `.gateway-upload-*.tmp` and left out of listings (one left behind by a crash is
never taken for an object). A write resolves symlinks in the key's directories, not in its last
segment: the object's own name is replaced or unlinked, never the file a link points to.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import mimetypes
import os
import secrets
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from ..httpsem import ByteRange
from .base import (
    BucketNotFound,
    InvalidObjectKey,
    ListedObject,
    ObjectMeta,
    ObjectNotFound,
    RangeNotSatisfiable,
    StorageError,
    UpstreamBroken,
)

_TEMP_PREFIX = ".gateway-upload-"
_TEMP_SUFFIX = ".tmp"


class LocalBackend:
    name = "local"

    def __init__(self, root: str, chunk_size: int) -> None:
        self._root = Path(root).resolve()
        self._chunk_size = chunk_size
        self._cursors: dict[tuple[str, bool, str | None], Iterator[tuple[str, os.stat_result]]] = {}

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root):
            raise ObjectNotFound(key)
        return path

    def _open(self, key: str) -> tuple[BinaryIO, ObjectMeta]:
        """Open first, then describe the open file: the metadata is that of the bytes served."""
        try:
            handle = self._path(key).open("rb")
        except (OSError, ValueError):
            raise ObjectNotFound(key) from None
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            handle.close()
            raise ObjectNotFound(key)
        content_type, encoding = mimetypes.guess_type(key.rsplit("/", 1)[-1])
        if encoding not in (None, "gzip", "br"):  # bzip2, xz …: no HTTP content coding exists
            content_type, encoding = "application/octet-stream", None
        meta = ObjectMeta(
            size=st.st_size,
            etag=f'"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"',
            last_modified=int(st.st_mtime),
            content_type=content_type or "application/octet-stream",
            content_encoding=encoding,
        )
        return handle, meta

    def _stat(self, key: str) -> ObjectMeta:
        handle, meta = self._open(key)
        handle.close()
        return meta

    async def stat(self, key: str) -> ObjectMeta:
        return await asyncio.to_thread(self._stat, key)

    async def open(self, key: str, byte_range: ByteRange | None) -> LocalReader:
        handle, meta = await asyncio.to_thread(self._open, key)
        first, last = 0, meta.size - 1
        if byte_range is not None:
            span = byte_range.resolve(meta.size)
            if span is None:
                handle.close()
                raise RangeNotSatisfiable(key)
            first, last = span
        return LocalReader(meta, handle, first, last, byte_range is not None, self._chunk_size)

    async def check(self) -> None:
        if not os.access(self._root, os.R_OK | os.X_OK):
            raise StorageError(f"directory {self._root} is not readable")

    async def close(self) -> None:
        pass

    async def put_object(self, key: str, data: bytes, content_type: str) -> str:
        """Atomic replace; `content_type` is not kept (reads derive it from the key's extension)."""
        return await asyncio.to_thread(self._put, key, data)

    async def delete_object(self, key: str) -> bool:
        return await asyncio.to_thread(self._delete, key)

    async def object_md5(self, key: str) -> str | None:
        return await asyncio.to_thread(self._md5, key)

    def _write_path(self, key: str) -> Path:
        """The file a write of `key` touches: its directory resolved inside the root, its own
        name as given. Keys a bucket could hold but a directory cannot are refused."""
        segments = key.split("/")
        if ".." in segments:
            raise InvalidObjectKey(f"key {key!r} escapes the storage directory (a '..' segment)")
        if not key or "" in segments or "." in segments or "\0" in key:
            raise InvalidObjectKey(f"key {key!r} has an empty or '.' segment: a local storage cannot hold it")
        if segments[-1].startswith(_TEMP_PREFIX):
            raise InvalidObjectKey(f"key {key!r} is named like the gateway's temporary files")
        parent = (self._root / key).parent.resolve()
        if not parent.is_relative_to(self._root):
            raise InvalidObjectKey(f"key {key!r} resolves outside the storage directory")
        return parent / segments[-1]

    def _put(self, key: str, data: bytes) -> str:
        path = self._write_path(key)
        if not self._root.is_dir():  # never created behind the operator's back (an unmounted volume …)
            raise BucketNotFound(f"directory {self._root} does not exist")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidObjectKey(f"key {key!r} lies below a file, not a directory") from None
        except OSError as exc:
            raise StorageError(f"cannot create the directory of {key!r}: {exc.strerror}") from None
        if path.is_dir() and not path.is_symlink():
            raise InvalidObjectKey(f"key {key!r} names a directory")
        temp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(12)}{_TEMP_SUFFIX}"
        created = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            created = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:
            if created:
                temp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {key!r}: {exc.strerror}") from None
        _sync_directory(path.parent)
        return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"

    def _delete(self, key: str) -> bool:
        """Unlink the file; directories left empty stay (listings never show them)."""
        path = self._write_path(key)
        try:
            if path.is_dir():
                return False  # a "folder", not an object
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r}: {exc.strerror}") from None
        _sync_directory(path.parent)
        return True

    def _md5(self, key: str) -> str | None:
        try:
            handle, _meta = self._open(key)
        except ObjectNotFound:
            return None
        digest = hashlib.md5(usedforsecurity=False)
        with handle:
            try:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            except OSError as exc:
                raise StorageError(f"cannot read {key!r}: {exc.strerror}") from None
        return base64.b64encode(digest.digest()).decode("ascii")

    async def list_page(
        self, prefix: str, recursive: bool, page_token: str | None, page_size: int
    ) -> tuple[list[ListedObject], str | None]:
        return await asyncio.to_thread(self._list_page, prefix, recursive, page_token, page_size)

    def _list_page(
        self, prefix: str, recursive: bool, page_token: str | None, page_size: int
    ) -> tuple[list[ListedObject], str | None]:
        """The page after key `page_token`. The walk of the previous page is resumed when this
        process still holds it (a listing of many pages stays linear); otherwise it walks again
        and skips up to the token."""
        if not self._root.is_dir():
            raise BucketNotFound(f"directory {self._root} does not exist")
        cursor = self._cursors.pop((prefix, recursive, page_token), None)
        if cursor is None:
            walk = self._walk(self._root, "", prefix, recursive)
            if page_token is not None:
                token = page_token.encode()
                walk = (item for item in walk if item[0].encode() > token)
        else:
            walk = cursor
        page: list[ListedObject] = []
        for key, st in walk:
            page.append(ListedObject(key, f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}", st.st_size))
            if len(page) == page_size:
                following = next(walk, None)
                if following is None:
                    return page, None
                self._cursors[(prefix, recursive, key)] = itertools.chain([following], walk)
                while len(self._cursors) > 16:  # abandoned listings
                    del self._cursors[next(iter(self._cursors))]
                return page, key
        return page, None

    def _walk(self, directory: Path, base: str, prefix: str, recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
        """Regular files below `directory` whose keys start with `prefix`, in byte order of keys.

        Siblings sort by name, a directory's name taken with its '/' so that 'a.txt' < 'a/x'.
        """
        try:
            entries = [(entry, entry.is_dir(follow_symlinks=False)) for entry in os.scandir(directory)]
        except OSError:
            return
        entries.sort(key=lambda item: (item[0].name + "/" if item[1] else item[0].name).encode())
        for entry, is_dir in entries:
            key = base + entry.name
            if is_dir:
                folder = key + "/"
                inside = folder.startswith(prefix)
                if prefix.startswith(folder) or (inside and recursive):
                    yield from self._walk(Path(entry.path), folder, prefix, recursive)
            elif entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX):
                continue  # a write in progress, or one a crash interrupted
            elif key.startswith(prefix) and (recursive or "/" not in key[len(prefix) :]):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield key, st


def _sync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable (best effort: not every file system can)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalReader:
    def __init__(self, meta: ObjectMeta, handle: BinaryIO, first: int, last: int, partial: bool, chunk: int) -> None:
        self.meta, self.first, self.last, self.partial = meta, first, last, partial
        self._handle, self._chunk = handle, chunk

    def _read(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self._handle.fileno(), size, offset)
        except OSError as exc:
            raise UpstreamBroken(f"file read failed: {exc.strerror}") from None

    async def chunks(self) -> AsyncIterator[bytes]:
        offset, end = self.first, self.last + 1
        try:
            while offset < end:
                data = await asyncio.to_thread(self._read, offset, min(self._chunk, end - offset))
                if not data:
                    raise UpstreamBroken("file shrank while it was being read")
                offset += len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()
