"""The parser process (gateway/sync/cpu.py): a call over budget or a crash fails one file, never
the gateway, and the next call gets a fresh process."""

from __future__ import annotations

import os
import time

import pytest

from gateway.sync import cpu
from gateway.sync.parse import FileError


async def test_a_call_over_its_budget_is_killed_and_the_next_call_works(monkeypatch):
    monkeypatch.setattr(cpu, "PARSE_BUDGET", 0.5)
    assert await cpu.off_loop(cpu._in_process, len, ("abc",)) == 3
    stuck = cpu._process[1].process
    started = time.monotonic()
    with pytest.raises(FileError, match=r"longer than 0\.5 seconds"):
        await cpu.off_loop(cpu._in_process, time.sleep, (30,))
    assert time.monotonic() - started < 10
    assert not stuck.is_alive()
    assert await cpu.off_loop(cpu._in_process, len, ("abcd",)) == 4
    assert cpu._process[1].process.pid != stuck.pid


async def test_a_crash_fails_the_call_and_the_next_call_works():
    assert await cpu.off_loop(cpu._in_process, len, ("x",)) == 1
    with pytest.raises(FileError, match="ended unexpectedly"):
        await cpu.off_loop(cpu._in_process, os._exit, (3,))
    assert await cpu.off_loop(cpu._in_process, len, ("xy",)) == 2


async def test_errors_come_back_as_raised():
    with pytest.raises(ZeroDivisionError):
        await cpu.off_loop(cpu._in_process, divmod, (1, 0))
