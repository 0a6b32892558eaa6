"""The default peer policy (no `peers` section) refuses internal destinations.

RFC 8656's security considerations (§21) ask a TURN server not to become a way into
its own network. With no `peers.allow`, pyturn must refuse loopback, unspecified,
private and link-local peers, including the cloud metadata address and IPv4 loopback
spelled as an IPv4-mapped IPv6 address. Requests are built, signed and parsed by
aioice's TURN client code, except for the IPv6-relay test at the end, which needs
REQUESTED-ADDRESS-FAMILY and so uses pyturn's own codec.

Safety: no datagram is ever addressed to anything but 127.0.0.1 here. For 10.0.0.1 and
169.254.169.254 only CreatePermission/ChannelBind requests are sent to the server;
installing a permission sends nothing to the peer, and no data follows.

Each test starts its own server: pyturn rate-limits "peer denied" log lines per client
address, and every client here is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from aioice import stun
from aioice.turn import TurnClientUdpProtocol

from pyturn.wire import integrity
from pyturn.wire.attributes import (
    FAMILY_IPV6,
    TRANSPORT_UDP,
    Attribute,
    ChannelNumber,
    ErrorCode,
    Lifetime,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
)
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerFactory,
    ServerProcess,
)

pytestmark = pytest.mark.interop

T = TypeVar("T")
Addr = tuple[str, int]

SCENARIO_TIMEOUT = 20.0
STEP_TIMEOUT = 5.0
QUIET_PERIOD = 0.5
DEFAULT_POLICY = {"peers": None}  # drop the test config's allow-list: built-in policy


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, SCENARIO_TIMEOUT)

    return asyncio.run(bounded())


@pytest.fixture
def default_policy_server(server_factory: ServerFactory) -> ServerProcess:
    server = server_factory(DEFAULT_POLICY)
    assert "peers" not in server.config
    return server


async def allocate(server: ServerProcess) -> tuple[TurnClientUdpProtocol, Addr]:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(
            server.udp_address,
            username=USER,
            password=PASSWORD,
            lifetime=600,
            channel_refresh_time=500,
        ),
        remote_addr=server.udp_address,
    )
    relayed = await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
    return client, relayed


async def transact(client: TurnClientUdpProtocol, request: stun.Message) -> stun.Message:
    """The response to an authenticated request, success or error (signature checked)."""
    try:
        response, _ = await asyncio.wait_for(client.request_with_retry(request), STEP_TIMEOUT)
    except stun.TransactionFailed as failure:
        return failure.response
    return response


async def create_permission(client: TurnClientUdpProtocol, peer: Addr) -> stun.Message:
    request = stun.Message(stun.Method.CREATE_PERMISSION, stun.Class.REQUEST)
    request.attributes["XOR-PEER-ADDRESS"] = peer
    return await transact(client, request)


async def channel_bind(client: TurnClientUdpProtocol, channel: int, peer: Addr) -> stun.Message:
    request = stun.Message(stun.Method.CHANNEL_BIND, stun.Class.REQUEST)
    request.attributes["CHANNEL-NUMBER"] = channel
    request.attributes["XOR-PEER-ADDRESS"] = peer
    return await transact(client, request)


def refused_with(response: stun.Message) -> int | None:
    assert response.message_class in (stun.Class.RESPONSE, stun.Class.ERROR)
    return response.error_code if response.message_class == stun.Class.ERROR else None


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param("127.0.0.1", 403, id="loopback"),
        # RFC 8656 §10 / RFC 6156: an IPv6 peer on an IPv4 allocation is 443 Peer Address
        # Family Mismatch; the family check comes before the policy, so no log line.
        pytest.param("::ffff:127.0.0.1", 443, id="ipv4-mapped-loopback"),
        pytest.param("0.0.0.0", 403, id="unspecified"),
        pytest.param("10.0.0.1", 403, id="rfc1918"),
        pytest.param("169.254.169.254", 403, id="cloud-metadata"),
    ],
)
def test_default_policy_refuses_create_permission_for_internal_peers(
    default_policy_server: ServerProcess, peer: str, expected: int
) -> None:
    """RFC 8656 §10 and §21: CreatePermission to an internal address is refused
    (403 Forbidden, or 443 for the wrong family) and the refusal is logged."""
    server = default_policy_server

    async def scenario() -> int | None:
        client, _ = await allocate(server)
        try:
            return refused_with(await create_permission(client, (peer, 3478)))
        finally:
            await client.delete()

    assert run(scenario()) == expected
    if expected == 403:
        server.wait_for_event("peer denied", user=USER, peer=peer)
    else:
        assert not server.events("peer denied"), server.log_text


def test_default_policy_refuses_channel_bind_to_loopback(
    default_policy_server: ServerProcess,
) -> None:
    """RFC 8656 §12 with §21: ChannelBind to 127.0.0.1 is 403, logged."""
    server = default_policy_server

    async def scenario() -> int | None:
        client, _ = await allocate(server)
        try:
            return refused_with(await channel_bind(client, 0x4000, (LOOPBACK, 3478)))
        finally:
            await client.delete()

    assert run(scenario()) == 403
    server.wait_for_event("peer denied", user=USER, peer=LOOPBACK)


async def send_indication_and_channel_data(server: ServerProcess, peer: Addr) -> bool:
    """Try to reach `peer`: CreatePermission and ChannelBind, then a Send indication and
    ChannelData on the channel we asked for. True when the permission was granted."""
    client, _ = await allocate(server)
    try:
        granted = refused_with(await create_permission(client, peer)) is None
        await channel_bind(client, 0x4000, peer)
        indication = stun.Message(stun.Method.SEND, stun.Class.INDICATION)
        indication.attributes["XOR-PEER-ADDRESS"] = peer
        indication.attributes["DATA"] = b"send-indication"
        client.send_stun(indication, server.udp_address)
        client.transport.sendto(b"\x40\x00\x00\x0cchannel-data")
        await asyncio.sleep(QUIET_PERIOD)
    finally:
        await client.delete()
    return granted


def received_within_quiet_period(sock: socket.socket) -> list[bytes]:
    sock.settimeout(QUIET_PERIOD)
    got = []
    for _ in range(10):
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            break
        sock.settimeout(0.05)
    return got


def test_default_policy_relays_nothing_to_a_loopback_listener(
    default_policy_server: ServerProcess, turn_server: ServerProcess
) -> None:
    """RFC 8656 §11.2/§12.5: without a permission, a Send indication or ChannelData for
    127.0.0.1 is dropped silently; a UDP socket there receives nothing in 0.5 s.

    Control: the same steps against a server whose config allows 127.0.0.0/8 deliver
    both datagrams to the socket, so the silence is the policy, not the test.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind((LOOPBACK, 0))
        peer: Addr = listener.getsockname()

        mark = default_policy_server.log_mark()
        granted = run(send_indication_and_channel_data(default_policy_server, peer))
        assert not granted
        assert received_within_quiet_period(listener) == []
        default_policy_server.wait_for_event("peer denied", since=mark, user=USER, peer=LOOPBACK)

        assert run(send_indication_and_channel_data(turn_server, peer))
        assert sorted(received_within_quiet_period(listener)) == [
            b"channel-data",
            b"send-indication",
        ]


# -- IPv6 allocations: every spelling of an internal address is refused -----------------


class WireClient:
    """A minimal blocking TURN client on pyturn's own codec (RFC 8656 over UDP).

    aioice cannot send REQUESTED-ADDRESS-FAMILY, which an IPv6 relay needs; the server
    is what is under test here, so encoding with pyturn.wire is fine. Every response to
    an authenticated request must carry a valid MESSAGE-INTEGRITY.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(STEP_TIMEOUT)
        self.sock.bind((LOOPBACK, 0))
        self.key: bytes | None = None
        self.auth: tuple[Attribute, ...] = ()

    def close(self) -> None:
        self.sock.close()

    def transact(self, method: int, *attributes: Attribute) -> Message:
        txid = new_transaction_id()
        request = Message(method, MessageClass.REQUEST, txid, (*attributes, *self.auth))
        self.sock.sendto(encode(request, integrity_key=self.key), self.server.udp_address)
        for _ in range(8):  # skip anything that is not our answer (bounded)
            response = decode(self.sock.recv(4096))
            if response.transaction_id == txid:
                if self.key is not None:
                    assert integrity.verify_integrity(response, self.key), response
                return response
        raise AssertionError("no response with our transaction id")

    def allocate(self, *attributes: Attribute) -> Message:
        challenge = self.transact(Method.ALLOCATE, *attributes)
        realm, nonce = challenge.get(Realm), challenge.get(Nonce)
        assert realm is not None and nonce is not None, challenge
        self.key = integrity.long_term_key(USER, realm.value, PASSWORD)
        self.auth = (Username(USER), realm, nonce)
        return self.transact(Method.ALLOCATE, *attributes)


def error_code(response: Message) -> int | None:
    if response.msg_class == MessageClass.SUCCESS:
        return None
    code = response.get(ErrorCode)
    assert code is not None, response
    return code.code


INTERNAL_IPV6_PEERS = [
    "::1",  # loopback
    "::",  # unspecified
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",  # IPv4-mapped RFC 1918
    "::ffff:169.254.169.254",  # IPv4-mapped cloud metadata
    "64:ff9b::a9fe:a9fe",  # NAT64 (RFC 6052) spelling of 169.254.169.254
    "fe80::1",  # link-local
    "fd00:ec2::254",  # AWS IPv6 metadata (unique local)
]


# A unique-local network the operator allows: the one hole in the built-in deny list, so
# the test can show a grant without naming any address outside the test network.
ALLOWED_ULA = "fd00:1234::/32"


@pytest.fixture
def ipv6_relay_server(server_factory: ServerFactory) -> ServerProcess:
    """The built-in deny list plus one allowed ULA network, with an IPv6 relay on ::1."""
    return server_factory({"peers": {"allow": [ALLOWED_ULA]}, "relay": {"address6": "::1"}})


def test_default_policy_refuses_internal_peers_on_an_ipv6_allocation(
    ipv6_relay_server: ServerProcess,
) -> None:
    """RFC 8656 §21 on an IPv6 relay (REQUESTED-ADDRESS-FAMILY, RFC 8656 §7.2): IPv6
    loopback, unspecified, link-local, ULA, and IPv4 internal addresses embedded in
    IPv4-mapped or NAT64 form are all refused with 403; ChannelBind to ::1 too. An
    operator's `peers.allow` entry opens only its own network. Only requests to the
    server are sent; nothing is relayed."""
    server = ipv6_relay_server
    client = WireClient(server)
    try:
        allocated = client.allocate(
            RequestedTransport(TRANSPORT_UDP), RequestedAddressFamily(FAMILY_IPV6)
        )
        assert error_code(allocated) is None, allocated
        relayed = allocated.get(XorRelayedAddress)
        assert relayed is not None and relayed.host == "::1"
        codes = {
            peer: error_code(client.transact(Method.CREATE_PERMISSION, XorPeerAddress(peer, 9)))
            for peer in INTERNAL_IPV6_PEERS
        }
        bind = client.transact(Method.CHANNEL_BIND, ChannelNumber(0x4000), XorPeerAddress("::1", 9))
        # A peer in the allowed network is accepted: the refusals are the policy at work.
        granted = client.transact(Method.CREATE_PERMISSION, XorPeerAddress("fd00:1234::1", 9))
        client.transact(Method.REFRESH, Lifetime(0))
    finally:
        client.close()
    assert codes == dict.fromkeys(INTERNAL_IPV6_PEERS, 403)
    assert error_code(bind) == 403
    assert error_code(granted) is None
    assert server.events("peer denied"), server.log_text
