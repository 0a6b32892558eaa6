"""The collector on its own: what Stats counts from core events and how it is exposed."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

from pyturn.core.allocation import Allocation, FiveTuple
from pyturn.core.auth import AuthFailure
from pyturn.core.forwarding import (
    BYTES_TO_CLIENT,
    BYTES_TO_PEER,
    PACKETS_TO_CLIENT,
    PACKETS_TO_PEER,
    ForwardingTable,
)
from pyturn.core.randomness import SystemRandom
from pyturn.core.server import (
    AllocationCreated,
    AllocationDeleted,
    AuthFailed,
    Event,
    PeerDenied,
    QuotaRejected,
    RequestHandled,
)
from pyturn.metrics import LIFETIME_BUCKETS, Stats, TurnCollector, method_label, relayed_totals
from pyturn.wire.attributes import FAMILY_IPV4, Address
from pyturn.wire.message import Method
from tests.ops.helpers import parse_metrics, value

CLIENT: Address = ("198.51.100.7", 5000)


@dataclass
class FakeRelay:
    port: int

    @property
    def key(self) -> int:
        return self.port

    def sendto(self, data: bytes, peer: Address, /) -> None:
        pass


@dataclass
class FakeServer:
    allocations: dict[FiveTuple, Allocation] = field(default_factory=dict)
    pools: dict[int, list[int]] = field(default_factory=lambda: {FAMILY_IPV4: [1, 2, 3]})
    relay_ips: dict[int, str] = field(default_factory=lambda: {FAMILY_IPV4: "192.0.2.1"})
    table: ForwardingTable = field(default_factory=lambda: ForwardingTable(SystemRandom()))


def allocation(transport: str, port: int, created_at: float = 0.0) -> Allocation:
    return Allocation(
        five_tuple=(transport, ("198.51.100.7", port), ("192.0.2.1", 3478)),
        username="alice",
        quota_user="alice",
        key=b"k" * 16,
        relay=FakeRelay(50000 + port),
        relayed_address=("192.0.2.1", 50000 + port),
        family=FAMILY_IPV4,
        created_at=created_at,
        expires_at=created_at + 600,
        allocate_transaction=b"t" * 12,
        allocate_response=b"",
        table=ForwardingTable(SystemRandom()),
    )


def count(a: Allocation, to_peer: tuple[int, int], to_client: tuple[int, int] = (0, 0)) -> None:
    """What the data plane would have added to the allocation's counters."""
    a.counters[PACKETS_TO_PEER], a.counters[BYTES_TO_PEER] = to_peer
    a.counters[PACKETS_TO_CLIENT], a.counters[BYTES_TO_CLIENT] = to_client


def test_live_allocations_and_ended_ones_add_up_without_double_counting() -> None:
    server, stats = FakeServer(), Stats()
    live = allocation("udp", 1)
    live.permissions = {"203.0.113.1": 300.0, "203.0.113.2": 300.0}
    live.channel_peers = {0x4000: ("203.0.113.1", 7000)}
    count(live, to_peer=(3, 300), to_client=(2, 20))
    ended = allocation("udp", 2, created_at=100.0)
    count(ended, to_peer=(5, 500))
    for a in (live, ended):
        server.allocations[a.five_tuple] = a
        stats.record(AllocationCreated(a))
    registry = CollectorRegistry()
    registry.register(TurnCollector(server, stats))

    def sample(name: str, **labels: str) -> float:
        return value(parse_metrics(generate_latest(registry).decode()), name, **labels)

    assert sample("pyturn_allocations", transport="udp") == 2
    assert sample("pyturn_relayed_packets_total", direction="client_to_peer", transport="udp") == 8
    # The core deletes (removes from `allocations`) and the worker records the event.
    del server.allocations[ended.five_tuple]
    stats.record(AllocationDeleted(ended, "expired", now=100.0 + 45))
    assert sample("pyturn_allocations", transport="udp") == 1
    assert sample("pyturn_permissions") == 2
    assert sample("pyturn_channels") == 1
    assert sample("pyturn_relayed_packets_total", direction="client_to_peer", transport="udp") == 8
    assert sample("pyturn_relayed_bytes_total", direction="client_to_peer", transport="udp") == 800
    assert sample("pyturn_relayed_bytes_total", direction="peer_to_client", transport="udp") == 20
    # The status page's chart counts the same bytes without rendering everything.
    assert relayed_totals(server, stats) == {"client_to_peer": 800, "peer_to_client": 20}
    assert sample("pyturn_allocations_deleted_total", reason="expired") == 1
    assert sample("pyturn_allocations_created_total", transport="udp") == 2
    # 45 s falls in the 60 s bucket and every bucket above it.
    assert sample("pyturn_allocation_lifetime_seconds_bucket", le="30") == 0
    assert sample("pyturn_allocation_lifetime_seconds_bucket", le="60") == 1
    assert sample("pyturn_allocation_lifetime_seconds_bucket", le="+Inf") == 1
    assert sample("pyturn_allocation_lifetime_seconds_sum") == 45
    assert sample("pyturn_relay_ports_available", family="ipv4") == 3


def test_request_auth_peer_and_quota_events_are_counted_by_label() -> None:
    stats = Stats()
    events: list[Event] = [
        RequestHandled(Method.ALLOCATE, 401, CLIENT),
        RequestHandled(Method.ALLOCATE, 0, CLIENT),
        RequestHandled(0x0FF, 400, CLIENT),
        AuthFailed(CLIENT, None, AuthFailure.NO_CREDENTIALS),
        AuthFailed(CLIENT, "bob", AuthFailure.EXPIRED_REST_CREDENTIAL),
        PeerDenied(CLIENT, "alice", ("10.0.0.1", 1)),
        QuotaRejected(CLIENT, "alice"),
        AllocationDeleted(allocation("tcp", 3), "connection closed", now=5.0),
    ]
    for event in events:
        stats.record(event)
    registry = CollectorRegistry()
    registry.register(TurnCollector(FakeServer(), stats, lambda: True))
    samples = parse_metrics(generate_latest(registry).decode())
    assert value(samples, "pyturn_requests_total", method="allocate", code="401") == 1
    assert value(samples, "pyturn_requests_total", method="allocate", code="success") == 1
    assert value(samples, "pyturn_requests_total", method="other", code="400") == 1
    assert value(samples, "pyturn_auth_failures_total", reason="no_credentials") == 1
    assert value(samples, "pyturn_auth_failures_total", reason="expired_rest_credential") == 1
    assert value(samples, "pyturn_auth_failures_total", reason="bad_password") == 0
    assert value(samples, "pyturn_peers_denied_total") == 1
    assert value(samples, "pyturn_quota_rejections_total") == 1
    assert value(samples, "pyturn_allocations_deleted_total", reason="connection_closed") == 1
    assert value(samples, "pyturn_draining") == 1


def test_method_labels_are_bounded() -> None:
    assert method_label(Method.CHANNEL_BIND) == "channel_bind"
    assert {method_label(m) for m in range(0x1000)} == {m.name.lower() for m in Method} | {"other"}


def test_lifetime_buckets_are_sorted_and_cover_a_day() -> None:
    assert list(LIFETIME_BUCKETS) == sorted(LIFETIME_BUCKETS)
    assert LIFETIME_BUCKETS[-1] >= 86400
