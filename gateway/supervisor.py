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


_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_KILL_GRACE_SECONDS = 5.0


def _worker_main(target: Callable[[Settings, int], None], settings: Settings, index: int) -> None:
    # Forked with the supervisor's handlers installed and these signals blocked: a SIGTERM
    # before the server installs its own handlers must stop this worker, not run `stop` here.
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    os.setpgrp()
    target(settings, index)


def supervise(settings: Settings, target: Callable[[Settings, int], None]) -> None:
    """Run `target(settings, index)` in N forked workers; a dead worker is replaced by one with its index."""
    context = multiprocessing.get_context("fork")
    workers: dict[int, tuple[multiprocessing.process.BaseProcess, float, int]] = {}
    stopping = False
    kill_at = float("inf")  # when stopping: SIGKILL whoever outlives the graceful deadline
    exit_code = 0

    def spawn(index: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # `stop` must see every started worker
        try:
            process = context.Process(target=_worker_main, args=(target, settings, index), name="gateway-worker")
            process.start()
            workers[process.sentinel] = (process, time.monotonic(), index)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping, kill_at
        if not stopping:
            log.info("stopping %d workers (signal %d)", len(workers), signum)
            kill_at = time.monotonic() + settings.server.shutdown_timeout + _KILL_GRACE_SECONDS
        stopping = True
        for process, _, _ in workers.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(settings.server.workers):
        spawn(index)
    while workers:
        remaining = kill_at - time.monotonic()
        if remaining <= 0:
            for process, _, _ in workers.values():
                log.error("worker %s outlived the shutdown deadline; killing it", process.pid)
                process.kill()
            exit_code, kill_at = 1, float("inf")
        # Bounded, so a deadline set by a signal handler during the wait is noticed.
        for sentinel in wait(list(workers), timeout=min(max(remaining, 0.0), 1.0)):
            process, started, index = workers.pop(sentinel)
            process.join()
            if process.pid is not None:
                mark_process_dead(process.pid)
            if stopping:
                if process.exitcode not in (0, -signal.SIGTERM):
                    exit_code = 1
                continue
            if time.monotonic() - started < _MIN_HEALTHY_SECONDS:
                log.error("worker %s exited with %s right after start; stopping", process.pid, process.exitcode)
                exit_code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
            spawn(index)
    if exit_code:
        sys.exit(exit_code)
