"""Prometheus metrics and health checks, scraped from a real server while it relays."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from pyturn import __version__
from pyturn.probe import ProbeClient, ProbeError
from pyturn.store import open_store
from pyturn.wire.attributes import ErrorCode, RequestedTransport
from pyturn.wire.message import Method
from tests.interop.server_process import LOOPBACK, require_tool
from tests.ops.conftest import StartServer
from tests.ops.helpers import Peer, Samples, value, wait_until

RELAYED_PACKETS = "pyturn_relayed_packets_total"
RELAYED_BYTES = "pyturn_relayed_bytes_total"


def relayed(samples: Samples, direction: str, transport: str) -> tuple[float, float]:
    labels = {"direction": direction, "transport": transport}
    return value(samples, RELAYED_PACKETS, **labels), value(samples, RELAYED_BYTES, **labels)


def test_counters_follow_a_relay_run_live_and_after_the_allocations_end(
    start_server: StartServer,
) -> None:
    """Exact counts: what the clients and the peer sent is what the metrics say."""
    server = start_server()
    peer = Peer()
    udp = server.client("udp")
    tcp = server.client("tcp")
    try:
        udp.allocate()
        tcp.allocate()
        assert udp.relayed is not None and tcp.relayed is not None
        udp.create_permission(peer.address)
        tcp.create_permission(peer.address)
        udp.channel_bind(0x4001, peer.address)

        # UDP client -> peer: 3 Send indications and 4 ChannelData messages.
        to_peer = [b"x" * n for n in (10, 20, 30)]
        for data in to_peer:
            udp.send_indication(peer.address, data)
        for n in (1, 2, 3, 4):
            udp.send_channel_data(0x4001, b"c" * n)
            to_peer.append(b"c" * n)
        assert sorted(peer.recv()[0] for _ in to_peer) == sorted(to_peer)
        # peer -> UDP client: 2 datagrams (ChannelData, as a channel is bound).
        to_client = [b"p" * 100, b"q" * 200]
        for data in to_client:
            peer.send(data, udp.relayed)
        assert [udp.receive(3.0) for _ in to_client] == [
            (("channel", 0x4001), d) for d in to_client
        ]
        # TCP client: 1 datagram each way.
        tcp.send_indication(peer.address, b"t" * 7)
        assert peer.recv() == (b"t" * 7, tcp.relayed)
        peer.send(b"u" * 9, tcp.relayed)
        assert tcp.receive(3.0) == (peer.address, b"u" * 9)

        live = server.scrape()
        assert value(live, "pyturn_allocations", transport="udp") == 1
        assert value(live, "pyturn_allocations", transport="tcp") == 1
        assert value(live, "pyturn_permissions") == 2
        assert value(live, "pyturn_channels") == 1
        assert relayed(live, "client_to_peer", "udp") == (7, 60 + 10)
        assert relayed(live, "peer_to_client", "udp") == (2, 300)
        assert relayed(live, "client_to_peer", "tcp") == (1, 7)
        assert relayed(live, "peer_to_client", "tcp") == (1, 9)
        assert value(live, "pyturn_allocations_created_total", transport="udp") == 1
        assert value(live, "pyturn_allocations_created_total", transport="tcp") == 1
        requests = {
            ("allocate", "401"): 2,
            ("allocate", "success"): 2,
            ("create_permission", "success"): 2,
            ("channel_bind", "success"): 1,
        }
        for (method, code), count in requests.items():
            assert value(live, "pyturn_requests_total", method=method, code=code) == count
        assert value(live, "pyturn_auth_failures_total", reason="no_credentials") == 2

        # The allocations end: one by Refresh(0), one by closing its TCP connection.
        udp.refresh(0)
        tcp.close()
        wait_until(lambda: value(server.scrape(), "pyturn_allocations", transport="tcp") == 0)
        after = server.scrape()
    finally:
        udp.close()
        tcp.close()
        peer.close()
    assert value(after, "pyturn_allocations", transport="udp") == 0
    assert value(after, "pyturn_permissions") == value(after, "pyturn_channels") == 0
    # Totals survive the allocations they came from.
    for direction in ("client_to_peer", "peer_to_client"):
        for transport in ("udp", "tcp"):
            assert relayed(after, direction, transport) == relayed(live, direction, transport)
    assert value(after, "pyturn_allocations_deleted_total", reason="refresh") == 1
    assert value(after, "pyturn_allocations_deleted_total", reason="connection_closed") == 1
    assert value(after, "pyturn_allocations_deleted_total", reason="expired") == 0
    assert value(after, "pyturn_requests_total", method="refresh", code="success") == 1
    assert value(after, "pyturn_allocation_lifetime_seconds_count") == 2
    assert value(after, "pyturn_allocation_lifetime_seconds_bucket", le="60") == 2
    assert 0 < value(after, "pyturn_allocation_lifetime_seconds_sum") < 60


def test_refusals_are_counted_by_reason(start_server: StartServer) -> None:
    server = start_server({"quotas": {"allocations_per_user": 1}})
    clients: list[ProbeClient] = []
    try:
        wrong = server.client(password="wrong")
        clients.append(wrong)
        with_code = wrong.request(Method.ALLOCATE, [RequestedTransport(17)]).get(ErrorCode)
        assert with_code is not None and with_code.code == 401
        nobody = server.client(user="nobody")
        clients.append(nobody)
        nobody.request(Method.ALLOCATE, [RequestedTransport(17)])
        first = server.client()
        clients.append(first)
        first.allocate()
        # The default peer policy refuses private ranges (only 127.0.0.0/8 is allowed).
        with pytest.raises(ProbeError, match="403"):
            first.create_permission(("10.1.2.3", 5000))
        second = server.client()
        clients.append(second)
        quota = second.request(Method.ALLOCATE, [RequestedTransport(17)]).get(ErrorCode)
        assert quota is not None and quota.code == 486
        samples = server.scrape()
    finally:
        for client in clients:
            client.close()
    assert value(samples, "pyturn_auth_failures_total", reason="bad_password") == 1
    assert value(samples, "pyturn_auth_failures_total", reason="unknown_user") == 1
    assert value(samples, "pyturn_auth_failures_total", reason="stale_nonce") == 0
    assert value(samples, "pyturn_peers_denied_total") == 1
    assert value(samples, "pyturn_quota_rejections_total") == 1
    assert value(samples, "pyturn_requests_total", method="allocate", code="486") == 1
    assert value(samples, "pyturn_requests_total", method="create_permission", code="403") == 1


def test_process_metrics_come_from_pyturns_own_registry(start_server: StartServer) -> None:
    server = start_server()
    samples = server.scrape()
    names = {name for name, _ in samples}
    assert "process_resident_memory_bytes" in names
    assert "process_open_fds" in names
    assert "python_info" in names
    assert value(samples, "pyturn_info", version=__version__) == 1
    assert value(samples, "pyturn_draining") == 0
    assert value(samples, "pyturn_relay_ports_available", family="ipv4") == 1000


@pytest.mark.interop
def test_counters_move_by_what_coturns_uclient_sent_through_pyturn(
    start_server: StartServer,
) -> None:
    """Interop run: turnutils_uclient sends N messages to turnutils_peer, which echoes."""
    uclient = require_tool("turnutils_uclient")
    peer_tool = require_tool("turnutils_peer")
    server = start_server()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_port:
        probe_port.bind((LOOPBACK, 0))
        peer_port = probe_port.getsockname()[1]
    peer = subprocess.Popen(
        [peer_tool, "-L", LOOPBACK, "-p", str(peer_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages, size = 10, 120
    before = server.scrape()
    try:
        result = subprocess.run(
            [
                *(uclient, "-u", "alice", "-w", "alicepw", "-e", LOOPBACK, "-r", str(peer_port)),
                *("-n", str(messages), "-m", "1", "-l", str(size), "-c", "-z", "5"),
                *("-p", str(server.udp_port), LOOPBACK),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ),
            check=False,
        )
    finally:
        peer.terminate()
        peer.wait(timeout=5)
    assert result.returncode == 0, result.stdout + result.stderr
    after = server.scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(RELAYED_PACKETS, direction="client_to_peer", transport="udp") == messages
    assert delta(RELAYED_BYTES, direction="client_to_peer", transport="udp") == messages * size
    assert delta(RELAYED_PACKETS, direction="peer_to_client", transport="udp") == messages
    assert delta(RELAYED_BYTES, direction="peer_to_client", transport="udp") == messages * size
    created = delta("pyturn_allocations_created_total", transport="udp")
    assert created >= 1
    assert delta("pyturn_requests_total", method="allocate", code="success") == created
    assert delta("pyturn_requests_total", method="allocate", code="401") == created


def test_live_and_ready_answer_200_once_every_listener_is_bound(
    start_server: StartServer,
) -> None:
    server = start_server()
    assert server.get("/live") == (200, "live\n")
    assert server.get("/ready") == (200, "ready\n")
    assert server.get("/nothing")[0] == 404
    assert server.get("/metrics?name=x")[0] == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_bandwidth_drops_and_limits_are_exported(start_server: StartServer, workers: int) -> None:
    """Datagrams over `bandwidth.per_allocation` are counted as dropped, by direction and
    reason, live and after the allocation ends; the limits are gauges (the node's, not a
    sum over workers)."""
    server = start_server({"workers": workers, "bandwidth": {"per_allocation": "80 kbit/s"}})
    if workers > 1:
        server.wait_for_log(rf"ready in \d+ ms: {workers} workers", timeout=15)
    peer = Peer()
    client = server.client("udp")
    try:
        client.allocate()
        client.create_permission(peer.address)
        client.channel_bind(0x4001, peer.address)
        # 30 kB at once: 200 ms of 10 kB/s passes (2000 bytes) and one more datagram.
        for _ in range(30):
            client.send_channel_data(0x4001, b"d" * 1000)
        peer.recv()
        samples = server.scrape()
        dropped = "pyturn_bandwidth_dropped_bytes_total"

        def counted() -> float:
            return value(
                server.scrape(), dropped, direction="client_to_peer", reason="per_allocation"
            )

        wait_until(lambda: counted() >= 25_000)
        assert 25_000 <= counted() <= 28_000
        assert value(samples, dropped, direction="peer_to_client", reason="per_allocation") == 0
        assert value(samples, dropped, direction="client_to_peer", reason="total") == 0
        limit = "pyturn_bandwidth_limit_bytes_per_second"
        assert value(samples, limit, scope="per_allocation") == 10_000
        assert value(samples, limit, scope="total") == 0
        client.refresh(0)
        wait_until(lambda: value(server.scrape(), "pyturn_allocations", transport="udp") == 0)
        assert 25_000 <= counted() <= 28_000  # kept after the allocation ended
    finally:
        client.close()
        peer.close()


def test_the_store_is_watched_and_its_outage_shown(
    start_server: StartServer, tmp_path: Path
) -> None:
    """`pyturn_store_up` is 1 while the store can be read; a store that becomes
    unreadable leaves the users it had in service (0, and a warning), until it is back."""
    db = tmp_path / "users.db"
    store = open_store(f"sqlite://{db}", create=True)
    store.add_user("dave", "example.org", "davepw")
    store.close()
    server = start_server({"store": f"sqlite://{db}"})
    assert value(server.scrape(), "pyturn_store_up") == 1
    good = db.read_bytes()
    mark = server.log_mark()
    db.write_bytes(b"\0garbage" * (len(good) // 8 + 1))
    wait_until(lambda: value(server.scrape(), "pyturn_store_up") == 0, timeout=5)
    server.wait_for_log("store unreadable, keeping the users and secrets it had", since=mark)
    client = server.client("udp", user="dave", password="davepw")
    try:
        client.allocate()  # dave is still served from what was read before
    finally:
        client.close()
    db.write_bytes(good)
    wait_until(lambda: value(server.scrape(), "pyturn_store_up") == 1, timeout=5)
