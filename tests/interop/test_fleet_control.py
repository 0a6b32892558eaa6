"""Kick, revoke and sessions across a fleet: two nodes (each a supervisor with two
workers) on one real redis-server. A command given to node A must reach the sessions
that node B holds within a second, and B's users must be listed on A."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyturn.probe import ProbeClient, ProbeError
from tests.interop.server_process import PASSWORD, USER, ServerFactory, ServerProcess
from tests.interop.server_process import run_pyturn as pyturn
from tests.interop.turn_wire_client import open_client
from tests.redis_server import RedisServer

pytestmark = pytest.mark.interop

WITHIN = 1.0  # seconds a kick or revocation may take to reach another node
CLIENTS = 4
OPEN_BUDGET = {"unauthenticated_burst": 100_000, "unauthenticated_rate": 100_000.0}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def start_node(
    tmp_path: Path, server_factory: ServerFactory, redis_server: RedisServer
) -> Callable[[str], tuple[ServerProcess, Path]]:
    def start(name: str) -> tuple[ServerProcess, Path]:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        socket = directory / "ctl.sock"
        node = server_factory(
            {
                "workers": 2,
                "store": redis_server.url,
                "limits": OPEN_BUDGET,
                "control": {"socket": str(socket), "state_file": str(directory / "s.json")},
            }
        )
        node.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
        return node, socket

    return start


def hold(node: ServerProcess, count: int = CLIENTS) -> list[ProbeClient]:
    clients: list[ProbeClient] = []
    for _ in range(count):
        client = open_client("udp", node.udp_address)
        client.login()
        client.allocate()
        clients.append(client)
    return clients


def allocate_code(node: ServerProcess) -> int | None:
    client = open_client("udp", node.udp_address, username=USER, password=PASSWORD)
    try:
        client.login()
        client.allocate()
        return None
    except ProbeError as exc:
        return int(str(exc).split("refused: ")[1][:3])
    finally:
        client.close()


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """How long `condition` took to hold (polled); fails past `seconds`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - started


def deleted(node: ServerProcess, since: int, reason: str) -> int:
    return sum(e.get("reason") == reason for e in node.events("allocation deleted", since=since))


def test_a_kick_on_one_node_ends_the_sessions_another_node_holds(
    start_node: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    node_a, socket_a = start_node("a")
    node_b, _ = start_node("b")
    clients = hold(node_b)
    mark = node_b.log_mark()
    kick = pyturn("kick", "--user", USER, "--socket", str(socket_a))
    sent = time.monotonic()
    assert kick.returncode == 0, kick.stderr
    assert kick.stdout.strip() == "kicked 0 allocations on this node; 1 other nodes told"
    within(WITHIN, lambda: deleted(node_b, mark, "kicked") == CLIENTS)
    print(f"kick reached the other node's {CLIENTS} sessions {time.monotonic() - sent:.2f} s after")
    for client in clients:
        with pytest.raises(ProbeError, match="437"):
            client.refresh(600)
        client.close()
    assert node_a.events("allocation deleted") == []


def test_a_revocation_on_one_node_holds_on_every_node_and_for_new_ones(
    start_node: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    _, socket_a = start_node("a")
    node_b, socket_b = start_node("b")
    clients = hold(node_b, 2)
    mark = node_b.log_mark()
    result = pyturn("revoke", "--user", USER, "--for", "1h", "--socket", str(socket_a))
    assert result.returncode == 0, result.stderr
    took = within(WITHIN, lambda: deleted(node_b, mark, "revoked") == 2)
    print(f"revocation ended the other node's sessions in {took:.2f} s")
    assert all(allocate_code(node_b) == 401 for _ in range(CLIENTS))
    listing = pyturn("revoke", "--list", "--socket", str(socket_b))
    assert listing.stdout.startswith(f"{USER}\tuntil 20")
    # A node that starts later finds the fleet's revocations in Redis.
    node_c, _ = start_node("c")
    assert all(allocate_code(node_c) == 401 for _ in range(CLIENTS))
    removed = pyturn("revoke", "--remove", "--user", USER, "--socket", str(socket_a))
    assert removed.returncode == 0, removed.stderr
    took = within(WITHIN, lambda: allocate_code(node_b) is None)
    print(f"the revocation's removal reached another node in {took:.2f} s")
    for client in clients:
        client.close()


def test_sessions_fleet_lists_the_allocations_of_every_node(
    start_node: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    node_a, socket_a = start_node("a")
    node_b, _ = start_node("b")
    held = {"a": hold(node_a, 1), "b": hold(node_b, 2)}

    def rows() -> list[dict[str, Any]]:
        result = pyturn("sessions", "--fleet", "--json", "--socket", str(socket_a))
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        assert isinstance(found, list)
        return found

    # Nodes publish every 5 s; allow two rounds.
    within(11.0, lambda: len(rows()) == 3)
    found = rows()
    relayed = {
        name: {f"{c.relayed[0]}:{c.relayed[1]}" for c in clients if c.relayed}
        for name, clients in held.items()
    }
    by_node: dict[str, set[str]] = {}
    for row in found:
        by_node.setdefault(row["node"], set()).add(row["relayed"][0])
    assert sorted(by_node.values(), key=len) == [relayed["a"], relayed["b"]]
    assert {row["user"] for row in found} == {USER}
    assert len(by_node) == 2
    table = pyturn("sessions", "--fleet", "--socket", str(socket_a)).stdout
    assert table.splitlines()[0].split()[-1] == "NODE"
    for clients in held.values():
        for client in clients:
            client.close()
