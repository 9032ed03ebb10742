"""A GCS JSON API stand-in holding one large synthetic bucket: the storage of scenario 6 (sync).

fake-gcs-server cannot hold 100,000 objects within a benchmark's time. Its memory backend finds
an object by a linear scan of the bucket (building two ID strings per comparison), so every
upload costs O(n): measured here, 20,000 concurrent uploads took 287 s, and its `-data` preload
goes through the same code (5,000 objects 8.8 s, 10,000 24 s, 20,000 102 s: quadratic).
Its filesystem backend uploads in O(1) (~575 objects/s) but reads and decodes every object's
metadata on every listing page (20,000 objects: 0.6 s per page of 1,000), so listing 100,000
objects would take minutes and the benchmark would measure the emulator. See bench/README.md.

This server answers what a sync asks, the way GCS does, with O(page) work per listing page:

    GET    /storage/v1/b/B                     the bucket resource
    GET    /storage/v1/b/B/o                   list: prefix, delimiter, maxResults (<= 1000),
                                               pageToken, fields (partial response), byte order
    GET    /storage/v1/b/B/o/KEY               the object resource; ?alt=media: its bytes, with
                                               X-Goog-Generation, Last-Modified, ETag, X-Goog-Hash
    POST   /upload/storage/v1/b/B/o?uploadType=media&name=KEY   create or replace (new generation)
    DELETE /storage/v1/b/B/o/KEY

At start it generates `--count` objects named `PREFIX + obj-%07d.json`, each a small JSON file
holding one task (so it is a valid task file too), plus `--outside` objects outside the prefix.
Everything is kept in memory: a sorted key list (bisect) and a dict of objects.

    python -m bench.synthgcs --port 8100 --bucket bench-sync --prefix sync/ --count 100000
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web

MAX_RESULTS = 1000
_AFTER = "\U0010ffff"  # sorts after any character a key holds: skips a collapsed prefix
_UPLOAD_LIMIT = 64 << 20


def key_name(prefix: str, index: int) -> str:
    return f"{prefix}obj-{index:07d}.json"


def task_body(index: int) -> bytes:
    """Object `index`'s bytes: one task as JSON (a task file with one task, or any blob)."""
    return json.dumps({"data": {"text": f"synthetic task {index:07d}"}}).encode() + b"\n"


@dataclass(slots=True)
class Obj:
    generation: int
    body: bytes
    md5: str
    content_type: str
    updated: dt.datetime


class Bucket:
    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: list[str] = []  # sorted: Python compares str by code point, i.e. UTF-8 byte order
        self.objects: dict[str, Obj] = {}
        self._generation = int(time.time() * 1_000_000)
        self.created = dt.datetime.now(dt.UTC)

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> Obj:
        self._generation += 1
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        obj = Obj(self._generation, body, md5, content_type, dt.datetime.now(dt.UTC))
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = obj
        return obj

    def seed(self, prefix: str, count: int, outside: int) -> None:
        """Bulk creation: keys generated in order, so no insort per key."""
        now = dt.datetime.now(dt.UTC)
        names = [key_name(prefix, i) for i in range(count)] + [f"outside/obj-{i:07d}.json" for i in range(outside)]
        for index, key in enumerate(names):
            body = task_body(index)
            self._generation += 1
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            self.objects[key] = Obj(self._generation, body, md5, "application/json", now)
        self.keys = sorted(self.objects)

    def delete(self, key: str) -> bool:
        if self.objects.pop(key, None) is None:
            return False
        index = bisect.bisect_left(self.keys, key)
        del self.keys[index]
        return True

    def resource(self, key: str, obj: Obj) -> dict[str, Any]:
        stamp = obj.updated.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "kind": "storage#object",
            "id": f"{self.name}/{key}/{obj.generation}",
            "name": key,
            "bucket": self.name,
            "generation": str(obj.generation),
            "metageneration": "1",
            "contentType": obj.content_type,
            "size": str(len(obj.body)),
            "md5Hash": obj.md5,
            "timeCreated": stamp,
            "updated": stamp,
        }

    def list(self, prefix: str, delimiter: str, max_results: int, start: str | None) -> dict[str, Any]:
        """One page in byte order: items and collapsed prefixes both count toward max_results."""
        keys = self.keys
        index = bisect.bisect_left(keys, start if start is not None else prefix)
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        while index < len(keys) and len(items) + len(prefixes) < max_results:
            key = keys[index]
            if not key.startswith(prefix):
                break
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    folder = key[: cut + len(delimiter)]
                    prefixes.append(folder)
                    index = bisect.bisect_left(keys, folder + _AFTER, index)
                    continue
            items.append(self.resource(key, self.objects[key]))
            index += 1
        answer: dict[str, Any] = {"kind": "storage#objects"}
        if index < len(keys) and keys[index].startswith(prefix):
            answer["nextPageToken"] = base64.urlsafe_b64encode(keys[index].encode()).decode()
        if prefixes:
            answer["prefixes"] = prefixes
        if items:
            answer["items"] = items
        return answer


def parse_fields(fields: str) -> dict[str, set[str] | None]:
    """`items(name,generation),nextPageToken` -> {"items": {"name", "generation"}, "nextPageToken": None}."""
    selected: dict[str, set[str] | None] = {}
    depth, start = 0, 0
    parts = []
    for position, char in enumerate(fields + ","):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(fields[start:position].strip())
            start = position + 1
    for part in filter(None, parts):
        name, _, inner = part.partition("(")
        selected[name.strip()] = {f.strip() for f in inner.rstrip(")").split(",")} if inner else None
    return selected


def partial(answer: dict[str, Any], fields: str) -> dict[str, Any]:
    """GCS's partial response: only the fields asked for (one level of nesting, as the gateway asks)."""
    selected = parse_fields(fields)
    out: dict[str, Any] = {}
    for name, inner in selected.items():
        if name not in answer:
            continue
        value = answer[name]
        if inner is not None and isinstance(value, list):
            value = [{k: v for k, v in item.items() if k in inner} for item in value]
        out[name] = value
    return out


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "errors": [{"message": message}]}}
    return web.json_response(body, status=status)


def make_app(bucket: Bucket) -> web.Application:
    def own(request: web.Request) -> bool:
        return request.match_info["bucket"] == bucket.name

    async def get_bucket(request: web.Request) -> web.Response:
        if not own(request):
            return _error(404, "bucket not found")
        created = bucket.created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return web.json_response({"kind": "storage#bucket", "name": bucket.name, "timeCreated": created})

    async def list_objects(request: web.Request) -> web.Response:
        if not own(request):
            return _error(404, "bucket not found")
        query = request.query
        try:
            max_results = min(int(query.get("maxResults", MAX_RESULTS)), MAX_RESULTS)
        except ValueError:
            return _error(400, "invalid maxResults")
        token = query.get("pageToken")
        start = None
        if token:
            try:
                start = base64.urlsafe_b64decode(token.encode()).decode()
            except ValueError:
                return _error(400, "invalid pageToken")
        answer = bucket.list(query.get("prefix", ""), query.get("delimiter", ""), max(max_results, 1), start)
        if "fields" in query:
            answer = partial(answer, query["fields"])
        return web.Response(body=json.dumps(answer).encode(), content_type="application/json")

    async def get_object(request: web.Request) -> web.StreamResponse:
        if not own(request):
            return _error(404, "bucket not found")
        key = unquote(request.match_info["key"])
        obj = bucket.objects.get(key)
        if obj is None:
            return _error(404, "no such object")
        if request.query.get("alt") != "media":
            answer = bucket.resource(key, obj)
            if "fields" in request.query:
                answer = partial(answer, request.query["fields"])
            return web.json_response(answer)
        headers = {
            "X-Goog-Generation": str(obj.generation),
            "X-Goog-Metageneration": "1",
            "X-Goog-Stored-Content-Length": str(len(obj.body)),
            "X-Goog-Hash": f"md5={obj.md5}",
            "ETag": f'"{obj.md5}"',
            "Last-Modified": format_datetime(obj.updated, usegmt=True),
        }
        return web.Response(body=obj.body, headers=headers, content_type=obj.content_type)

    async def upload(request: web.Request) -> web.Response:
        if not own(request):
            return _error(404, "bucket not found")
        if request.query.get("uploadType") != "media" or not request.query.get("name"):
            return _error(400, "only uploadType=media with a name is supported")
        body = await request.read()
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        key = request.query["name"]
        return web.json_response(bucket.resource(key, bucket.put(key, body, content_type)))

    async def delete_object(request: web.Request) -> web.Response:
        if not own(request):
            return _error(404, "bucket not found")
        if not bucket.delete(unquote(request.match_info["key"])):
            return _error(404, "no such object")
        return web.Response(status=204)

    app = web.Application(client_max_size=_UPLOAD_LIMIT)
    app.router.add_get("/storage/v1/b/{bucket}", get_bucket)
    app.router.add_get("/storage/v1/b/{bucket}/o", list_objects)
    app.router.add_get("/storage/v1/b/{bucket}/o/{key:.+}", get_object)
    app.router.add_delete("/storage/v1/b/{bucket}/o/{key:.+}", delete_object)
    app.router.add_post("/upload/storage/v1/b/{bucket}/o", upload)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.synthgcs", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="sync/")
    parser.add_argument("--count", type=int, default=100_000, help="objects under the prefix")
    parser.add_argument("--outside", type=int, default=0, help="objects outside the prefix")
    args = parser.parse_args(argv)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # die with the harness
    started = time.perf_counter()
    bucket = Bucket(args.bucket)
    bucket.seed(args.prefix, args.count, args.outside)
    print(f"synthgcs: {len(bucket.keys)} objects in {time.perf_counter() - started:.2f}s", file=sys.stderr, flush=True)
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        make_app(bucket), host=args.host, port=args.port, access_log=None, print=None, shutdown_timeout=1.0, loop=loop
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
