"""`workers: N`: worker processes behind SO_REUSEPORT, watched by a supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pyturn.config import parse_config
from pyturn.net.supervisor import Supervisor, merge_expositions, worker_config
from tests.interop.test_turnutils import CLIENTS, MESSAGES, run_uclient
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, parse_metrics, value, wait_until

RELAYED_PACKETS = "pyturn_relayed_packets_total"


def _start(start_server: StartServer, **overrides: object) -> OpsServer:
    server = start_server({"workers": 2, **overrides})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    return server


def _workers(server: OpsServer) -> list[int]:
    assert server.process is not None
    out = subprocess.run(
        ["ps", "--ppid", str(server.process.pid), "-o", "pid="],
        capture_output=True,
        text=True,
        check=False,
        timeout=5,
    )
    return [int(pid) for pid in out.stdout.split()]


def test_workers_share_the_relay_range_and_the_quotas_and_serve_no_metrics() -> None:
    """Relay ports and quotas are the node's (pyturn/net/node_state.py): no worker gets a
    slice of the range or a share of the total."""
    config = parse_config(
        {
            "relay": {"min_port": 50000, "max_port": 50010},
            "quotas": {"allocations_total": 5},
            "workers": 2,
        }
    )
    worker = worker_config(config, config.listen, 2)
    assert worker.relay == config.relay
    assert worker.quotas == config.quotas
    assert not worker.metrics.enabled
    assert worker.workers == 2


def test_metrics_of_the_workers_are_summed_except_per_process_facts() -> None:
    one = (
        '# TYPE pyturn_allocations gauge\npyturn_allocations{transport="udp"} 2.0\n'
        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 100.0\n"
    )
    two = (
        '# TYPE pyturn_allocations gauge\npyturn_allocations{transport="udp"} 3.0\n'
        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 90.0\n"
    )
    merged = parse_metrics(merge_expositions([one, two]).decode())
    assert value(merged, "pyturn_allocations", transport="udp") == 5
    assert value(merged, "process_start_time_seconds") == 90


@pytest.mark.interop
def test_two_workers_relay_for_many_clients_and_metrics_add_up(
    start_server: StartServer, echo_peer: int
) -> None:
    """Clients hash to either worker; the supervisor's /metrics counts them all."""
    server = _start(start_server)
    assert len(_workers(server)) == 2
    run = run_uclient(server, echo_peer, "-c")
    sent = MESSAGES * CLIENTS
    assert (run.returncode, run.lost, run.received) == (0, 0, sent), run.output
    samples = server.scrape()
    assert value(samples, "pyturn_workers") == 2
    assert value(samples, RELAYED_PACKETS, direction="client_to_peer", transport="udp") == sent
    assert value(samples, RELAYED_PACKETS, direction="peer_to_client", transport="udp") == sent


def test_a_worker_that_dies_is_restarted_and_logged(start_server: StartServer) -> None:
    server = _start(start_server)
    victim = _workers(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"worker \d \(pid {victim}\) exited with code -9: restarting", timeout=5)
    wait_until(lambda: len(_workers(server)) == 2 and victim not in _workers(server), timeout=10)
    wait_until(lambda: server.get("/ready")[0] == 200, timeout=10)
    assert value(server.scrape(), "pyturn_worker_restarts_total") == 1
    client = server.client()
    client.allocate()


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    start_server: StartServer,
) -> None:
    server = _start(start_server, shutdown_timeout=5)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    assert "stopped: every worker has exited" in server.log_text


def test_sigterm_while_the_workers_start_still_stops_everything(tmp_path: Path) -> None:
    """A stop signal that lands between two worker spawns must reach both workers."""
    import sys
    import time

    import yaml

    from tests.interop.server_process import base_config

    config = {**base_config(), "workers": 2, "shutdown_timeout": 0}
    path = tmp_path / "pyturn.yaml"
    path.write_text(yaml.safe_dump(config))
    for delay in (0.2, 0.4, 0.6):
        process = subprocess.Popen(
            [sys.executable, "-m", "pyturn", "serve", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=10) in (0, -signal.SIGTERM), delay
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)


def test_sigterm_while_the_metrics_endpoint_starts_still_stops_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last await of start-up: a stop signal handled there must not be overwritten by
    "serving" (the workers' exits were then taken for crashes and restarted, forever)."""
    import asyncio

    from tests.interop.server_process import LOOPBACK, base_config, merge_config

    config = parse_config(
        merge_config(
            base_config(),
            {"workers": 2, "metrics": {"enabled": True, "address": LOOPBACK, "port": 0}},
        ),
        source="test",
    )
    start_endpoint = Supervisor._start_ops_endpoint

    async def signalled_meanwhile(self: Supervisor) -> None:
        await start_endpoint(self)
        self._on_stop_signal(signal.SIGTERM)

    monkeypatch.setattr(Supervisor, "_start_ops_endpoint", signalled_meanwhile)

    async def run() -> Supervisor:
        supervisor = Supervisor(config, None, 2)
        try:
            await asyncio.wait_for(supervisor.start(), 20)
            await asyncio.wait_for(supervisor.wait(), 20)
        finally:
            for worker in list(supervisor.workers.values()):
                if worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
        return supervisor

    supervisor = asyncio.run(run())
    assert supervisor.restarts == 0
    assert supervisor.state == "draining"
