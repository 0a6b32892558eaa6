"""The node's shared counts for `workers: N`: one memory region, every worker maps it.

The supervisor creates the region (a memfd) before the first worker starts and hands it
to each worker; `SharedNodeState` is the core's `NodeState` (pyturn/core/node.py) over
it. A POSIX record lock on the memfd serializes what must be one step (check and count,
find and take): the kernel drops it if its holder dies, and it costs two system calls.

Layout, all little-endian, sized from the relay port range (`NodeLayout`):

- header: generation (u64), allocations and reservations held on the node (u64);
- users: an open-addressing table (linear probing, backward-shift deletion) of
  (key u64, count u32, bandwidth bucket u32) per user holding something, at most half
  full: the users holding something never outnumber the ports of both families;
- budgets: (key u64, tokens f64, last f64) per source IP, direct-mapped: a collision
  forgets the older source's bucket, as the in-process budget forgets its oldest;
- per address family, one byte per relay port: 0 if free, else 1 + the index of the
  worker that holds it; then one byte per port, 1 while it is reserved for a token;
- bandwidth buckets (pyturn/core/bandwidth.py), as many as user slots: buckets 0 and 1
  are the node's (its total, and the count of allocations sending), each user holding
  something has one of the others (the number in its entry, which moves with it), and
  one byte per bucket says which are taken. The native fast path reads and charges them
  atomically, without the lock.

Keys are keyed BLAKE2b hashes (the workers' shared secret), so clients cannot aim at a
slot. When a worker dies its ports are freed, and the user counts are rebuilt: the
supervisor clears them and bumps the generation, and each worker, seeing a new
generation under the lock, adds back what it holds before doing anything else. Users
get their buckets anew then, and the worker repoints its allocations (`on_rebucket`);
until every worker has, two users may share a bucket for a moment.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyturn.config import MAX_WORKERS
from pyturn.core.bandwidth import BUCKET_WORDS, FIRST_USER_BUCKET, Words, clear_bucket
from pyturn.core.node import NO_FLEET, PortPool
from pyturn.core.quotas import UserCounts
from pyturn.core.randomness import RandomSource
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6

_HEADER_SIZE = 64
_COUNTS = struct.Struct("<QQ")  # generation, total held
_USER = struct.Struct("<QII")  # key, count, bandwidth bucket
_BUCKET_SIZE = 8 * BUCKET_WORDS
_BUDGET = struct.Struct("<Qdd")
_BUDGET_SLOTS = 1 << 16  # as many sources as the in-process budget keeps


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """Where each part of the region starts, for a relay port range."""

    min_port: int
    max_port: int

    @property
    def ports(self) -> int:
        return self.max_port - self.min_port + 1

    @property
    def user_slots(self) -> int:
        # A power of two, at least twice the most users that can hold something.
        return max(1024, 1 << (4 * self.ports - 1).bit_length())

    @property
    def users_at(self) -> int:
        return _HEADER_SIZE

    @property
    def budgets_at(self) -> int:
        return self.users_at + self.user_slots * _USER.size

    def owners_at(self, family: int) -> int:
        start = self.budgets_at + _BUDGET_SLOTS * _BUDGET.size
        return start if family == FAMILY_IPV4 else start + 2 * self.ports

    def reserved_at(self, family: int) -> int:
        return self.owners_at(family) + self.ports

    @property
    def buckets_at(self) -> int:
        # Page-aligned, so the 64-bit words the fast path updates atomically are aligned.
        end = self.owners_at(FAMILY_IPV6) + 2 * self.ports
        return -(-end // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def buckets_used_at(self) -> int:
        return self.buckets_at + self.user_slots * _BUCKET_SIZE

    @property
    def size(self) -> int:
        return self.buckets_used_at + self.user_slots


def create_region(layout: NodeLayout) -> int:
    """A zeroed memfd of the layout's size (the supervisor's; workers inherit it)."""
    fd = os.memfd_create("pyturn-node", 0)
    os.ftruncate(fd, layout.size)
    return fd


class _Region:
    """The mapped region and its lock."""

    def __init__(self, fd: int, layout: NodeLayout, secret: bytes) -> None:
        self.fd = fd
        self.layout = layout
        self.mm = mmap.mmap(fd, layout.size)
        self._secret = hashlib.blake2b(secret, digest_size=32).digest()
        start = layout.buckets_at
        self.buckets: Words = memoryview(self.mm)[start : layout.buckets_used_at].cast("Q")

    def key(self, name: str) -> int:
        digest = hashlib.blake2b(name.encode(), digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def __enter__(self) -> None:
        """`with region:` holds the lock (every worker's, and the supervisor's)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- the user table (call with the lock held) ------------------------------------------

    def find_user(self, key: int) -> tuple[int, int]:
        """(offset of the key's slot, its count), or (offset of the empty slot, -1)."""
        mm, mask, base = self.mm, self.layout.user_slots - 1, self.layout.users_at
        i = key & mask
        for _ in range(mask + 1):
            offset = base + i * _USER.size
            found, count, _ = _USER.unpack_from(mm, offset)
            if found == key:
                return offset, count
            if found == 0:
                return offset, -1
            i = (i + 1) & mask
        # Cannot happen: the table is sized for twice the users that can hold a port.
        raise RuntimeError("node state: the user table is full")

    def add_user(self, key: int, delta: int) -> int:
        """Add `delta` to a user's count: its bandwidth bucket (0 once it holds nothing)."""
        return self._count_at(*self.find_user(key), key, delta)

    def _count_at(self, offset: int, count: int, key: int, delta: int) -> int:
        """Add `delta` to the slot `find_user` gave for `key`, and to the node's total:
        the user's bandwidth bucket (a new one for a new user), 0 once it holds nothing."""
        bucket = 0
        if count > 0 or delta > 0:
            bucket = _USER.unpack_from(self.mm, offset)[2] if count > 0 else self._take_bucket()
            count = max(count, 0) + delta
            if count > 0:
                _USER.pack_into(self.mm, offset, key, count, bucket)
            else:
                self._delete_user(offset)
                self.mm[self.layout.buckets_used_at + bucket] = 0
                bucket = 0
        generation, total = _COUNTS.unpack_from(self.mm, 0)
        _COUNTS.pack_into(self.mm, 0, generation, max(total + delta, 0))
        return bucket

    def _take_bucket(self) -> int:
        """A free bandwidth bucket, emptied, now taken (never one of the node's own)."""
        mm, used = self.mm, self.layout.buckets_used_at
        at = mm.find(b"\0", used + FIRST_USER_BUCKET, used + self.layout.user_slots)
        if at < 0:  # cannot happen: there are as many buckets as user slots
            raise RuntimeError("node state: no bandwidth bucket left")
        mm[at] = 1
        bucket = at - used
        clear_bucket(self.buckets, bucket)
        return bucket

    def _delete_user(self, offset: int) -> None:
        """Empty a slot, moving later entries of its probe run back (no tombstones)."""
        mm, slots, base = self.mm, self.layout.user_slots, self.layout.users_at
        hole = (offset - base) // _USER.size
        i = hole
        while True:
            i = (i + 1) % slots
            key, count, bucket = _USER.unpack_from(mm, base + i * _USER.size)
            if key == 0:
                break
            home = key % slots
            # The entry at i may fill the hole unless its home lies in (hole, i].
            if (hole < i and not hole < home <= i) or (hole > i and not (home <= i or home > hole)):
                _USER.pack_into(mm, base + hole * _USER.size, key, count, bucket)
                hole = i
        _USER.pack_into(mm, base + hole * _USER.size, 0, 0, 0)

    def forget_worker(self, index: int) -> None:
        """A worker died: free its ports and reservations, and have the user counts
        rebuilt by the living (see the module docstring). The supervisor's; nothing
        once it has closed the region (its workers exit after it stopped)."""
        if self.mm.closed:
            return
        with self:
            layout, mm = self.layout, self.mm
            users = layout.users_at
            mm[users : users + layout.user_slots * _USER.size] = bytes(
                layout.user_slots * _USER.size
            )
            used = layout.buckets_used_at
            mm[used : used + layout.user_slots] = bytes(layout.user_slots)
            generation, _ = _COUNTS.unpack_from(mm, 0)
            _COUNTS.pack_into(mm, 0, generation + 1, 0)
            owner = bytes([index + 1])
            for family in (FAMILY_IPV4, FAMILY_IPV6):
                owners, reserved = layout.owners_at(family), layout.reserved_at(family)
                end = owners + layout.ports
                at = mm.find(owner, owners, end)
                while at >= 0:
                    mm[at] = 0
                    mm[reserved + at - owners] = 0
                    at = mm.find(owner, at + 1, end)

    def close(self) -> None:
        self.buckets.release()
        self.mm.close()


class SupervisorRegion(_Region):
    """The supervisor's handle on the region: it creates it and cleans up after a death."""

    def __init__(self, layout: NodeLayout, secret: bytes) -> None:
        super().__init__(create_region(layout), layout, secret)

    def close(self) -> None:
        super().close()
        os.close(self.fd)


class SharedNodeState(_Region):
    """`NodeState` over the shared region, for worker `index` of the node."""

    def __init__(
        self, fd: int, layout: NodeLayout, secret: bytes, *, index: int, burst: int, rate: float
    ) -> None:
        if not 0 <= index < MAX_WORKERS:
            raise ValueError(f"worker index {index} outside 0-{MAX_WORKERS - 1}")
        super().__init__(fd, layout, secret)
        self.owner = index + 1
        self.held_here = UserCounts()
        self._user_keys: dict[str, int] = {}
        # The bandwidth bucket of each user this worker holds something for.
        self._buckets: dict[str, int] = {}
        self.on_rebucket: Callable[[str, int], None] | None = None
        self.fleet = NO_FLEET
        self.burst = float(burst)
        self.rate = rate
        self._generation = _COUNTS.unpack_from(self.mm, 0)[0]

    def _sync(self) -> None:
        """Under the lock: after a worker died, add back what this one holds."""
        generation = _COUNTS.unpack_from(self.mm, 0)[0]
        if generation != self._generation:
            for user, count in self.held_here.items():
                bucket = self.add_user(self._user_keys[user], count)
                if bucket != self._buckets.get(user):
                    self._buckets[user] = bucket
                    if self.on_rebucket is not None:
                        self.on_rebucket(user, bucket)
            self._generation = generation

    def user_bucket(self, user: str) -> int:
        return self._buckets.get(user, 0)

    def sync(self) -> None:
        with self:
            self._sync()

    def held_on_node(self, user: str) -> int:
        with self:
            self._sync()
            return max(self.find_user(self.key(user))[1], 0)

    def bucket_on_node(self, user: str) -> int:
        """The bandwidth bucket the node's table gives `user` (0: it holds nothing)."""
        with self:
            self._sync()
            offset, count = self.find_user(self.key(user))
            return _USER.unpack_from(self.mm, offset)[2] if count > 0 else 0

    @property
    def total(self) -> int:
        return int(_COUNTS.unpack_from(self.mm, 0)[1])

    def _user_key(self, user: str) -> int:
        """The key of a user: kept while this worker holds something for it."""
        key = self._user_keys.get(user)
        if key is None:
            key = self._user_keys[user] = self.key(user)
        return key

    def hold(self, user: str, per_user: int, total: int) -> bool:
        key = self._user_key(user)
        bucket = 0
        with self:
            self._sync()
            offset, count = self.find_user(key)
            fleet = self.fleet
            refused = bool(
                per_user and max(count, 0) + fleet.users.get(user, 0) >= per_user
            ) or bool(total and _COUNTS.unpack_from(self.mm, 0)[1] + fleet.total >= total)
            if not refused:
                bucket = self._count_at(offset, count, key, 1)
        if refused:
            if user not in self.held_here:
                del self._user_keys[user]
            return False
        self.held_here[user] += 1
        self._buckets[user] = bucket
        return True

    def add(self, user: str) -> None:
        key = self._user_key(user)
        with self:
            self._sync()
            bucket = self.add_user(key, 1)
        self.held_here[user] += 1
        self._buckets[user] = bucket

    def release(self, user: str) -> None:
        key = self._user_key(user)
        with self:
            self._sync()
            self.add_user(key, -1)
        self.held_here.remove(user)
        if user not in self.held_here:
            del self._user_keys[user]
            del self._buckets[user]

    def allow_unsigned(self, ip: str, now: float) -> bool:
        """The budget of `ip` for the node. `now` (this worker's clock) is not used: the
        buckets are refilled by the system's monotonic clock, read under the lock, the
        same for every worker. Each worker's clock maps that one to Unix time with an
        offset of its own (uvloop's clock has millisecond steps), and two workers whose
        clocks differ by a millisecond would add tokens by taking turns."""
        key = self.key(ip)
        offset = self.layout.budgets_at + (key & (_BUDGET_SLOTS - 1)) * _BUDGET.size
        with self:
            now = time.monotonic()
            found, tokens, last = _BUDGET.unpack_from(self.mm, offset)
            if found != key:
                tokens = self.burst
            else:
                tokens = min(self.burst, tokens + max(now - last, 0.0) * self.rate)
            allowed: bool = tokens >= 1.0
            _BUDGET.pack_into(self.mm, offset, key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def set_budget(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate

    def port_pools(self, min_port: int, max_port: int, random: RandomSource) -> dict[int, PortPool]:
        if (min_port, max_port) != (self.layout.min_port, self.layout.max_port):
            raise ValueError("the relay port range differs from the node's")
        return {
            FAMILY_IPV4: SharedPortPool(self, FAMILY_IPV4, random),
            FAMILY_IPV6: SharedPortPool(self, FAMILY_IPV6, random),
        }

    def compact(self, now: float) -> None:
        self.held_here.compact()
        self._user_keys = dict(self._user_keys)
        self._buckets = dict(self._buckets)


class SharedPortPool:
    """The relay ports of one family for the whole node: owner bytes in the region."""

    def __init__(self, region: SharedNodeState, family: int, random: RandomSource) -> None:
        self.region = region
        self.random = random
        self.min_port = region.layout.min_port
        self.max_port = region.layout.max_port
        self.owner = region.owner
        self._owners = region.layout.owners_at(family)
        self._reserved = region.layout.reserved_at(family)
        self._size = region.layout.ports

    def __len__(self) -> int:
        return self.region.mm[self._owners : self._owners + self._size].count(0)

    def _at(self, port: int) -> int | None:
        """The owner byte's offset, or None outside the range."""
        if not self.min_port <= port <= self.max_port:
            return None
        return self._owners + port - self.min_port

    def is_free(self, port: int) -> bool:
        at = self._at(port)
        return at is not None and self.region.mm[at] == 0

    def _free_from(self, start: int) -> int:
        """Offset of the first free port at or after `start`, wrapping around; -1 if none."""
        mm, low, high = self.region.mm, self._owners, self._owners + self._size
        at = mm.find(b"\0", low + start, high)
        return at if at >= 0 else mm.find(b"\0", low, low + start)

    def take_random(self) -> int | None:
        # The first free port from a random place: as unpredictable as a random pick for
        # a client that cannot see which ports are taken (RFC 8656 §7.2, RFC 6056).
        start = self.random.below(self._size)
        region = self.region
        with region:
            at = self._free_from(start)
            if at < 0:
                return None
            region.mm[at] = self.owner
        return self.min_port + at - self._owners

    def take(self, port: int) -> int | None:
        at = self._at(port)
        if at is None:
            return None
        region = self.region
        with region:
            if region.mm[at] != 0:
                return None
            region.mm[at] = self.owner
        return port

    def put(self, port: int) -> None:
        at = self._at(port)
        if at is None:
            return
        # No lock: only this worker writes the byte of a port it holds and has not
        # reserved (take and reserve write free bytes, claim reserved ones, and the
        # supervisor those of a dead worker).
        mm = self.region.mm
        if mm[at] == self.owner and mm[self._reserved + at - self._owners] == 0:
            mm[at] = 0

    def _random_free(self, fits: Callable[[int], bool]) -> int | None:
        """A free port (not taken) that `fits`, looked for from a random place."""
        mm, low, high = self.region.mm, self._owners, self._owners + self._size
        start = low + self.random.below(self._size)
        for begin, end in ((start, high), (low, start)):
            at = mm.find(b"\0", begin, end)
            while at >= 0:
                port = self.min_port + at - low
                if fits(port):
                    return port
                at = mm.find(b"\0", at + 1, end)
        return None

    def random_even(self) -> int | None:
        return self._random_free(lambda port: port % 2 == 0)

    def random_even_pair(self) -> int | None:
        return self._random_free(lambda port: port % 2 == 0 and self.is_free(port + 1))

    def reserve(self, port: int) -> bool:
        at = self._at(port)
        if at is None:
            return False
        region = self.region
        with region:
            if region.mm[at] != 0:
                return False
            region.mm[at] = self.owner
            region.mm[self._reserved + at - self._owners] = 1
        return True

    def claim_reserved(self, port: int) -> bool:
        at = self._at(port)
        if at is None:
            return False
        region = self.region
        with region:
            flag = self._reserved + at - self._owners
            if region.mm[flag] != 1:
                return False
            region.mm[flag] = 0
            region.mm[at] = self.owner
        return True

    def unreserve(self, port: int) -> None:
        at = self._at(port)
        if at is None:
            return
        region = self.region
        with region:
            flag = self._reserved + at - self._owners
            if region.mm[flag] == 1 and region.mm[at] == self.owner:
                region.mm[flag] = 0
                region.mm[at] = 0
