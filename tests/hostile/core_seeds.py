"""Hand-written step sequences for the core harness: the fuzzers' starting points.

Each scenario is a normal or an abusive conversation (allocate and relay, reserve an
even port, RFC 6062 Connect and ConnectionBind, dual stack, denied peers, quotas,
every auth mode, malformed frames, drain) that the fuzzers mutate from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from pyturn.wire.attributes import (
    FAMILY_IPV6,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    EvenPort,
    Lifetime,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UnknownAttribute,
    XorPeerAddress,
)
from pyturn.wire.message import Message, MessageClass, Method, encode
from tests.hostile.addresses import all_denied_peers
from tests.hostile.core_harness import (
    AUTH_MODES,
    Closed,
    Drain,
    PeerArrived,
    PeerClosed,
    PeerConnected,
    Raw,
    Signed,
    Step,
    Timer,
    request_template,
)

# Client indexes in core_harness.CLIENTS.
UDP_A, UDP_A2, UDP_B, TCP_CONTROL, TCP_DATA, UDP_V6, TLS_B, MALLORY = range(8)
PEER = ("8.8.8.8", 5000)
PEER_V6 = ("2606:4700:4700::1111", 5000)

_txids = (i.to_bytes(12, "big") for i in itertools.count(1))


def signed(client: int, method: int, *attributes: Attribute, dt: float = 0.0, **kw: object) -> Step:
    data = request_template(method, attributes, next(_txids))
    auth = str(kw.get("auth", "valid"))
    return Step(client, dt, Signed(data, auth, bool(kw.get("fingerprint", False))))


def raw_message(client: int, method: int, msg_class: MessageClass, *attrs: Attribute) -> Step:
    return Step(client, 0.0, Raw(encode(Message(method, msg_class, next(_txids), attrs))))


def allocate(client: int, *extra: Attribute, transport: int = TRANSPORT_UDP) -> Step:
    return signed(client, Method.ALLOCATE, RequestedTransport(transport), *extra)


def udp_relay() -> Iterator[Step]:
    yield allocate(UDP_A, Lifetime(3600))
    yield signed(UDP_A, Method.CREATE_PERMISSION, XorPeerAddress(*PEER))
    yield signed(UDP_A, Method.CHANNEL_BIND, ChannelNumber(0x4000), XorPeerAddress(*PEER))
    yield Step(UDP_A, 1.0, Raw(b"\x40\x00\x00\x05hello\x00\x00\x00"))
    yield raw_message(
        UDP_A, Method.SEND, MessageClass.INDICATION, XorPeerAddress(*PEER), Data(b"hi")
    )
    yield signed(UDP_A, Method.REFRESH, Lifetime(600), dt=299.0)
    yield Step(UDP_A, 301.0, Timer())
    yield signed(UDP_A, Method.REFRESH, Lifetime(0))


def reservation() -> Iterator[Step]:
    yield allocate(UDP_A, EvenPort(True))
    yield allocate(UDP_A2, ReservationToken(bytes(8)))
    yield signed(UDP_A, Method.REFRESH, Lifetime(0))
    yield allocate(UDP_B, EvenPort(False), DontFragment())
    yield Step(UDP_B, 31.0, Timer())


def tcp_relay() -> Iterator[Step]:
    yield allocate(TCP_CONTROL, transport=TRANSPORT_TCP)
    yield signed(TCP_CONTROL, Method.CONNECT, XorPeerAddress("8.8.8.8", 443))
    yield Step(TCP_CONTROL, 1.0, PeerConnected(0, True))
    yield signed(TCP_DATA, Method.CONNECTION_BIND, ConnectionId(0))
    yield signed(TCP_CONTROL, Method.CREATE_PERMISSION, XorPeerAddress(*PEER))
    yield Step(TCP_CONTROL, 0.0, PeerArrived(0, 0))
    yield Step(TCP_CONTROL, 31.0, Timer())
    yield signed(TCP_CONTROL, Method.CONNECT, XorPeerAddress("1.1.1.1", 443))
    yield Step(TCP_CONTROL, 0.0, PeerClosed(0))
    yield Step(TCP_CONTROL, 0.0, Closed())


def dual_stack() -> Iterator[Step]:
    yield allocate(UDP_A, AdditionalAddressFamily(FAMILY_IPV6))
    yield signed(UDP_A, Method.CREATE_PERMISSION, XorPeerAddress(*PEER), XorPeerAddress(*PEER_V6))
    yield signed(UDP_A, Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(*PEER_V6))
    yield allocate(UDP_V6, RequestedAddressFamily(FAMILY_IPV6))
    yield signed(UDP_V6, Method.CREATE_PERMISSION, XorPeerAddress(*PEER_V6))


def denied_peers() -> Iterator[Step]:
    yield allocate(UDP_A)
    yield allocate(UDP_V6, RequestedAddressFamily(FAMILY_IPV6))
    for host in all_denied_peers().values():
        client = UDP_V6 if ":" in host else UDP_A
        yield signed(client, Method.CREATE_PERMISSION, XorPeerAddress(host, 9))
        yield signed(client, Method.CHANNEL_BIND, ChannelNumber(0x4002), XorPeerAddress(host, 9))


def quotas() -> Iterator[Step]:
    for client in (UDP_A, UDP_A2, TCP_CONTROL, UDP_B, TLS_B, UDP_V6):
        yield allocate(client)
    yield signed(
        UDP_A, Method.CREATE_PERMISSION, *(XorPeerAddress(f"8.8.8.{i}", 1) for i in range(6))
    )
    for i in range(5):
        yield signed(
            UDP_A, Method.CHANNEL_BIND, ChannelNumber(0x4000 + i), XorPeerAddress(f"8.8.4.{i}", 1)
        )


def auth_modes() -> Iterator[Step]:
    for mode in AUTH_MODES:
        yield signed(UDP_B, Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), auth=mode)
        yield signed(MALLORY, Method.ALLOCATE, RequestedTransport(TRANSPORT_UDP), auth=mode)
    yield signed(UDP_B, Method.REFRESH, Lifetime(0), fingerprint=True, auth="sha256")


def malformed() -> Iterator[Step]:
    request = request_template(Method.ALLOCATE, [RequestedTransport(17)], bytes(12))
    yield Step(UDP_A, 0.0, Raw(request[:19]))
    yield Step(UDP_A, 0.0, Raw(request[:2] + b"\x00\x04" + request[4:20]))
    yield Step(UDP_A, 0.0, Raw(request[:2] + b"\x00\x05" + request[4:] + b"\x00"))
    yield Step(UDP_A, 0.0, Raw(request[:-4] + b"\x00\x00\x00\x00"))
    unknown = UnknownAttribute(0x0033, b"x")
    yield signed(UDP_A, Method.ALLOCATE, RequestedTransport(17), unknown)
    yield signed(UDP_A, 0x0FF, Lifetime(1))
    yield Step(UDP_A, 0.0, Raw(b"\x7f\xff\xff\xff"))


def drain() -> Iterator[Step]:
    yield allocate(UDP_A)
    yield Step(UDP_A, 0.0, Drain())
    yield allocate(UDP_B)
    yield signed(UDP_A, Method.REFRESH, Lifetime(600), dt=3601.0)


def seed_scenarios() -> dict[str, Sequence[Step]]:
    return {
        "udp-relay": list(udp_relay()),
        "reservation": list(reservation()),
        "tcp-relay": list(tcp_relay()),
        "dual-stack": list(dual_stack()),
        "denied-peers": list(denied_peers()),
        "quotas": list(quotas()),
        "auth-modes": list(auth_modes()),
        "malformed": list(malformed()),
        "drain": list(drain()),
    }
