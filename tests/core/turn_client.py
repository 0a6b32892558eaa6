"""A sans-IO TURN test client, a fake relay binder, and the shared test configuration.

`TurnTestClient` talks to a `TurnServer` through bytes only, as a real client would: it
encodes requests with `pyturn.wire.message.encode`, signs them with the long-term key
(RFC 8489 §9.2.2), fetches REALM and NONCE with an unauthenticated first request, and
decodes the replies. Nothing here opens a socket or reads a clock: every call takes
`now`, which defaults to `T0`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyturn.config import Config, parse_config
from pyturn.core.allocation import Allocation, FiveTuple, RelaySocket
from pyturn.core.server import Action, Reply, SendToPeer, TurnServer
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Address,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UserHash,
    Username,
    XorPeerAddress,
)
from pyturn.wire.channel_data import channel_header
from pyturn.wire.message import (
    Message,
    MessageClass,
    Method,
    decode,
    encode,
    new_transaction_id,
)

A = TypeVar("A", bound=Attribute)

# make_server(overrides=None, *, relay_ipv4=..., relay_ipv6=None) -> TurnServer
MakeServer = Callable[..., TurnServer]

T0 = 1_800_000_000.0
REALM = "example.org"
RELAY_IP = "192.0.2.10"
CLIENT: Address = ("203.0.113.7", 40001)
OTHER_CLIENT: Address = ("203.0.113.8", 40002)
SERVER_ADDRESS: Address = ("192.0.2.10", 3478)
# Public addresses used only as values inside messages: no traffic is ever sent.
PEER: Address = ("8.8.8.8", 5000)
PEER2: Address = ("1.1.1.1", 6000)
PEER3: Address = ("9.9.9.9", 7000)
PEER_V6: Address = ("2606:4700:4700::1111", 5000)

BASE_CONFIG: dict[str, Any] = {
    "realm": REALM,
    "auth": {
        "users": {"alice": "alicepw", "bob": "bobpw"},
        "secrets": ["s3cret", "old-secret"],
    },
    "peers": {"allow": []},
    "relay": {"min_port": 50000, "max_port": 50009},
}
RELAY_PORTS = range(50000, 50010)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_config(overrides: Mapping[str, Any] | None = None) -> Config:
    """The test configuration with `overrides` merged in: nested mappings merge key by key
    (so `{"auth": {"users": {...}}}` adds users); to replace one, build the dict from
    `BASE_CONFIG` and call `parse_config` directly."""
    return parse_config(_merge(BASE_CONFIG, overrides or {}))


# -- a fake relay binder -------------------------------------------------------------------


_RELAY_KEYS = itertools.count(1000)


@dataclass(eq=False)
class FakeRelay:
    """What `FakeBinder.bind` hands the core: a port (compared by identity), and the
    number the forwarding table knows it by (a real one's is its descriptor)."""

    port: int
    family: int
    dont_fragment: bool
    # Which of the family's relay addresses it is bound on.
    index: int = 0
    key: int = field(default_factory=lambda: next(_RELAY_KEYS))

    def sendto(self, data: bytes, peer: Address, /) -> None:
        raise AssertionError("the sans-IO core must never send on a relay socket")


@dataclass
class FakeBinder:
    """A `RelayBinder` that records binds and releases.

    Ports in `taken` behave as if another process held them: `bind` returns None.
    """

    taken: set[int] = field(default_factory=set)
    bound: list[FakeRelay] = field(default_factory=list)
    released: list[RelaySocket] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    tcp_ports: set[int] = field(default_factory=set)

    def bind(
        self, family: int, port: int, dont_fragment: bool, index: int = 0
    ) -> RelaySocket | None:
        self.attempts.append(port)
        if port in self.taken:
            return None
        relay = FakeRelay(port, family, dont_fragment, index)
        self.bound.append(relay)
        return relay

    def bind_tcp(self, family: int, port: int, index: int = 0) -> RelaySocket | None:
        relay = self.bind(family, port, False, index)
        if relay is not None:
            self.tcp_ports.add(port)
        return relay

    def release(self, relay: RelaySocket) -> None:
        self.released.append(relay)

    @property
    def live_ports(self) -> set[int]:
        released = {id(r) for r in self.released}
        return {r.port for r in self.bound if id(r) not in released}


# -- results -------------------------------------------------------------------------------


@dataclass
class Result:
    """What one request produced: every action, and the decoded reply if there was one."""

    actions: list[Action]
    raw: bytes | None
    message: Message | None

    @property
    def code(self) -> int:
        """0 for a success response, else the ERROR-CODE (fails the test if no reply)."""
        assert self.message is not None, f"no reply among {self.actions!r}"
        if self.message.msg_class == MessageClass.SUCCESS:
            return 0
        assert self.message.msg_class == MessageClass.ERROR
        error = self.message.get(ErrorCode)
        assert error is not None, "error response without ERROR-CODE"
        return error.code

    @property
    def ok(self) -> bool:
        return self.code == 0

    def get(self, kind: type[A]) -> A | None:
        assert self.message is not None, f"no reply among {self.actions!r}"
        return self.message.get(kind)

    def need(self, kind: type[A]) -> A:
        attr = self.get(kind)
        assert attr is not None, f"{kind.__name__} missing from {self.message!r}"
        return attr

    def has(self, kind: type[Attribute]) -> bool:
        return self.get(kind) is not None

    @property
    def events(self) -> list[Action]:
        return [a for a in self.actions if not isinstance(a, Reply | SendToPeer)]

    def events_of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]


def replies(actions: Iterable[Action]) -> list[Reply]:
    return [a for a in actions if isinstance(a, Reply)]


# -- the client ----------------------------------------------------------------------------


class TurnTestClient:
    """One TURN client on one 5-tuple, holding its credentials and the server's nonce."""

    def __init__(
        self,
        server: TurnServer,
        username: str = "alice",
        password: str = "alicepw",  # noqa: S107 (a test user's password)
        *,
        realm: str = REALM,
        client: Address = CLIENT,
        server_address: Address = SERVER_ADDRESS,
        transport: str = "udp",
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.realm = realm
        self.five_tuple: FiveTuple = (transport, client, server_address)
        self.key = integrity.long_term_key(username, realm, password)
        self.nonce: str | None = None
        # RFC 8489 §9.2.3: PASSWORD-ALGORITHM to pick (None: plain MD5, no attributes), the
        # PASSWORD-ALGORITHMS to echo, and whether to send USERHASH instead of USERNAME.
        self.password_algorithm: int | None = None
        self.offered_algorithms: tuple[tuple[int, bytes], ...] = ()
        self.use_userhash = False
        self.last_sent = b""
        self.history: list[Result] = []

    @property
    def address(self) -> Address:
        return self.five_tuple[1]

    @property
    def signing_key(self) -> bytes:
        """The long-term key for the chosen PASSWORD-ALGORITHM (RFC 8489 §9.2.2)."""
        if self.password_algorithm is None:
            return self.key
        return integrity.long_term_key(
            self.username, self.realm, self.password, self.password_algorithm
        )

    def use_password_algorithm(self, algorithm: int) -> None:
        """Echo the PASSWORD-ALGORITHMS of the last 401/438 and pick `algorithm`."""
        offered = self.history[-1].need(PasswordAlgorithms).algorithms if self.history else ()
        self.offered_algorithms = offered
        self.password_algorithm = algorithm

    # -- raw exchanges -------------------------------------------------------------------

    def send_bytes(self, data: bytes, *, now: float = T0) -> list[Action]:
        self.last_sent = data
        return self.server.receive(data, self.five_tuple, now)

    def exchange(self, data: bytes, *, now: float = T0) -> Result:
        actions = self.send_bytes(data, now=now)
        found = replies(actions)
        assert len(found) <= 1, f"more than one reply: {actions!r}"
        raw = found[0].data if found else None
        result = Result(actions, raw, decode(raw) if raw is not None else None)
        self.history.append(result)
        return result

    def encode_request(
        self,
        method: int,
        attributes: Iterable[Attribute] = (),
        *,
        auth: bool = True,
        sha256: bool = False,
        fingerprint: bool = False,
        txid: bytes | None = None,
        key: bytes | None = None,
    ) -> bytes:
        attrs = list(attributes)
        if auth:
            assert self.nonce is not None, "no nonce yet: call fetch_nonce() first"
            who: Attribute = (
                UserHash(integrity.userhash(self.username, self.realm))
                if self.use_userhash
                else Username(self.username)
            )
            credentials: list[Attribute] = [who, Realm(self.realm), Nonce(self.nonce)]
            if self.password_algorithm is not None:
                credentials.append(PasswordAlgorithms(self.offered_algorithms))
                credentials.append(PasswordAlgorithm(self.password_algorithm))
            attrs = credentials + attrs
        message = Message(method, MessageClass.REQUEST, txid or new_transaction_id(), tuple(attrs))
        return encode(
            message,
            integrity_key=(key or self.signing_key) if auth else None,
            integrity_sha256=sha256,
            integrity_sha1=not sha256,
            fingerprint=fingerprint,
        )

    def fetch_nonce(self, *, now: float = T0, method: int = Method.ALLOCATE) -> Result:
        """Send a bare unauthenticated request and keep the NONCE from the 401."""
        result = self.exchange(self.encode_request(method, auth=False), now=now)
        assert result.code == 401, f"expected 401, got {result.message!r}"
        assert result.need(Realm).value == self.realm
        self.nonce = result.need(Nonce).value
        return result

    def request(
        self,
        method: int,
        attributes: Iterable[Attribute] = (),
        *,
        now: float = T0,
        sha256: bool = False,
        fingerprint: bool = False,
        txid: bytes | None = None,
        retry_stale: bool = True,
    ) -> Result:
        """An authenticated request; like a real client, retry once on 438 (RFC 8489 §9.2.5)."""
        attrs = list(attributes)
        if self.nonce is None:
            self.fetch_nonce(now=now)
        data = self.encode_request(method, attrs, sha256=sha256, fingerprint=fingerprint, txid=txid)
        result = self.exchange(data, now=now)
        if retry_stale and result.message is not None and result.code == 438:
            self.nonce = result.need(Nonce).value
            data = self.encode_request(method, attrs, sha256=sha256, fingerprint=fingerprint)
            result = self.exchange(data, now=now)
        return result

    # -- TURN methods --------------------------------------------------------------------

    def allocate(
        self,
        *,
        now: float = T0,
        lifetime: int | None = None,
        transport: int | None = TRANSPORT_UDP,
        even_port: bool | None = None,
        reservation_token: bytes | None = None,
        family: int | None = None,
        additional_family: int | None = None,
        dont_fragment: bool = False,
        extra: Iterable[Attribute] = (),
        sha256: bool = False,
        fingerprint: bool = False,
        txid: bytes | None = None,
    ) -> Result:
        """RFC 8656 §7.1; `even_port` is the R bit (None leaves EVEN-PORT out)."""
        attrs: list[Attribute] = []
        if transport is not None:
            attrs.append(RequestedTransport(transport))
        if lifetime is not None:
            attrs.append(Lifetime(lifetime))
        if even_port is not None:
            attrs.append(EvenPort(even_port))
        if reservation_token is not None:
            attrs.append(ReservationToken(reservation_token))
        if family is not None:
            attrs.append(RequestedAddressFamily(family))
        if additional_family is not None:
            attrs.append(AdditionalAddressFamily(additional_family))
        if dont_fragment:
            attrs.append(DontFragment())
        attrs.extend(extra)
        return self.request(
            Method.ALLOCATE, attrs, now=now, sha256=sha256, fingerprint=fingerprint, txid=txid
        )

    def refresh(
        self,
        lifetime: int | None = None,
        *,
        now: float = T0,
        family: int | None = None,
        sha256: bool = False,
    ) -> Result:
        """RFC 8656 §8.1."""
        attrs: list[Attribute] = []
        if lifetime is not None:
            attrs.append(Lifetime(lifetime))
        if family is not None:
            attrs.append(RequestedAddressFamily(family))
        return self.request(Method.REFRESH, attrs, now=now, sha256=sha256)

    def create_permission(self, *peers: Address, now: float = T0) -> Result:
        """RFC 8656 §10.1."""
        return self.request(
            Method.CREATE_PERMISSION, [XorPeerAddress(*peer) for peer in peers], now=now
        )

    def channel_bind(self, number: int, peer: Address, *, now: float = T0) -> Result:
        """RFC 8656 §12.1."""
        return self.request(
            Method.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(*peer)], now=now
        )

    def send_indication(self, peer: Address, data: bytes, *, now: float = T0) -> list[Action]:
        """RFC 8656 §11.1: indications are never authenticated."""
        message = Message(
            Method.SEND,
            MessageClass.INDICATION,
            new_transaction_id(),
            (XorPeerAddress(*peer), Data(data)),
        )
        return self.send_bytes(encode(message), now=now)

    def channel_data(
        self, number: int, data: bytes, *, now: float = T0, padding: bytes = b""
    ) -> list[Action]:
        """RFC 8656 §12.4: header (channel, length), data, and optional UDP padding."""
        return self.send_bytes(channel_header(number, len(data)) + data + padding, now=now)

    def binding(self, *, now: float = T0, fingerprint: bool = False) -> Result:
        """RFC 8489 §6: a plain Binding request, no credentials."""
        data = self.encode_request(Method.BINDING, auth=False, fingerprint=fingerprint)
        return self.exchange(data, now=now)


def frame_for_client(allocation: Allocation, peer: Address, data: bytes) -> bytes | None:
    """What the data plane sends the client of `allocation` for a datagram from `peer`
    to the relay of the peer's family (`ForwardingTable.from_peer`), or None."""
    relay = allocation.relay_for(peer[0])
    routed = allocation.table.from_peer(relay.key, peer, data, 0)
    return None if routed is None else routed[1]
