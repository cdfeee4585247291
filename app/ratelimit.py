"""Per-key limits, in the API process's memory: a rate limit on submissions (RateLimiter) and a cap on
the transcriptions a key has waiting at once (InFlight).

Submissions: a token bucket per API-key hash.

A bucket holds up to `burst` tokens and refills at `per_minute / 60` tokens a second; each submission
takes one. An empty bucket answers 429 with Retry-After (whole seconds until the next token). Keys are
known by their sha256 only (what app.auth.check_key returns), and only valid keys ever reach a bucket,
so the table is bounded by the number of configured keys. With several API processes each keeps its
own buckets: the limit is per process, which is what a single-host deployment runs.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RateLimiter:
    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"rate limit must be positive, got {per_minute} per minute")
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = float(burst if burst and burst > 0 else max(1, math.ceil(per_minute)))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key hash -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is never refused again."""
    return str(max(1, math.ceil(seconds)))


class InFlight:
    """Requests under way per key. A transcription holds an API thread while its worker runs it, and the
    threads are shared: without a cap one client's burst takes them all and everyone else waits behind it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    @contextmanager
    def hold(self, key: str, limit: int) -> Iterator[None]:
        """One more request for `key`; 429 when it already has `limit` (0: no cap)."""
        if limit <= 0:
            yield
            return
        from app.schemas import ApiError

        with self._lock:
            if self._count[key] >= limit:
                raise ApiError(429, f"this API key already has {limit} transcriptions waiting "
                                    "(TARQ_MAX_TRANSCRIPTIONS_PER_KEY); send more when one has answered",
                               code="too_many_in_flight", headers={"Retry-After": "1"})
            self._count[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._count[key] -= 1
                if self._count[key] <= 0:
                    del self._count[key]
