"""Bandwidth limits: per allocation, per user and for the node, each way on its own.

Each limit is a rate in bytes per second (0: none) and a bucket, kept as GCRA does: the
bucket is one number, the time at which it would be empty again (its "theoretical
arrival time", TAT). `size` bytes pass at time `now` when the TAT is at most
`now + BURST_NS`, and then move it by `size / rate` seconds from `max(TAT, now)`: over
any stretch of time no more than `rate` bytes per second pass, plus one burst of 200 ms
worth. A bucket is one 64-bit word, so a check is integer arithmetic and no timer runs.

Where the buckets live:

- an allocation's (one per direction, and one per direction for its fair share of the
  total, below) in its counters array, beside its traffic counters
  (pyturn/core/forwarding.py), with the bytes dropped for each reason;
- the node's in `buckets`, an array of 64-bit words, BUCKET_WORDS per bucket: bucket 0
  is the node's total, bucket 1 counts the allocations sending (below), and bucket
  i >= FIRST_USER_BUCKET is a user's. With several workers it is a slice of the shared
  node region (pyturn/net/node_state.py), so a user and the node are limited across
  every worker; `NodeState` says which bucket a user has.

The total is shared fairly. A bucket alone lets through whichever packet comes first
once it has room, and senders with a steady beat can then win every time: two calls
at the same rate were seen to split the total 90/10. So each allocation also has a
fair-share bucket at `total / n`, n the allocations that sent in the previous second
or so far in this one, if more (counted in bucket 1, per one-second window); an
allocation over its fair share may use
only the first half of the total's burst, and leaves the rest to those within theirs.
Light senders keep what they send, heavy ones share what is left about equally, and
nothing of the total is left unused while someone wants it.

The rates are three words (`Rates`): the config's per_allocation, per_user and total.
A reload writes them, so a new limit holds at once for running allocations too.

`admit` below is the rule; pyturn/net/_fastpath.c has the same rule for the native
path, with atomic updates of the node's words (a Python update of a shared word can
race another worker's, so the I/O layer hands the table the native `admit` when it has
one), and tests/net/test_forwarding_differential.py holds the two to the same answers.
"""

from __future__ import annotations

import array
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    Counters: TypeAlias = array.array[int]  # array("Q"): see forwarding.PACKETS_TO_PEER
    Rates: TypeAlias = array.array[int]
else:
    Counters = Rates = array.array
# The node's bucket words: a memoryview cast to "Q" (of shared memory, with workers).
Words = memoryview

# How much a bucket lets through at once after a quiet spell.
BURST_NS = 200_000_000
NS_PER_SECOND = 1_000_000_000

# Directions: a bucket and a drop counter each.
TO_PEER, TO_CLIENT = 0, 1
# What `admit` answers: 0 when the bytes pass, else which limit refused them.
ADMITTED, PER_ALLOCATION, PER_USER, TOTAL = range(4)
REASONS = {PER_ALLOCATION: "per_allocation", PER_USER: "per_user", TOTAL: "total"}

# An allocation's words in its counters array, after the four traffic counters:
# its buckets (by direction), its user's bucket number (0: none), the last window it
# was counted as sending in, the bytes dropped, by direction and reason (DROPPED + 3 *
# direction + reason - 1), and its fair-share buckets (by direction).
TAT = 4
USER_BUCKET = 6
SEEN_WINDOW = 7
DROPPED = 8
FAIR_TAT = 14
COUNTERS_SIZE = 16

# A node bucket's words: its TAT each way, and when the total last dropped something
# (ns; what tells an Allocate the node is at capacity). The fourth word is spare.
BUCKET_WORDS = 4
LAST_DROP = 2
# Bucket 1: the allocations sending, per one-second window, in two words (even and
# odd windows), each (window << 24) | count.
SENDING = BUCKET_WORDS
WINDOW_NS = NS_PER_SECOND
_COUNT_BITS = 24
_COUNT_MASK = (1 << _COUNT_BITS) - 1
FIRST_USER_BUCKET = 2


# The rates' words are per_allocation, per_user and total.
TOTAL_RATE = 2


def new_rates(per_allocation: int = 0, per_user: int = 0, total: int = 0) -> Rates:
    return array.array("Q", (per_allocation, per_user, total))


def new_buckets(count: int = FIRST_USER_BUCKET) -> Words:
    """`count` node buckets, empty (the node's two first, then users'), in anonymous
    memory: the pages of buckets never used are never touched, so cost nothing."""
    return memoryview(mmap.mmap(-1, 8 * BUCKET_WORDS * count)).cast("Q")


_EMPTY_BUCKET = memoryview(bytes(8 * BUCKET_WORDS)).cast("Q")


def clear_bucket(buckets: Words, bucket: int) -> None:
    """Empty node bucket `bucket`, for a user it is given to."""
    start = bucket * BUCKET_WORDS
    buckets[start : start + BUCKET_WORDS] = _EMPTY_BUCKET


def _user_word(counters: Counters, buckets: Words, direction: int) -> int | None:
    """The word of the allocation's user bucket for `direction`; None when it has none."""
    word = counters[USER_BUCKET] * BUCKET_WORDS + direction
    return word if direction < word < len(buckets) else None


def admit(  # noqa: PLR0917 (the native admit's signature)
    counters: Counters, rates: Rates, buckets: Words, direction: int, size: int, now: int
) -> int:
    """Whether `size` bytes of the allocation with `counters` may go `direction` at `now`
    (ns): ADMITTED, and every bucket of a set limit is charged; else the first limit that
    refuses them (PER_ALLOCATION, PER_USER, TOTAL), and nothing is charged. Drops are
    the caller's to count (`count_drop`): a stream waits instead."""
    per_allocation, per_user, total = rates
    tolerance = now + BURST_NS
    if per_allocation and counters[TAT + direction] > tolerance:
        return PER_ALLOCATION
    user = _user_word(counters, buckets, direction) if per_user else None
    if user is not None and buckets[user] > tolerance:
        return PER_USER
    fair = 0
    has_total = total and len(buckets) >= SENDING + 2
    if has_total:
        fair = max(total // sending(counters, buckets, now), 1)
        within_fair = counters[FAIR_TAT + direction] <= tolerance
        if buckets[direction] > (tolerance if within_fair else now + BURST_NS // 2):
            return TOTAL
    if per_allocation:
        counters[TAT + direction] = _charged(counters[TAT + direction], now, size, per_allocation)
    if user is not None:
        buckets[user] = _charged(buckets[user], now, size, per_user)
    if has_total:
        buckets[direction] = _charged(buckets[direction], now, size, total)
        counters[FAIR_TAT + direction] = _charged(counters[FAIR_TAT + direction], now, size, fair)
    return ADMITTED


def sending(counters: Counters, buckets: Words, now: int) -> int:
    """How many allocations are sending: those counted in the window before `now`'s, or
    so far in `now`'s if more (this one among them). The window so far matters when
    sending starts: with the window before's count alone, the first second would be
    first come, first served, and one of two calls starting together could take it all."""
    window = now // WINDOW_NS
    current = buckets[SENDING + (window & 1)]
    if counters[SEEN_WINDOW] != window:
        counters[SEEN_WINDOW] = window
        count = (current & _COUNT_MASK) + 1 if current >> _COUNT_BITS == window else 1
        current = (window << _COUNT_BITS) | count
        buckets[SENDING + (window & 1)] = current
    so_far = current & _COUNT_MASK if current >> _COUNT_BITS == window else 0
    before = buckets[SENDING + ((window - 1) & 1)]
    counted = before & _COUNT_MASK if before >> _COUNT_BITS == window - 1 else 0
    return max(counted, so_far, 1)


def _charged(tat: int, now: int, size: int, rate: int) -> int:
    return max(tat, now) + size * NS_PER_SECOND // rate


def count_drop(
    counters: Counters, buckets: Words, direction: int, reason: int, *, size: int, now: int
) -> None:
    """`size` bytes were dropped for `reason`: counted on the allocation, and a drop for
    the total stamped on the node (see `at_capacity`)."""
    counters[DROPPED + 3 * direction + reason - 1] += size
    if reason == TOTAL:
        buckets[LAST_DROP] = now


def wait(counters: Counters, rates: Rates, buckets: Words, direction: int, now: int) -> int:
    """How long (ns) until `admit` lets bytes through again, if nothing else is charged
    meanwhile: what a stream waits before it reads on."""
    per_allocation, per_user, total = rates
    # When each limit lets bytes through again.
    times = [now]
    if per_allocation:
        times.append(counters[TAT + direction] - BURST_NS)
    user = _user_word(counters, buckets, direction) if per_user else None
    if user is not None:
        times.append(buckets[user] - BURST_NS)
    if total and len(buckets) >= SENDING + 2:
        # The whole burst once back within the fair share, else half of it.
        whole = max(buckets[direction], counters[FAIR_TAT + direction]) - BURST_NS
        times.append(min(whole, buckets[direction] - BURST_NS // 2))
    return max(times) - now


def at_capacity(buckets: Words, now: int, window: int = 2 * NS_PER_SECOND) -> bool:
    """Whether the node's total limit dropped something in the last `window` ns: measured
    use, not the sum of what running allocations could use, so idle allocations do not
    keep new ones out."""
    last = buckets[LAST_DROP]
    return last != 0 and now - last < window


def dropped(counters: Counters, direction: int) -> int:
    """Bytes dropped one way, for any limit."""
    start = DROPPED + 3 * direction
    return sum(counters[start : start + 3])


# admit's signature, for the native one the I/O layer may install.
Admit = Callable[[Counters, Rates, Words, int, int, int], int]
