"""`regex_filter` on RE2 (gateway/keyfilter.py): Label Studio's semantics, linear time, and a
refusal naming the construct for what RE2 cannot run — the same words in the API and the file."""

from __future__ import annotations

import re
import time

import pytest

from gateway.config import ConfigError, settings_from_dict
from gateway.keyfilter import FilterError, compile_filter

KEYS = ["a.jpg", "images/a.jpg", "images/a.JPG", "images/deeper/b.png", "x/images/c.jpg", "images/", "ü/é.jpg", "a1/2"]
PATTERNS = [r".*\.jpg$", r"\.jpg$", r"images/", r"images/[^/]+\.(jpg|png)$", r"(?i).*\.jpg", r"[a-z]\d/", r".*é", "a"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_as_label_studio_does(pattern):
    """`re.match` against the whole key: anchored at the start, not at the end."""
    matches = compile_filter(pattern)
    assert matches is not None
    assert [key for key in KEYS if matches(key)] == [key for key in KEYS if re.match(pattern, key)]


def test_an_empty_filter_selects_everything():
    assert compile_filter("") is None


def test_catastrophic_backtracking_costs_nothing():
    """Issue 16 case 1: Python's re takes about a second for n = 24 and doubles with each `a`."""
    matches = compile_filter("redos/(a+)+$")
    assert matches is not None
    started = time.perf_counter()
    assert not matches("redos/" + "a" * 1000 + "!")
    assert matches("redos/" + "a" * 1000)
    assert time.perf_counter() - started < 0.5  # linear: microseconds, on any machine


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        (r"(a)\1", r"a backreference (\1)"),
        (r"(?P<n>a)(?P=n)", "a named backreference"),
        (r"images/(?=.*\.jpg)", "look-ahead (?=…)"),
        (r"images/(?!tmp)", "negative look-ahead (?!…)"),
        (r".*(?<=\.jpg)", "look-behind (?<=…)"),
        (r".*(?<!\.tmp)$", "negative look-behind (?<!…)"),
        (r"(?>a+)b", "an atomic group (?>…)"),
        (r"a*+b", "a possessive"),
    ],
)
def test_what_re2_cannot_run_is_refused_naming_the_construct(pattern, construct):
    with pytest.raises(FilterError) as caught:
        compile_filter(pattern)
    message = str(caught.value)
    assert construct in message and "RE2" in message and "\n" not in message
    # The config file says the same, on one line naming the key.
    raw = {"auth": {"secret": "s" * 40}, "storages": [{"id": "s", "project": "1", "type": "gcs", "bucket": "bkt"}]}
    raw["storages"][0]["regex_filter"] = pattern
    with pytest.raises(ConfigError) as config:
        settings_from_dict(raw, env={})
    assert str(config.value) == f"[[storages]] id='s'.regex_filter: {message}"


def test_invalid_patterns_keep_pythons_reason():
    with pytest.raises(FilterError, match=r"^not a valid regular expression \(missing \), unterminated subpattern"):
        compile_filter("(unclosed")
