"""Per-key rate limit on submissions: a token bucket per API-key hash, in the API process's memory.

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
from collections.abc import Callable


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
