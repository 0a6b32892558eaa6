"""IPv6 against the real server: listeners on ::1 and relaying from ::1 (RFC 6156 / RFC 8656).

The server listens on UDP and TCP at both ::1 and 127.0.0.1, relays IPv4 from 127.0.0.1
and IPv6 from ::1 (`relay.address6`), and allows peers on 127.0.0.0/8 and ::1/128. The
client is pyturn's own codec (through `turn_wire_client`); the peers are plain UDP
sockets the test reads and answers itself, so every echo is explicit. turnutils_uclient
checks the same over ::1 from coturn's side.

Only loopback addresses are used: 127.0.0.1 and ::1.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Address,
    EvenPort,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    XorPeerAddress,
    XorRelayedAddress,
)
from pyturn.wire.message import MessageClass, Method
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerProcess,
    base_config,
    merge_config,
    relayed_packets,
    require_tool,
    running_server,
)
from tests.interop.test_turnutils import UclientRun, turnutils_peer
from tests.interop.turn_wire_client import WireClient, error_code, error_text, open_client

pytestmark = pytest.mark.interop

LOOPBACK6 = "::1"
STEP_TIMEOUT = 5.0
TOOL_TIMEOUT = 30.0


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind((LOOPBACK6, 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def v6_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not ipv6_available():
        pytest.skip("this host has no ::1 (IPv6 loopback disabled)")
    overrides = {
        "listen": [
            {"transport": transport, "address": host, "port": 0}
            for host in (LOOPBACK6, LOOPBACK)
            for transport in ("udp", "tcp")
        ],
        "relay": {"address6": LOOPBACK6},
        "peers": {"allow": ["127.0.0.0/8", "::1/128"]},
    }
    config = merge_config(base_config(), overrides)
    yield from running_server(config, Path(tmp_path_factory.mktemp("pyturn-v6")))


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def udp_peer(host: str, peers: list[socket.socket]) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    peers.append(sock)
    sock.bind((host, 0))
    sock.settimeout(STEP_TIMEOUT)
    return sock


def address_of(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def echo_once(peer: socket.socket) -> tuple[bytes, Address]:
    """Receive one datagram at the peer and send it back; (data, where it came from)."""
    data, source = peer.recvfrom(65535)
    peer.sendto(data, source)
    return data, (str(source[0]), int(source[1]))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_binding_on_ipv6_loopback_returns_the_ipv6_client_address(
    v6_server: ServerProcess, clients: list[WireClient], transport: str
) -> None:
    """RFC 8489 §14.2: XOR-MAPPED-ADDRESS of a client on ::1 is its IPv6 address and
    port (the XOR for IPv6 also uses the transaction id), over UDP and over TCP."""
    client = open_client(transport, v6_server.address(transport, LOOPBACK6))
    clients.append(client)
    mapped = client.binding()
    assert mapped == address_of(client.link.sock)
    assert mapped[0] == LOOPBACK6


@pytest.mark.parametrize(
    ("transport", "host"),
    [
        pytest.param("udp", LOOPBACK6, id="udp-over-ipv6"),
        pytest.param("tcp", LOOPBACK6, id="tcp-over-ipv6"),
        pytest.param("udp", LOOPBACK, id="udp-over-ipv4"),
    ],
)
def test_an_ipv6_allocation_relays_to_an_ipv6_peer(
    v6_server: ServerProcess,
    clients: list[WireClient],
    peers: list[socket.socket],
    transport: str,
    host: str,
) -> None:
    """RFC 8656 §7.2 and RFC 6156: REQUESTED-ADDRESS-FAMILY IPv6 gives a relayed address
    on ::1 (whatever family the client itself uses); a Send indication reaches a [::1]
    peer from that address, the echo returns as a Data indication, then the same over
    a channel."""
    mark = v6_server.log_mark()
    client = open_client(transport, v6_server.address(transport, host))
    clients.append(client)
    relayed = client.allocate_ok(
        [RequestedTransport(TRANSPORT_UDP), RequestedAddressFamily(FAMILY_IPV6)]
    )
    assert len(relayed) == 1 and relayed[0][0] == LOOPBACK6, relayed
    peer = udp_peer(LOOPBACK6, peers)
    peer_address = address_of(peer)
    client.create_permission(peer_address)

    client.send_indication(peer_address, b"to an ipv6 peer")
    assert echo_once(peer) == (b"to an ipv6 peer", relayed[0])
    assert client.receive(STEP_TIMEOUT) == (peer_address, b"to an ipv6 peer")

    client.channel_bind(0x4001, peer_address)
    client.send_channel_data(0x4001, b"over a channel")
    assert echo_once(peer) == (b"over a channel", relayed[0])
    assert client.receive(STEP_TIMEOUT) == (("channel", 0x4001), b"over a channel")

    client.refresh(0)
    deleted = v6_server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"[{LOOPBACK6}]:{relayed[0][1]}"
    )
    assert relayed_packets(deleted) == (2, 2)


def test_an_ipv6_allocation_refuses_an_ipv4_peer(
    v6_server: ServerProcess, clients: list[WireClient]
) -> None:
    """RFC 8656 §9.1/§12.1 (443 Peer Address Family Mismatch): an IPv6-only allocation
    cannot get a permission for an IPv4 peer."""
    client = open_client("udp", v6_server.address("udp", LOOPBACK6))
    clients.append(client)
    client.allocate_ok([RequestedTransport(TRANSPORT_UDP), RequestedAddressFamily(FAMILY_IPV6)])
    response = client.request(Method.CREATE_PERMISSION, [XorPeerAddress(LOOPBACK, 9)])
    assert error_code(response) == 443


@pytest.mark.parametrize("host", [LOOPBACK, LOOPBACK6], ids=["client-on-ipv4", "client-on-ipv6"])
def test_a_dual_stack_allocation_relays_to_an_ipv4_and_an_ipv6_peer(
    v6_server: ServerProcess, clients: list[WireClient], peers: list[socket.socket], host: str
) -> None:
    """RFC 8656 §7.2 (ADDITIONAL-ADDRESS-FAMILY IPv6): the response carries two
    XOR-RELAYED-ADDRESS, one IPv4 and one IPv6; data to a 127.0.0.1 peer leaves from the
    IPv4 one and data to a ::1 peer from the IPv6 one, and both echoes come back."""
    mark = v6_server.log_mark()
    client = open_client("udp", v6_server.address("udp", host))
    clients.append(client)
    relayed = client.allocate_ok(
        [RequestedTransport(TRANSPORT_UDP), AdditionalAddressFamily(FAMILY_IPV6)]
    )
    assert len(relayed) == 2, relayed
    relayed4, relayed6 = relayed
    assert relayed4[0] == LOOPBACK and relayed6[0] == LOOPBACK6, relayed

    peer4, peer6 = udp_peer(LOOPBACK, peers), udp_peer(LOOPBACK6, peers)
    for peer, source in ((peer4, relayed4), (peer6, relayed6)):
        address = address_of(peer)
        client.create_permission(address)
        payload = b"dual stack to " + address[0].encode()
        client.send_indication(address, payload)
        assert echo_once(peer) == (payload, source)
        assert client.receive(STEP_TIMEOUT) == (address, payload)

    created = v6_server.wait_for_event(
        "allocation created", since=mark, relayed=f"{LOOPBACK}:{relayed4[1]}"
    )
    assert created.get("relayed6") == f"[{LOOPBACK6}]:{relayed6[1]}", created


# -- coturn's client over ::1 -----------------------------------------------------------


@pytest.fixture(scope="module")
def v6_echo_peer() -> Iterator[int]:
    """turnutils_peer (UDP echo) on [::1]; yields its port."""
    with turnutils_peer(LOOPBACK6) as port:
        yield port


def test_uclient_over_ipv6_relays_every_message_to_an_ipv6_peer(
    v6_server: ServerProcess, v6_echo_peer: int
) -> None:
    """RFC 6156 with coturn's client: over UDP to [::1], asking for an IPv6 relayed
    address (-x), 20 messages from each of 2 clients reach turnutils_peer on [::1] and
    come back, none lost.

    -c (no RTCP allocations): without it uclient reserves the next port with EVEN-PORT
    and redeems the RESERVATION-TOKEN, which fails for IPv6; see
    test_a_reservation_token_can_be_redeemed_in_either_family.
    """
    tool = require_tool("turnutils_uclient")
    mark = v6_server.log_mark()
    messages, clients = 20, 2
    command = [
        tool,
        "-x",
        "-c",
        "-p",
        str(v6_server.address("udp", LOOPBACK6)[1]),
        "-e",
        LOOPBACK6,
        "-r",
        str(v6_echo_peer),
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        str(messages),
        "-m",
        str(clients),
        "-l",
        "170",
        LOOPBACK6,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    run = UclientRun(result.returncode, result.stdout + result.stderr)
    total = messages * clients
    assert run.returncode == 0, run.output
    assert run.lost == 0, run.output
    assert (run.sent, run.received) == (total, total), run.output
    created = v6_server.events("allocation created", since=mark)
    assert created, v6_server.log_since(mark)
    assert all(fields["client"].startswith(f"[{LOOPBACK6}]") for fields in created), created
    assert all(fields["relayed"].startswith(f"[{LOOPBACK6}]") for fields in created), created


@pytest.mark.parametrize(
    ("family", "relay_host"),
    [
        pytest.param(FAMILY_IPV4, LOOPBACK, id="ipv4"),
        pytest.param(FAMILY_IPV6, LOOPBACK6, id="ipv6"),
    ],
)
def test_a_reservation_token_can_be_redeemed_in_either_family(
    v6_server: ServerProcess, clients: list[WireClient], family: int, relay_host: str
) -> None:
    """RFC 8656 §7.2 steps 5-6 and §18.9: an allocation with EVEN-PORT (R=1) in either
    family returns a RESERVATION-TOKEN; an Allocate carrying only that token (no
    REQUESTED-ADDRESS-FAMILY is allowed with it) gets the reserved port, one above the
    first, on the relay address of the reserved family."""
    first = open_client("udp", v6_server.address("udp", LOOPBACK6))
    clients.append(first)
    response = first.allocate_with(
        [
            RequestedTransport(TRANSPORT_UDP),
            RequestedAddressFamily(family),
            EvenPort(reserve=True),
        ]
    )
    assert response.msg_class == MessageClass.SUCCESS, error_text(response)
    relayed = response.get(XorRelayedAddress)
    token = response.get(ReservationToken)
    assert relayed is not None and token is not None, response
    assert relayed.host == relay_host and relayed.port % 2 == 0

    second = open_client("udp", v6_server.address("udp", LOOPBACK6))
    clients.append(second)
    second.share_credentials(first)
    redeemed = second.allocate_with([RequestedTransport(TRANSPORT_UDP), token])
    assert redeemed.msg_class == MessageClass.SUCCESS, error_text(redeemed)
    assert redeemed.get(XorRelayedAddress) == XorRelayedAddress(relay_host, relayed.port + 1)
