"""JSON as RFC 8259 has it: Python's json reads NaN and ±Infinity, which are not JSON — they
cannot be answered as JSON again and PostgreSQL refuses them — so they raise ValueError."""

from __future__ import annotations

import json
from typing import Any


def loads(text: bytes | str) -> Any:
    return json.loads(text, parse_constant=_not_json)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")
