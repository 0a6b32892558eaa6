"""What the allocation quotas count: allocations (and reserved ports) per user.

`quotas.allocations_per_user` is checked against these counts when an Allocate comes
(pyturn/core/allocate.py); a REST username counts under its user part.
"""

from __future__ import annotations

from collections import Counter


class UserCounts(Counter[str]):
    """A Counter whose users leave it when their count falls to zero."""

    def remove(self, user: str) -> None:
        self[user] -= 1
        if self[user] <= 0:
            del self[user]

    def compact(self) -> None:
        """Refill in place, sized for the users left (relay ports hold this very one)."""
        kept = dict(self)
        self.clear()
        self.update(kept)
