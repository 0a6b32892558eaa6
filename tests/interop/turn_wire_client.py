"""A blocking STUN/TURN client for interop tests, built on `pyturn.probe`'s client.

`pyturn.probe.ProbeClient` already speaks STUN over UDP, TCP and TLS with pyturn's own
codec (long-term credentials, 438 retry, stream framing); this adds what the tests need
beyond the probe: any Allocate attributes (REQUESTED-TRANSPORT TCP, address families),
RFC 6062 Connect / ConnectionAttempt / ConnectionBind, and taking over a data
connection's socket once it has become a raw byte pipe.

Everything here is bounded in time: each call takes a timeout and every loop has a
deadline.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from pyturn.probe import Link, ProbeClient, ProbeTarget
from pyturn.wire.attributes import (
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    Address,
    Attribute,
    ConnectionId,
    ErrorCode,
    RequestedTransport,
    XorPeerAddress,
    XorRelayedAddress,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, Method, decode, is_stun
from tests.interop.server_process import PASSWORD, USER

DEFAULT_TIMEOUT = 5.0


class WireClient(ProbeClient):
    """`ProbeClient` plus RFC 6062 and free-form Allocate requests."""

    def __init__(self, link: Link, username: str, password: str, timeout: float) -> None:
        super().__init__(link, username, password, timeout)
        # ConnectionAttempt indications (RFC 6062 §5.3): (peer, CONNECTION-ID).
        self.attempts: deque[tuple[Address, int]] = deque()

    def _handle_unsolicited(self, frame: bytes) -> None:
        if is_stun(frame):
            try:
                msg = decode(frame)
            except DecodeError:
                return
            if msg.method == Method.CONNECTION_ATTEMPT and msg.msg_class == MessageClass.INDICATION:
                peer, cid = msg.get(XorPeerAddress), msg.get(ConnectionId)
                if peer is not None and cid is not None:
                    self.attempts.append((peer.address, cid.value))
                return
        super()._handle_unsolicited(frame)

    # -- requests ------------------------------------------------------------------------

    def login(self) -> None:
        """Learn REALM and NONCE from the 401 to an unauthenticated Allocate."""
        self.challenge()

    def allocate_with(self, attributes: Sequence[Attribute]) -> Message:
        """A signed Allocate with exactly `attributes` (plus the credentials)."""
        if self.key is None:
            self.login()
        return self.request(Method.ALLOCATE, list(attributes))

    def allocate_ok(self, attributes: Sequence[Attribute] = ()) -> list[Address]:
        """Allocate (UDP relaying unless `attributes` say otherwise); the relayed addresses."""
        attrs = list(attributes) or [RequestedTransport(TRANSPORT_UDP)]
        msg = self.allocate_with(attrs)
        assert msg.msg_class == MessageClass.SUCCESS, error_text(msg)
        relayed = [attr.address for attr in msg.get_all(XorRelayedAddress)]
        assert relayed, msg
        self.relayed = relayed[0]
        return relayed

    def allocate_tcp(self) -> Address:
        """RFC 6062 §5.1: an allocation whose relayed address is a TCP port."""
        return self.allocate_ok([RequestedTransport(TRANSPORT_TCP)])[0]

    def connect_peer(self, peer: Address) -> Message:
        """RFC 6062 §5.2: Connect; the success response carries a CONNECTION-ID."""
        return self.request(Method.CONNECT, [XorPeerAddress(*peer)])

    def connection_bind(self, connection_id: int) -> Message:
        """RFC 6062 §5.4: on this (new) connection, claim the peer connection."""
        return self.request(Method.CONNECTION_BIND, [ConnectionId(connection_id)])

    def wait_connection_attempt(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[Address, int]:
        """The next ConnectionAttempt indication: (peer address, CONNECTION-ID)."""
        deadline = time.monotonic() + timeout
        while not self.attempts:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no ConnectionAttempt within {timeout} s")
            frame = self.link.recv(left)
            if frame is not None:
                self._handle_unsolicited(frame)
        return self.attempts.popleft()

    def share_credentials(self, other: ProbeClient) -> None:
        """Use `other`'s REALM, NONCE and key (nonces are per client IP, not per socket)."""
        self.realm, self.nonce, self.key = other.realm, other.nonce, other.key

    def take_pipe(self) -> tuple[socket.socket, bytes]:
        """After ConnectionBind: the raw socket and any payload bytes already read.

        From here on the connection carries the peer's bytes, not STUN (RFC 6062 §5.4).
        """
        leftover = b"".join(self.link.frames) + bytes(self.link.framer.buffer)
        self.link.frames.clear()
        self.link.framer.buffer.clear()
        return self.link.sock, leftover


def error_text(msg: Message) -> str:
    code = msg.get(ErrorCode)
    return f"{code.code} {code.reason}" if code is not None else repr(msg)


def error_code(msg: Message) -> int | None:
    code = msg.get(ErrorCode)
    return code.code if code is not None else None


def open_client(
    transport: str,
    address: Address,
    *,
    ca_file: Path | None = None,
    server_name: str = "localhost",
    username: str = USER,
    password: str = PASSWORD,
    timeout: float = DEFAULT_TIMEOUT,
) -> WireClient:
    """A client on a new connection (new 5-tuple) to `address`.

    `transport` is udp, tcp or tls; TLS verifies the server against `ca_file` under the
    name `server_name` (the test certificates are issued to "localhost").
    """
    scheme = "turns" if transport == "tls" else "turn"
    link_transport = "udp" if transport == "udp" else "tcp"
    host = server_name if transport == "tls" else address[0]
    target = ProbeTarget(scheme, host, address[1], link_transport)
    link = Link(target, address, timeout, ca_file=str(ca_file) if ca_file is not None else None)
    return WireClient(link, username, password, timeout)


def recv_exactly(sock: socket.socket, size: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Read `size` bytes from a stream socket, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    assert len(data) == size, f"got {len(data)} of {size} bytes within {timeout} s: {bytes(data)!r}"
    return bytes(data)
