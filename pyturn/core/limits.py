"""Per-source budgets for answers that cost an attacker nothing to provoke.

A 401 or 438 goes to whatever source address a request claims, before that source has
proved anything, so a spoofed flood would make the server reflect them at a victim.
Each source IP gets a token bucket; past it, those answers are dropped.
"""

from __future__ import annotations

import itertools


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

    def prune(self, now: float) -> None:
        """Forget sources whose bucket has refilled: a full bucket and no bucket answer
        alike, and the entries of past sources would otherwise stay up to `max_sources`.

        The dict is in least-recently-seen order, so only its front is looked at, and
        it stops at the first bucket still refilling (a later call gets the rest).
        """
        if self.rate <= 0:
            return  # buckets never refill: each one is state that must be kept
        buckets = self._buckets
        stale = 0
        for tokens, last in buckets.values():
            if tokens + (now - last) * self.rate < self.burst:
                break
            stale += 1
        if not stale:
            return
        if stale == len(buckets):
            buckets.clear()  # also gives back the grown hash table
        else:
            # A fresh dict of the survivors: deleting from the front one by one would
            # keep the table at its largest size.
            self._buckets = dict(itertools.islice(buckets.items(), stale, None))
