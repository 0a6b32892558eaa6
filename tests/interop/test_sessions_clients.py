"""`pyturn sessions` and `pyturn kick` against real third-party clients, two workers.

Each test starts its own server with `workers: 2` and a control socket, lets aioice's
TURN client or coturn's turnutils_uclient hold allocations through it, and checks the
rows of `pyturn sessions --json --socket PATH` against what the clients themselves
know: their local address, the relayed address they were given, the channel numbers
they bound and the data they sent and received. Then `pyturn kick` ends allocations
(by user, relayed address or client address) and the clients lose them: the relay no
longer reaches the peer and a Refresh gets 437 (RFC 8656 §7.2: allocation mismatch).

The commands run as an operator runs them: `python -m pyturn ...` in a subprocess.
Everything is on 127.0.0.1; the control socket is a UNIX socket under the test's
temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aioice import stun

from pyturn.core.auth import rest_password, rest_username
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    REST_SECRET,
    USER,
    ServerFactory,
    ServerProcess,
    relayed_packets,
    require_tool,
)
from tests.interop.test_aioice_turn import (
    STEP_TIMEOUT,
    Collector,
    EchoPeer,
    Recording,
    run,
    start_echo_peer,
)
from tests.interop.test_aioice_turn import open_client as open_aioice_client
from tests.interop.test_turnutils import turnutils_peer

pytestmark = pytest.mark.interop

Row = dict[str, Any]
Addr = tuple[str, int]

WORKERS = 2
CLI_TIMEOUT = 20.0
# AF_UNIX paths must fit sun_path (108 bytes with the terminating NUL).
SOCKET_PATH_LIMIT = 100
# Every field of a `pyturn sessions --json` row (pyturn/core/sessions.py: describe()).
ROW_FIELDS = {
    "user",
    "quota_user",
    "client",
    "transport",
    "relayed",
    "tcp_relay",
    "age",
    "lifetime_left",
    "permissions",
    "channels",
    "peer_connections",
    "bytes_to_peer",
    "packets_to_peer",
    "bytes_to_client",
    "packets_to_client",
    "worker",
}
AIOICE_CLIENTS = 3
MESSAGES = 5
# Up to this many aioice clients until both workers hold one (the kernel's SO_REUSEPORT
# hash picks the worker: all on one worker has odds 2**-15).
SPREAD_CLIENTS = 16
UCLIENT_CLIENTS = 3
# uclient sends this many messages, one per 20 ms per client, so it holds its
# allocations for several seconds; it is stopped as soon as the kick is checked.
UCLIENT_MESSAGES = 400
UCLIENT_CONNECT_TIMEOUT = 15.0
# How long datagrams from a kicked allocation are given to (wrongly) reach the peer
# after a live allocation's datagram sent later has arrived.
GRACE = 0.3


def host_port(address: Addr) -> str:
    return f"{address[0]}:{address[1]}"


@dataclass(frozen=True)
class Node:
    """A running server with two workers and the control socket it serves."""

    server: ServerProcess
    socket: str

    def cli(self, *args: str) -> str:
        """`pyturn ARGS --socket PATH`; its standard output (it must succeed)."""
        result = subprocess.run(
            [sys.executable, "-m", "pyturn", *args, "--socket", self.socket],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def sessions(self, user: str | None = None) -> list[Row]:
        """The rows of `pyturn sessions --json` (for `--user USER`)."""
        rows = json.loads(self.cli("sessions", "--json", *(["--user", user] if user else [])))
        assert isinstance(rows, list), rows
        for row in rows:
            assert set(row) == ROW_FIELDS, row
            assert row["worker"] in range(WORKERS), row
        return rows

    def kick(self, *args: str) -> int:
        """`pyturn kick ARGS`; how many allocations it says it ended."""
        output = self.cli("kick", *args)
        found = re.fullmatch(r"kicked (\d+) allocations on this node\n", output)
        assert found is not None, output
        return int(found[1])


@pytest.fixture
def control_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the control socket and state file go: the test's tmp_path, or a short
    directory in /tmp when that path is too long for a UNIX socket."""
    if len(str(tmp_path / "control.sock").encode()) < SOCKET_PATH_LIMIT:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="pt", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def node(server_factory: ServerFactory, control_dir: Path) -> Node:
    socket_path = str(control_dir / "control.sock")
    server = server_factory(
        {
            "workers": WORKERS,
            "control": {
                "socket": socket_path,
                "state_file": str(control_dir / "state.json"),
            },
        }
    )
    server.wait_for_log(rf"ready in \d+ ms: {WORKERS} workers", timeout=15)
    server.wait_for_log(r"control socket on " + re.escape(socket_path))
    return Node(server, socket_path)


def wait_for_events(
    server: ServerProcess, event: str, count: int, *, since: int, timeout: float = 5.0
) -> list[dict[str, str]]:
    """At least `count` `event` lines after `since`, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        found = server.events(event, since=since)
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) >= count, (count, server.log_since(since))
    return found


# -- aioice ---------------------------------------------------------------------------------


async def open_clients(
    server: ServerProcess, transport: str, count: int, username: str = USER
) -> list[Recording]:
    """`count` aioice clients with an allocation each and a Collector as their receiver."""
    password = PASSWORD if username == USER else rest_password(REST_SECRET, username)
    clients: list[Recording] = []
    try:
        for _ in range(count):
            client = await open_aioice_client(server, transport, username, password)
            client.receiver = Collector()
            clients.append(client)
        await asyncio.gather(*(client.connect() for client in clients))
    except BaseException:
        for client in clients:
            client.transport.close()
        raise
    return clients


def local_address(client: Recording) -> str:
    """The client's own end of its 5-tuple (on loopback, what the server sees)."""
    sockname = client.transport.get_extra_info("sockname")
    return host_port((sockname[0], sockname[1]))


def relayed_address(client: Recording) -> str:
    assert client.relayed_address is not None
    return host_port(client.relayed_address)


async def delete_all(clients: list[Recording]) -> None:
    # A kicked client's Refresh gets 437: aioice logs it and closes its transport.
    await asyncio.gather(*(client.delete() for client in clients), return_exceptions=True)


async def echo(client: Recording, peer: Addr, payloads: list[bytes]) -> None:
    """Send `payloads` to `peer` through the relay (aioice binds a channel first) and
    receive every echo, in order."""
    receiver = client.receiver
    assert isinstance(receiver, Collector)
    for payload in payloads:
        await client.send_data(payload, peer)
    for payload in payloads:
        got = await asyncio.wait_for(receiver.queue.get(), STEP_TIMEOUT)
        assert got == (payload, peer)


def payloads_of(index: int) -> list[bytes]:
    return [b"client %d message %d" % (index, n) for n in range(MESSAGES)]


def by_relayed(rows: list[Row]) -> dict[str, Row]:
    """Rows by their (only, IPv4) relayed address."""
    out = {}
    for row in rows:
        assert len(row["relayed"]) == 1, row
        out[row["relayed"][0]] = row
    assert len(out) == len(rows), rows
    return out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sessions_lists_each_aioice_allocation_as_the_client_holds_it(
    node: Node, transport: str
) -> None:
    """Three aioice clients over `transport` each hold an allocation on a server with
    two workers. `pyturn sessions --json` has one row per client with its user, transport,
    client address (the client's own socket address), the relayed address aioice got,
    and a lifetime that with the age adds up to the one granted. Once each client has
    sent five messages to a UDP echo peer (aioice binds a channel to send), its row has
    the peer's IP as permission, aioice's channel number bound to the peer, and counts
    exactly the packets and bytes relayed each way. The table lists the same."""
    server = node.server
    mark = server.log_mark()

    async def scenario() -> None:
        peer_transport, peer, peer_addr = await start_echo_peer()
        started = time.monotonic()
        clients = await open_clients(server, transport, AIOICE_CLIENTS)
        try:
            rows = by_relayed(await asyncio.to_thread(node.sessions))
            assert set(rows) == {relayed_address(client) for client in clients}
            for client in clients:
                row = rows[relayed_address(client)]
                created = await asyncio.to_thread(
                    server.wait_for_event,
                    "allocation created",
                    since=mark,
                    relayed=relayed_address(client),
                )
                lifetime = float(created["lifetime"])
                expected = {
                    "user": USER,
                    "quota_user": USER,
                    "client": local_address(client),
                    "transport": transport,
                    "relayed": [relayed_address(client)],
                    "tcp_relay": False,
                    "permissions": [],
                    "channels": {},
                    "peer_connections": 0,
                    "bytes_to_peer": 0,
                    "packets_to_peer": 0,
                    "bytes_to_client": 0,
                    "packets_to_client": 0,
                }
                assert {key: row[key] for key in expected} == expected
                assert created["client"] == row["client"]
                assert 0 <= row["age"] <= time.monotonic() - started + 0.1, row
                assert row["lifetime_left"] + row["age"] == pytest.approx(lifetime, abs=0.05)

            for index, client in enumerate(clients):
                await echo(client, peer_addr, payloads_of(index))
            assert {source for _, source in peer.received} == {
                client.relayed_address for client in clients
            }

            rows = by_relayed(await asyncio.to_thread(node.sessions))
            for index, client in enumerate(clients):
                row = rows[relayed_address(client)]
                size = sum(len(payload) for payload in payloads_of(index))
                expected = {
                    "client": local_address(client),
                    "permissions": [LOOPBACK],
                    "channels": {
                        f"0x{client.peer_to_channel[peer_addr]:04X}": host_port(peer_addr)
                    },
                    "packets_to_peer": MESSAGES,
                    "bytes_to_peer": size,
                    "packets_to_client": MESSAGES,
                    "bytes_to_client": size,
                }
                assert {key: row[key] for key in expected} == expected
            table = await asyncio.to_thread(node.cli, "sessions")
            for client in clients:
                lines = [line for line in table.splitlines() if relayed_address(client) in line]
                assert [line.split()[:3] for line in lines] == [
                    [USER, local_address(client), transport]
                ], table
        finally:
            await delete_all(clients)
            peer_transport.close()

    run(scenario())


def test_sessions_gathers_both_workers_allocations_and_filters_by_user(node: Node) -> None:
    """aioice clients of a static user and of a TURN REST user (`<expiry>:dave`) come in
    pairs until both workers hold allocations: `pyturn sessions` lists every client's
    allocation whichever worker holds it, with the worker named; `--user dave` lists
    exactly the REST user's (its quota user is dave), `--user` with the whole REST
    username the same, `--user alice` exactly alice's, and an unknown user none."""
    server = node.server
    rest_user = rest_username(int(time.time()) + 600, "dave")

    async def scenario() -> None:
        clients: dict[str, list[Recording]] = {USER: [], rest_user: []}
        try:
            rows: list[Row] = []
            for _ in range(SPREAD_CLIENTS // 2):
                for username in clients:
                    clients[username] += await open_clients(server, "udp", 1, username)
                rows = await asyncio.to_thread(node.sessions)
                if {row["worker"] for row in rows} == set(range(WORKERS)):
                    break
            assert {row["worker"] for row in rows} == set(range(WORKERS)), rows

            everyone = [client for held in clients.values() for client in held]
            assert {(row["client"], row["relayed"][0]) for row in rows} == {
                (local_address(client), relayed_address(client)) for client in everyone
            }
            assert len(rows) == len(everyone)

            for asked, username, quota_user in [
                ("dave", rest_user, "dave"),
                (rest_user, rest_user, "dave"),
                (USER, USER, USER),
            ]:
                listed = await asyncio.to_thread(node.sessions, asked)
                assert {row["relayed"][0] for row in listed} == {
                    relayed_address(client) for client in clients[username]
                }, asked
                assert {(row["user"], row["quota_user"]) for row in listed} == {
                    (username, quota_user)
                }
            assert await asyncio.to_thread(node.sessions, "nobody") == []
        finally:
            await delete_all([client for held in clients.values() for client in held])

    run(scenario())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_kick_by_relayed_address_ends_that_aioice_allocation_only(
    node: Node, transport: str
) -> None:
    """Two aioice clients relay to a UDP echo peer. `pyturn kick --relayed` with the
    first one's relayed address ends that allocation alone (the server logs reason
    kicked, sessions lists only the other): the kicked client's data no longer reaches
    the peer while the other's does, and its Refresh gets 437 (Allocation Mismatch).
    Then `pyturn kick --client IP:PORT` ends the other one the same way."""
    server = node.server

    async def scenario() -> None:
        peer_transport, peer, peer_addr = await start_echo_peer()
        kicked, kept = clients = await open_clients(server, transport, 2)
        try:
            for index, client in enumerate(clients):
                await echo(client, peer_addr, payloads_of(index))

            mark = server.log_mark()
            count = await asyncio.to_thread(node.kick, "--relayed", relayed_address(kicked))
            assert count == 1
            deleted = await asyncio.to_thread(
                server.wait_for_event,
                "allocation deleted",
                since=mark,
                relayed=relayed_address(kicked),
            )
            assert (deleted["reason"], deleted["client"]) == ("kicked", local_address(kicked))
            assert relayed_packets(deleted) == (MESSAGES, MESSAGES)
            rows = await asyncio.to_thread(node.sessions)
            assert [row["relayed"] for row in rows] == [[relayed_address(kept)]]

            await relay_stopped(kicked, kept, peer, peer_addr)
            await refresh_refused(kicked)

            mark = server.log_mark()
            count = await asyncio.to_thread(node.kick, "--client", local_address(kept))
            assert count == 1
            deleted = await asyncio.to_thread(
                server.wait_for_event,
                "allocation deleted",
                since=mark,
                relayed=relayed_address(kept),
            )
            assert deleted["reason"] == "kicked"
            assert await asyncio.to_thread(node.sessions) == []
            await refresh_refused(kept)
        finally:
            await delete_all(clients)
            peer_transport.close()

    run(scenario())


async def relay_stopped(kicked: Recording, kept: Recording, peer: EchoPeer, to: Addr) -> None:
    """What `kicked` sends (on its channel) no longer reaches the peer; what `kept`
    sends afterwards does."""
    received = len(peer.received)
    for n in range(3):
        await kicked.send_data(b"after the kick %d" % n, to)
    await echo(kept, to, [b"still relayed"])
    # Nothing to wait for but the kicked datagrams' chance to arrive (on another worker).
    await asyncio.sleep(GRACE)
    assert peer.received[received:] == [(b"still relayed", kept.relayed_address)]


async def refresh_refused(client: Recording) -> None:
    """The client's own Refresh (with its credentials) gets 437."""
    request = stun.Message(stun.Method.REFRESH, stun.Class.REQUEST)
    request.attributes["LIFETIME"] = 600
    with pytest.raises(stun.TransactionFailed) as failure:
        await asyncio.wait_for(client.request_with_retry(request), STEP_TIMEOUT)
    assert failure.value.response.error_code == 437


# -- coturn's turnutils_uclient -------------------------------------------------------------


class Uclient:
    """turnutils_uclient -v running in the background, its output read as it comes."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="uclient-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self._lines.append(raw.decode("utf-8", errors="replace"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            for _ in range(int(timeout / 0.1) + 1):
                if any(regex.search(line) for line in self._lines):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    break
                self._changed.wait(min(remaining, 0.1))
        raise AssertionError(f"uclient printed no {pattern!r} within {timeout} s:\n{self.output}")

    def allocations(self) -> set[tuple[str, str]]:
        """(local address, relayed address) of each allocation uclient reports."""
        pairs, local = set(), None
        for line in self.output.splitlines():
            connected = re.search(r"Connected from: (\S+)", line)
            if connected is not None:
                local = connected[1]
            relayed = re.search(r"Received relay addr: (\S+)", line)
            if relayed is not None:
                assert local is not None, self.output
                pairs.add((local, relayed[1]))
        return pairs

    def channels(self) -> set[int]:
        """The channel numbers uclient reports bound."""
        return {int(number, 16) for number in re.findall(r"success: (0x[0-9a-f]+)", self.output)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def uclient(server: ServerProcess, peer_port: int, transport: str) -> Iterator[Uclient]:
    tool = require_tool("turnutils_uclient")
    flags = ["-t"] if transport == "tcp" else []
    port = server.tcp_port if transport == "tcp" else server.udp_port
    command = [
        tool,
        "-v",
        "-c",
        *flags,
        "-p",
        str(port),
        "-e",
        LOOPBACK,
        "-r",
        str(peer_port),
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        str(UCLIENT_MESSAGES),
        "-m",
        str(UCLIENT_CLIENTS),
        "-l",
        "100",
        LOOPBACK,
    ]
    client = Uclient(command)
    try:
        yield client
    finally:
        client.stop()


def relaying(rows: list[Row]) -> bool:
    """Some allocation has relayed to the peer and back."""
    return any(row["packets_to_peer"] and row["packets_to_client"] for row in rows)


def poll_sessions(
    node: Node, done: Callable[[list[Row]], bool], timeout: float = 10.0
) -> list[Row]:
    """`pyturn sessions` until `done(rows)` (or `timeout`); the last rows."""
    deadline = time.monotonic() + timeout
    rows = node.sessions()
    for _ in range(int(timeout / 0.1) + 1):
        if done(rows) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
        rows = node.sessions()
    return rows


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_kick_by_user_ends_every_allocation_of_a_running_uclient(
    node: Node, transport: str
) -> None:
    """While coturn's turnutils_uclient runs three clients over `transport`, `pyturn
    sessions` lists exactly the allocations uclient reports and still holds (its local
    and relayed addresses, the channel numbers it bound; over TCP uclient closes the
    connections of the allocations it does not use, and the server deletes those), all
    alice's, counting its traffic. `pyturn kick --user alice` ends every one: it says
    how many, the server logs each as deleted with reason kicked (having relayed at least
    what sessions had counted), and `pyturn sessions` lists none."""
    server = node.server
    start = server.log_mark()
    with turnutils_peer() as peer_port, uclient(server, peer_port, transport) as client:
        client.wait_for(r"Total connect time", UCLIENT_CONNECT_TIMEOUT)
        channels = client.channels()
        assert channels, client.output

        # uclient starts sending a moment after its allocations are made.
        rows = poll_sessions(node, relaying)
        released = {
            fields["relayed"] for fields in server.events("allocation deleted", since=start)
        }
        held = {
            (local, relayed) for local, relayed in client.allocations() if relayed not in released
        }
        assert len(held) >= UCLIENT_CLIENTS, client.output
        assert {(row["client"], row["relayed"][0]) for row in rows} == held, client.output
        assert len(rows) == len(held)
        assert {int(number, 16) for row in rows for number in row["channels"]} == channels
        for row in rows:
            assert (row["user"], row["quota_user"], row["transport"]) == (USER, USER, transport)
            assert set(row["permissions"]) <= {LOOPBACK}, row
            assert {peer.rpartition(":")[0] for peer in row["channels"].values()} <= {LOOPBACK}
        assert relaying(rows), rows
        counted = {row["relayed"][0]: row["packets_to_peer"] for row in rows}

        assert client.process.poll() is None, "uclient ended before the kick"
        mark = server.log_mark()
        assert node.kick("--user", USER) == len(held)
        deleted = wait_for_events(server, "allocation deleted", len(held), since=mark)
        assert {fields["relayed"] for fields in deleted} == {relayed for _, relayed in held}
        for fields in deleted:
            assert (fields["reason"], fields["user"]) == ("kicked", USER), fields
            assert relayed_packets(fields)[0] >= counted[fields["relayed"]], fields
        assert node.sessions() == []
        assert node.sessions(USER) == []
