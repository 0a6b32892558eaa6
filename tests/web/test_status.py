"""What the status page shows, from an exposition; and its traffic chart's rates."""

from __future__ import annotations

import asyncio

from pyturn.config import parse_config
from pyturn.net.supervisor import merge_expositions
from pyturn.net.worker import Worker
from pyturn.web.status import RateHistory, summarize


def test_the_summary_of_an_idle_workers_metrics_is_all_zeros() -> None:
    config = parse_config(
        {
            "listen": [{"transport": "udp", "address": "127.0.0.1", "port": 0}],
            "relay": {"address": "127.0.0.1", "min_port": 50000, "max_port": 50099},
        }
    )

    async def scrape() -> bytes:
        return await Worker(config).exposition()

    text = asyncio.run(scrape())
    summary = summarize(text.decode())
    assert summary["allocations"] == {"tcp": 0, "tls": 0, "udp": 0}
    assert summary["relay_ports_available"] == {"ipv4": 100}
    assert set(summary["auth_failures"]) >= {"no_credentials", "bad_password", "revoked"}
    assert summary["relayed_bytes"] == {"client_to_peer": 0, "peer_to_client": 0}
    assert summary["store_up"] is None


def test_workers_summed_by_the_supervisor_are_summed_on_the_page() -> None:
    worker = """# TYPE pyturn_allocations gauge
pyturn_allocations{transport="udp"} 3
pyturn_allocations{transport="tcp"} 1
# TYPE pyturn_relayed_bytes counter
pyturn_relayed_bytes_total{direction="client_to_peer",transport="udp"} 1000
pyturn_relayed_bytes_total{direction="client_to_peer",transport="tcp"} 24
pyturn_relayed_bytes_total{direction="peer_to_client",transport="udp"} 500
# TYPE pyturn_peers_denied counter
pyturn_peers_denied_total 2
# TYPE pyturn_auth_failures counter
pyturn_auth_failures_total{reason="bad_password"} 4
# TYPE pyturn_store_up gauge
pyturn_store_up 0
"""
    summary = summarize(merge_expositions([worker, worker]).decode())
    assert summary["allocations"] == {"udp": 6, "tcp": 2}
    assert summary["relayed_bytes"] == {"client_to_peer": 2048, "peer_to_client": 1000}
    assert summary["peers_denied"] == 4
    assert summary["auth_failures"] == {"bad_password": 8}
    assert summary["store_up"] is False


def test_rates_are_bits_per_second_between_samples_and_never_negative() -> None:
    history = RateHistory(kept=3)
    history.add(100.0, {"client_to_peer": 0, "peer_to_client": 0})
    history.add(105.0, {"client_to_peer": 6250, "peer_to_client": 625})
    # A worker restarted: its ended allocations' bytes are gone from the sum.
    history.add(110.0, {"client_to_peer": 100, "peer_to_client": 1250})
    assert history.rates() == [
        {"since": 100.0, "at": 105.0, "client_to_peer_bps": 10000.0, "peer_to_client_bps": 1000.0},
        {"since": 105.0, "at": 110.0, "client_to_peer_bps": 0.0, "peer_to_client_bps": 1000.0},
    ]
    history.add(115.0, {"client_to_peer": 100, "peer_to_client": 1250})
    assert len(history.samples) == 3
    assert [point["at"] for point in history.rates()] == [110.0, 115.0]
