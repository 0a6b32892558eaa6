"""Prometheus metrics: plain counters fed by core events, read by a collector at scrape time.

Nothing here runs per relayed packet. The relay fast path adds to the integer counters of
each `Allocation`; the worker hands every core event to `Stats.record`, which adds to
plain integers and, when an allocation is deleted, moves its packet and byte counts into
totals kept by client transport. `TurnCollector` sums those totals and the live
allocations only when Prometheus scrapes, so the relay pays nothing for being measured.

The registry is our own `CollectorRegistry` (not prometheus_client's global one), with the
standard process, platform and GC collectors added. This module does no I/O; the HTTP
endpoint is `pyturn.net.http`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyturn import __version__
from pyturn.core.allocation import Allocation, FiveTuple
from pyturn.core.auth import AuthFailure
from pyturn.core.bandwidth import DROPPED, REASONS, TO_CLIENT, TO_PEER
from pyturn.core.forwarding import ForwardingTable
from pyturn.core.server import (
    AllocationCreated,
    AllocationDeleted,
    AuthFailed,
    Event,
    PeerDenied,
    QuotaRejected,
    ReplySuppressed,
    RequestHandled,
)
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6
from pyturn.wire.message import Method

# Allocation lifetimes in seconds: most WebRTC calls last minutes, some hours.
LIFETIME_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)

# Request methods get their own label value; anything else is "other", so a client
# sending made-up methods cannot grow the number of series.
_METHOD_NAMES = {int(m): m.name.lower() for m in Method}
DELETE_REASONS = (
    "expired",
    "refresh",
    "connection_closed",
    "shutdown",
    "kicked",
    "revoked",
    "credential_expired",
)
TRANSPORTS = ("udp", "tcp", "tls")
DIRECTIONS = ("client_to_peer", "peer_to_client")
# The drop counters of an allocation (bandwidth.DROPPED on), as metric labels.
_DROPS = tuple(
    (DROPPED + 3 * direction + reason - 1, DIRECTIONS[direction], name)
    for direction in (TO_PEER, TO_CLIENT)
    for reason, name in REASONS.items()
)
_FAMILY_NAMES = {FAMILY_IPV4: "ipv4", FAMILY_IPV6: "ipv6"}


# Distinct (method, code) pairs counted by number before they are folded into labels.
_HANDLED_KEYS = 256


def method_label(method: int) -> str:
    return _METHOD_NAMES.get(method, "other")


def code_label(code: int) -> str:
    """`success` for a success response, else the STUN error code (`401`, `508`, ...)."""
    return "success" if code == 0 else str(code)


class Traffic:
    """Packets and bytes in both directions; one per client transport."""

    __slots__ = ("bytes_to_client", "bytes_to_peer", "packets_to_client", "packets_to_peer")

    def __init__(self) -> None:
        self.packets_to_peer = 0
        self.bytes_to_peer = 0
        self.packets_to_client = 0
        self.bytes_to_client = 0


class Stats:
    """Counters of one worker, kept as plain integers; `record` takes one core event."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, str]] = Counter()
        self._handled: dict[int, int] = {}
        self.auth_failures: Counter[AuthFailure] = Counter()
        self.peers_denied = 0
        self.quota_rejections = 0
        self.replies_suppressed: Counter[int] = Counter()
        self.allocations_created: Counter[str] = Counter()
        self.allocations_deleted: Counter[str] = Counter()
        self.config_reloads: Counter[str] = Counter()
        # Relayed traffic of allocations already deleted, by client transport.
        self.closed_traffic: dict[str, Traffic] = {}
        # Bytes they dropped over bandwidth limits, by position in the counters.
        self.closed_dropped: Counter[int] = Counter()
        self.lifetime_buckets = [0] * len(LIFETIME_BUCKETS)
        self.lifetime_count = 0
        self.lifetime_sum = 0.0

    def record(self, event: Event) -> None:
        # RequestHandled comes once per request: counted by number, labelled when read.
        if type(event) is RequestHandled:
            handled = self._handled
            # An int key, not a tuple: nothing for the garbage collector to track.
            key = (event.method << 10) | event.code  # codes are below 700
            handled[key] = handled.get(key, 0) + 1
            if len(handled) > _HANDLED_KEYS:  # clients choose the method number
                self._fold_handled()
        elif isinstance(event, AllocationCreated):
            self.allocations_created[event.allocation.five_tuple[0]] += 1
        elif isinstance(event, AllocationDeleted):
            self._deleted(event)
        elif isinstance(event, AuthFailed):
            self.auth_failures[event.reason] += 1
        elif isinstance(event, PeerDenied):
            self.peers_denied += 1
        elif isinstance(event, QuotaRejected):
            self.quota_rejections += 1
        elif isinstance(event, ReplySuppressed):
            self.replies_suppressed[event.code] += 1

    @property
    def requests(self) -> Counter[tuple[str, str]]:
        """Requests answered, by (method label, code label)."""
        self._fold_handled()
        return self._requests

    def _fold_handled(self) -> None:
        for key, count in self._handled.items():
            self._requests[method_label(key >> 10), code_label(key & 0x3FF)] += count
        self._handled.clear()

    def _deleted(self, event: AllocationDeleted) -> None:
        a = event.allocation
        self.allocations_deleted[event.reason.replace(" ", "_")] += 1
        transport = a.five_tuple[0]
        totals = self.closed_traffic.get(transport)
        if totals is None:
            totals = self.closed_traffic[transport] = Traffic()
        totals.packets_to_peer += a.packets_to_peer
        totals.bytes_to_peer += a.bytes_to_peer
        totals.packets_to_client += a.packets_to_client
        totals.bytes_to_client += a.bytes_to_client
        for index, _, _ in _DROPS:
            self.closed_dropped[index] += a.counters[index]
        lifetime = max(event.now - a.created_at, 0.0)
        index = bisect.bisect_left(LIFETIME_BUCKETS, lifetime)
        if index < len(self.lifetime_buckets):
            self.lifetime_buckets[index] += 1
        self.lifetime_count += 1
        self.lifetime_sum += lifetime


class ServerView(Protocol):
    """What the collector reads from `TurnServer`."""

    @property
    def allocations(self) -> Mapping[FiveTuple, Allocation]: ...

    @property
    def pools(self) -> Mapping[int, Sized]: ...

    @property
    def relay_ips(self) -> Mapping[int, str]: ...

    @property
    def table(self) -> ForwardingTable: ...


class TurnCollector(Collector):
    """Turns `Stats` and the server's live allocations into metric families at scrape time."""

    def __init__(
        self,
        server: ServerView,
        stats: Stats,
        draining: Callable[[], bool] = lambda: False,
        store_up: Callable[[], bool | None] = lambda: None,
    ) -> None:
        self.server = server
        self.stats = stats
        self.draining = draining
        # Whether the store (`store:`) could be read at the last try; None: no store.
        self.store_up = store_up

    def collect(self) -> Iterator[Metric]:
        server, stats = self.server, self.stats

        info = GaugeMetricFamily("pyturn_info", "pyturn version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        draining = GaugeMetricFamily(
            "pyturn_draining", "1 while the server drains before stopping, else 0."
        )
        draining.add_metric([], 1 if self.draining() else 0)
        yield draining
        store_up = self.store_up()
        if store_up is not None:
            yield GaugeMetricFamily(
                "pyturn_store_up",
                "1 while the store's users and secrets can be read, 0 while the last "
                "snapshot is served because it cannot.",
                1 if store_up else 0,
            )

        # -- what is open now ----------------------------------------------------------
        open_by_transport: Counter[str] = Counter()
        permissions = channels = 0
        live: dict[str, Traffic] = {t: Traffic() for t in TRANSPORTS}
        dropped = stats.closed_dropped.copy()
        for allocation in server.allocations.values():
            counters = allocation.counters
            for index, _, _ in _DROPS:
                dropped[index] += counters[index]
            transport = allocation.five_tuple[0]
            open_by_transport[transport] += 1
            permissions += len(allocation.permissions)
            channels += len(allocation.channel_peers)
            traffic = live.setdefault(transport, Traffic())
            traffic.packets_to_peer += allocation.packets_to_peer
            traffic.bytes_to_peer += allocation.bytes_to_peer
            traffic.packets_to_client += allocation.packets_to_client
            traffic.bytes_to_client += allocation.bytes_to_client
        allocations = GaugeMetricFamily(
            "pyturn_allocations", "Allocations open now, by client transport.", labels=["transport"]
        )
        for transport in sorted(set(TRANSPORTS) | open_by_transport.keys()):
            allocations.add_metric([transport], open_by_transport[transport])
        yield allocations
        yield GaugeMetricFamily(
            "pyturn_permissions",
            "Peer permissions installed now, over all allocations.",
            permissions,
        )
        yield GaugeMetricFamily(
            "pyturn_channels", "Channel bindings open now, over all allocations.", channels
        )
        ports = GaugeMetricFamily(
            "pyturn_relay_ports_available",
            "Relay ports free to hand out, by address family.",
            labels=["family"],
        )
        for family, pool in sorted(server.pools.items()):
            if family in server.relay_ips:
                ports.add_metric([_FAMILY_NAMES.get(family, str(family))], len(pool))
        yield ports

        # -- allocations over time -----------------------------------------------------
        created = CounterMetricFamily(
            "pyturn_allocations_created",
            "Allocations created, by client transport.",
            labels=["transport"],
        )
        for transport in sorted(set(TRANSPORTS) | stats.allocations_created.keys()):
            created.add_metric([transport], stats.allocations_created[transport])
        yield created
        deleted = CounterMetricFamily(
            "pyturn_allocations_deleted",
            "Allocations ended, by reason: expired (lifetime ran out), refresh (the client "
            "sent Refresh with lifetime 0), connection_closed (TCP/TLS), shutdown, kicked "
            "(pyturn kick), revoked (pyturn revoke), credential_expired "
            "(auth.end_expired_sessions).",
            labels=["reason"],
        )
        for reason in sorted(set(DELETE_REASONS) | stats.allocations_deleted.keys()):
            deleted.add_metric([reason], stats.allocations_deleted[reason])
        yield deleted
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(LIFETIME_BUCKETS, stats.lifetime_buckets, strict=True):
            cumulative += count
            buckets.append((_bucket_label(bound), cumulative))
        buckets.append(("+Inf", stats.lifetime_count))
        lifetimes = HistogramMetricFamily(
            "pyturn_allocation_lifetime_seconds",
            "How long ended allocations lasted, from Allocate to deletion.",
        )
        lifetimes.add_metric([], buckets, stats.lifetime_sum)
        yield lifetimes

        # -- requests and refusals -----------------------------------------------------
        requests = CounterMetricFamily(
            "pyturn_requests",
            "STUN/TURN requests answered, by method and result code "
            '("success" or the STUN error code).',
            labels=["method", "code"],
        )
        for (method, code), count in sorted(stats.requests.items()):
            requests.add_metric([method, code], count)
        yield requests
        auth = CounterMetricFamily(
            "pyturn_auth_failures",
            "Requests refused by authentication, by reason. no_credentials includes the "
            "normal first challenge of every client; revoked counts users refused by "
            "pyturn revoke.",
            labels=["reason"],
        )
        for failure in AuthFailure:
            auth.add_metric([failure.value], stats.auth_failures[failure])
        yield auth
        yield CounterMetricFamily(
            "pyturn_peers_denied",
            "CreatePermission and ChannelBind requests refused by the peer policy.",
            stats.peers_denied,
        )
        yield CounterMetricFamily(
            "pyturn_quota_rejections",
            "Allocate requests refused with 486 because a quota was reached.",
            stats.quota_rejections,
        )
        suppressed = CounterMetricFamily(
            "pyturn_unsigned_replies_dropped",
            "401/438 answers not sent because their source used up limits.unauthenticated_*.",
            labels=["code"],
        )
        for unsigned_code in (401, 438):
            suppressed.add_metric([str(unsigned_code)], stats.replies_suppressed[unsigned_code])
        yield suppressed
        reloads = CounterMetricFamily(
            "pyturn_config_reloads",
            "Config reloads (SIGHUP), by result: success or failure (old config kept).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], stats.config_reloads[result])
        yield reloads

        # -- relayed traffic -----------------------------------------------------------
        packets = CounterMetricFamily(
            "pyturn_relayed_packets",
            "Datagrams relayed, by direction and client transport.",
            labels=["direction", "transport"],
        )
        octets = CounterMetricFamily(
            "pyturn_relayed_bytes",
            "Application data bytes relayed (without TURN framing), by direction and "
            "client transport.",
            labels=["direction", "transport"],
        )
        for transport in sorted(live.keys() | stats.closed_traffic.keys()):
            now = live.get(transport) or Traffic()
            past = stats.closed_traffic.get(transport) or Traffic()
            packets.add_metric(
                ["client_to_peer", transport], now.packets_to_peer + past.packets_to_peer
            )
            packets.add_metric(
                ["peer_to_client", transport], now.packets_to_client + past.packets_to_client
            )
            octets.add_metric(["client_to_peer", transport], now.bytes_to_peer + past.bytes_to_peer)
            octets.add_metric(
                ["peer_to_client", transport], now.bytes_to_client + past.bytes_to_client
            )
        yield packets
        yield octets

        # -- bandwidth limits ----------------------------------------------------------
        drops = CounterMetricFamily(
            "pyturn_bandwidth_dropped_bytes",
            "Application data bytes dropped over a bandwidth limit, by direction and the "
            "limit (per_allocation, per_user, total). TCP and TLS are slowed, not dropped.",
            labels=["direction", "reason"],
        )
        for index, direction, reason in _DROPS:
            drops.add_metric([direction, reason], dropped[index])
        yield drops
        limits = GaugeMetricFamily(
            "pyturn_bandwidth_limit_bytes_per_second",
            "The configured bandwidth limits, each way, by scope (0: unlimited).",
            labels=["scope"],
        )
        for scope, rate in zip(REASONS.values(), server.table.rates, strict=True):
            limits.add_metric([scope], rate)
        yield limits


def relayed_totals(server: ServerView, stats: Stats) -> dict[str, int]:
    """Application bytes relayed each way, ended allocations included: the sum of
    pyturn_relayed_bytes_total over transports, without rendering every metric."""
    to_peer = sum(traffic.bytes_to_peer for traffic in stats.closed_traffic.values())
    to_client = sum(traffic.bytes_to_client for traffic in stats.closed_traffic.values())
    for allocation in server.allocations.values():
        to_peer += allocation.bytes_to_peer
        to_client += allocation.bytes_to_client
    return {"client_to_peer": to_peer, "peer_to_client": to_client}


def _bucket_label(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else str(bound)


def make_registry(collector: TurnCollector) -> CollectorRegistry:
    """A registry of its own: pyturn's collector plus process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)


__all__ = [
    "DELETE_REASONS",
    "DIRECTIONS",
    "LIFETIME_BUCKETS",
    "ServerView",
    "Stats",
    "TurnCollector",
    "code_label",
    "make_registry",
    "method_label",
    "render",
]
