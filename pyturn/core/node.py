"""What the worker processes of one node hold together: quotas, budgets and relay ports.

A node with several workers must behave as one server: a user's allocations, the total,
the unsigned answers a source IP gets and the relay ports are counted for the node, not
per process. The core asks through `NodeState`, synchronously (an Allocate is answered
at once), and never knows where the counts live:

- `LocalNodeState` (here) keeps them in this process: `workers: 1`, and core tests.
- `SharedNodeState` (pyturn/net/node_state.py) keeps them in a shared memory region that
  the supervisor creates and every worker maps, under a lock: `workers: N`.

Both hand out relay ports through a `PortPool` per address family with the same
semantics, including EVEN-PORT reservations that any worker can redeem.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pyturn.core import bandwidth
from pyturn.core.limits import SourceBudget
from pyturn.core.quotas import UserCounts
from pyturn.core.randomness import RandomSource
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """What the other nodes of a fleet hold (allocations and reserved ports per user, and
    in all), as last read from the store they share (pyturn/store/redis_store.py): the
    quotas count them beside this node's own. Empty for a node on its own."""

    users: Mapping[str, int] = field(default_factory=dict)
    total: int = 0


NO_FLEET = FleetCounts()


class PortPool(Protocol):
    """Relay ports of one address family: which are free, taken or reserved."""

    min_port: int
    max_port: int

    def __len__(self) -> int:
        """How many ports are free (for metrics)."""

    def take_random(self) -> int | None:
        """A free port chosen at random (RFC 8656 §7.2), now taken; None when none is."""

    def take(self, port: int) -> int | None:
        """Take `port` if it is free."""

    def is_free(self, port: int) -> bool: ...

    def put(self, port: int) -> None:
        """Give back a port this process took."""

    def random_even(self) -> int | None:
        """A free even port (EVEN-PORT, RFC 8656 §14.6), not yet taken."""

    def random_even_pair(self) -> int | None:
        """A free even port whose successor is free too (EVEN-PORT with R), not yet taken."""

    def reserve(self, port: int) -> bool:
        """Take `port` for a RESERVATION-TOKEN; False if it is not free."""

    def claim_reserved(self, port: int) -> bool:
        """Redeem a reservation of `port` (made by any worker): now taken by this
        process. False when it is not reserved (already used, or let go)."""

    def unreserve(self, port: int) -> None:
        """A reservation this process made ran out: free the port unless redeemed."""


class NodeState(Protocol):
    """The node-wide counts the core checks (see the module docstring)."""

    # This process's own holdings per user (what it would give back if it stopped).
    held_here: UserCounts
    # The node's bandwidth buckets (pyturn/core/bandwidth.py): the first two are the
    # node's own, and each user holding something has one of its own while it does.
    buckets: bandwidth.Words
    # Told (user, bucket) when a user this process holds for got another bucket (after
    # a worker died, see pyturn/net/node_state.py), so its allocations follow.
    on_rebucket: Callable[[str, int], None] | None
    # The rest of the fleet's holdings, which the quotas count too (the I/O layer sets it).
    fleet: FleetCounts

    def user_bucket(self, user: str) -> int:
        """The bandwidth bucket of a user this process holds something for (0: none)."""

    def hold(self, user: str, per_user: int, total: int) -> bool:
        """Count one more allocation (or reserved port) for `user` if that stays within
        `per_user` for the user and `total` for the node, the rest of the fleet's
        holdings counted in (0: no limit). Check and count are one step, so two workers
        cannot both take the last place."""

    def add(self, user: str) -> None:
        """Count one more for `user` without a check (a reserved port beside an
        allocation that was checked)."""

    def release(self, user: str) -> None:
        """One allocation or reservation of `user` ended."""

    def allow_unsigned(self, ip: str, now: float) -> bool:
        """Whether `ip` may get one more unsigned answer (401/438): a token bucket per
        source IP, for the node (pyturn/core/limits.py)."""

    def set_budget(self, burst: int, rate: float) -> None:
        """New bucket size and refill rate (start-up and reload)."""

    def port_pools(self, min_port: int, max_port: int, random: RandomSource) -> dict[int, PortPool]:
        """The relay port pool of each address family."""

    def compact(self, now: float) -> None:
        """Give back memory held for what ended (see TurnServer.compact)."""


class LocalPortPool:
    """Relay ports of one family, for one process, chosen with a CSPRNG (RFC 8656 §7.2).

    `free` holds every port not handed out; taking one is a swap-remove at a random
    index, so picking stays O(1) however full the range is.
    """

    def __init__(self, min_port: int, max_port: int, random: RandomSource) -> None:
        self.random = random
        self.min_port = min_port
        self.max_port = max_port
        self.free: list[int] = list(range(min_port, max_port + 1))
        # Each port's position in `free`, -1 once taken, at index port - min_port. An
        # array, not a dict: putting a port back stores a C integer rather than a new
        # int object, and such objects, made while allocations come and go and kept for
        # good, would each pin a whole arena of freed memory.
        self._index = array.array("i", range(len(self.free)))
        self.reserved: set[int] = set()

    def __len__(self) -> int:
        return len(self.free)

    def take_random(self) -> int | None:
        if not self.free:
            return None
        return self.take(self.free[self.random.below(len(self.free))])

    def take(self, port: int) -> int | None:
        if not self.min_port <= port <= self.max_port:
            return None
        index = self._index
        i = index[port - self.min_port]
        if i < 0:
            return None
        index[port - self.min_port] = -1
        # The pool's own int: the caller's may be a fresh one (a reservation token's).
        port = self.free[i]
        last = self.free.pop()
        if last != port:
            self.free[i] = last
            index[last - self.min_port] = i
        return port

    def is_free(self, port: int) -> bool:
        return self.min_port <= port <= self.max_port and self._index[port - self.min_port] >= 0

    def put(self, port: int) -> None:
        if not self.min_port <= port <= self.max_port or self._index[port - self.min_port] >= 0:
            return
        self._index[port - self.min_port] = len(self.free)
        self.free.append(port)

    def random_even_pair(self, tries: int = 64) -> int | None:
        for _ in range(tries):
            port = self.free[self.random.below(len(self.free))] if self.free else None
            if port is None:
                return None
            even = port & ~1
            if self.is_free(even) and self.is_free(even + 1):
                return even
        for port in list(self.free):
            if port % 2 == 0 and self.is_free(port + 1):
                return port
        return None

    def random_even(self, tries: int = 64) -> int | None:
        for _ in range(tries):
            if not self.free:
                return None
            port = self.free[self.random.below(len(self.free))]
            if port % 2 == 0:
                return port
        return next((p for p in self.free if p % 2 == 0), None)

    def reserve(self, port: int) -> bool:
        if self.take(port) is None:
            return False
        self.reserved.add(port)
        return True

    def claim_reserved(self, port: int) -> bool:
        if port not in self.reserved:
            return False
        self.reserved.discard(port)
        return True

    def unreserve(self, port: int) -> None:
        if port in self.reserved:
            self.reserved.discard(port)
            self.put(port)


class LocalNodeState:
    """The node is this one process: counts in dictionaries."""

    def __init__(self, burst: int = 32, rate: float = 8.0, *, users: int = 2 * 16384) -> None:
        """`users`: the most users that can hold something at once (at most one per relay
        port of each family), each with a bandwidth bucket."""
        self.held_here = UserCounts()
        self.total = 0
        self.unsigned_budget = SourceBudget(burst, rate)
        first = bandwidth.FIRST_USER_BUCKET
        self.buckets = bandwidth.new_buckets(first + users)
        self._buckets: dict[str, int] = {}
        self._free_buckets = list(range(first + users - 1, first - 1, -1))
        self.on_rebucket: Callable[[str, int], None] | None = None
        self.fleet = NO_FLEET

    def hold(self, user: str, per_user: int, total: int) -> bool:
        fleet = self.fleet
        if (per_user and self.held_here[user] + fleet.users.get(user, 0) >= per_user) or (
            total and self.total + fleet.total >= total
        ):
            return False
        self.add(user)
        return True

    def add(self, user: str) -> None:
        if user not in self.held_here and self._free_buckets:
            bucket = self._buckets[user] = self._free_buckets.pop()
            bandwidth.clear_bucket(self.buckets, bucket)
        self.held_here[user] += 1
        self.total += 1

    def release(self, user: str) -> None:
        self.held_here.remove(user)
        self.total -= 1
        if user not in self.held_here and user in self._buckets:
            self._free_buckets.append(self._buckets.pop(user))

    def user_bucket(self, user: str) -> int:
        return self._buckets.get(user, 0)

    def allow_unsigned(self, ip: str, now: float) -> bool:
        return self.unsigned_budget.allow(ip, now)

    def set_budget(self, burst: int, rate: float) -> None:
        self.unsigned_budget = SourceBudget(burst, rate)

    def port_pools(self, min_port: int, max_port: int, random: RandomSource) -> dict[int, PortPool]:
        return {
            FAMILY_IPV4: LocalPortPool(min_port, max_port, random),
            FAMILY_IPV6: LocalPortPool(min_port, max_port, random),
        }

    def compact(self, now: float) -> None:
        self.held_here.compact()
        self.unsigned_budget.prune(now)
        self._buckets = dict(self._buckets)
