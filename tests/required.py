"""One rule for what a missing server or tool means: skipped locally, a failure under CI.

`.ci/run` sets CI=true, but CI services spell it 1, True or yes as well; anything but empty,
0, false or no counts, for every suite that must not skip under CI (PostgreSQL, Label Studio
and nginx, chromium).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """Skip the test for want of `message`'s tool, or fail it under CI."""
    if under_ci():
        pytest.fail(f"{message} (required under CI)", pytrace=False)
    pytest.skip(message)
