"""Per-source budgets for answers that cost an attacker nothing to provoke.

A 401 or 438 goes to whatever source address a request claims, before that source has
proved anything, so a spoofed flood would make the server reflect them at a victim.
Each source IP gets a token bucket; past it, those answers are dropped.
"""

from __future__ import annotations


class SourceBudget:
    """Token buckets keyed by IP, at most `max_sources` of them (oldest forgotten first)."""

    def __init__(self, burst: int, rate: float, max_sources: int = 65536) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, now: float) -> bool:
        buckets = self._buckets
        entry = buckets.pop(ip, None)
        if entry is None:
            if len(buckets) >= self.max_sources:
                del buckets[next(iter(buckets))]
            tokens = self.burst
        else:
            tokens, last = entry
            tokens = min(self.burst, tokens + max(now - last, 0.0) * self.rate)
        allowed = tokens >= 1.0
        # Re-inserting keeps the dict in least-recently-seen order for eviction.
        buckets[ip] = (tokens - 1.0 if allowed else tokens, now)
        return allowed
