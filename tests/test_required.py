"""The one CI rule (tests/required.py): a missing server fails under any CI spelling, skips locally."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import test_label_studio
from .required import missing, under_ci


def outcome(call) -> BaseException | None:  # type: ignore[no-untyped-def]
    """What `call` raised, skips and failures included (pytest.raises would let a skip through)."""
    try:
        call()
    except BaseException as exc:  # pytest's outcomes (skip, fail) are BaseExceptions
        return exc
    return None


@pytest.mark.parametrize(
    ("value", "ci"),
    [
        *[(value, True) for value in ("true", "1", "True", "yes")],
        *[(value, False) for value in ("", "0", "false", "no")],
    ],
)
def test_any_ci_spelling_makes_a_missing_tool_fail(monkeypatch, value, ci):
    monkeypatch.setenv("CI", value)
    assert under_ci() is ci
    raised = outcome(lambda: missing("a tool"))
    assert isinstance(raised, pytest.fail.Exception if ci else pytest.skip.Exception)


def test_the_drop_in_suite_fails_under_ci_1_without_label_studio(monkeypatch, tmp_path):
    """Issue 16 case 6: `CI=1` skipped all the Label Studio tests (only "true" counted)."""
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(test_label_studio, "LS_VENV", tmp_path / "no-label-studio")
    assert isinstance(outcome(test_label_studio._require_tools), pytest.fail.Exception)


def test_no_suite_reads_ci_itself():
    """Every rule once: only tests/required.py looks at the CI variable."""
    readers = [
        path.name
        for path in Path(__file__).parent.glob("*.py")
        if path.name not in ("required.py", Path(__file__).name)
        and re.search(r"""environ(\.get)?[\[(]\s*["']CI["']|getenv\(\s*["']CI["']""", path.read_text())
    ]
    assert readers == []
