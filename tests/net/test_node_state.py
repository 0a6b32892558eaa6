"""The node's shared counts (pyturn/net/node_state.py), several workers in one process.

Each `SharedNodeState` maps the same memfd, as worker processes do; the lock is a
process-wide POSIX lock, so here it never blocks, and what is checked is the arithmetic:
counts are the node's, ports are handed out once each, a death is cleaned up.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.core.bandwidth import BUCKET_WORDS
from pyturn.core.node import FleetCounts
from pyturn.core.randomness import SystemRandom
from pyturn.net.node_state import NodeLayout, SharedNodeState, SupervisorRegion
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6

SECRET = b"s" * 32


class Node:
    def __init__(self, min_port: int, max_port: int) -> None:
        self.layout = NodeLayout(min_port, max_port)
        self.region = SupervisorRegion(self.layout, SECRET)
        self.workers: list[SharedNodeState] = []

    def worker(self, index: int) -> SharedNodeState:
        state = SharedNodeState(self.region.fd, self.layout, SECRET, index=index, burst=3, rate=1.0)
        self.workers.append(state)
        return state

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.region.close()


@pytest.fixture
def node() -> Iterator[Node]:
    made = Node(50000, 50020)
    yield made
    made.close()


def test_a_users_quota_and_the_total_hold_across_workers(node: Node) -> None:
    a, b, c = node.worker(0), node.worker(1), node.worker(2)
    assert [w.hold("alice", 3, 5) for w in (a, b, c, a)] == [True, True, True, False]
    assert b.hold("bob", 3, 5) and c.hold("bob", 3, 5)
    assert not a.hold("carol", 3, 5)  # the node holds 5
    b.release("alice")
    assert a.hold("carol", 3, 5)
    assert a.held_on_node("alice") == 2 and c.held_on_node("bob") == 2
    assert a.held_here == Counter({"alice": 1, "carol": 1})


def test_unsigned_answers_are_budgeted_per_source_for_the_node(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    assert [a.allow_unsigned("192.0.2.1", 0.0), b.allow_unsigned("192.0.2.1", 0.0)] == [True] * 2
    assert a.allow_unsigned("192.0.2.1", 0.0)
    assert not b.allow_unsigned("192.0.2.1", 0.0)  # burst 3, spent over both workers
    assert b.allow_unsigned("192.0.2.2", 0.0)
    # Refilled by the system's monotonic clock (20 tokens per second here), not by the
    # clock value a worker passes.
    a.set_budget(3, 20.0)
    assert not a.allow_unsigned("192.0.2.1", 1000.0)
    time.sleep(0.1)
    assert a.allow_unsigned("192.0.2.1", 0.0)


@pytest.mark.parametrize("size", [3, 21, 10_000])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_every_port_of_the_range_is_handed_out_once(size: int, workers: int) -> None:
    node = Node(40000, 40000 + size - 1)
    try:
        pools = [
            node.worker(i).port_pools(40000, 40000 + size - 1, SystemRandom())[FAMILY_IPV4]
            for i in range(workers)
        ]
        taken = [pools[i % workers].take_random() for i in range(size)]
        assert sorted(p for p in taken if p is not None) == list(range(40000, 40000 + size))
        assert all(pool.take_random() is None for pool in pools)
        assert len(pools[0]) == 0
        last = taken[-1]
        assert last is not None
        pools[0].put(last)  # not its port unless worker 0 took it
        pools[(size - 1) % workers].put(last)
        assert len(pools[0]) == 1 and pools[-1].take_random() == last
    finally:
        node.close()


def test_a_reservation_made_by_one_worker_is_redeemed_by_another(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    pool_a = a.port_pools(50000, 50020, SystemRandom())[FAMILY_IPV6]
    pool_b = b.port_pools(50000, 50020, SystemRandom())[FAMILY_IPV6]
    even = pool_a.random_even_pair()
    assert even is not None and even % 2 == 0
    assert pool_a.take(even) == even and pool_a.reserve(even + 1)
    assert not pool_b.is_free(even + 1) and pool_b.take(even + 1) is None
    assert pool_b.claim_reserved(even + 1)
    assert not pool_a.claim_reserved(even + 1)  # used once
    pool_a.unreserve(even + 1)  # the token's 30 s pass: the port is b's now
    assert not pool_b.is_free(even + 1)
    pool_b.put(even + 1)
    assert pool_a.is_free(even + 1)
    assert pool_a.reserve(even + 1)
    pool_a.unreserve(even + 1)
    assert pool_b.is_free(even + 1)


def test_a_dead_workers_ports_are_freed_and_the_living_recount_their_users(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    pool_a = a.port_pools(50000, 50020, SystemRandom())[FAMILY_IPV4]
    pool_b = b.port_pools(50000, 50020, SystemRandom())[FAMILY_IPV4]
    mine = [pool_a.take_random() for _ in range(5)]
    theirs = [pool_b.take_random() for _ in range(4)]
    assert a.hold("alice", 2, 0) and b.hold("alice", 2, 0) and b.hold("bob", 0, 0)
    node.region.forget_worker(1)
    assert len(pool_a) == 21 - 5
    assert all(pool_a.is_free(p) for p in theirs if p is not None)
    assert not any(pool_b.is_free(p) for p in mine if p is not None)
    assert a.held_on_node("alice") == 1 and a.held_on_node("bob") == 0
    assert a.hold("alice", 2, 0)
    assert not a.hold("alice", 2, 0)


class _Colliding(SharedNodeState):
    """Keys that pile up on a few home slots, so that probing and deletion are exercised."""

    def key(self, name: str) -> int:
        number = int(name[1:])
        return (number % 3) | ((number + 1) << 12)  # never 0, the empty slot


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_user_counts_match_a_counter_whatever_collides(ops: list[tuple[bool, int]]) -> None:
    node = Node(50000, 50100)
    state = _Colliding(node.region.fd, node.layout, SECRET, index=0, burst=1, rate=0.0)
    model: Counter[str] = Counter()
    try:
        for hold, number in ops:
            user = f"u{number}"
            if hold:
                assert state.hold(user, 0, 0)
                model[user] += 1
            elif model[user]:
                state.release(user)
                model[user] -= 1
            assert state.total == model.total()
        buckets = {}
        for number in range(41):
            user = f"u{number}"
            assert state.held_on_node(user) == model[user]
            # A user's bucket moves with its entry, and no two users share one.
            assert state.bucket_on_node(user) == state.user_bucket(user)
            if model[user]:
                buckets[user] = state.user_bucket(user)
        assert 0 not in buckets.values()
        assert len(set(buckets.values())) == len(buckets)
    finally:
        state.close()
        node.close()


def test_a_refused_user_leaves_nothing_behind_in_the_worker(node: Node) -> None:
    a = node.worker(0)
    assert a.hold("alice", 1, 0)
    assert not a.hold("alice", 1, 0)
    assert not a.hold("bob", 0, 1)  # the node holds 1 of a total of 1
    assert a.held_here == Counter({"alice": 1}) and set(a._user_keys) == {"alice"}
    a.release("alice")
    assert not a.held_here and not a._user_keys
    assert a.held_on_node("alice") == 0 and a.total == 0


def test_a_worker_exiting_after_the_supervisor_closed_the_region_is_no_error() -> None:
    """At shutdown the supervisor closes the region while its workers still exit."""
    region = SupervisorRegion(NodeLayout(50000, 50002), SECRET)
    region.close()
    region.forget_worker(0)


def test_a_users_bandwidth_bucket_is_the_nodes_across_workers(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    assert a.hold("alice", 0, 0) and b.hold("alice", 0, 0) and b.hold("bob", 0, 0)
    alice, bob = a.user_bucket("alice"), b.user_bucket("bob")
    assert b.user_bucket("alice") == alice != bob
    assert 0 not in (alice, bob)
    # The words are the same memory in both workers (and in the native path's view).
    a.buckets[alice * BUCKET_WORDS] = 12345
    assert b.buckets[alice * BUCKET_WORDS] == 12345
    a.release("alice")
    assert a.user_bucket("alice") == 0 and b.bucket_on_node("alice") == alice
    b.release("alice")
    assert b.bucket_on_node("alice") == 0
    assert a.hold("carol", 0, 0)
    carol = a.user_bucket("carol")
    assert carol == alice  # free again, and emptied for its new user
    assert list(a.buckets[carol * BUCKET_WORDS : (carol + 1) * BUCKET_WORDS]) == [0] * 4


def test_after_a_death_the_living_get_buckets_again_and_say_so(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    assert b.hold("bob", 0, 0)  # the first bucket goes to a user only b holds
    assert a.hold("alice", 0, 0) and b.hold("alice", 0, 0)
    before = a.user_bucket("alice")
    moved: list[tuple[str, int]] = []
    a.on_rebucket = lambda user, bucket: moved.append((user, bucket))
    node.region.forget_worker(1)
    a.sync()
    after = a.user_bucket("alice")
    assert a.bucket_on_node("alice") == after != 0
    assert a.bucket_on_node("bob") == 0
    assert moved == ([] if after == before else [("alice", after)])
    assert after != before  # bob's bucket was freed, and is the first free one


def test_the_quotas_of_a_node_count_the_rest_of_the_fleet(node: Node) -> None:
    a, b = node.worker(0), node.worker(1)
    for worker in (a, b):
        worker.fleet = FleetCounts({"alice": 1}, 3)
    assert a.hold("alice", 3, 6)
    assert not b.hold("alice", 2, 6)  # 1 on this node, 1 elsewhere
    assert b.hold("bob", 0, 6) and a.hold("carol", 0, 6)
    assert not a.hold("dave", 0, 6)  # 3 on this node, 3 elsewhere


def test_workers_whose_clocks_differ_cannot_refill_a_budget_by_taking_turns(node: Node) -> None:
    """Worker clocks are the monotonic clock mapped to Unix time, each with an offset of
    its own: a half-second difference (far more than happens) adds no token."""
    a, b = node.worker(0), node.worker(1)  # burst 3, 1 token per second
    answered = [w.allow_unsigned("192.0.2.7", 1000.0 + skew) for w, skew in [(a, 0.0)] * 3]
    assert answered == [True] * 3
    turns = [(a, 0.5), (b, 0.0)] * 10  # within milliseconds of each other
    assert not any(w.allow_unsigned("192.0.2.7", 1000.0 + skew) for w, skew in turns)
