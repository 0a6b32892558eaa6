"""PROXY protocol listeners on a real server with two workers, headers sent by hand:
the client the header names is the client everywhere, only trusted proxies may send one,
and bad, missing or slow headers close the connection. (HAProxy in front: see
test_haproxy.py.)"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from pyturn.wire.attributes import XorMappedAddress
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from pyturn.wire.proxy_protocol import encode_v1, encode_v2
from tests.interop.server_process import (
    LOOPBACK,
    ServerFactory,
    ServerProcess,
)
from tests.interop.turn_wire_client import recv_exactly

pytestmark = pytest.mark.interop

PROXY = "127.0.0.1"  # where the "load balancer" connects from
UNTRUSTED = "127.0.0.5"
# Values inside headers only: no traffic goes to these.
CLIENT_A = ("192.0.2.44", 50001)
CLIENT_B = ("2001:db8::44", 50002)
TIMEOUT = 1.0
# Both versions naming CLIENT_A.
HEADERS_FOR_A = [encode_v1(CLIENT_A, (LOOPBACK, 3478)), encode_v2(CLIENT_A, (LOOPBACK, 3478))]


def proxied(transport: str) -> dict[str, object]:
    return {
        "transport": transport,
        "address": LOOPBACK,
        "port": 0,
        "proxy_protocol": True,
        "trusted_proxies": [f"{PROXY}/32"],
    }


@pytest.fixture
def server(server_factory: ServerFactory, tls_files: tuple[Path, Path]) -> ServerProcess:
    return server_factory(
        {
            "listen": [proxied("tcp"), proxied("tls")],
            "tls": {"certificate": str(tls_files[0]), "private_key": str(tls_files[1])},
            "workers": 2,
            "limits": {"first_message_timeout": TIMEOUT, "connections_per_source": 2},
        }
    )


def connect_from(
    source: str, address: tuple[str, int], sockets: list[socket.socket]
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.bind((source, 0))
    sock.settimeout(3.0)
    sock.connect(address)
    return sock


def mapped_address(sock: socket.socket) -> tuple[str, int]:
    """A Binding request over the connection: the address the server says it sees."""
    txid = new_transaction_id()
    sock.sendall(encode(Message(Method.BINDING, MessageClass.REQUEST, txid, ()), fingerprint=True))
    head = recv_exactly(sock, 20)
    body = recv_exactly(sock, int.from_bytes(head[2:4], "big"))
    answer = decode(head + body)
    assert answer.transaction_id == txid
    mapped = answer.get(XorMappedAddress)
    assert mapped is not None
    return mapped.address


def closed_by_server(sock: socket.socket, within: float = 3.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("header", HEADERS_FOR_A, ids=["v1", "v2"])
def test_the_client_a_header_names_is_the_client_the_server_sees(
    server: ServerProcess, sockets: list[socket.socket], header: bytes
) -> None:
    sock = connect_from(PROXY, server.tcp_address, sockets)
    # The header and the first request in one segment, as proxies send them.
    sock.sendall(header)
    assert mapped_address(sock) == CLIENT_A
    assert mapped_address(sock) == CLIENT_A  # and it stays so


def test_ipv6_clients_and_local_health_checks(
    server: ServerProcess, sockets: list[socket.socket]
) -> None:
    six = connect_from(PROXY, server.tcp_address, sockets)
    six.sendall(encode_v2(CLIENT_B, ("2001:db8::1", 3478)))
    assert mapped_address(six) == CLIENT_B
    local = connect_from(PROXY, server.tcp_address, sockets)
    local.sendall(encode_v2(None, None))  # LOCAL: the proxy itself
    assert mapped_address(local) == local.getsockname()


def test_tls_follows_the_header(server: ServerProcess, sockets: list[socket.socket]) -> None:
    raw = connect_from(PROXY, server.tls_address, sockets)
    raw.sendall(encode_v2(CLIENT_A, (LOOPBACK, 5349)))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["stun.turn"])
    tls = context.wrap_socket(raw, server_hostname="localhost")
    sockets.append(tls)
    assert tls.selected_alpn_protocol() == "stun.turn"
    assert mapped_address(tls) == CLIENT_A


@pytest.mark.parametrize("header", HEADERS_FOR_A, ids=["v1", "v2"])
def test_only_trusted_proxies_may_send_a_header(
    server: ServerProcess, sockets: list[socket.socket], header: bytes
) -> None:
    mark = server.log_mark()
    sock = connect_from(UNTRUSTED, server.tcp_address, sockets)
    sock.sendall(header)
    assert closed_by_server(sock)
    server.wait_for_log(
        rf"connection from {UNTRUSTED} refused: not in the listener's trusted_proxies",
        since=mark,
    )


@pytest.mark.parametrize(
    "first_bytes",
    [
        encode(Message(Method.BINDING, MessageClass.REQUEST, new_transaction_id(), ())),
        b"PROXY TCP4 999.0.2.44 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.44 127.0.0.1 1 2" + b" " * 100 + b"\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
        b"\x16\x03\x01\x00\x05hello",
    ],
    ids=["no-header", "bad-address", "too-long", "v2-too-long", "tls-first"],
)
def test_a_bad_or_missing_header_closes_the_connection(
    server: ServerProcess, sockets: list[socket.socket], first_bytes: bytes
) -> None:
    mark = server.log_mark()
    sock = connect_from(PROXY, server.tcp_address, sockets)
    sock.sendall(first_bytes)
    assert closed_by_server(sock)
    server.wait_for_log(rf"connection from {PROXY} closed: ", since=mark)
    # The server goes on serving.
    good = connect_from(PROXY, server.tcp_address, sockets)
    good.sendall(encode_v1(CLIENT_A, (LOOPBACK, 3478)))
    assert mapped_address(good) == CLIENT_A


def test_a_header_cut_short_waits_no_longer_than_the_first_message_timeout(
    server: ServerProcess, sockets: list[socket.socket]
) -> None:
    header = encode_v2(CLIENT_A, (LOOPBACK, 3478))
    sock = connect_from(PROXY, server.tcp_address, sockets)
    started = time.monotonic()
    sock.sendall(header[:10])
    assert closed_by_server(sock, within=TIMEOUT + 3)
    assert time.monotonic() - started < TIMEOUT + 2
    # A header in pieces within the time is fine.
    slow = connect_from(PROXY, server.tcp_address, sockets)
    for piece in (header[:5], header[5:20], header[20:]):
        slow.sendall(piece)
        time.sleep(0.1)
    assert mapped_address(slow) == CLIENT_A


def test_per_source_limits_count_the_clients_the_headers_name(
    server_factory: ServerFactory, sockets: list[socket.socket]
) -> None:
    """connections_per_source is 2 (per worker process: one here), and the proxy's own
    address is not one bucket for all."""
    server = server_factory(
        {"listen": [proxied("tcp")], "workers": 1, "limits": {"connections_per_source": 2}}
    )
    first, second, third = (connect_from(PROXY, server.tcp_address, sockets) for _ in range(3))
    for sock in (first, second):
        sock.sendall(encode_v1(CLIENT_A, (LOOPBACK, 3478)))
        assert mapped_address(sock) == CLIENT_A
    third.sendall(encode_v1(CLIENT_A, (LOOPBACK, 3478)))
    assert closed_by_server(third)
    other = connect_from(PROXY, server.tcp_address, sockets)
    other.sendall(encode_v1(("192.0.2.45", 1), (LOOPBACK, 3478)))
    assert mapped_address(other) == ("192.0.2.45", 1)
