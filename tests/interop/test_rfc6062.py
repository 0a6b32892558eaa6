"""RFC 6062 TCP allocations against the real server: coturn's client and a hand-written one.

turnutils_uclient -T allocates two TCP-relayed allocations of its own (with -y implied)
and has each Connect to the other's relayed address, so every byte goes client ->
data connection -> relayed TCP connection -> the other allocation -> its data
connection. The hand-written client uses pyturn's own codec (via `turn_wire_client`)
to drive both directions of RFC 6062 step by step: a peer connecting in
(ConnectionAttempt, §5.3) and the client connecting out (Connect, §5.2), each followed
by ConnectionBind (§5.4) on a new data connection and an echo both ways.

Every socket is on 127.0.0.1. The peer-policy test sends Connect requests naming
10.0.0.1 and 169.254.169.254, which the server must refuse before it opens a socket;
even if it did not, its relay address is 127.0.0.1, and Linux does not route a
connection from a loopback source to a non-loopback destination.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pyturn.core.tcp_relaying import connection_id_worker
from pyturn.logs import format_address
from pyturn.wire.attributes import ConnectionId
from pyturn.wire.message import MessageClass
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerFactory,
    ServerProcess,
    base_config,
    merge_config,
    require_tool,
    running_server,
    tls_config,
)
from tests.interop.test_turnutils import UclientRun
from tests.interop.turn_wire_client import (
    WireClient,
    error_code,
    error_text,
    open_client,
    recv_exactly,
)

pytestmark = pytest.mark.interop

MESSAGES = 50
CLIENTS = 2
LENGTH = 170
TOOL_TIMEOUT = 30.0
PEER_TIMEOUT = 5.0
# Payloads start with a byte that is neither STUN (00) nor ChannelData (01), so the
# client's framer cannot mistake a payload that arrives with the ConnectionBind response.
EARLY = b"\xfepeer spoke before the bind"


def run_uclient_tcp_relay(
    server: ServerProcess, *flags: str, messages: int = MESSAGES
) -> UclientRun:
    """uclient -T (RFC 6062 relaying between its own two allocations)."""
    tool = require_tool("turnutils_uclient")
    port = server.tls_port if "-S" in flags else server.tcp_port
    command = [
        tool,
        "-T",
        *flags,
        "-p",
        str(port),
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        str(messages),
        "-m",
        str(CLIENTS),
        "-l",
        str(LENGTH),
        LOOPBACK,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    return UclientRun(result.returncode, result.stdout + result.stderr)


def bytes_moved(server: ServerProcess, mark: int, transport: str) -> tuple[int, int]:
    """(bytes to peers, bytes to clients) of the `transport` allocations deleted since mark."""
    deleted = [
        fields
        for fields in server.events("allocation deleted", since=mark)
        if fields.get("transport") == transport
    ]
    return (
        sum(int(fields["bytes_to_peer"]) for fields in deleted),
        sum(int(fields["bytes_to_client"]) for fields in deleted),
    )


@pytest.mark.parametrize(
    ("flags", "transport"),
    [pytest.param((), "tcp", id="tcp"), pytest.param(("-S",), "tls", id="tls")],
)
def test_uclient_relays_every_message_over_tcp_allocations(
    tls_server: ServerProcess, flags: tuple[str, ...], transport: str
) -> None:
    """RFC 6062 §5.1-§5.5 with coturn's client: Allocate with REQUESTED-TRANSPORT TCP,
    Connect to the other allocation's relayed address, ConnectionAttempt on the other
    side, ConnectionBind on both, then 50 messages from each of 2 clients come back with
    none lost, over a TCP (-T) or a TLS (-T -S) control connection. The server's
    deletion log lines account for every byte, both ways."""
    mark = tls_server.log_mark()
    run = run_uclient_tcp_relay(tls_server, *flags)
    total = MESSAGES * CLIENTS
    assert run.returncode == 0, run.output
    assert run.lost == 0, run.output
    assert (run.sent, run.received) == (total, total), run.output
    expected = (total * LENGTH, total * LENGTH)
    deadline = time.monotonic() + 5.0
    for _ in range(50):
        if bytes_moved(tls_server, mark, transport) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert bytes_moved(tls_server, mark, transport) == expected, tls_server.log_since(mark)
    created = tls_server.events("allocation created", since=mark)
    assert {(fields["user"], fields["transport"]) for fields in created} == {(USER, transport)}


# -- the hand-written client -------------------------------------------------------------


def tcp_listener(sockets: list[socket.socket], host: str = LOOPBACK) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(listener)
    listener.bind((host, 0))
    listener.listen(4)
    return listener


def connect_to_listener(
    control: WireClient, listener: socket.socket, sockets: list[socket.socket]
) -> tuple[int, socket.socket]:
    """RFC 6062 §5.2 Connect to `listener`: the CONNECTION-ID and the accepted socket."""
    response = control.connect_peer(listener.getsockname()[:2])
    assert response.msg_class == MessageClass.SUCCESS, error_text(response)
    cid = response.get(ConnectionId)
    assert cid is not None
    conn = accepted_within(listener, PEER_TIMEOUT)
    assert conn is not None
    sockets.append(conn)
    return cid.value, conn


def accepted_within(listener: socket.socket, timeout: float) -> socket.socket | None:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return None
    return conn


def assert_closed(sock: socket.socket, what: str, timeout: float = PEER_TIMEOUT) -> None:
    """`sock` reaches EOF (or a reset) within `timeout`, with nothing more to read."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return
    except TimeoutError:
        raise AssertionError(f"{what}: still open after {timeout} s") from None
    assert data == b"", f"{what}: got {data!r} instead of EOF"


def data_connection(
    server: ServerProcess, control: WireClient, connection_id: int, clients: list[WireClient]
) -> tuple[socket.socket, bytes]:
    """Open a data connection, ConnectionBind it, and return its raw socket and leftover."""
    data = open_client("tcp", server.tcp_address)
    clients.append(data)
    data.share_credentials(control)
    response = data.connection_bind(connection_id)
    assert response.msg_class == MessageClass.SUCCESS, error_text(response)
    return data.take_pipe()


def test_a_peer_connecting_to_the_relayed_address_reaches_the_client_both_ways(
    turn_server: ServerProcess, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.3 and §5.4: with a permission for the peer's IP, a TCP connection to
    the relayed address yields a ConnectionAttempt naming the peer and a CONNECTION-ID;
    what the peer sent before the bind is buffered and delivered after ConnectionBind
    on a new data connection, and from then on bytes flow both ways unchanged."""
    control = open_client("tcp", turn_server.tcp_address)
    clients.append(control)
    relayed = control.allocate_tcp()
    assert relayed[0] == LOOPBACK
    control.create_permission((LOOPBACK, 0))

    peer = socket.create_connection(relayed, timeout=PEER_TIMEOUT)
    sockets.append(peer)
    peer.sendall(EARLY)
    peer_address, connection_id = control.wait_connection_attempt()
    assert peer_address == peer.getsockname()[:2]

    pipe, leftover = data_connection(turn_server, control, connection_id, clients)
    assert leftover + recv_exactly(pipe, len(EARLY) - len(leftover)) == EARLY
    for i in range(5):
        to_peer = b"\xfdclient to peer %d" % i
        pipe.sendall(to_peer)
        assert recv_exactly(peer, len(to_peer)) == to_peer
        to_client = b"\xfcpeer to client %d" % i
        peer.sendall(to_client)
        assert recv_exactly(pipe, len(to_client)) == to_client

    # The peer hangs up: the server closes the client's data connection too.
    peer.close()
    assert_closed(pipe, "the data connection after the peer closed")


def test_a_peer_without_a_permission_gets_no_connection_attempt(
    turn_server: ServerProcess, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.3: a connection to the relayed address from an IP with no permission
    is closed, and the client hears nothing of it."""
    control = open_client("tcp", turn_server.tcp_address)
    clients.append(control)
    relayed = control.allocate_tcp()
    peer = socket.create_connection(relayed, timeout=PEER_TIMEOUT)
    sockets.append(peer)
    peer.settimeout(PEER_TIMEOUT)
    with contextlib.suppress(ConnectionResetError):
        assert peer.recv(16) == b""
    assert control.receive(0.3) is None
    assert not control.attempts


def test_connect_to_a_peer_then_connection_bind_carries_an_echo(
    turn_server: ServerProcess, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.2 and §5.4: Connect opens a TCP connection from the relayed transport
    address to the peer and answers with a CONNECTION-ID; ConnectionBind on a new data
    connection turns it into a pipe to the peer, which echoes what it gets."""
    listener = tcp_listener(sockets)
    control = open_client("tcp", turn_server.tcp_address)
    clients.append(control)
    relayed = control.allocate_tcp()

    response = control.connect_peer(listener.getsockname())
    assert response.msg_class == MessageClass.SUCCESS, error_text(response)
    cid = response.get(ConnectionId)
    assert cid is not None
    conn = accepted_within(listener, PEER_TIMEOUT)
    assert conn is not None, "the server answered Connect but no connection reached the peer"
    sockets.append(conn)
    assert conn.getpeername()[:2] == relayed

    pipe, leftover = data_connection(turn_server, control, cid.value, clients)
    assert leftover == b""
    for i in range(5):
        message = b"\xfbround trip %d " % i + bytes(range(256)) * 4
        pipe.sendall(message)
        conn.sendall(recv_exactly(conn, len(message)))  # the peer echoes
        assert recv_exactly(pipe, len(message)) == message

    # RFC 6062 §5.5 / RFC 8656 §3.1: closing the control connection ends the allocation,
    # and with it the connections to its peers and their data connections.
    control.close()
    assert_closed(conn, "the peer connection after the control connection closed")
    assert_closed(pipe, "the data connection after the control connection closed")


def test_connect_to_a_peer_refused_by_the_default_policy_is_403_without_a_connection(
    server_factory: ServerFactory, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.2 with RFC 8656 §9's policy hook: under the default peer policy (no
    peers.allow) Connect to loopback, a private address or the cloud metadata address is
    403 Forbidden, and the server does not even try: nothing connects to the loopback
    listener named in the request."""
    server = server_factory({"peers": None})
    listener = tcp_listener(sockets)
    control = open_client("tcp", server.tcp_address)
    clients.append(control)
    control.allocate_tcp()
    mark = server.log_mark()
    for peer in [listener.getsockname()[:2], ("10.0.0.1", 80), ("169.254.169.254", 80)]:
        response = control.connect_peer(peer)
        assert response.msg_class == MessageClass.ERROR, (peer, response)
        assert error_code(response) == 403, (peer, error_text(response))
    conn = accepted_within(listener, 0.5)
    if conn is not None:
        sockets.append(conn)
    assert conn is None, "the server connected to a peer its policy refuses"
    # A fresh server: three refusals stay under the log throttle (5 per client address).
    server.wait_for_event("peer denied", since=mark, peer="169.254.169.254")
    denied = [fields["peer"] for fields in server.events("peer denied", since=mark)]
    assert denied == [LOOPBACK, "10.0.0.1", "169.254.169.254"], server.log_since(mark)


def test_connect_errors_follow_rfc_6062(
    turn_server: ServerProcess, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.2 and §5.4 error cases: Connect to a loopback port with nothing
    listening is 447 Connection Timeout or Failure; a second Connect to a peer already
    connected is 446 Connection Already Exists; ConnectionBind naming an unknown
    CONNECTION-ID is 400."""
    closed = tcp_listener(sockets)
    closed_address = closed.getsockname()[:2]
    closed.close()  # nothing listens there now: the kernel answers with a RST
    listener = tcp_listener(sockets)
    control = open_client("tcp", turn_server.tcp_address)
    clients.append(control)
    control.allocate_tcp()

    response = control.connect_peer(closed_address)
    assert error_code(response) == 447, error_text(response)

    first = control.connect_peer(listener.getsockname()[:2])
    assert first.msg_class == MessageClass.SUCCESS, error_text(first)
    conn = accepted_within(listener, PEER_TIMEOUT)
    assert conn is not None
    sockets.append(conn)
    again = control.connect_peer(listener.getsockname()[:2])
    assert error_code(again) == 446, error_text(again)

    cid = first.get(ConnectionId)
    assert cid is not None
    data = open_client("tcp", turn_server.tcp_address)
    clients.append(data)
    data.share_credentials(control)
    unknown = data.connection_bind(cid.value ^ 0x5A5A5A5A)
    assert error_code(unknown) == 400, error_text(unknown)


def echo_through(pipe: socket.socket, peer: socket.socket, tag: bytes) -> None:
    """One message each way between a data connection and its peer."""
    pipe.sendall(b"\xfd" + tag)
    assert recv_exactly(peer, 1 + len(tag)) == b"\xfd" + tag
    peer.sendall(b"\xfc" + tag)
    assert recv_exactly(pipe, 1 + len(tag)) == b"\xfc" + tag


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_that_denies_a_peer_closes_its_established_peer_connection(
    server_factory: ServerFactory,
    clients: list[WireClient],
    sockets: list[socket.socket],
    workers: int,
) -> None:
    """RFC 8656 §21.2.1 for RFC 6062: a SIGHUP whose peer policy now denies a peer closes
    the relayed TCP connection to it and the client's data connection, both ways, while a
    connection to a peer still allowed keeps relaying."""
    server = server_factory({"workers": workers})
    control = open_client("tcp", server.tcp_address)
    clients.append(control)
    control.allocate_tcp()
    pipes: list[tuple[socket.socket, socket.socket]] = []
    for host in (LOOPBACK, "127.0.0.2"):
        connection_id, peer = connect_to_listener(control, tcp_listener(sockets, host), sockets)
        pipe, leftover = data_connection(server, control, connection_id, clients)
        assert leftover == b""
        echo_through(pipe, peer, b"before the reload")
        pipes.append((pipe, peer))

    server.config["peers"] = {"allow": ["127.0.0.2/32"]}  # 127.0.0.1 falls to the deny list
    server.config_path.write_text(yaml.safe_dump(server.config, sort_keys=False))
    mark = server.log_mark()
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_event("config reloaded", since=mark)

    (denied_pipe, denied_peer), (kept_pipe, kept_peer) = pipes
    assert_closed(denied_peer, "the connection to the denied peer")
    assert_closed(denied_pipe, "the data connection of the denied peer")
    echo_through(kept_pipe, kept_peer, b"after the reload")


# -- several workers (issue 14) ----------------------------------------------------------

WORKER_RUNS = 10
TLS_WORKER_RUNS = 3
# uclient's run time hardly depends on the count; few messages keep the log short.
WORKER_MESSAGES = 10


@pytest.fixture(scope="module", params=[2, 4], ids=["workers=2", "workers=4"])
def workers_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: tuple[Path, Path],
) -> Iterator[ServerProcess]:
    """A server with several worker processes on UDP, TCP and TLS; its debug log says
    which data connections went from one worker to another."""
    overrides = {
        **tls_config(*tls_files),
        "workers": request.param,
        "logging": {"level": "debug"},
    }
    config = merge_config(base_config(), overrides)
    yield from running_server(config, tmp_path_factory.mktemp("pyturn-workers"))


def assert_every_message_echoed(run: UclientRun, messages: int) -> None:
    total = messages * CLIENTS
    assert run.returncode == 0, run.output
    assert run.lost == 0, run.output
    assert (run.sent, run.received) == (total, total), run.output


@pytest.mark.parametrize("attempt", range(1, WORKER_RUNS + 1))
def test_uclient_relays_every_message_whichever_worker_accepts_its_data_connections(
    workers_server: ServerProcess, attempt: int
) -> None:
    """RFC 6062 §5.4 with `workers: 2` and `4`: the worker that accepts a data connection
    is the kernel's pick, not the one holding the peer connection its ConnectionBind
    names; it passes the connection to that worker, and every message comes back."""
    run = run_uclient_tcp_relay(workers_server, messages=WORKER_MESSAGES)
    assert_every_message_echoed(run, WORKER_MESSAGES)


@pytest.mark.parametrize("attempt", range(1, TLS_WORKER_RUNS + 1))
def test_uclient_over_tls_relays_every_message_whichever_worker_accepts(
    workers_server: ServerProcess, attempt: int
) -> None:
    """The same over TLS (-S): a TLS session cannot move between processes, so the
    accepting worker keeps it and pipes the plaintext to the owner."""
    run = run_uclient_tcp_relay(workers_server, "-S", messages=WORKER_MESSAGES)
    assert_every_message_echoed(run, WORKER_MESSAGES)


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Each worker slot's process, from the supervisor's debug lines (the latest wins)."""
    found = re.findall(r"worker (\d+) ready \(pid (\d+)\)", server.log_text)
    return {int(slot): int(pid) for slot, pid in found}


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_data_connection_accepted_by_another_worker_carries_bytes_both_ways(
    workers_server: ServerProcess,
    tls_files: tuple[Path, Path],
    transport: str,
    clients: list[WireClient],
    sockets: list[socket.socket],
) -> None:
    """RFC 6062 §5.2 and §5.4 with several workers: while the worker that holds the peer
    connection is stopped (SIGSTOP), another one must accept the data connection; it
    passes it on (TCP: the socket; TLS: a pipe from the TLS session it keeps), the
    owner, continued, answers the ConnectionBind, and the pipe carries bytes both ways."""
    address = workers_server.address(transport)
    ca_file = tls_files[0] if transport == "tls" else None
    control = open_client(transport, address, ca_file=ca_file)
    clients.append(control)
    control.allocate_tcp()
    connection_id, conn = connect_to_listener(control, tcp_listener(sockets), sockets)
    owner = worker_pids(workers_server)[connection_id_worker(connection_id)]
    mark = workers_server.log_mark()

    os.kill(owner, signal.SIGSTOP)
    try:
        data = open_client(transport, address, ca_file=ca_file, timeout=2 * PEER_TIMEOUT)
        clients.append(data)
        data.share_credentials(control)
        client = format_address(data.link.sock.getsockname()[:2])
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(data.connection_bind, connection_id)
            try:
                handed = workers_server.wait_for_event(
                    "data connection handed over", since=mark, client=client
                )
            finally:
                os.kill(owner, signal.SIGCONT)
            bound = answer.result(timeout=2 * PEER_TIMEOUT)
    finally:
        os.kill(owner, signal.SIGCONT)
    assert bound.msg_class == MessageClass.SUCCESS, error_text(bound)
    assert handed["transport"] == transport
    assert int(handed["worker"]) == connection_id_worker(connection_id)
    taken = workers_server.wait_for_event("data connection taken over", since=mark, client=client)
    proxied = "yes" if transport == "tls" else "no"  # a TLS session stays where it began
    assert (taken["transport"], taken["proxied"]) == (transport, proxied)

    pipe, leftover = data.take_pipe()
    assert leftover == b""
    for i in range(3):
        message = b"\xfbround trip %d " % i + bytes(range(256))
        pipe.sendall(message)
        conn.sendall(recv_exactly(conn, len(message)))  # the peer echoes
        assert recv_exactly(pipe, len(message)) == message


def test_a_connection_bind_naming_a_dead_worker_is_400(
    server_factory: ServerFactory, clients: list[WireClient], sockets: list[socket.socket]
) -> None:
    """RFC 6062 §5.4: when the worker that made a CONNECTION-ID dies, its peer
    connections die with it; a ConnectionBind naming one is answered 400 by whichever
    worker gets it (sent back to the accepting one while the slot is empty, or the
    restarted worker, which never heard of it), as one process answers an unknown ID."""
    server = server_factory({"workers": 2, "logging": {"level": "debug"}})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    pids = worker_pids(server)
    listener = tcp_listener(sockets)
    control = open_client("tcp", server.tcp_address)
    clients.append(control)
    control.allocate_tcp()
    response = control.connect_peer(listener.getsockname()[:2])
    assert response.msg_class == MessageClass.SUCCESS, error_text(response)
    cid = response.get(ConnectionId)
    assert cid is not None
    owner = connection_id_worker(cid.value)
    mark = server.log_mark()
    os.kill(pids[owner], signal.SIGKILL)
    server.wait_for_log(rf"worker {owner} \(pid {pids[owner]}\) exited", since=mark)

    data = open_client("tcp", server.tcp_address)
    clients.append(data)
    data.share_credentials(control)
    refused = data.connection_bind(cid.value)
    assert error_code(refused) == 400, error_text(refused)
