"""Slow, stalled and greedy stream clients must not hurt the others (real server process).

pyturn serves every client from one event loop, so one connection that stalls, lies
about a frame's length, never reads, or opens too many connections could starve the
rest. These tests make such a client and measure that a well-behaved one is still
answered quickly (< 1 s), and check the defences: a 5 s first-message timeout
(FIRST_FRAME_TIMEOUT), at most 64 stream connections per source address
(MAX_CONNECTIONS_PER_SOURCE), and bounded write buffers (MAX_WRITE_BUFFER).

Every server here is fresh (the per-source counter and timers are per process) and
every socket is on 127.0.0.0/8.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from pyturn.wire.message import Message, MessageClass, Method, encode, new_transaction_id
from tests.interop.server_process import LOOPBACK, ServerFactory, ServerProcess, tls_config
from tests.interop.turn_wire_client import WireClient, open_client, recv_exactly

pytestmark = pytest.mark.interop

FIRST_MESSAGE_TIMEOUT = 5.0  # pyturn.net.stream.FIRST_FRAME_TIMEOUT, the default
CLOSED_WITHIN = 8.0
PER_SOURCE = 64  # pyturn.net.stream.MAX_CONNECTIONS_PER_SOURCE, the default
QUICK = 1.0


def binding_request() -> bytes:
    return encode(Message(Method.BINDING, MessageClass.REQUEST, new_transaction_id()))


def binding_round_trip(sock: socket.socket, timeout: float = QUICK) -> None:
    """A Binding request on a raw stream socket; its response must come within `timeout`."""
    request = binding_request()
    sock.sendall(request)
    header = recv_exactly(sock, 20, timeout)
    assert header[8:20] == request[8:20], header
    (length,) = struct.unpack_from("!H", header, 2)
    recv_exactly(sock, length, timeout)


def closed_after(sock: socket.socket, started: float, limit: float) -> float | None:
    """Seconds from `started` until the server closed `sock` (EOF or RST), or None if it
    is still open `limit` seconds after `started`."""
    for _ in range(1000):  # each pass ends in EOF, a reset, a timeout or some data
        left = started + limit - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, ssl.SSLError):
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started
    return None


def timed_allocations(server: ServerProcess, clients: list[WireClient]) -> dict[str, float]:
    """Seconds each of a new TCP and a new UDP client takes to get an allocation."""
    took: dict[str, float] = {}
    for transport in ("tcp", "udp"):
        started = time.monotonic()
        client = open_client(
            transport, server.tcp_address if transport == "tcp" else server.udp_address
        )
        clients.append(client)
        client.allocate_ok()
        took[transport] = time.monotonic() - started
    return took


def test_stalled_clients_do_not_delay_others_and_are_closed_after_the_first_message_timeout(
    server_factory: ServerFactory,
    tls_files: tuple[Path, Path],
    sockets: list[socket.socket],
    clients: list[WireClient],
) -> None:
    """Slowloris on a STUN stream (RFC 8656 §3.1 leaves the defence to the server): a
    TCP connection that sends half a STUN header and nothing more, a TLS connection that
    does the same after its handshake, and one that never starts its handshake do not
    hold up anyone else's Allocate; the server closes each once the first-message
    timeout (5 s) passes, within 8 s. A client that did send a whole message stays."""
    server = server_factory(tls_config(*tls_files))
    half_header = binding_request()[:10]
    stalled: dict[str, socket.socket] = {}
    started = time.monotonic()
    stalled["tcp"] = socket.create_connection(server.tcp_address, timeout=QUICK)
    stalled["tcp"].sendall(half_header)
    stalled["tls, no handshake"] = socket.create_connection(server.tls_address, timeout=QUICK)
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    raw = socket.create_connection(server.tls_address, timeout=QUICK)
    stalled["tls"] = context.wrap_socket(raw, server_hostname="localhost")
    stalled["tls"].sendall(half_header)
    sockets.extend(stalled.values())

    took = timed_allocations(server, clients)
    assert max(took.values()) < QUICK, took

    for name, sock in stalled.items():
        closed = closed_after(sock, started, CLOSED_WITHIN)
        assert closed is not None, f"stalled {name} connection still open after {CLOSED_WITHIN} s"
        assert closed >= FIRST_MESSAGE_TIMEOUT - 1.0, f"{name}: closed after {closed:.2f} s"
    tcp_client = clients[0]
    assert tcp_client.binding()[0] == LOOPBACK  # past the timeout and still served


def test_a_stream_announcing_60000_bytes_then_stopping_does_not_hurt_others(
    server_factory: ServerFactory, sockets: list[socket.socket], clients: list[WireClient]
) -> None:
    """RFC 8489 §6.2.2 framing over TCP: a STUN header whose length says 60000 bytes,
    followed by only part of them, leaves the server waiting for that one connection
    only; others keep getting allocations at once, whether the liar lies in its first
    message (then the first-message timeout, here 1 s, closes it) or after a good one."""
    server = server_factory({"limits": {"first_message_timeout": 1.0}})
    header = struct.pack("!HHI12s", 0x0001, 60000, 0x2112A442, new_transaction_id())

    first_liar = socket.create_connection(server.tcp_address, timeout=QUICK)
    sockets.append(first_liar)
    connected_at = time.monotonic()
    first_liar.sendall(header + b"\x00" * 30000)

    later_liar = socket.create_connection(server.tcp_address, timeout=QUICK)
    sockets.append(later_liar)
    binding_round_trip(later_liar)
    later_liar.sendall(header + b"\x00" * 30000)

    took = timed_allocations(server, clients)
    assert max(took.values()) < QUICK, took
    closed = closed_after(first_liar, connected_at, 3.0)
    assert closed is not None, "the lying connection was still open after 3 s"
    took = timed_allocations(server, clients)
    assert max(took.values()) < QUICK, took


def rss_kib(pid: int) -> int:
    """Resident set size of a process we started, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_client_that_never_reads_does_not_stop_the_server_answering_others(
    server_factory: ServerFactory, sockets: list[socket.socket], clients: list[WireClient]
) -> None:
    """RFC 8656 §12 over TCP: a client binds a channel, then stops reading while its peer
    floods the relayed address. The server buffers at most a bounded amount for it
    (its memory grows by less than 64 MiB while tens of MB are sent) and meanwhile answers other
    clients' Binding and Allocate requests within a second."""
    server = server_factory()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(peer)
    peer.bind((LOOPBACK, 0))
    peer_address = (LOOPBACK, int(peer.getsockname()[1]))

    sleeper = open_client("tcp", server.tcp_address)
    clients.append(sleeper)
    # A small receive window: the kernel on our side soaks up little of the flood.
    sleeper.link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    relayed = sleeper.allocate_ok()[0]
    sleeper.channel_bind(0x4000, peer_address)
    # The peer must have a permission-matching source (it does: the channel's peer).
    peer.sendto(b"hello", relayed)
    assert sleeper.receive(QUICK) == (("channel", 0x4000), b"hello")

    rss_before = rss_kib(server.pid)
    payload = b"\xaa" * 1000
    sent = 0
    stop = threading.Event()

    def flood() -> None:
        """Bursts of datagrams until told to stop (at most 4 s and 100,000 datagrams)."""
        nonlocal sent
        deadline = time.monotonic() + 4.0
        for _ in range(200):
            if stop.is_set() or time.monotonic() > deadline:
                return
            for _ in range(500):
                try:
                    peer.sendto(payload, relayed)
                except OSError:
                    break  # the socket buffer is full: let the server catch up
                sent += 1
            time.sleep(0.005)

    flooder = threading.Thread(target=flood, name="peer-flood", daemon=True)
    flooder.start()
    try:
        worst = 0.0
        watcher = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(watcher)
        for _ in range(20):
            started = time.monotonic()
            binding_round_trip(watcher)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)
        took = timed_allocations(server, clients)
    finally:
        stop.set()
        flooder.join(timeout=10.0)
    assert worst < QUICK, f"a Binding took {worst:.2f} s during the flood"
    assert max(took.values()) < QUICK, took
    assert sent > 10_000, sent
    grown = rss_kib(server.pid) - rss_before
    assert grown < 64 * 1024, f"the server grew by {grown} KiB for {sent} datagrams"
    assert server.process is not None and server.process.poll() is None


def test_a_source_gets_64_stream_connections_and_the_rest_are_closed_at_once(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """Descriptor exhaustion from one address (the defence RFC 8656 §21 leaves to the
    server): 64 TCP connections from 127.0.0.1 are served; the 65th to 70th are closed
    by the server at once; the first 64 keep working; another source (127.0.0.2) and UDP
    are not affected; and once they close, 127.0.0.1 may connect again."""
    server = server_factory()
    admitted = []
    for _ in range(PER_SOURCE):
        sock = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(sock)
        binding_round_trip(sock)  # a whole first message: no first-message timeout
        admitted.append(sock)

    for n in range(PER_SOURCE + 1, 71):
        extra = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(extra)
        started = time.monotonic()
        closed = closed_after(extra, started, QUICK)
        assert closed is not None, f"connection {n} from 127.0.0.1 was not closed"

    for sock in admitted:
        binding_round_trip(sock)

    other_source = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(other_source)
    other_source.settimeout(QUICK)
    other_source.bind(("127.0.0.2", 0))
    other_source.connect(server.tcp_address)
    binding_round_trip(other_source)
    udp = open_client("udp", server.udp_address)
    try:
        assert udp.binding()[0] == LOOPBACK
    finally:
        udp.close()

    for sock in admitted:
        sock.close()
    again: socket.socket | None = None
    deadline = time.monotonic() + 3.0
    for _ in range(30):  # the server notices the closes asynchronously
        candidate = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(candidate)
        try:
            binding_round_trip(candidate)
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            continue
        again = candidate
        break
    assert again is not None, "127.0.0.1 could not connect again after closing its 64"


def closed_at_once(socks: list[socket.socket], within: float = QUICK) -> list[bool]:
    """For each socket, whether the server closed it (EOF or RST) within `within` s."""
    deadline = time.monotonic() + within
    closed = [False] * len(socks)
    for _ in range(100):
        for i, sock in enumerate(socks):
            if closed[i]:
                continue
            sock.setblocking(False)
            try:
                closed[i] = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed[i] = True
            finally:
                sock.setblocking(True)
        if all(closed) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return closed


def test_the_per_source_cap_and_the_timeout_follow_the_limits_config(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """The `limits` section: with connections_per_source 4 the fifth connection from
    127.0.0.1 is closed at once, and with first_message_timeout 1 a silent connection
    is closed after about a second."""
    server = server_factory({"limits": {"connections_per_source": 4, "first_message_timeout": 1.0}})
    for _ in range(4):
        sock = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(sock)
        binding_round_trip(sock)
    fifth = socket.create_connection(server.tcp_address, timeout=QUICK)
    sockets.append(fifth)
    assert closed_at_once([fifth]) == [True]
    sockets[0].close()
    silent: socket.socket | None = None
    for _ in range(20):  # the server sees the close asynchronously
        candidate = socket.create_connection(server.tcp_address, timeout=QUICK)
        sockets.append(candidate)
        if closed_at_once([candidate], 0.1) == [False]:
            silent = candidate
            break
    assert silent is not None
    started = time.monotonic()
    closed = closed_after(silent, started, 3.0)
    assert closed is not None and closed < 3.0, closed


@pytest.mark.parametrize("workers", [1, 2])
def test_reads_keep_a_connection_open_and_an_allocation_holds_it_until_it_ends(
    server_factory: ServerFactory, workers: int
) -> None:
    """With first_message_timeout 1: a connection that asks a Binding every 0.4 s stays
    open past the timeout and is closed about a second after it stops; one with an
    allocation stays open while silent, and is closed about a second after its
    Refresh(0) ends the allocation."""
    server = server_factory({"workers": workers, "limits": {"first_message_timeout": 1.0}})
    talker = open_client("tcp", server.tcp_address)
    holder = open_client("tcp", server.tcp_address)
    try:
        holder.allocate_ok()
        for _ in range(7):  # 2.8 s of reads 0.4 s apart
            talker.binding()
            time.sleep(0.4)
        assert closed_after(holder.link.sock, time.monotonic(), 0.05) is None
        stopped = time.monotonic()
        closed = closed_after(talker.link.sock, stopped, 3.0)
        assert closed is not None and 0.5 < closed < 2.5, closed
        still_open = closed_after(holder.link.sock, time.monotonic(), 0.05) is None
        assert still_open, "closed while it had an allocation"
        holder.refresh(0)
        ended = time.monotonic()
        closed = closed_after(holder.link.sock, ended, 3.0)
        assert closed is not None and 0.5 < closed < 2.5, closed
    finally:
        talker.close()
        holder.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_connection_whose_allocation_expires_while_it_is_silent_is_closed(
    server_factory: ServerFactory, workers: int
) -> None:
    """An allocation of 2 s on a silent connection, first_message_timeout 1: the
    allocation holds the connection open, and once it has expired the connection must
    talk within the timeout like any other, or it is closed."""
    server = server_factory(
        {
            "workers": workers,
            "limits": {"first_message_timeout": 1.0},
            "allocations": {"default_lifetime": 2, "max_lifetime": 2},
        }
    )
    holder = open_client("tcp", server.tcp_address)
    try:
        holder.allocate_ok()
        allocated = time.monotonic()
        # The lifetime runs from the server's answer, a moment before `allocated`.
        assert closed_after(holder.link.sock, allocated, 1.5) is None, "closed with an allocation"
        closed = closed_after(holder.link.sock, allocated, 6.0)
        assert closed is not None and closed < 5.0, closed
    finally:
        holder.close()


def test_connections_to_a_tls_listener_count_against_the_per_source_cap_before_the_handshake(
    server_factory: ServerFactory, tls_files: tuple[Path, Path], sockets: list[socket.socket]
) -> None:
    """`limits.connections_per_source` ("TCP/TLS connections one client IP may hold open
    at once"): 70 TCP connections to the TLS port that never start a handshake hold 70
    descriptors in the server; the 65th to 70th must be closed at once, as on TCP."""
    server = server_factory(tls_config(*tls_files))
    opened = []
    for _ in range(PER_SOURCE + 6):
        sock = socket.create_connection(server.tls_address, timeout=QUICK)
        sockets.append(sock)
        opened.append(sock)
    closed = closed_at_once(opened)
    assert closed == [False] * PER_SOURCE + [True] * 6, f"{sum(closed)} of 70 closed at once"
