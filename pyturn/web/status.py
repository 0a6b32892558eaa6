"""What the status page shows, computed from a Prometheus exposition: no I/O here.

The ops endpoint gathers the same text that /metrics serves (from every worker), so
the page and Prometheus can never disagree. `RateHistory` keeps the relayed byte
counters sampled every few seconds for the page's chart of the last minutes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pyturn.config import RelayConfig

SAMPLE_INTERVAL = 5.0
# Six minutes of samples.
SAMPLES_KEPT = 73


def summarize(text: str) -> dict[str, Any]:
    """The figures the status page shows, out of an exposition."""
    allocations: dict[str, int] = {}
    created: dict[str, int] = {}
    ports: dict[str, int] = {}
    auth_failures: dict[str, int] = {}
    deleted: dict[str, int] = {}
    relayed = {"client_to_peer": 0, "peer_to_client": 0}
    bandwidth_dropped = 0
    single = {
        "pyturn_permissions": 0,
        "pyturn_channels": 0,
        "pyturn_peers_denied_total": 0,
        "pyturn_quota_rejections_total": 0,
        "pyturn_worker_restarts_total": 0,
    }
    store_up: bool | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "pyturn_allocations":
                allocations[labels["transport"]] = value
            elif name == "pyturn_allocations_created_total":
                created[labels["transport"]] = value
            elif name == "pyturn_relay_ports_available":
                ports[labels["family"]] = value
            elif name == "pyturn_auth_failures_total":
                auth_failures[labels["reason"]] = value
            elif name == "pyturn_allocations_deleted_total":
                deleted[labels["reason"]] = value
            elif name == "pyturn_relayed_bytes_total":
                relayed[labels["direction"]] = relayed.get(labels["direction"], 0) + value
            elif name == "pyturn_bandwidth_dropped_bytes_total":
                bandwidth_dropped += value
            elif name == "pyturn_store_up":
                store_up = bool(value)
            elif name in single:
                single[name] = value
    return {
        "allocations": allocations,
        "allocations_created": created,
        "permissions": single["pyturn_permissions"],
        "channels": single["pyturn_channels"],
        "relay_ports_available": ports,
        "auth_failures": auth_failures,
        "allocations_deleted": deleted,
        "peers_denied": single["pyturn_peers_denied_total"],
        "quota_rejections": single["pyturn_quota_rejections_total"],
        "bandwidth_dropped_bytes": bandwidth_dropped,
        "relayed_bytes": relayed,
        "worker_restarts": single["pyturn_worker_restarts_total"],
        "store_up": store_up,
    }


@dataclass(slots=True)
class RateHistory:
    """Relayed byte counters over time, for bit rates of the last minutes."""

    kept: int = SAMPLES_KEPT
    # (time, bytes client->peer, bytes peer->client), oldest first.
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, at: float, relayed: dict[str, int]) -> None:
        self.samples.append((at, relayed["client_to_peer"], relayed["peer_to_client"]))
        while len(self.samples) > self.kept:
            self.samples.popleft()

    def rates(self) -> list[dict[str, float]]:
        """Bits per second each way between consecutive samples (`since` to `at`).

        A counter that went down (a worker restarted and lost its ended allocations'
        totals) gives 0 for that step rather than a negative rate."""
        points: list[dict[str, float]] = []
        for (t0, up0, down0), (t1, up1, down1) in zip(
            self.samples, list(self.samples)[1:], strict=False
        ):
            span = t1 - t0
            if span <= 0:
                continue
            points.append(
                {
                    "since": t0,
                    "at": t1,
                    "client_to_peer_bps": max(up1 - up0, 0) * 8 / span,
                    "peer_to_client_bps": max(down1 - down0, 0) * 8 / span,
                }
            )
        return points


def listener_facts(listeners: Iterable[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """(transport, address, port) of each bound listener, for the pages."""
    return [
        {"transport": transport, "address": address, "port": port}
        for transport, address, port in listeners
    ]


def relay_facts(relay: RelayConfig) -> dict[str, Any]:
    return {
        "address": relay.address,
        "external_address": relay.external_address,
        "address6": relay.address6,
        "external_address6": relay.external_address6,
        "ports": [relay.min_port, relay.max_port],
        "more_addresses": [
            {"address": extra.address, "external_address": extra.external_address}
            for extra in relay.more_addresses
        ],
    }
