"""Where a sync's CPU work runs: never on the event loop, which may also be serving media.

* Filtering a listing page (RE2: linear, microseconds a key) runs on this process's one sync
  thread (`off_loop`).
* Parsing task files — megabytes of JSON, JSONL or Parquet from whoever may write to the bucket —
  runs in a parser process (`Remote`), spawned on first use. Its work never holds this process's
  interpreter lock (a thread would: the C JSON parser keeps it for a whole line), each call (one
  chunk, one Parquet batch) has a time budget after which the process is killed and the file
  fails, and a crash (say, out of memory on a hostile file) fails that file only; the next call
  starts a new process. One process per serving process: a sync never takes more than one core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")
PARSE_BUDGET = 60.0  # seconds one call may take in the parser process (one chunk or batch: milliseconds)

_thread: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on this process's one sync thread. Made per process: a forked worker
    must not inherit a thread that does not exist in it."""
    global _thread
    if _thread is None or _thread[0] != os.getpid():
        _thread = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gateway-sync"))
    return await asyncio.get_running_loop().run_in_executor(_thread[1], functools.partial(function, *args))


class _ParserProcess:
    """A spawned process running the calls it is sent, one at a time (`_serve`)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs,), name="gateway-sync-parser", daemon=True)
        self.process.start()
        theirs.close()

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], budget: float) -> Any:
        from .parse import FileError

        try:
            self._conn.send((function, args))
            if not self._conn.poll(budget):
                self.kill()
                raise FileError(f"parsing took longer than {budget:g} seconds (for one piece of the file)")
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise FileError("the parser process ended unexpectedly (out of memory?)") from None
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self._conn.close()


_process: tuple[int, _ParserProcess] | None = None


def _in_process(function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """On the sync thread: the call, sent to this process's parser process (started if needed)."""
    global _process
    if _process is None or _process[0] != os.getpid() or not _process[1].process.is_alive():
        _process = (os.getpid(), _ParserProcess())
    return _process[1].call(function, args, PARSE_BUDGET)


def _serve(conn: Connection) -> None:
    """The parser process: calls in, results (or the exception) out, until the pipe closes."""
    while True:
        try:
            function, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer: tuple[bool, Any] = (True, function(*args))
        except Exception as exc:
            answer = (False, exc)
        try:
            conn.send(answer)
        except Exception as exc:  # an answer that cannot be pickled: its description can
            conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


_objects: dict[int, Any] = {}  # in the parser process: the live parsers by handle
_handles = itertools.count()


def _create(handle: int, cls: type, args: tuple[Any, ...]) -> None:
    _objects[handle] = cls(*args)


def _method(handle: int, name: str, args: tuple[Any, ...]) -> Any:
    if handle not in _objects:
        from .parse import FileError

        raise FileError("the parser process was restarted while the file was read")
    return getattr(_objects[handle], name)(*args)


def _discard(handle: int) -> None:
    _objects.pop(handle, None)


class Remote:
    """An object (a parser) living in the parser process; methods are called by name and their
    arguments and results pickled across. `async with Remote(cls, *args) as parser`."""

    def __init__(self, cls: type, *args: Any) -> None:
        self._cls, self._args = cls, args
        self._handle = next(_handles)

    async def __aenter__(self) -> Remote:
        await off_loop(_in_process, _create, (self._handle, self._cls, self._args))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if _process is not None and _process[1].process.is_alive():
            await off_loop(_in_process, _discard, (self._handle,))

    async def call(self, name: str, *args: Any) -> Any:
        return await off_loop(_in_process, _method, (self._handle, name, args))
