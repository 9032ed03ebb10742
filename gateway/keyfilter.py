"""`regex_filter`: which listed keys a storage imports, matched by RE2.

Label Studio applies the filter with Python's `re.match` against the whole key (prefix
included). Object names come from whoever may write to the bucket, and a backtracking engine
given an innocent-looking filter (`(a+)+$`) and one crafted key takes seconds to minutes per key;
RE2 matches in time linear in the key, whatever the pattern. It has no backreferences and no
look-around (they need backtracking): such filters are refused, naming the construct.

Differences a filter may notice: `$` matches only at the very end (Python's also before a final
newline) and `\\d`, `\\w`, `\\s` are ASCII classes (Python's are Unicode).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import re2

# RE2's words for what it refuses → what the construct is called.
_CONSTRUCTS = (
    ("invalid perl operator: (?=", "look-ahead (?=…)"),
    ("invalid perl operator: (?!", "negative look-ahead (?!…)"),
    ("invalid perl operator: (?<=", "look-behind (?<=…)"),
    ("invalid perl operator: (?<!", "negative look-behind (?<!…)"),
    ("invalid perl operator: (?P", "a named backreference (?P=…)"),
    ("invalid perl operator: (?(", "a conditional group (?(…)…|…)"),
    ("invalid perl operator: (?>", "an atomic group (?>…)"),
    ("bad repetition operator: ", "a possessive or repeated quantifier"),
)
_BACKREFERENCE = re.compile(r"invalid escape sequence: \\[1-9]")


class FilterError(ValueError):
    """A filter the gateway will not run; the message names the construct, not the field."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.never_capture = True  # only whether a key matches counts
    return options


_OPTIONS = _options()


def compile_filter(pattern: str) -> Callable[[str], bool] | None:
    """Whether a key matches `pattern` as Label Studio applies it (None: empty, every key).

    The pattern must be valid for Python (Label Studio's engine) and runnable by RE2 (ours)."""
    if not pattern:
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        raise FilterError(f"not a valid regular expression ({exc})") from None
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise FilterError(_refusal(exc)) from None
    return lambda key: compiled.match(key) is not None


def _refusal(exc: Exception) -> str:
    detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    if _BACKREFERENCE.match(detail):
        construct = f"a backreference ({detail.rpartition(': ')[2]})"
    else:
        construct = next((name for words, name in _CONSTRUCTS if detail.startswith(words)), None)
    if construct is None:
        return f"RE2, the gateway's linear-time matcher, cannot run this pattern ({detail})"
    return (
        f"uses {construct}, which RE2, the gateway's linear-time matcher, cannot run "
        f"(no backreferences or look-around; RE2 says: {detail})"
    )
