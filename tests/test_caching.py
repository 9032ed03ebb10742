"""ExpiringCache: expiry by the clock, bounded size with the oldest insertion evicted."""

from __future__ import annotations

from gateway.caching import ExpiringCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_ttl():
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(10, ttl=5, clock=clock)
    cache["a"] = 1
    clock.now += 5
    assert cache.get("a") == 1
    clock.now += 0.001
    assert cache.get("a") is None
    assert len(cache) == 0


def test_oldest_insertion_is_evicted_when_full_and_reinsertion_refreshes():
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(2, ttl=60, clock=clock)
    cache["a"], cache["b"] = 1, 2
    cache["a"] = 10  # re-inserted: now the newest
    cache["c"] = 3
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (10, None, 3)
    assert len(cache) == 2
    clock.now += 30
    cache["c"] = 4  # a refresh restarts the lifetime
    clock.now += 45
    assert (cache.get("a"), cache.get("c")) == (None, 4)


def test_pop_and_missing_keys():
    cache: ExpiringCache[int, str] = ExpiringCache(4, ttl=1)
    assert cache.get(1) is None
    cache[1] = "x"
    cache.pop(1)
    cache.pop(2)  # absent: no error
    assert cache.get(1) is None
