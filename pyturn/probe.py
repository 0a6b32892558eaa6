"""`pyturn probe`: check a TURN server end to end, as an operator would after a deploy.

Against `turn:HOST[:PORT][?transport=udp|tcp]` or `turns:HOST[:PORT]` (RFC 7065 URIs) it
runs, each step timed and printed:

1. Binding: the server answers STUN and reports our mapped address.
2. Allocate without credentials: the server challenges with 401, REALM and NONCE.
3. Allocate with the long-term credential (allocation A), then a second one (B) from
   another socket.
4. CreatePermission on both, each for the other's relayed address.
5. A sends a Send indication to B's relayed address; B must get it as a Data indication
   from A's relayed address. Then B binds a channel to A and sends ChannelData; A must
   get it. That is a relayed round trip through two relay ports.
6. Refresh with LIFETIME 0 releases both allocations.

It uses pyturn's own codec and blocking sockets: a probe is one short conversation, and
works against any RFC 8656 server, coturn included. Exit status: 0 when every step
passed, 1 when one failed (with the reason), 2 for a bad command line.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyturn.logs import format_address
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    TRANSPORT_UDP,
    Address,
    AlternateServer,
    Attribute,
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
)
from pyturn.wire.channel_data import (
    StreamFramer,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import (
    Message,
    MessageClass,
    Method,
    decode,
    encode,
    is_stun,
    new_transaction_id,
)

DEFAULT_PORTS = {"turn": 3478, "turns": 5349}
_URL = re.compile(
    r"(?P<scheme>turns?):(?://)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:?/\[\]]+))"
    r"(?::(?P<port>\d{1,5}))?(?:\?transport=(?P<transport>[a-zA-Z]+))?"
)
# RFC 8489 §6.2.1: retransmit over UDP starting at 500 ms, doubling.
_INITIAL_RTO = 0.5
_CHANNEL = 0x4000


class ProbeError(Exception):
    """A step failed; the message says what was expected and what happened."""


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    scheme: str  # turn or turns
    host: str
    port: int
    transport: str  # udp or tcp

    def __str__(self) -> str:
        return f"{self.scheme}:{format_address((self.host, self.port))}?transport={self.transport}"


def parse_turn_url(url: str) -> ProbeTarget:
    """`turn:HOST[:PORT][?transport=udp|tcp]` or `turns:...` (RFC 7065); ValueError if not."""
    match = _URL.fullmatch(url.strip())
    if match is None:
        raise ValueError(
            f"not a TURN URL: {url!r} (expected turn:HOST[:PORT][?transport=udp|tcp] "
            "or turns:HOST[:PORT])"
        )
    scheme = match["scheme"]
    host = match["v6"] or match["host"]
    port = int(match["port"]) if match["port"] else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {url!r}")
    transport = (match["transport"] or ("tcp" if scheme == "turns" else "udp")).lower()
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be udp or tcp, got {transport!r}")
    if scheme == "turns" and transport == "udp":
        raise ValueError("turns:...?transport=udp means DTLS, which the probe does not speak")
    return ProbeTarget(scheme, host, port, transport)


# -- one client socket -------------------------------------------------------------------


class Link:
    """One client connection to the server: datagrams over UDP, frames over TCP/TLS.

    Connecting is part of construction; failures raise `ProbeError` saying what failed.
    """

    def __init__(
        self,
        target: ProbeTarget,
        address: Address,
        timeout: float,
        insecure: bool = False,
        ca_file: str | None = None,
    ) -> None:
        self.target = target
        self.reliable = target.transport != "udp"
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        where = format_address(address)
        self.framer = StreamFramer()
        self.frames: deque[bytes] = deque()
        if not self.reliable:
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.connect(address)  # so ICMP port unreachable comes back as an error
            return
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except TimeoutError as exc:
            raise ProbeError(f"TCP connect to {where} timed out after {timeout:g} s") from exc
        except OSError as exc:
            raise ProbeError(f"TCP connect to {where} failed: {_reason(exc)}") from exc
        # Requests follow ChannelData the server does not answer: without this, Nagle
        # holds each request back until the delayed ACK, 40 ms later.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.scheme == "turns":
            context = ssl.create_default_context(cafile=ca_file)
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            try:
                sock = context.wrap_socket(sock, server_hostname=target.host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise ProbeError(f"TLS handshake with {where} failed: {exc}") from exc
        self.sock = sock

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ProbeError(f"sending to {self.target} failed: {_reason(exc)}") from exc

    def recv(self, timeout: float) -> bytes | None:
        """The next datagram or frame, or None after `timeout` seconds."""
        if self.frames:
            return self.frames.popleft()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionRefusedError as exc:
                raise ProbeError(
                    f"connection refused: nothing answers on {self.target.transport.upper()} "
                    f"{self.target.host}:{self.target.port}"
                ) from exc
            except OSError as exc:
                raise ProbeError(f"receiving from {self.target} failed: {_reason(exc)}") from exc
            if not self.reliable:
                return data
            if not data:
                raise ProbeError("the server closed the connection")
            self.framer.feed(data)
            try:
                self.frames.extend(self.framer.frames())
            except DecodeError as exc:
                raise ProbeError(f"the server sent a broken stream: {exc}") from exc
            if self.frames:
                return self.frames.popleft()

    def close(self) -> None:
        self.sock.close()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _error(msg: Message) -> str:
    code = msg.get(ErrorCode)
    if code is None:
        return "an error response without ERROR-CODE"
    text = f"{code.code} {code.reason}".strip()
    alternate = msg.get(AlternateServer)
    if alternate is not None:
        text += f" (ALTERNATE-SERVER {format_address(alternate.address)})"
    return text


# -- a TURN client for one allocation ----------------------------------------------------


class ProbeClient:
    """Speaks STUN/TURN over one `Link`; keeps REALM, NONCE and the key once learnt."""

    def __init__(self, link: Link, username: str, password: str, timeout: float) -> None:
        self.link = link
        self.username = username
        self.password = password
        self.timeout = timeout
        self.realm: str | None = None
        self.nonce: str | None = None
        self.key: bytes | None = None
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        # Relayed data that arrived while we waited for something else: (peer, data).
        self.inbox: deque[tuple[Address, bytes]] = deque()

    def close(self) -> None:
        self.link.close()

    # -- transport ---------------------------------------------------------------------

    def _handle_unsolicited(self, frame: bytes) -> None:
        if is_channel_data(frame):
            try:
                channel, payload = decode_channel_data(frame)
            except DecodeError:
                return
            self.inbox.append((("channel", channel), payload))
            return
        if not is_stun(frame):
            return
        try:
            msg = decode(frame)
        except DecodeError:
            return
        if msg.method == Method.DATA and msg.msg_class == MessageClass.INDICATION:
            peer, data = msg.get(XorPeerAddress), msg.get(Data)
            if peer is not None and data is not None:
                self.inbox.append((peer.address, data.value))

    def transact(self, method: int, attributes: Sequence[Attribute], *, sign: bool) -> Message:
        """Send a request (retransmitting over UDP) and return its response."""
        txid = new_transaction_id()
        attrs = list(attributes)
        if sign:
            assert self.realm is not None and self.nonce is not None and self.key is not None
            attrs += [Username(self.username), Realm(self.realm), Nonce(self.nonce)]
        data = encode(
            Message(method, MessageClass.REQUEST, txid, tuple(attrs)),
            integrity_key=self.key if sign else None,
            fingerprint=True,
        )
        deadline = time.monotonic() + self.timeout
        rto = _INITIAL_RTO
        self.link.send(data)
        next_send = time.monotonic() + rto
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ProbeError(
                    f"no answer from {self.link.target} within {self.timeout:g} s "
                    "(wrong address or port, a firewall, or the server is down)"
                )
            wait = deadline - now if self.link.reliable else min(deadline, next_send) - now
            frame = self.link.recv(max(wait, 0.0))
            if frame is None:
                if not self.link.reliable and time.monotonic() >= next_send:
                    self.link.send(data)
                    rto *= 2
                    next_send = time.monotonic() + rto
                continue
            if is_stun(frame) and frame[8:20] == txid:
                try:
                    msg = decode(frame)
                except DecodeError as exc:
                    raise ProbeError(f"the server's response does not decode: {exc}") from exc
                if msg.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
                    self._check_integrity(msg)
                    return msg
            self._handle_unsolicited(frame)

    def _check_integrity(self, msg: Message) -> None:
        if self.key is None:
            return
        if msg.integrity_offset is not None and not integrity.verify_integrity(msg, self.key):
            raise ProbeError("the response's MESSAGE-INTEGRITY does not verify")
        if msg.integrity_sha256_offset is not None and not integrity.verify_integrity_sha256(
            msg, self.key
        ):
            raise ProbeError("the response's MESSAGE-INTEGRITY-SHA256 does not verify")

    def request(self, method: int, attributes: Sequence[Attribute]) -> Message:
        """A signed request; a 438 Stale Nonce is retried once with the new nonce."""
        msg = self.transact(method, attributes, sign=True)
        code, nonce = msg.get(ErrorCode), msg.get(Nonce)
        if code is not None and code.code == 438 and nonce is not None:
            self.nonce = nonce.value
            msg = self.transact(method, attributes, sign=True)
        return msg

    # -- TURN operations ---------------------------------------------------------------

    def binding(self) -> Address:
        msg = self.transact(Method.BINDING, [], sign=False)
        if msg.msg_class != MessageClass.SUCCESS:
            raise ProbeError(f"Binding failed: {_error(msg)}")
        mapped = msg.get(XorMappedAddress)
        if mapped is None:
            raise ProbeError("Binding response without XOR-MAPPED-ADDRESS")
        self.mapped = mapped.address
        return mapped.address

    def challenge(self) -> str:
        """Allocate without credentials: expect 401 with REALM and NONCE (RFC 8656 §7.2)."""
        msg = self.transact(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)], sign=False)
        if msg.msg_class == MessageClass.SUCCESS:
            raise ProbeError(
                "the server allocated a relay without asking for credentials: an open relay"
            )
        code = msg.get(ErrorCode)
        realm, nonce = msg.get(Realm), msg.get(Nonce)
        if code is None or code.code != 401 or realm is None or nonce is None:
            raise ProbeError(f"expected 401 with REALM and NONCE, got {_error(msg)}")
        self.realm, self.nonce = realm.value, nonce.value
        try:
            self.key = integrity.long_term_key(self.username, realm.value, self.password)
        except ValueError as exc:
            raise ProbeError(f"the password cannot be used: {exc}") from exc
        return realm.value

    def allocate(self) -> tuple[Address, int]:
        msg = self.request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])
        if msg.msg_class != MessageClass.SUCCESS:
            code = msg.get(ErrorCode)
            hint = ""
            if code is not None and code.code == 401:
                hint = f": wrong username or password for realm {self.realm!r}"
            elif code is not None and code.code in (300, 508):
                hint = ": the server is draining or out of relay ports"
            raise ProbeError(f"Allocate refused: {_error(msg)}{hint}")
        relayed = msg.get(XorRelayedAddress)
        if relayed is None:
            raise ProbeError("Allocate response without XOR-RELAYED-ADDRESS")
        lifetime = msg.get(Lifetime)
        self.relayed = relayed.address
        return relayed.address, lifetime.value if lifetime is not None else 0

    def create_permission(self, peer: Address) -> None:
        msg = self.request(Method.CREATE_PERMISSION, [XorPeerAddress(*peer)])
        if msg.msg_class != MessageClass.SUCCESS:
            hint = ""
            code = msg.get(ErrorCode)
            if code is not None and code.code == 403:
                hint = (
                    f": the server's peer policy refuses its own relay address {peer[0]} "
                    "(allow it, e.g. peers.allow in pyturn or allowed-peer-ip in coturn)"
                )
            raise ProbeError(f"CreatePermission for {peer[0]} refused: {_error(msg)}{hint}")

    def channel_bind(self, channel: int, peer: Address) -> None:
        msg = self.request(Method.CHANNEL_BIND, [ChannelNumber(channel), XorPeerAddress(*peer)])
        if msg.msg_class != MessageClass.SUCCESS:
            raise ProbeError(f"ChannelBind 0x{channel:04X} refused: {_error(msg)}")

    def refresh(self, lifetime: int) -> None:
        msg = self.request(Method.REFRESH, [Lifetime(lifetime)])
        if msg.msg_class != MessageClass.SUCCESS:
            raise ProbeError(f"Refresh refused: {_error(msg)}")

    def send_indication(self, peer: Address, data: bytes) -> None:
        msg = Message(
            Method.SEND,
            MessageClass.INDICATION,
            new_transaction_id(),
            (XorPeerAddress(*peer), Data(data)),
        )
        self.link.send(encode(msg, fingerprint=True))

    def send_channel_data(self, channel: int, data: bytes) -> None:
        self.link.send(encode_channel_data(channel, data, pad=self.link.reliable))

    def receive(self, timeout: float) -> tuple[Address, bytes] | None:
        """The next relayed datagram: ((peer) or ("channel", n), data), or None."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            frame = self.link.recv(left)
            if frame is not None:
                self._handle_unsolicited(frame)
        return self.inbox.popleft()


def connect(
    target: ProbeTarget,
    address: Address,
    username: str,
    password: str,
    *,
    timeout: float = 5.0,
    insecure: bool = False,
    ca_file: str | None = None,
) -> ProbeClient:
    """A client on a fresh connection (a new 5-tuple) to the server at `address`."""
    link = Link(target, address, timeout, insecure, ca_file)
    return ProbeClient(link, username, password, timeout)


# -- the probe itself --------------------------------------------------------------------


@dataclass
class _Step:
    """One printed line: created when the step starts, `ok` prints it with its timing."""

    name: str
    out: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)

    def ok(self, detail: str) -> None:
        ms = (time.perf_counter() - self.started) * 1000
        self.out(f"ok    {self.name:<26} {ms:8.1f} ms  {detail}")


def _relay(
    sender: Callable[[], None], receiver: ProbeClient, expect: bytes, timeout: float
) -> Address | None:
    """Send (up to 3 times, as UDP may lose one) until `receiver` gets `expect`."""
    deadline = time.monotonic() + timeout
    attempt_wait = max(timeout / 3, 0.2)
    while time.monotonic() < deadline:
        sender()
        until = min(deadline, time.monotonic() + attempt_wait)
        while (left := until - time.monotonic()) > 0:
            got = receiver.receive(left)
            if got is None:
                break
            peer, data = got
            if data == expect:
                return peer
    return None


def resolve(target: ProbeTarget) -> Address:
    kind = socket.SOCK_DGRAM if target.transport == "udp" else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=kind)
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {target.host!r}: {exc.strerror}") from exc
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, like most clients
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


def run_probe(
    target: ProbeTarget,
    username: str,
    password: str,
    *,
    timeout: float = 5.0,
    insecure: bool = False,
    ca_file: str | None = None,
    out: Callable[[str], None] = print,
) -> bool:
    """Run every step against `target`, printing one line each; True when all passed."""
    started = time.perf_counter()
    clients: list[ProbeClient] = []
    step = _Step("resolve", out)
    try:
        address = resolve(target)
        out(f"probe {target} at {format_address(address)} as {username!r}")

        def new_client() -> ProbeClient:
            client = connect(
                target,
                address,
                username,
                password,
                timeout=timeout,
                insecure=insecure,
                ca_file=ca_file,
            )
            clients.append(client)
            return client

        step = _Step("binding", out)
        a = new_client()
        mapped = a.binding()
        step.ok(f"mapped address {format_address(mapped)}")
        step = _Step("allocate, no credentials", out)
        realm = a.challenge()
        step.ok(f"401 with realm {realm!r} and a nonce")
        step = _Step("allocate A", out)
        relayed_a, lifetime = a.allocate()
        step.ok(f"relayed address {format_address(relayed_a)}, lifetime {lifetime} s")
        step = _Step("allocate B", out)
        b = new_client()
        b.challenge()
        relayed_b, _ = b.allocate()
        step.ok(f"relayed address {format_address(relayed_b)}")
        step = _Step("create permissions", out)
        a.create_permission(relayed_b)
        b.create_permission(relayed_a)
        step.ok(f"A for {relayed_b[0]}, B for {relayed_a[0]}")
        step = _Step("relay A->B (Send/Data)", out)
        payload = b"pyturn probe A->B " + secrets.token_hex(8).encode()
        peer = _relay(lambda: a.send_indication(relayed_b, payload), b, payload, timeout)
        if peer is None:
            raise ProbeError(
                f"B got nothing within {timeout:g} s of A's Send indication to "
                f"{format_address(relayed_b)}: the relay does not forward between its own ports"
            )
        if peer != relayed_a:
            raise ProbeError(f"B got the data from {peer}, expected {format_address(relayed_a)}")
        step.ok(f"{len(payload)} bytes reached B from {format_address(relayed_a)}")
        step = _Step("channel bind", out)
        b.channel_bind(_CHANNEL, relayed_a)
        step.ok(f"B: channel 0x{_CHANNEL:04X} to {format_address(relayed_a)}")
        step = _Step("relay B->A (ChannelData)", out)
        payload = b"pyturn probe B->A " + secrets.token_hex(8).encode()
        peer = _relay(lambda: b.send_channel_data(_CHANNEL, payload), a, payload, timeout)
        if peer is None:
            raise ProbeError(f"A got nothing within {timeout:g} s of B's ChannelData")
        if peer != relayed_b:
            raise ProbeError(f"A got the data from {peer}, expected {format_address(relayed_b)}")
        step.ok(f"{len(payload)} bytes reached A from {format_address(relayed_b)}")
        step = _Step("refresh, lifetime 0", out)
        for client in clients:
            client.refresh(0)
            client.relayed = None
        step.ok("both allocations released")
    except ProbeError as exc:
        out(f"FAIL  {step.name:<26} {exc}")
        out(f"probe failed at {step.name!r}: {exc}")
        return False
    finally:
        for client in clients:
            # After a failure, release what was allocated (a TCP allocation ends with its
            # connection anyway); best effort, briefly.
            if client.relayed is not None and not client.link.reliable:
                client.timeout = min(client.timeout, 1.0)
                with contextlib.suppress(ProbeError):
                    client.transact(Method.REFRESH, [Lifetime(0)], sign=True)
        for client in clients:
            client.close()
    out(f"PASS  every step passed in {(time.perf_counter() - started) * 1000:.1f} ms")
    return True
