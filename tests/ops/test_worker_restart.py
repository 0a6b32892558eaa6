"""`workers: 2`: a worker that dies and restarts moves no other worker's UDP clients.

The supervisor binds one SO_REUSEPORT socket per worker slot and keeps them all open, so
the kernel's hash of a client's 5-tuple keeps picking the same slot while one worker
dies and another takes its place (and its socket). The surviving worker's clients keep
relaying on their allocations; the dead worker's clients reach the new worker in that
slot, which answers 437 Allocation Mismatch to their Refresh.

Which worker holds an allocation is told by its relayed port: each worker hands out
ports from its own slice of the relay range (supervisor.relay_slice).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pyturn.config import parse_config
from pyturn.net.supervisor import relay_slice
from pyturn.probe import ProbeClient
from pyturn.wire.attributes import ErrorCode, Lifetime
from pyturn.wire.message import MessageClass, Method
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, Peer, relay_round_trip, value, wait_until

CLIENTS = 16
WORKERS = 2
# Tries at spreading the clients over both workers; all 16 on one has odds of 2 in 65,536.
ROUNDS = 3
CHANNEL = 0x4000
ALLOCATIONS = "pyturn_allocations"


def _workers(server: OpsServer) -> list[int]:
    """The supervisor's child processes (its workers), oldest pid first."""
    pids: list[int] = []
    for children in Path(f"/proc/{server.pid}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    return sorted(pids)


def _slot(server: OpsServer, client: ProbeClient) -> int:
    """The worker index whose relay port slice holds `client`'s relayed port."""
    assert client.relayed is not None
    config = parse_config(server.config, source="test")
    port = client.relayed[1]
    for index in range(WORKERS):
        low, high = relay_slice(config, index, WORKERS)
        if low <= port <= high:
            return index
    raise AssertionError(f"relayed port {port} is in no worker's slice")


def _allocate(server: OpsServer, peer: Peer, client: ProbeClient, tag: bytes) -> None:
    """An allocation for `client` that has relayed a Send indication and its Data
    indication, with a channel to `peer`."""
    client.allocate()
    client.create_permission(peer.address)
    relay_round_trip(client, peer, b"allocated " + tag)
    client.channel_bind(CHANNEL, peer.address)


def _refresh_code(client: ProbeClient) -> int | None:
    """Refresh the allocation for 600 s: None on success, else the error code."""
    response = client.request(Method.REFRESH, [Lifetime(600)])
    if response.msg_class == MessageClass.SUCCESS:
        return None
    code = response.get(ErrorCode)
    assert code is not None, response
    return code.code


def _channel_round_trip(client: ProbeClient, peer: Peer, payload: bytes) -> None:
    """ChannelData to the peer through the relay, and back on the channel."""
    assert client.relayed is not None
    client.send_channel_data(CHANNEL, payload)
    assert peer.recv() == (payload, client.relayed)
    peer.send(payload[::-1], client.relayed)
    assert client.receive(3.0) == (("channel", CHANNEL), payload[::-1])


def _nothing_arrives(peer: Peer, within: float) -> None:
    peer.sock.settimeout(within)
    try:
        stray = peer.recv()
    except TimeoutError:
        return
    finally:
        peer.sock.settimeout(3.0)
    raise AssertionError(f"the peer got {stray}")


def _kill_and_check(
    server: OpsServer, peer: Peer, slots: dict[ProbeClient, int], victim: int, restarts: int
) -> list[ProbeClient]:
    """Kill worker `victim`, wait for its successor, check that only its clients lost
    their allocations; returns those clients."""
    assert value(server.scrape(), ALLOCATIONS, transport="udp") == CLIENTS
    mark = server.log_mark()
    os.kill(victim, signal.SIGKILL)
    exited = server.wait_for_log(
        rf"worker (\d) \(pid {victim}\) exited with code -9: restarting", since=mark, timeout=10
    )
    dead_slot = int(exited[1])
    wait_until(lambda: len(_workers(server)) == WORKERS, timeout=15)
    assert victim not in _workers(server)
    wait_until(lambda: server.get("/ready")[0] == 200, timeout=15)

    codes = {client: _refresh_code(client) for client in slots}
    survivors = [client for client, code in codes.items() if code is None]
    mismatched = [client for client, code in codes.items() if code == 437]
    assert len(survivors) + len(mismatched) == CLIENTS, sorted(map(str, codes.values()))
    assert survivors and mismatched
    assert {slots[client] for client in survivors} == set(range(WORKERS)) - {dead_slot}
    assert {slots[client] for client in mismatched} == {dead_slot}

    for i, client in enumerate(survivors):
        _channel_round_trip(client, peer, b"after restart %d, client %d" % (restarts, i))
    # The new worker in the dead slot knows none of these channels: nothing relays.
    for client in mismatched:
        client.send_channel_data(CHANNEL, b"to a forgotten channel")
    _nothing_arrives(peer, 0.5)

    samples = server.scrape()
    assert value(samples, ALLOCATIONS, transport="udp") == len(survivors)
    assert value(samples, "pyturn_worker_restarts_total") == restarts
    return mismatched


def test_a_worker_killed_and_restarted_moves_none_of_the_other_workers_clients(
    start_server: StartServer,
) -> None:
    """Each worker is killed once in turn: the survivors' clients keep relaying, the dead
    worker's clients get 437 and allocate again on its successor, on the same 5-tuple."""
    # Every client's 401 challenge comes from 127.0.0.1: lift the per-source budget.
    server = start_server(
        {"workers": WORKERS, "limits": {"unauthenticated_burst": 4 * CLIENTS * ROUNDS}}
    )
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    peer = Peer()
    clients: list[ProbeClient] = []
    try:
        for _ in range(ROUNDS):
            batch = []
            for i in range(CLIENTS):
                client = server.client()  # a socket, and so a source port, of its own
                clients.append(client)
                batch.append(client)
                _allocate(server, peer, client, b"client %d" % i)
            slots = {client: _slot(server, client) for client in batch}
            if len(set(slots.values())) == WORKERS:
                break
            for client in batch:  # all on one worker: end them, and try new clients
                client.refresh(0)
        assert len(set(slots.values())) == WORKERS, "every client hashed to one worker"

        # Kill every worker once. Were the listeners still each worker's own, the death
        # of the worker whose socket came first in the kernel's SO_REUSEPORT group would
        # move the last one's socket into its place, and with it the slots' clients.
        first = _workers(server)
        for restarts, victim in enumerate(first, start=1):
            lost = _kill_and_check(server, peer, slots, victim, restarts)
            for i, client in enumerate(lost):
                # The same 5-tuple reaches the new worker in the same slot.
                _allocate(server, peer, client, b"again %d" % i)
                assert _slot(server, client) == slots[client]
    finally:
        for client in clients:
            client.close()
        peer.close()
