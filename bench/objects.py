"""The benchmark's objects: a 50 MiB one kept in memory, a 2 GiB one generated block by block,
and a 64 KiB one in a second bucket that the gateway serves as signed-URL redirects (scenario 3).

The 2 GiB object is never held whole: it is 1 MiB blocks, each a block of a small random pool
stamped with its index, so it is uploaded from a generator and any slice (e.g. a range past
2^31) can be recomputed for a check.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from .procs import BenchError, Emulator

MiB = 1 << 20
SMALL_SIZE = 50 * MiB
BIG_SIZE = 2048 * MiB
BUCKET = "bench-media"
SMALL_KEY = "bench/object-50MiB.bin"
BIG_KEY = "bench/object-2GiB.bin"
SIGNED_BUCKET = "bench-signed"  # the presign storage's bucket (a task's URI picks the storage by bucket)
SIGNED_SIZE = 64 * 1024
SIGNED_KEY = "bench/object-64KiB.bin"
_POOL_BLOCKS = 17  # prime: neighbouring blocks differ beyond their stamp


@dataclass
class SeededObject:
    key: str
    size: int
    md5: str = ""
    sha256: str = ""
    generation: str = ""
    bucket: str = BUCKET
    data: bytes | None = field(default=None, repr=False)  # the whole object (small one only)
    pool: list[bytes] | None = field(default=None, repr=False)  # block pool (generated one only)

    def blocks(self) -> Iterator[bytes]:
        if self.data is not None:
            for offset in range(0, self.size, MiB):
                yield self.data[offset : offset + MiB]
            return
        assert self.pool is not None
        for index in range(self.size // MiB):
            yield index.to_bytes(8, "big") + self.pool[index % len(self.pool)][8:]

    def slice(self, first: int, last: int) -> bytes:
        """Bytes first..last (inclusive), recomputed for the generated object."""
        if self.data is not None:
            return self.data[first : last + 1]
        assert self.pool is not None
        parts = []
        for index in range(first // MiB, last // MiB + 1):
            block = index.to_bytes(8, "big") + self.pool[index % len(self.pool)][8:]
            start = max(first - index * MiB, 0)
            stop = min(last - index * MiB, MiB - 1)
            parts.append(block[start : stop + 1])
        return b"".join(parts)

    def summary(self) -> dict[str, object]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "size": self.size,
            "md5": self.md5,
            "sha256": self.sha256,
            "generation": self.generation,
        }


def _upload(emulator: Emulator, obj: SeededObject) -> SeededObject:
    md5, sha256 = hashlib.md5(), hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for block in obj.blocks():
            md5.update(block)
            sha256.update(block)
            yield block

    stored = emulator.upload(obj.bucket, obj.key, obj.size, hashed())
    obj.md5, obj.sha256 = md5.hexdigest(), sha256.hexdigest()
    obj.generation = str(stored.get("generation", ""))
    if int(stored.get("size", -1)) != obj.size:
        raise BenchError(f"{obj.key}: the emulator stored {stored.get('size')} bytes, expected {obj.size}")
    if stored.get("md5Hash") and base64.b64decode(stored["md5Hash"]).hex() != obj.md5:
        raise BenchError(f"{obj.key}: the emulator's md5 differs from the uploaded bytes'")
    return obj


def seed(emulator: Emulator, with_big: bool) -> dict[str, SeededObject]:
    """Create the buckets and upload the objects; returns them by role ("small", "big", "signed")."""
    emulator.create_bucket(BUCKET)
    emulator.create_bucket(SIGNED_BUCKET)
    objects = {"small": _upload(emulator, SeededObject(SMALL_KEY, SMALL_SIZE, data=os.urandom(SMALL_SIZE)))}
    signed = SeededObject(SIGNED_KEY, SIGNED_SIZE, bucket=SIGNED_BUCKET, data=os.urandom(SIGNED_SIZE))
    objects["signed"] = _upload(emulator, signed)
    if with_big:
        pool = [os.urandom(MiB) for _ in range(_POOL_BLOCKS)]
        objects["big"] = _upload(emulator, SeededObject(BIG_KEY, BIG_SIZE, pool=pool))
    return objects
