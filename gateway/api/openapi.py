"""The management API's OpenAPI 3.1 description, served at /api/openapi.json (no token needed)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web


@cache
def document() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "openapi.json").read_text(encoding="utf-8"))


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(document())
