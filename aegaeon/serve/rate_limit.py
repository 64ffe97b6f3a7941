"""Per-client rate limits: a token bucket per API key (or per client address when no key is needed).

A client may send `requests_per_minute` generation requests in a burst, and one more each time
60 / requests_per_minute seconds pass; beyond that it gets 429 with the seconds until its next one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

SECONDS_PER_MINUTE = 60.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets by client identity; `take` is thread-safe and O(1)."""

    def __init__(self, requests_per_minute: int, clock=time.monotonic):
        if requests_per_minute < 1:
            raise ValueError(f"requests_per_minute must be >= 1, got {requests_per_minute}")
        self.capacity = float(requests_per_minute)
        self.refill_per_s = requests_per_minute / SECONDS_PER_MINUTE
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one request of `client`'s budget: 0.0 if allowed, else the seconds until it would be."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(client, _Bucket(self.capacity, now))
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.refill_per_s)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.refill_per_s
