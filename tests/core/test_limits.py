"""Per-source budget for unsigned answers (401/438): the reflection guard."""

from __future__ import annotations

from pyturn.core.limits import SourceBudget
from pyturn.core.server import ReplySuppressed
from pyturn.wire.message import Method
from tests.core.turn_client import T0, MakeServer, TurnTestClient


def test_a_source_gets_a_burst_of_401s_then_nothing_until_the_bucket_refills(
    make_server: MakeServer,
) -> None:
    server = make_server({"limits": {"unauthenticated_burst": 3, "unauthenticated_rate": 1.0}})
    client = TurnTestClient(server)
    bare = client.encode_request(Method.ALLOCATE, auth=False)
    answered = [client.exchange(bare, now=T0).message is not None for _ in range(5)]
    assert answered == [True, True, True, False, False]
    dropped = client.exchange(bare, now=T0)
    assert dropped.events_of(ReplySuppressed) == [ReplySuppressed(client.address, 401)]
    assert client.exchange(bare, now=T0 + 1.0).code == 401
    assert client.exchange(bare, now=T0 + 1.0).message is None


def test_each_source_ip_has_its_own_budget(make_server: MakeServer) -> None:
    server = make_server({"limits": {"unauthenticated_burst": 1, "unauthenticated_rate": 0}})
    first = TurnTestClient(server, client=("203.0.113.1", 1000))
    second = TurnTestClient(server, client=("203.0.113.2", 1000))
    bare = first.encode_request(Method.ALLOCATE, auth=False)
    assert first.exchange(bare).code == 401
    assert first.exchange(bare).message is None
    assert second.exchange(bare).code == 401


def test_authenticated_clients_are_not_limited_by_the_unsigned_budget(
    make_server: MakeServer,
) -> None:
    server = make_server({"limits": {"unauthenticated_burst": 1, "unauthenticated_rate": 0}})
    client = TurnTestClient(server)
    assert client.allocate().code == 0
    for _ in range(10):
        assert client.refresh(600).code == 0


def test_the_budget_forgets_the_oldest_source_when_full() -> None:
    budget = SourceBudget(burst=1, rate=0, max_sources=2)
    assert budget.allow("a", 0) and budget.allow("b", 0)
    assert not budget.allow("a", 0)
    assert budget.allow("c", 0)  # "b" was the least recently seen: forgotten
    assert len(budget) == 2
    assert budget.allow("b", 0)
