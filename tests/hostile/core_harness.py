"""Drive one `TurnServer` with a sequence of hostile steps and check its invariants.

The sans-IO engine behind `fuzz/fuzz_core.py` (atheris) and
`tests/core/test_fuzz_core.py` (hypothesis). A step is (5-tuple index, time step, op):

- `Raw(data)`: bytes from that 5-tuple, as a datagram or stream frame;
- `Signed(data)`: `data` decoded as a STUN message, then re-sent as a request from the
  5-tuple's user, with USERNAME, REALM, a valid NONCE and a correct MESSAGE-INTEGRITY
  (or whatever the op's `auth` mode asks for), so the fuzzer reaches the handlers behind
  authentication. Small CONNECTION-ID and RESERVATION-TOKEN values are replaced by ids the
  server handed out earlier, so ConnectionBind and reserved ports are reachable too;
- `Timer()`, `Closed()`, `PeerConnected(i, ok)`, `PeerArrived(i, peer)`,
  `PeerClosed(i)`, `Drain()`: the I/O layer's calls into the core.

After each step the harness checks that nothing was relayed to a peer the policy denies
or the allocation has no permission for, that no relay port or socket leaked, and that
quotas and per-allocation caps hold; at the end it lets every lifetime run out and checks
that everything went back. Any exception is a finding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyturn.config import Config
from pyturn.core.allocation import FiveTuple, PeerConnection
from pyturn.core.auth import rest_password, rest_username
from pyturn.core.bandwidth import BURST_NS, USER_BUCKET
from pyturn.core.node import LocalPortPool
from pyturn.core.server import (
    Action,
    ConnectToPeer,
    Reply,
    SendToClient,
    SendToPeer,
    TurnServer,
)
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    Address,
    Attribute,
    ConnectionId,
    Fingerprint,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    Realm,
    ReservationToken,
    UserHash,
    Username,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, decode, encode
from tests.core.turn_client import FakeBinder, TurnTestClient, make_config
from tests.hostile.addresses import PUBLIC_V4, all_denied_peers

REALM = "example.org"
RELAY_IP = "192.0.2.10"
RELAY_IP6 = "2001:db8::10"
SERVER: Address = ("192.0.2.10", 3478)
START = 1_800_000_000.0
MIN_PORT, MAX_PORT = 50000, 50015
FAR_FUTURE = 10_000_000.0

# Small limits, so that quotas, caps and port exhaustion are all reachable in a few steps.
HARNESS_CONFIG: dict[str, object] = {
    "realm": REALM,
    "auth": {"users": {"alice": "alicepw", "bob": "bobpw"}, "secrets": ["s3cret"]},
    "relay": {"min_port": MIN_PORT, "max_port": MAX_PORT, "address6": "::1"},
    "peers": {"allow": ["198.51.100.0/25"], "deny": ["1.1.1.0/24"]},
    "quotas": {
        "allocations_per_user": 5,
        "allocations_total": 12,
        "permissions_per_allocation": 4,
        "channels_per_allocation": 3,
    },
    "limits": {"unauthenticated_burst": 4, "unauthenticated_rate": 1.0},
    # Tight enough that hostile steps run into every limit.
    "bandwidth": {"per_allocation": 2000, "per_user": 3000, "total": 5000},
}

# (transport, client address, user): the 5-tuples the steps come from. Two share an IP,
# the TCP pair are a control and a data connection (RFC 6062), one client is IPv6.
REST_USER = rest_username(int(START + FAR_FUTURE * 2), "carol")
CLIENTS: tuple[tuple[str, Address, str, str], ...] = (
    ("udp", ("203.0.113.7", 40001), "alice", "alicepw"),
    ("udp", ("203.0.113.7", 40002), "alice", "alicepw"),
    ("udp", ("203.0.113.8", 40003), "bob", "bobpw"),
    ("tcp", ("203.0.113.9", 40004), "alice", "alicepw"),
    ("tcp", ("203.0.113.9", 40005), "alice", "alicepw"),
    ("udp", ("2001:db8:1::7", 40006), REST_USER, rest_password("s3cret", REST_USER)),
    ("tls", ("203.0.113.10", 40007), "bob", "bobpw"),
    ("udp", ("203.0.113.11", 40008), "mallory", "nope"),
)

# Peers worth naming: allowed public ones, the operator's allow and deny lists, and every
# spelling of an internal address (tests/hostile/addresses.py).
PEERS: tuple[str, ...] = (
    PUBLIC_V4,
    "198.51.100.7",  # allowed by peers.allow (inside TEST-NET-2, default-denied)
    "198.51.100.200",  # TEST-NET-2 outside the allow entry: denied
    "1.1.1.1",  # peers.deny
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    *all_denied_peers().values(),
)

AUTH_MODES = ("valid", "stale-nonce", "bad-key", "no-integrity", "userhash", "sha256")


class InvariantBroken(AssertionError):
    """The server did something it must never do; the message says what."""


# -- steps --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Raw:
    data: bytes


@dataclass(frozen=True, slots=True)
class Signed:
    """`data` re-sent as a request signed (or not) as `auth` says."""

    data: bytes
    auth: str = "valid"
    fingerprint: bool = False


@dataclass(frozen=True, slots=True)
class Timer:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    """The stream connection of this 5-tuple went away."""


@dataclass(frozen=True, slots=True)
class PeerConnected:
    index: int
    ok: bool


@dataclass(frozen=True, slots=True)
class PeerArrived:
    index: int
    peer: int


@dataclass(frozen=True, slots=True)
class PeerClosed:
    index: int


@dataclass(frozen=True, slots=True)
class Drain:
    pass


Op = Raw | Signed | Timer | Closed | PeerConnected | PeerArrived | PeerClosed | Drain


@dataclass(frozen=True, slots=True)
class Step:
    client: int
    dt: float
    op: Op


# -- the harness --------------------------------------------------------------------------


def harness_config() -> Config:
    return make_config(HARNESS_CONFIG)


_CONFIG: Config | None = None


def _shared_config() -> Config:
    global _CONFIG  # noqa: PLW0603 (parsed once: the fuzzer runs millions of inputs)
    if _CONFIG is None:
        _CONFIG = harness_config()
    return _CONFIG


@dataclass
class Harness:
    """One server, its fake binder, the clients' codecs, and what the server handed out."""

    config: Config = field(default_factory=_shared_config)
    now: float = START
    binder: FakeBinder = field(default_factory=FakeBinder)
    server: TurnServer = field(init=False)
    codecs: list[TurnTestClient] = field(init=False)
    tokens: list[bytes] = field(default_factory=list)
    connection_ids: list[int] = field(default_factory=list)
    replies: int = 0
    relayed: int = 0

    def __post_init__(self) -> None:
        self.server = TurnServer(
            self.config,
            self.binder,
            relay_ipv4=RELAY_IP,
            relay_ipv6=RELAY_IP6,
            nonce_secret=b"fuzz" * 8,
        )
        self.codecs = [
            TurnTestClient(
                self.server,
                user,
                password,
                realm=REALM,
                client=address,
                server_address=SERVER,
                transport=transport,
            )
            for transport, address, user, password in CLIENTS
        ]

    # -- running -----------------------------------------------------------------------

    def run(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self.step(step)
        self.finish()

    def step(self, step: Step) -> None:
        self.now += max(0.0, step.dt)
        codec = self.codecs[step.client % len(self.codecs)]
        five_tuple = codec.five_tuple
        op = step.op
        server = self.server
        actions: list[Action]
        if isinstance(op, Raw):
            actions = server.receive(op.data, five_tuple, self.now)
            self._check_replies(op.data, actions)
        elif isinstance(op, Signed):
            data = self._sign(codec, op)
            if data is None:
                return
            actions = server.receive(data, five_tuple, self.now)
            self._check_replies(data, actions)
        elif isinstance(op, Timer):
            actions = server.expire(self.now)
        elif isinstance(op, Closed):
            actions = server.connection_closed(five_tuple, self.now)
        elif isinstance(op, PeerConnected):
            actions = server.peer_connected(self._connection_id(op.index), op.ok, self.now)
        elif isinstance(op, PeerArrived):
            allocation = server.allocations.get(five_tuple)
            if allocation is None:
                return
            host = PEERS[op.peer % len(PEERS)]
            _, actions = server.peer_connection_arrived(allocation, (host, 50000), self.now)
        elif isinstance(op, PeerClosed):
            actions = server.peer_connection_closed(self._connection_id(op.index))
        else:
            server.draining = not server.draining
            actions = []
        self._observe(actions, five_tuple)
        self.check()

    def finish(self) -> None:
        """Let every lifetime run out: all ports, sockets and connections must come back."""
        self.now += FAR_FUTURE
        self._observe(self.server.expire(self.now), None)
        self.check()
        server = self.server
        if server.allocations:
            raise InvariantBroken(f"allocations outlived their lifetime: {server.allocations}")
        if server.peer_connections:
            raise InvariantBroken(f"peer connections left over: {server.peer_connections}")
        if server._reservations:
            raise InvariantBroken(f"reservations left over: {server._reservations}")
        if +server.node.held_here:
            raise InvariantBroken(f"quota counts left over: {server.node.held_here}")
        if self.live_relays():
            raise InvariantBroken(f"relay sockets never released: {self.live_relays()}")
        for family, pool in server.pools.items():
            if len(pool) != MAX_PORT - MIN_PORT + 1:
                raise InvariantBroken(f"family {family}: {len(pool)} ports back in the pool")

    # -- building requests ---------------------------------------------------------------

    def _sign(self, codec: TurnTestClient, op: Signed) -> bytes | None:
        try:
            template = decode(op.data)
        except DecodeError:
            return None
        attributes = [
            self._substitute(attr)
            for attr in template.attributes
            if not isinstance(
                attr,
                Username | Realm | Nonce | UserHash | MessageIntegrity,
            )
            and not isinstance(attr, MessageIntegritySha256 | Fingerprint)
        ]
        auth = op.auth if op.auth in AUTH_MODES else "valid"
        ip = codec.address[0]
        codec.nonce = self.server.auth.make_nonce(ip, self.now)
        if auth == "stale-nonce":
            codec.nonce = self.server.auth.make_nonce(ip, self.now - 10_000)
        codec.use_userhash = auth == "userhash"
        key = b"wrong key" if auth == "bad-key" else None
        return codec.encode_request(
            template.method,
            attributes,
            auth=auth != "no-integrity",
            sha256=auth == "sha256",
            fingerprint=op.fingerprint,
            txid=template.transaction_id,
            key=key,
        )

    def _substitute(self, attr: Attribute) -> Attribute:
        """Point small ids at ones the server really issued, so the fuzzer can use them."""
        if isinstance(attr, ConnectionId) and attr.value < 16 and self.connection_ids:
            return ConnectionId(self.connection_ids[attr.value % len(self.connection_ids)])
        if isinstance(attr, ReservationToken) and attr.value[:7] == bytes(7) and self.tokens:
            return ReservationToken(self.tokens[attr.value[7] % len(self.tokens)])
        return attr

    def _connection_id(self, index: int) -> int:
        ids = self.connection_ids
        return ids[index % len(ids)] if ids else index

    # -- checks ----------------------------------------------------------------------------

    def _check_replies(self, request: bytes, actions: Sequence[Action]) -> None:
        for action in actions:
            if not isinstance(action, Reply):
                continue
            self.replies += 1
            try:
                reply = decode(action.data)
            except DecodeError as exc:
                raise InvariantBroken(f"the server sent bytes it cannot decode: {exc}") from exc
            if reply.msg_class not in (MessageClass.SUCCESS, MessageClass.ERROR):
                raise InvariantBroken(f"a reply that is not a response: {reply!r}")
            if reply.transaction_id != request[8:20]:
                raise InvariantBroken("a reply with another transaction id")
            for token in reply.get_all(ReservationToken):
                self.tokens.append(token.value)

    def _observe(self, actions: Sequence[Action], five_tuple: FiveTuple | None) -> None:
        server = self.server
        for action in actions:
            if isinstance(action, SendToPeer):
                self.relayed += 1
                self._check_send(action, five_tuple)
            elif isinstance(action, ConnectToPeer):
                self._remember(action.connection)
                if not server.policy.is_allowed(action.connection.peer[0]):
                    raise InvariantBroken(f"Connect to a denied peer {action.connection.peer}")
            elif isinstance(action, SendToClient):
                for connection in (action.allocation.peer_connections or {}).values():
                    self._remember(connection)
        for connection in server.peer_connections.values():
            self._remember(connection)

    def _remember(self, connection: PeerConnection) -> None:
        if connection.connection_id not in self.connection_ids:
            self.connection_ids.append(connection.connection_id)
            del self.connection_ids[:-16]

    def _check_send(self, send: SendToPeer, five_tuple: FiveTuple | None) -> None:
        host = send.peer[0]
        if not self.server.policy.is_allowed(host):
            raise InvariantBroken(f"relayed to a denied peer {send.peer}")
        allocation = self.server.allocations.get(five_tuple) if five_tuple else None
        if allocation is None:
            raise InvariantBroken(f"relayed for a 5-tuple without an allocation: {five_tuple}")
        if host not in allocation.permissions:
            raise InvariantBroken(f"relayed to {send.peer} without a permission")
        if send.relay not in allocation.relays:
            raise InvariantBroken("relayed through another allocation's socket")
        family = FAMILY_IPV6 if ":" in host else FAMILY_IPV4
        if not allocation.serves_family(family):
            raise InvariantBroken(f"relayed to {send.peer} across address families")

    def live_relays(self) -> set[int]:
        released = {id(relay) for relay in self.binder.released}
        return {id(relay) for relay in self.binder.bound} - released

    def check(self) -> None:
        """Accounting that must hold after every step."""
        server = self.server
        quotas = self.config.quotas
        allocations = list(server.allocations.values())
        for five_tuple, allocation in server.allocations.items():
            if allocation.five_tuple != five_tuple or allocation.closed:
                raise InvariantBroken(f"allocation filed under the wrong 5-tuple: {five_tuple}")
        # Quotas (RFC 8656 §7.2 step 7). The server's count may include more than live
        # allocations (reservations, say) but never fewer; finish() checks it drains.
        per_user = Counter(a.quota_user for a in allocations)
        for user, count in per_user.items():
            if server.node.held_here[user] < count:
                raise InvariantBroken(
                    f"{user}: {count} allocations, counted {server.node.held_here}"
                )
            if quotas.allocations_per_user and count > quotas.allocations_per_user:
                raise InvariantBroken(f"{user} holds {count} allocations, over the quota")
        if quotas.allocations_total and len(allocations) > quotas.allocations_total:
            raise InvariantBroken(f"{len(allocations)} allocations over the total quota")
        # Bandwidth: a user's allocations share its bucket, no other user's; and nothing
        # relays more than its limit allows since it began, plus one burst and one packet.
        buckets = {a.quota_user: a.counters[USER_BUCKET] for a in allocations}
        for allocation in allocations:
            bucket = allocation.counters[USER_BUCKET]
            if bucket != buckets[allocation.quota_user] or bucket != server.node.user_bucket(
                allocation.quota_user
            ):
                raise InvariantBroken(f"{allocation.quota_user}: bandwidth bucket {bucket}")
            rate = self.config.bandwidth.per_allocation
            allowed = rate * (self.now - allocation.created_at + BURST_NS / 1e9) + 65_536
            if allocation.bytes_to_peer > allowed:
                raise InvariantBroken(
                    f"{allocation.bytes_to_peer} bytes relayed, {allowed} allowed"
                )
        if len(set(buckets.values())) != len(buckets) or 0 in buckets.values():
            raise InvariantBroken(f"users share bandwidth buckets: {buckets}")
        # Relay sockets: every bound, unreleased one belongs to exactly one allocation.
        owned = [id(relay) for a in allocations for relay in a.relays]
        if len(owned) != len(set(owned)) or set(owned) != self.live_relays():
            raise InvariantBroken("relay sockets leaked or shared between allocations")
        # Ports: free, in use or reserved, never two of these at once, none lost.
        for family, pool in server.pools.items():
            used = [
                relay.port
                for a in allocations
                for relay in a.relays
                if (FAMILY_IPV6 if relay is a.relay6 else a.family) == family
            ]
            reserved = [r.port for r in server._reservations.values() if r.family == family]
            assert isinstance(pool, LocalPortPool)  # the harness runs one process
            everything = list(pool.free) + used + reserved
            if len(everything) != len(set(everything)):
                raise InvariantBroken(f"family {family}: a port is counted twice")
            if set(everything) != set(range(MIN_PORT, MAX_PORT + 1)):
                raise InvariantBroken(f"family {family}: ports lost")
        # Per-allocation caps and the peer policy on what is installed.
        connections: dict[int, PeerConnection] = {}
        for allocation in allocations:
            if len(allocation.permissions) > quotas.permissions_per_allocation:
                raise InvariantBroken("permissions over the per-allocation cap")
            if len(allocation.channel_peers) > quotas.channels_per_allocation:
                raise InvariantBroken("channels over the per-allocation cap")
            peers = allocation.channel_peers
            headers = {p: int.from_bytes(h, "big") for p, h in allocation.channel_headers.items()}
            if {n: p for p, n in headers.items()} != peers or peers.keys() != set(
                allocation.channel_expiry
            ):
                raise InvariantBroken("channel tables disagree")
            for host in [*allocation.permissions, *(p[0] for p in peers.values())]:
                if not server.policy.is_allowed(host):
                    raise InvariantBroken(f"a permission or channel for denied {host}")
                if not allocation.serves_family(FAMILY_IPV6 if ":" in host else FAMILY_IPV4):
                    raise InvariantBroken(f"a permission for {host} across address families")
            for connection_id, connection in (allocation.peer_connections or {}).items():
                if connection.allocation is not allocation:
                    raise InvariantBroken("a peer connection filed under another allocation")
                connections[connection_id] = connection
        if connections != server.peer_connections:
            raise InvariantBroken("peer connections of closed allocations left over")


# -- a byte format for the fuzzer ------------------------------------------------------------

# Time steps a byte can pick: the interesting edges of nonce (600 s), permission (300 s),
# channel (600 s), ConnectionBind (30 s) and allocation (600-3600 s) lifetimes.
TIME_STEPS = (
    0.0,
    0.0,
    0.0,
    0.25,
    1.0,
    5.0,
    29.0,
    31.0,
    299.0,
    301.0,
    599.0,
    601.0,
    3599.0,
    3601.0,
    86400.0,
    1_000_000.0,
)
_HEADER = 5  # client, time step, kind, 16-bit payload length
MAX_STEPS = 128


def decode_steps(data: bytes) -> list[Step]:
    """Any bytes -> steps: a list of (client, time step, kind, length, payload) records.

    kind's low 3 bits pick the op: 0-1 Raw, 2-3 Signed (bits 3-5: auth mode, bit 6:
    FINGERPRINT), 4 Timer, 5 Closed, 6 a peer event (payload[0] % 4: connected ok,
    connect failed, arrived, closed), 7 Drain. A short tail is taken as it is.
    """
    steps: list[Step] = []
    pos = 0
    while pos < len(data) and len(steps) < MAX_STEPS:
        head = data[pos : pos + _HEADER].ljust(_HEADER, b"\0")
        size = int.from_bytes(head[3:5], "big")
        payload = data[pos + _HEADER : pos + _HEADER + size]
        pos += _HEADER + size
        client, dt, kind = head[0], TIME_STEPS[head[1] % len(TIME_STEPS)], head[2]
        steps.append(Step(client, dt, _op(kind, payload)))
    return steps


def _op(kind: int, payload: bytes) -> Op:
    low = kind & 7
    if low <= 1:
        return Raw(payload)
    if low <= 3:
        return Signed(payload, AUTH_MODES[(kind >> 3 & 7) % len(AUTH_MODES)], bool(kind & 0x40))
    if low == 4:
        return Timer()
    if low == 5:
        return Closed()
    if low == 7:
        return Drain()
    which, index, peer = (payload + b"\0\0\0")[:3]
    if which % 4 <= 1:
        return PeerConnected(index, which % 4 == 0)
    if which % 4 == 2:
        return PeerArrived(index, peer)
    return PeerClosed(index)


def encode_steps(steps: Iterable[Step]) -> bytes:
    """The inverse of `decode_steps` (time steps round down to `TIME_STEPS`), for seeds."""
    out = bytearray()
    for step in steps:
        op = step.op
        payload = b""
        if isinstance(op, Raw):
            kind, payload = 0, op.data
        elif isinstance(op, Signed):
            kind = 2 | AUTH_MODES.index(op.auth) << 3 | (0x40 if op.fingerprint else 0)
            payload = op.data
        elif isinstance(op, Timer):
            kind = 4
        elif isinstance(op, Closed):
            kind = 5
        elif isinstance(op, PeerConnected):
            kind, payload = 6, bytes((0 if op.ok else 1, op.index % 256, 0))
        elif isinstance(op, PeerArrived):
            kind, payload = 6, bytes((2, op.index % 256, op.peer % 256))
        elif isinstance(op, PeerClosed):
            kind, payload = 6, bytes((3, op.index % 256, 0))
        else:
            kind = 7
        dt = max(i for i, value in enumerate(TIME_STEPS) if value <= step.dt)
        out += bytes((step.client % 256, dt, kind)) + len(payload).to_bytes(2, "big") + payload
    return bytes(out)


def request_template(method: int, attributes: Sequence[Attribute], txid: bytes) -> bytes:
    """What `Signed` expects: any request carrying the attributes to sign."""
    return encode(Message(method, MessageClass.REQUEST, txid, tuple(attributes)))


__all__ = [
    "AUTH_MODES",
    "CLIENTS",
    "PEERS",
    "Closed",
    "Drain",
    "Harness",
    "InvariantBroken",
    "Op",
    "PeerArrived",
    "PeerClosed",
    "PeerConnected",
    "Raw",
    "Signed",
    "Step",
    "Timer",
    "decode_steps",
    "encode_steps",
    "request_template",
]
