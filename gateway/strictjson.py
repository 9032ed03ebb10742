"""JSON from untrusted senders, as RFC 8259 has it, with its nesting bounded before parsing.

Python's json reads NaN and ±Infinity, which are not JSON (they cannot be answered as JSON again
and PostgreSQL refuses them), other encodings than UTF-8, and `\\ud800` escapes that name no
character (UTF-8 cannot encode them): all refused here. Nesting is counted before any parser sees
the text — Python's parser recurses once per level and raises RecursionError near 1,000 levels,
ijson's C backend needs memory growing with the square of the depth — at C speed (regular
expressions and `bytes.translate`), as fast as the parse itself. Duplicate keys are read as
Python (and Label Studio) read them: the last one wins.
"""

from __future__ import annotations

import array
import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 100  # no task, annotation or setting needs more; deeper JSON is refused unparsed
BOM = b"\xef\xbb\xbf"  # as some editors save UTF-8; accepted and dropped

_BODY = rb'(?:[^"\\]++|\\[\s\S])*+'  # a string's content; possessive, so never backtracking
_STRING = re.compile(rb'"' + _BODY + rb'"')
_STRING_REST = re.compile(_BODY + rb'(")?')  # the rest of a string begun in an earlier piece
_BLOCK = 1024 * 1024  # brackets summed per step: nesting too deep is refused without reading on
_LEVELS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1 opens, -1 closes
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadJson(ValueError):
    """Why a text is refused; the message never quotes the text."""


class DepthGuard:
    """The nesting depth of JSON text fed piece by piece (a stream's chunks, or a whole body);
    `feed` raises BadJson as soon as it exceeds `limit`. Brackets inside strings do not count."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        self.limit = limit
        self.depth = 0
        self._in_string = False
        self._escaped = False  # the previous piece ended inside a string, on a backslash

    def feed(self, data: bytes) -> None:
        start = 0
        if self._escaped and data:
            start, self._escaped = 1, False
        if self._in_string:
            rest = _STRING_REST.match(data, start)
            if rest.group(1) is None:  # the string goes on in the next piece
                self._escaped = rest.end() < len(data)  # stopped before a lone backslash
                return
            start, self._in_string = rest.end(), False
        piece = data[start:]
        lone_backslash = (len(piece) - len(piece.rstrip(b"\\"))) % 2 == 1
        if lone_backslash:
            piece = piece[:-1]
        # Strings removed in one C-level pass with a literal replacement. The quote appended
        # closes a string the piece ends in, so every match succeeds and the scan stays linear
        # (a failed match would be retried at each escaped quote after it); it survives only
        # when the piece ends outside strings.
        outside = _STRING.sub(b"", piece + b'"')
        self._in_string = not outside.endswith(b'"')
        self._escaped = self._in_string and lone_backslash
        levels = outside.translate(_LEVELS, _NOT_BRACKETS)
        for begin in range(0, len(levels), _BLOCK):
            steps = array.array("b", levels[begin : begin + _BLOCK])
            if self.depth + max(accumulate(steps)) > self.limit:
                raise BadJson(f"nested deeper than {self.limit} levels")
            self.depth += sum(steps)


def loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The value of a JSON text (UTF-8, an optional BOM); BadJson (a ValueError) says why not."""
    data = data.removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadJson("not UTF-8 text") from None
    DepthGuard(max_depth).feed(data)
    try:
        value = json.loads(text, parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError (with the position) or NaN/Infinity
        raise BadJson(str(exc)) from None
    if _SURROGATE_ESCAPE.search(data) and not _unicode(value):
        raise BadJson("a \\u escape names a lone surrogate, which is no character")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unicode(value: Any) -> bool:
    """Whether every string of `value` is Unicode text (UTF-8 encodable)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
