"""`workers: 2`: a worker that dies and restarts moves no other worker's UDP clients.

The supervisor binds one SO_REUSEPORT socket per worker slot and keeps them all open, so
the kernel's hash of a client's 5-tuple keeps picking the same slot while one worker
dies and another takes its place (and its socket). The surviving worker's clients keep
relaying on their allocations; the dead worker's clients reach the new worker in that
slot, which answers 437 Allocation Mismatch to their Refresh.

Relay ports come from one pool for the node, so the relayed port does not tell which
worker holds an allocation; the process that holds its relay socket does (/proc). The
two deaths tell it too: the clients that lose their allocation when the first worker
dies must be exactly those that keep it when the second one dies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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


def _relay_owners(server: OpsServer) -> dict[int, int]:
    """UDP port -> the pid of the worker holding a socket on it, for ports held by only
    one worker (relay ports, not the listeners every worker shares)."""
    inodes: dict[str, int] = {}
    for pid in _workers(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes[target[len("socket:[") : -1]] = pid
    holders: dict[int, set[int]] = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... uid timeout inode
        holder = inodes.get(fields[9])
        if holder is not None:
            holders.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(holder)
    return {port: pids.pop() for port, pids in holders.items() if len(pids) == 1}


def _owner(server: OpsServer, client: ProbeClient) -> int:
    """The pid of the worker that holds `client`'s relay socket."""
    assert client.relayed is not None
    port = client.relayed[1]
    # /proc/net/udp is read in pieces: sockets other processes open and close meanwhile
    # can make it skip lines. A few reads see the port.
    for _ in range(10):
        owner = _relay_owners(server).get(port)
        if owner is not None:
            return owner
        time.sleep(0.05)
    raise AssertionError(f"no worker holds relayed port {port}")


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
    server: OpsServer, peer: Peer, clients: list[ProbeClient], victim: int, restarts: int
) -> tuple[list[ProbeClient], list[ProbeClient]]:
    """Kill worker `victim`, wait for its successor, check that the clients that kept
    their allocations still relay and the others, `victim`'s, get 437; returns (kept,
    lost)."""
    assert value(server.scrape(), ALLOCATIONS, transport="udp") == CLIENTS
    owners = {client: _owner(server, client) for client in clients}
    mark = server.log_mark()
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(
        rf"worker (\d) \(pid {victim}\) exited with code -9: restarting", since=mark, timeout=10
    )
    wait_until(lambda: len(_workers(server)) == WORKERS, timeout=15)
    assert victim not in _workers(server)
    wait_until(lambda: server.get("/ready")[0] == 200, timeout=15)

    codes = {client: _refresh_code(client) for client in clients}
    survivors = [client for client, code in codes.items() if code is None]
    mismatched = [client for client, code in codes.items() if code == 437]
    assert len(survivors) + len(mismatched) == CLIENTS, sorted(map(str, codes.values()))
    assert survivors and mismatched
    assert [owners[client] == victim for client in clients] == [
        codes[client] == 437 for client in clients
    ]

    for i, client in enumerate(survivors):
        _channel_round_trip(client, peer, b"after restart %d, client %d" % (restarts, i))
    # The new worker in the dead slot knows none of these channels: nothing relays.
    for client in mismatched:
        client.send_channel_data(CHANNEL, b"to a forgotten channel")
    _nothing_arrives(peer, 0.5)

    samples = server.scrape()
    assert value(samples, ALLOCATIONS, transport="udp") == len(survivors)
    assert value(samples, "pyturn_worker_restarts_total") == restarts
    return survivors, mismatched


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
            for client in clients:  # all on one worker: end them, and try new clients
                client.refresh(0)
                client.close()
            clients = []
            for i in range(CLIENTS):
                client = server.client()  # a socket, and so a source port, of its own
                clients.append(client)
                _allocate(server, peer, client, b"client %d" % i)
            if len({_owner(server, client) for client in clients}) == WORKERS:
                break
        assert len({_owner(server, client) for client in clients}) == WORKERS

        # Kill every worker once. Were the listeners still each worker's own, the death
        # of the worker whose socket came first in the kernel's SO_REUSEPORT group would
        # move the last one's socket into its place, and with it the slots' clients.
        first, second = _workers(server)
        kept, lost = _kill_and_check(server, peer, clients, first, 1)
        successor = (set(_workers(server)) - {second}).pop()
        for i, client in enumerate(lost):
            # The same 5-tuple reaches the new worker in the same slot.
            _allocate(server, peer, client, b"again %d" % i)
            assert _owner(server, client) == successor
        kept_again, lost_again = _kill_and_check(server, peer, clients, second, 2)
        # The slots did not move: who lost with the first death keeps with the second.
        assert set(kept_again) == set(lost) and set(lost_again) == set(kept)
    finally:
        for client in clients:
            client.close()
        peer.close()
