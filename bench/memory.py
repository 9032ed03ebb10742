"""Memory of a whole process tree (the gateway's supervisor and workers), sampled from a thread.

RSS summed over the processes is the figure the targets use. Forked workers share the pages
they inherited from the supervisor, which that sum counts once per process; PSS (proportional
set size: each shared page split between its sharers) is sampled alongside as the fairer total.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import psutil

from .procs import Service

MB = 1_000_000


@dataclass(frozen=True)
class Sample:
    seconds: float
    rss: int
    pss: int
    progress: int


def measure(service: Service) -> tuple[int, int]:
    """(summed RSS, summed PSS) of the service's process tree."""
    rss = pss = 0
    for process in service.tree():
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return rss, pss


def breakdown(service: Service) -> list[dict[str, object]]:
    """Per process: pid, role and memory, for the record."""
    rows = []
    for index, process in enumerate(service.tree()):
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rows.append(
                {
                    "pid": process.pid,
                    "role": "supervisor" if index == 0 else "worker",
                    "rss_mb": round(info.rss / MB, 1),
                    "pss_mb": round(getattr(info, "pss", 0) / MB, 1),
                    "uss_mb": round(getattr(info, "uss", 0) / MB, 1),
                }
            )
    return rows


class RssSampler:
    """Samples the service tree's memory every `interval` seconds until closed.

    `progress` may be set by the caller (e.g. bytes streamed so far); each sample records it, so
    memory can be related to how far a stream got.
    """

    def __init__(self, service: Service, interval: float = 0.1) -> None:
        self.service = service
        self.interval = interval
        self.progress = 0
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = 0.0

    def _sample(self) -> None:
        rss, pss = measure(self.service)
        self.samples.append(Sample(time.monotonic() - self._started, rss, pss, self.progress))

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    @property
    def peak(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    @property
    def peak_pss(self) -> int:
        return max((s.pss for s in self.samples), default=0)

    def peak_between(self, low: int, high: int) -> int:
        """Peak RSS among samples whose progress lay in [low, high)."""
        return max((s.rss for s in self.samples if low <= s.progress < high), default=0)


def idle_rss(service: Service, seconds: float = 1.0) -> tuple[int, int]:
    """Highest (RSS, PSS) over a short idle window: the baseline growth is measured against."""
    with RssSampler(service) as sampler:
        time.sleep(seconds)
    return sampler.peak, sampler.peak_pss
