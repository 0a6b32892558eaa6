"""The peer policy under attack: every spelling of an internal address, on every path.

Loopback, "this network", RFC 1918, carrier-grade NAT and the cloud metadata address,
each as IPv4 and in every IPv6 form that embeds an IPv4 address (IPv4-mapped,
IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32 server and client
fields), plus native IPv6 loopback, link-local, ULA, site-local, multicast and the AWS
IPv6 metadata address (tests/hostile/addresses.py), are refused on CreatePermission,
ChannelBind, Send and RFC 6062 Connect (RFC 8656 §21.2.1, RFC 6062 §5.2):

- on an IPv6 relay (relay.address6 "::1", REQUESTED-ADDRESS-FAMILY IPv6) the IPv6
  spellings get 403 Forbidden, the IPv4 ones 443 Peer Address Family Mismatch;
- on an IPv4 relay it is the other way round. Either way: refused.

The server runs the built-in deny list with one hole, 127.0.0.2/32, so that a control
request can show that the same path does work for an allowed peer.

Safety: CreatePermission and ChannelBind send nothing to the peer. Send indications go
only to loopback listeners (127.0.0.1, ::1, ::ffff:127.0.0.1), which check that nothing
arrives. A Connect would open a TCP connection, so before one naming a non-loopback
address goes to the real server, the same request is put to an in-process `TurnServer`
with the same config, which must refuse it without a `ConnectToPeer` action; besides,
the relay sockets are bound to 127.0.0.1 and ::1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pyturn.config import parse_config
from pyturn.core.server import ConnectToPeer, TurnServer
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    XorPeerAddress,
)
from pyturn.wire.message import Method
from tests.core.turn_client import FakeBinder, TurnTestClient
from tests.hostile.addresses import all_denied_peers, is_loopback_destination
from tests.hostile.client import LOOPBACK, LOOPBACK6, TurnClient, code_of, run
from tests.interop.server_process import (
    PASSWORD,
    REALM,
    USER,
    ServerProcess,
    base_config,
    merge_config,
)

ALLOWED = "127.0.0.2"
PUBLIC_V6 = "2606:4700:4700::1111"  # a permission only: nothing is ever sent to it
DENIED = all_denied_peers()
QUIET = 0.4
OVERRIDES: dict[str, Any] = {
    "peers": {"allow": [f"{ALLOWED}/32"]},
    "relay": {"address6": LOOPBACK6},
}


def family_of(host: str) -> int:
    return FAMILY_IPV6 if ":" in host else FAMILY_IPV4


def expected_refusal(host: str, relay_family: int) -> int:
    """403 for a peer of the relay's family, 443 (family mismatch) otherwise."""
    return 403 if family_of(host) == relay_family else 443


@pytest.fixture(scope="module")
def policy_config() -> dict[str, Any]:
    return merge_config(base_config(), OVERRIDES)


@pytest.fixture(scope="module")
def policy_server(
    tmp_path_factory: pytest.TempPathFactory, policy_config: dict[str, Any]
) -> Iterator[ServerProcess]:
    with ServerProcess(policy_config, tmp_path_factory.mktemp("pyturn-policy")) as server:
        yield server


FAMILIES = [pytest.param(FAMILY_IPV4, id="ipv4-relay"), pytest.param(FAMILY_IPV6, id="ipv6-relay")]


async def allocation(
    server: ServerProcess, relay_family: int, transport: int = TRANSPORT_UDP
) -> TurnClient:
    client = await TurnClient.open(
        server.tcp_address if transport == TRANSPORT_TCP else server.udp_address,
        transport="tcp" if transport == TRANSPORT_TCP else "udp",
    )
    family = FAMILY_IPV6 if relay_family == FAMILY_IPV6 else None
    response = await client.allocate(transport=transport, family=family)
    assert code_of(response) == 0, f"Allocate answered {code_of(response)}"
    assert client.relayed is not None
    assert family_of(client.relayed[0]) == relay_family
    return client


def control_peer(relay_family: int) -> tuple[str, int]:
    return (ALLOWED, 9) if relay_family == FAMILY_IPV4 else (PUBLIC_V6, 9)


@pytest.mark.parametrize("relay_family", FAMILIES)
@pytest.mark.parametrize("path", ["CreatePermission", "ChannelBind"])
def test_every_internal_address_is_refused_on_create_permission_and_channel_bind(
    policy_server: ServerProcess, relay_family: int, path: str, figures: dict[str, object]
) -> None:
    async def scenario() -> dict[str, int | None]:
        client = await allocation(policy_server, relay_family)
        codes: dict[str, int | None] = {}
        try:
            for number, (name, host) in enumerate(sorted(DENIED.items())):
                peer = (host, 9)
                if path == "CreatePermission":
                    response = await client.create_permission(peer)
                else:
                    response = await client.channel_bind(0x4000 + number, peer)
                codes[name] = code_of(response)
            # The same path works for an allowed peer.
            control = control_peer(relay_family)
            if path == "CreatePermission":
                codes["control"] = code_of(await client.create_permission(control))
            else:
                codes["control"] = code_of(await client.channel_bind(0x4FFF, control))
            assert code_of(await client.refresh(0)) == 0
        finally:
            client.close()
        return codes

    codes = run(scenario())
    assert codes.pop("control") == 0
    wrong = {
        name: code
        for name, code in codes.items()
        if code != expected_refusal(DENIED[name], relay_family)
    }
    assert not wrong, f"not refused as expected: {wrong}"
    figures["refused"] = f"{len(codes)} addresses: {dict(sorted(_tally(codes).items()))}"


def _tally(codes: dict[str, int | None]) -> dict[int | None, int]:
    out: dict[int | None, int] = {}
    for code in codes.values():
        out[code] = out.get(code, 0) + 1
    return out


class UdpListener:
    """A loopback UDP socket that counts what reaches it."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65535))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("relay_family", FAMILIES)
def test_a_send_indication_to_a_refused_peer_reaches_nothing(
    policy_server: ServerProcess, relay_family: int
) -> None:
    """RFC 8656 §11.2: without a permission a Send indication is dropped; and the
    permission is refused. Loopback listeners (127.0.0.1, ::1, and 127.0.0.1 spelled
    ::ffff:127.0.0.1) see nothing; the control peer 127.0.0.2 sees its datagram."""
    v4, v6, control = UdpListener(LOOPBACK), UdpListener(LOOPBACK6), UdpListener(ALLOWED)
    targets = [
        (LOOPBACK, v4.port),
        (f"::ffff:{LOOPBACK}", v4.port),
        (LOOPBACK6, v6.port),
    ]
    assert all(is_loopback_destination(host) for host, _ in targets)

    async def scenario() -> None:
        client = await allocation(policy_server, relay_family)
        try:
            for peer in targets:
                refused = await client.create_permission(peer)
                assert code_of(refused) == expected_refusal(peer[0], relay_family)
                client.send_indication(peer, b"must not arrive")
            if relay_family == FAMILY_IPV4:
                assert code_of(await client.create_permission((ALLOWED, control.port))) == 0
                client.send_indication((ALLOWED, control.port), b"control")
            await asyncio.sleep(QUIET)
            assert code_of(await client.refresh(0)) == 0
        finally:
            client.close()

    try:
        run(scenario())
        assert v4.received() == [] and v6.received() == []
        if relay_family == FAMILY_IPV4:
            assert control.received() == [b"control"]
    finally:
        for listener in (v4, v6, control):
            listener.close()


class TcpListener:
    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept_all(self) -> int:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except BlockingIOError:
                return len(self.accepted)

    def close(self) -> None:
        for sock in [*self.accepted, self.sock]:
            with contextlib.suppress(OSError):
                sock.close()


def core_refuses_connect(config: dict[str, Any], host: str, relay_family: int) -> bool:
    """The same Connect, put to an in-process core with the same config: refused, and
    no ConnectToPeer, so the real server will not open a connection either."""
    server = TurnServer(
        parse_config(config), FakeBinder(), relay_ipv4=LOOPBACK, relay_ipv6=LOOPBACK6
    )
    client = TurnTestClient(server, USER, PASSWORD, realm=REALM, transport="tcp")
    family = FAMILY_IPV6 if relay_family == FAMILY_IPV6 else None
    assert client.allocate(transport=TRANSPORT_TCP, family=family).code == 0
    result = client.request(Method.CONNECT, [XorPeerAddress(host, 9)])
    return not result.events_of(ConnectToPeer) and result.code in (403, 443)


@pytest.mark.parametrize("relay_family", FAMILIES)
def test_every_internal_address_is_refused_on_rfc6062_connect(
    policy_server: ServerProcess,
    policy_config: dict[str, Any],
    relay_family: int,
    figures: dict[str, object],
) -> None:
    """RFC 6062 §5.2 over a TCP control connection with a TCP allocation; loopback TCP
    listeners (127.0.0.1, ::1) see no connection, the control peer 127.0.0.2 does."""
    v4, v6, control = TcpListener(LOOPBACK), TcpListener(LOOPBACK6), TcpListener(ALLOWED)
    peers = {name: (host, 9) for name, host in DENIED.items()}
    peers["loopback listener"] = (LOOPBACK, v4.port)
    peers["mapped loopback listener"] = (f"::ffff:{LOOPBACK}", v4.port)
    peers["v6 loopback listener"] = (LOOPBACK6, v6.port)
    for name, (host, _) in peers.items():
        if not is_loopback_destination(host):
            assert core_refuses_connect(policy_config, host, relay_family), name

    async def scenario() -> dict[str, int | None]:
        client = await allocation(policy_server, relay_family, TRANSPORT_TCP)
        codes: dict[str, int | None] = {}
        try:
            for name, peer in sorted(peers.items()):
                codes[name] = code_of(await client.connect(peer))
            if relay_family == FAMILY_IPV4:
                codes["control"] = code_of(await client.connect((ALLOWED, control.port)))
            await asyncio.sleep(QUIET)
        finally:
            client.close()
        return codes

    try:
        codes = run(scenario())
        assert v4.accept_all() == 0 and v6.accept_all() == 0
        if relay_family == FAMILY_IPV4:
            assert codes.pop("control") == 0
            assert control.accept_all() == 1
    finally:
        for listener in (v4, v6, control):
            listener.close()
    wrong = {
        name: code
        for name, code in codes.items()
        if code != expected_refusal(peers[name][0], relay_family)
    }
    assert not wrong, f"not refused as expected: {wrong}"
    figures["refused"] = f"{len(codes)} addresses: {dict(sorted(_tally(codes).items()))}"
