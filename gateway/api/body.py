"""Request bodies of the management API, the webhook and the sign-in: bounded in size before they
are read, bounded in nesting before they are parsed (gateway/strictjson.py), and parsed in a thread
when large, so a big body never holds the event loop that streams media.

Refusals are JSON: 413 `body_too_large` naming the limit, 400 `bad_json` saying why (never quoting
the body).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import strictjson
from ..errors import Refused

KiB, MiB = 1024, 1024**2
TASK_IMPORT_BYTES = 64 * MiB  # a project's task list (also the app's client_max_size)
ANNOTATION_BYTES = 32 * MiB  # a webhook (bulk ANNOTATIONS_CREATED carries every task) or one annotation
SETTINGS_BYTES = 1 * MiB  # a storage's fields (a credentials JSON is a few KiB)
SIGN_IN_BYTES = 64 * KiB  # a token
IN_THREAD_BYTES = 64 * KiB  # larger bodies are parsed off the event loop (~1 ms of parsing here)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 beyond `limit`: at once when Content-Length says so, else as
    soon as the chunks received pass it (chunked bodies)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def parse_json(body: bytes) -> Any:
    try:
        if len(body) <= IN_THREAD_BYTES:
            return strictjson.loads(body)
        return await asyncio.to_thread(strictjson.loads, body)
    except strictjson.BadJson as exc:
        raise Refused(400, "bad_json", f"the body is not valid JSON: {exc}") from None


async def json_body(request: web.Request, limit: int) -> Any:
    return await parse_json(await read_body(request, limit))


def _too_large(limit: int) -> Refused:
    return Refused(413, "body_too_large", f"the body may hold at most {limit} bytes here")
