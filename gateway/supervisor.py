"""Several worker processes on one port: fork, forward signals, restart a worker that dies.

Each worker binds the port itself with SO_REUSEPORT, so the kernel spreads connections and no
process proxies another's traffic. Workers run in their own process group: a terminal's
Ctrl-C reaches only the supervisor, which asks each worker once to stop gracefully.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from .config import Settings
from .metrics import mark_process_dead

log = logging.getLogger("gateway.supervisor")
_MIN_HEALTHY_SECONDS = 5.0


def _worker_main(target: Callable[[Settings], None], settings: Settings) -> None:
    os.setpgrp()
    target(settings)


def supervise(settings: Settings, target: Callable[[Settings], None]) -> None:
    context = multiprocessing.get_context("fork")
    workers: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}
    stopping = False
    exit_code = 0

    def spawn() -> None:
        process = context.Process(target=_worker_main, args=(target, settings), name="gateway-worker")
        process.start()
        workers[process.sentinel] = (process, time.monotonic())

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers (signal %d)", len(workers), signum)
        stopping = True
        for process, _ in workers.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(settings.server.workers):
        spawn()
    while workers:
        for sentinel in wait(list(workers)):
            process, started = workers.pop(sentinel)
            process.join()
            if process.pid is not None:
                mark_process_dead(process.pid)
            if stopping:
                exit_code = exit_code or (1 if process.exitcode else 0)
                continue
            if time.monotonic() - started < _MIN_HEALTHY_SECONDS:
                log.error("worker %s exited with %s right after start; stopping", process.pid, process.exitcode)
                exit_code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
            spawn()
    if exit_code:
        sys.exit(exit_code)
