"""What ended allocations leave behind: nothing, once `compact` has run."""

from __future__ import annotations

from collections import Counter

from pyturn.core.limits import SourceBudget
from pyturn.core.node import LocalNodeState, LocalPortPool
from pyturn.core.randomness import SystemRandom
from pyturn.wire import integrity, message
from pyturn.wire.message import Method
from tests.core.turn_client import PEER, T0, MakeServer, TurnTestClient


def test_compact_leaves_no_state_of_ended_allocations(make_server: MakeServer) -> None:
    server = make_server()
    clients = [TurnTestClient(server, client=(f"203.0.113.{i}", 4000 + i)) for i in range(1, 9)]
    for client in clients:
        assert client.exchange(client.encode_request(Method.BINDING, auth=False), now=T0).code == 0
        bare = client.encode_request(Method.ALLOCATE, auth=False)
        assert client.exchange(bare, now=T0).code == 401  # a per-source budget entry
        assert client.allocate(now=T0).code == 0
        assert client.channel_bind(0x4000, PEER, now=T0).code == 0
    for client in clients:
        assert client.refresh(0, now=T0 + 1).code == 0
    assert server.ended_since_compact == len(clients)
    assert server.allocations == {}
    assert server.auth._checked_nonces and server._mapped_v4 and message._MEMO
    assert integrity._templates
    server.compact(T0 + 10)
    assert server.ended_since_compact == 0
    assert server._timers == []
    assert isinstance(server.node, LocalNodeState)
    assert len(server.node.unsigned_budget) == 0
    assert not server.node.held_here
    assert server.peer_connections == {}
    # Caches by client, nonce or key are empty too (their entries would pin heap pages).
    assert server.auth._checked_nonces == {}
    assert server.auth._derived_keys == {}
    assert server._mapped_v4 == {}
    assert message._MEMO == {}
    assert integrity._templates == {}


def test_compact_keeps_running_allocations_and_their_timers(make_server: MakeServer) -> None:
    server = make_server()
    kept = TurnTestClient(server, client=("203.0.113.1", 4000))
    gone = TurnTestClient(server, client=("203.0.113.2", 4000))
    assert kept.allocate(now=T0).code == 0
    assert gone.allocate(now=T0).code == 0
    assert gone.refresh(0, now=T0).code == 0
    server.compact(T0)
    assert list(server.allocations) == [kept.five_tuple]
    assert [t[2] for t in server._timers] == [server.allocations[kept.five_tuple]]
    assert server.next_deadline() is not None
    assert len(server.expire(T0 + 600)) == 1
    assert server.allocations == {}


def test_budget_prune_forgets_only_refilled_sources() -> None:
    budget = SourceBudget(burst=2, rate=1.0)
    assert budget.allow("a", 0.0)
    assert budget.allow("b", 0.5)
    budget.prune(0.9)
    assert len(budget) == 2  # neither bucket is full again yet
    budget.prune(1.0)
    assert len(budget) == 1  # "a" refilled: forgetting it changes nothing
    budget.prune(1.5)
    assert len(budget) == 0
    assert budget.allow("a", 1.5) and budget.allow("a", 1.5)
    assert not budget.allow("a", 1.5)


def test_budget_without_refill_keeps_its_sources() -> None:
    budget = SourceBudget(burst=1, rate=0)
    assert budget.allow("a", 0.0)
    budget.prune(1e9)
    assert not budget.allow("a", 1e9)


def test_port_pool_take_and_put() -> None:
    pool = LocalPortPool(50000, 50009, SystemRandom())
    assert len(pool) == 10
    taken = {pool.take_random() for _ in range(10)}
    assert taken == set(range(50000, 50010))
    assert pool.take_random() is None
    assert not pool.is_free(50003)
    pool.put(50003)
    pool.put(50003)  # twice: still one free port
    pool.put(60000)  # outside the range: ignored
    assert len(pool) == 1 and pool.is_free(50003)
    assert not pool.is_free(60000)
    assert pool.take(50004) is None
    assert pool.take(60000) is None
    assert pool.take(50003) == 50003
    assert len(pool) == 0


def test_port_pool_hands_out_its_own_int_objects() -> None:
    """A reservation token's port is a fresh int; the pool returns the one it keeps."""
    pool = LocalPortPool(50000, 50009, SystemRandom())
    fresh = int("50005")
    mine = pool.take(fresh)
    assert mine is not None
    assert mine == fresh and mine is not fresh
    pool.put(mine)
    assert pool.free[-1] is mine


def test_random_ports_cover_the_pool_evenly() -> None:
    """RFC 8656 §7.2 recommends randomized port assignment (RFC 6056): every free port
    comes up, none far more often than the others."""
    pool = LocalPortPool(50000, 50006, SystemRandom())
    counts: Counter[int] = Counter()
    for _ in range(7000):
        port = pool.take_random()
        assert port is not None
        counts[port] += 1
        pool.put(port)
    assert set(counts) == set(range(50000, 50007))
    assert all(700 < n < 1300 for n in counts.values()), counts  # 1000 +- 10 sigma
