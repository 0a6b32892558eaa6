"""The TURN server as a state machine: bytes and a clock value in, actions out.

`TurnServer.receive(data, five_tuple, now)` handles one datagram or stream frame from a
client and returns what to do: replies, datagrams for peers, and events for metrics and
logs. `expire(now)` ages allocations; `next_deadline()` says when to call it again.
Nothing here touches a socket or reads a clock.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pyturn.config import Config, split_host_port
from pyturn.core import errors
from pyturn.core.allocation import (
    BOUND,
    CONNECTING,
    CONNECTION_BIND_TIMEOUT,
    WAITING_FOR_BIND,
    Allocation,
    PeerConnection,
    PortPool,
    RelayBinder,
)
from pyturn.core.auth import SUPPORTED_ALGORITHMS, Authenticator, AuthFailure, Candidate
from pyturn.core.forwarding import FiveTuple, ForwardingTable, RelaySocket, SendToPeer
from pyturn.core.limits import SourceBudget
from pyturn.core.policy import PeerPolicy
from pyturn.core.randomness import RandomSource, SystemRandom
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    MAGIC_COOKIE,
    PASSWORD_ALGORITHM_MD5,
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    AdditionalAddressFamily,
    Address,
    AddressErrorCode,
    AlternateServer,
    Attribute,
    ChannelNumber,
    ConnectionId,
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
    Software,
    UnknownAttributes,
    UserHash,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    clear_address_cache,
    xor_address_value,
)
from pyturn.wire.channel_data import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    LEGACY_CHANNEL_MAX,
    is_channel_data,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import (
    Message,
    MessageClass,
    Method,
    decode,
    encode,
    encode_attributes,
    encode_tlv,
    finish,
    forget_decoded,
    is_stun,
    message_type,
    split_message_type,
)

_BINDING_REQUEST_TYPE = message_type(Method.BINDING, MessageClass.REQUEST).to_bytes(2, "big")
_BINDING_SUCCESS_TYPE = message_type(Method.BINDING, MessageClass.SUCCESS).to_bytes(2, "big")
_BINDING = Method.BINDING
_FINGERPRINT_HEADER = b"\x80\x28\x00\x04"
_SEND_INDICATION_TYPE = message_type(Method.SEND, MessageClass.INDICATION).to_bytes(2, "big")
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
# A Binding success's header up to the transaction ID, by message length: XOR-MAPPED-
# ADDRESS for IPv4 (12) or IPv6 (24), each with FINGERPRINT (+8) or without.
_BINDING_HEADS = {
    length: _BINDING_SUCCESS_TYPE + length.to_bytes(2, "big") + _COOKIE_BYTES
    for length in (12, 20, 24, 32)
}
_XOR_MAPPED_HEADERS = {
    size: XorMappedAddress.TYPE.to_bytes(2, "big") + size.to_bytes(2, "big") for size in (8, 20)
}
_MAPPED_CACHE = 4096
# Returned by a fast path that leaves the datagram to the full codec.
_SLOW_PATH = object()
RESERVATION_LIFETIME = 30.0  # RFC 8656 §7.2: a reserved port is held for about 30 s
_BIND_ATTEMPTS = 8
_ALGORITHMS_TLV = encode_tlv(PasswordAlgorithms(SUPPORTED_ALGORITHMS))


# -- actions and events ------------------------------------------------------------------


class Reply(NamedTuple):
    """Send `data` back to the client on the 5-tuple the request came from."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send `data` to the client of `allocation` on its control connection (RFC 6062)."""

    allocation: Allocation
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectToPeer:
    """Open a TCP connection from the relayed address to the peer, then call
    `TurnServer.peer_connected` with the outcome (RFC 6062 §5.2)."""

    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class JoinPeerConnection:
    """The client data connection this frame came on now carries `connection`'s bytes."""

    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class ClosePeerConnection:
    connection: PeerConnection


@dataclass(frozen=True, slots=True)
class StartRelaying:
    """Wiring for a new allocation: serve its relay sockets (an RFC 6062 relay starts
    accepting peers) and arm the timer for its first deadline."""

    allocation: Allocation


@dataclass(frozen=True, slots=True)
class StopRelaying:
    """A TCP allocation (RFC 6062) ended: close its peer connections. Its table entries
    are gone and its relay sockets released already; a UDP allocation needs no more."""

    allocation: Allocation


class RequestHandled(NamedTuple):
    """A request was answered (for metrics); a tuple, as there is one per request."""

    method: int
    code: int  # 0 for a success response
    client: Address


@dataclass(frozen=True, slots=True)
class AllocationCreated:
    allocation: Allocation


@dataclass(frozen=True, slots=True)
class AllocationRefreshed:
    allocation: Allocation
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationDeleted:
    allocation: Allocation
    reason: str  # "refresh", "expired", "connection closed", "shutdown"
    now: float


@dataclass(frozen=True, slots=True)
class AuthFailed:
    client: Address
    username: str | None
    reason: AuthFailure


@dataclass(frozen=True, slots=True)
class PeerDenied:
    client: Address
    username: str
    peer: Address


@dataclass(frozen=True, slots=True)
class QuotaRejected:
    client: Address
    username: str


@dataclass(frozen=True, slots=True)
class ReplySuppressed:
    """An unsigned answer (401/438) was dropped: its source used up its budget."""

    client: Address
    code: int


Event = (
    RequestHandled
    | AllocationCreated
    | AllocationRefreshed
    | AllocationDeleted
    | AuthFailed
    | PeerDenied
    | QuotaRejected
    | ReplySuppressed
)
Action = (
    Reply
    | SendToPeer
    | SendToClient
    | ConnectToPeer
    | JoinPeerConnection
    | ClosePeerConnection
    | StartRelaying
    | StopRelaying
    | Event
)


# A handler returns the success response's attributes, or None when the answer comes
# later (a Connect waits for the TCP handshake with the peer).
_Handler = Callable[[Message, FiveTuple, Candidate, float], list[Attribute] | None]


@dataclass(slots=True)
class _Reservation:
    port: int
    family: int
    expires_at: float
    # A reserved port counts against its user's quota until used or expired.
    quota_user: str


class TurnServer:
    """Every allocation of one process, and the request handlers of RFC 8656."""

    def __init__(
        self,
        config: Config,
        binder: RelayBinder,
        *,
        relay_ipv4: str | None = None,
        relay_ipv6: str | None = None,
        nonce_secret: bytes | None = None,
        random: RandomSource | None = None,
        table: ForwardingTable | None = None,
    ) -> None:
        self.binder = binder
        # Ports, CONNECTION-IDs, transaction IDs and the secret: one source, seedable.
        self.random = random or SystemRandom()
        self._nonce_secret = nonce_secret or self.random.token(32)
        # What the data plane forwards (the I/O layer may make it first, to hand it to
        # its relay sockets); the allocations' methods keep it in step.
        self.table = table if table is not None else ForwardingTable(self.random)
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.draining = False
        self._per_user: Counter[str] = Counter()
        self._reservations: dict[bytes, _Reservation] = {}
        self._timers: list[tuple[float, int, Allocation]] = []
        self._seq = itertools.count()
        self._events: list[Action] = []
        # Encoded XOR-MAPPED-ADDRESS attributes of IPv4 clients (see _answer_binding).
        self._mapped_v4: dict[Address, bytes] = {}
        self._relay_ipv4 = relay_ipv4
        self._relay_ipv6 = relay_ipv6
        self.reconfigure(config)
        self.pools = {
            FAMILY_IPV4: PortPool(config.relay.min_port, config.relay.max_port, self.random),
            FAMILY_IPV6: PortPool(config.relay.min_port, config.relay.max_port, self.random),
        }
        self._handlers: dict[int, _Handler] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
            Method.CONNECT: self._connect,
            Method.CONNECTION_BIND: self._connection_bind,
        }
        self.peer_connections: dict[int, PeerConnection] = {}
        # Allocations deleted since the last `compact`, for the I/O layer to decide when.
        self.ended_since_compact = 0

    def reconfigure(self, config: Config) -> None:
        """Take new users, secrets, policy, quotas and lifetimes; allocations stay."""
        self.config = config
        self.auth = Authenticator(
            config.realm,
            config.auth.users,
            config.auth.secrets,
            nonce_lifetime=config.auth.nonce_lifetime,
            nonce_secret=self._nonce_secret,
        )
        self.policy = PeerPolicy(config.peers.allow, config.peers.deny)
        limits = config.limits
        self.unsigned_budget = SourceBudget(
            limits.unauthenticated_burst, limits.unauthenticated_rate
        )
        # A tightened policy applies at once: nothing may be sent to a peer it now denies.
        for allocation in self.allocations.values():
            allocation.forget_peers(lambda ip: not self.policy.is_allowed(ip))
        relay = config.relay
        self.relay_ips: dict[int, str] = {}
        v4 = relay.external_address or self._relay_ipv4
        if v4:
            self.relay_ips[FAMILY_IPV4] = v4
        v6 = relay.external_address6 or self._relay_ipv6
        if v6 and relay.address6:
            self.relay_ips[FAMILY_IPV6] = v6
        self._software = (Software(config.software),) if config.software else ()
        # The constant attributes of replies, encoded once.
        self._software_tlv = tuple(encode_tlv(a) for a in self._software)
        self._challenge_realm = encode_tlv(Realm(config.realm))

    # -- entry points --------------------------------------------------------------------

    def receive(self, data: bytes, five_tuple: FiveTuple, now: float) -> list[Action]:
        """Handle one datagram (UDP) or one frame (TCP/TLS) from a client."""
        kind = data[:2]
        # Binding first: it is what most clients send most (a Binding request is never
        # ChannelData, whose first byte is 0x40-0x7F, so the order changes no outcome).
        if kind == _BINDING_REQUEST_TYPE:
            answer = self._answer_binding(data, five_tuple[1])
            if answer is not None:
                return answer
        elif is_channel_data(data):
            send = self.table.from_client(data, five_tuple)
            return [send] if send is not None else []
        elif kind == _SEND_INDICATION_TYPE:
            fast = self._route_send_indication(data, five_tuple)
            if fast is not _SLOW_PATH:
                return [fast] if isinstance(fast, SendToPeer) else []
        if not is_stun(data):
            return []
        try:
            msg = decode(data)
        except DecodeError:
            return self._malformed(data, five_tuple)
        # RFC 8489 §14.7: a wrong FINGERPRINT means it is not STUN at all: drop it.
        if msg.fingerprint_offset is not None and not integrity.verify_fingerprint(msg):
            return []
        self._events = []
        out = self._events
        if msg.msg_class == MessageClass.REQUEST:
            reply = self._request(msg, five_tuple, now)
            if reply is not None:
                out.append(reply)
        elif msg.msg_class == MessageClass.INDICATION and msg.method == Method.SEND:
            send = self._send_indication(msg, five_tuple)
            if send is not None:
                out.append(send)
        self._events = []
        return out

    def _answer_binding(self, data: bytes, client: Address) -> list[Action] | None:
        """RFC 8489 §7.3: a Binding request with no attributes but FINGERPRINT, answered
        without a decode; anything else (or SOFTWARE to send) returns None for the codec."""
        end = len(data)
        if (
            (end != 20 and end != 28)  # noqa: PLR1714 (two compares beat a tuple lookup)
            or data[4:8] != _COOKIE_BYTES
            or data[2]
            or data[3] != end - 20
            or self._software
        ):
            return None
        fingerprint = end == 28
        if fingerprint and (
            data[20:24] != _FINGERPRINT_HEADER
            or int.from_bytes(data[24:28], "big")
            != integrity.crc(data[:2] + b"\x00\x08" + data[4:20])
        ):
            return None  # let the codec drop it
        txid = data[8:20]
        # An IPv4 XOR-MAPPED-ADDRESS does not depend on the transaction ID: a client that
        # asks again (keepalives, ICE checks) gets the bytes made the first time.
        mapped = self._mapped_v4.get(client)
        if mapped is None:
            value = xor_address_value(client[0], client[1], txid)
            mapped = _XOR_MAPPED_HEADERS[len(value)] + value
            if value[1] == FAMILY_IPV4:
                if len(self._mapped_v4) >= _MAPPED_CACHE:
                    self._mapped_v4.clear()
                self._mapped_v4[client] = mapped
        if fingerprint:
            # The CRC covers everything before the FINGERPRINT attribute (RFC 8489 §14.7).
            response = b"".join((_BINDING_HEADS[len(mapped) + 8], txid, mapped))
            response += _FINGERPRINT_HEADER + integrity.crc(response).to_bytes(4, "big")
        else:
            response = b"".join((_BINDING_HEADS[len(mapped)], txid, mapped))
        return [Reply(response), RequestHandled(_BINDING, 0, client)]

    def _route_send_indication(
        self, data: bytes, five_tuple: FiveTuple
    ) -> SendToPeer | object | None:
        """RFC 8656 §11.2 for the common shape of a Send indication, without a decode.

        Handles XOR-PEER-ADDRESS (IPv4), DATA and DONT-FRAGMENT; anything else (IPv6,
        FINGERPRINT, unknown attributes, odd lengths) returns `_SLOW_PATH` so the full
        codec decides. The rules are those of `_send_indication`.
        """
        allocation = self.allocations.get(five_tuple)
        if allocation is None or allocation.is_tcp:
            return None
        end = len(data)
        if end < 20 or data[4:8] != _COOKIE_BYTES or 20 + ((data[2] << 8) | data[3]) != end:
            return _SLOW_PATH
        pos = 20
        peer: Address | None = None
        payload = None
        while pos < end:
            if pos + 4 > end:
                return _SLOW_PATH
            attr_type = (data[pos] << 8) | data[pos + 1]
            size = (data[pos + 2] << 8) | data[pos + 3]
            value_end = pos + 4 + size
            if value_end > end:
                return _SLOW_PATH
            if attr_type == XorPeerAddress.TYPE:
                if peer is None:
                    if size != 8 or data[pos + 4] != 0 or data[pos + 5] != FAMILY_IPV4:
                        return _SLOW_PATH
                    port = ((data[pos + 6] << 8) | data[pos + 7]) ^ 0x2112
                    ip = int.from_bytes(data[pos + 8 : pos + 12], "big") ^ 0x2112A442
                    host = f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"
                    peer = (host, port)
            elif attr_type == Data.TYPE:
                if payload is None:
                    payload = data[pos + 4 : value_end]
            elif attr_type != DontFragment.TYPE:
                return _SLOW_PATH
            pos = value_end + (-size % 4)
        if peer is None or payload is None:
            return None
        return self.table.send_to(five_tuple, peer, payload)

    def expire(self, now: float) -> list[Action]:
        """Age permissions, channels, reservations and allocations up to `now`."""
        out: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, allocation = heapq.heappop(timers)
            if allocation.closed or at != allocation.scheduled_at:
                continue
            allocation.scheduled_at = float("inf")
            if allocation.expires_at <= now:
                out += self._delete(allocation, "expired", now)
                continue
            allocation.expire(now)
            out += self._expire_peer_connections(allocation, now)
            self._schedule(allocation)
        for token in [t for t, r in self._reservations.items() if r.expires_at <= now]:
            reservation = self._reservations.pop(token)
            self.pools[reservation.family].put(reservation.port)
            self._uncount(reservation.quota_user)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [t[0] for t in self._timers[:1]]
        deadlines += [r.expires_at for r in self._reservations.values()]
        return min(deadlines, default=None)

    def connection_closed(self, five_tuple: FiveTuple, now: float) -> list[Action]:
        """RFC 8656 §3.1: over TCP/TLS, an allocation ends with its connection."""
        allocation = self.allocations.get(five_tuple)
        return self._delete(allocation, "connection closed", now) if allocation else []

    def close_all(self, now: float) -> list[Action]:
        out: list[Action] = []
        for allocation in list(self.allocations.values()):
            out += self._delete(allocation, "shutdown", now)
        return out

    # -- plumbing ------------------------------------------------------------------------

    def _schedule(self, allocation: Allocation) -> None:
        at = allocation.next_deadline()
        if at < allocation.scheduled_at:
            allocation.scheduled_at = at
            heapq.heappush(self._timers, (at, next(self._seq), allocation))

    def compact(self, now: float) -> None:
        """Let go of what ended allocations leave behind: their stale timer entries (each
        keeps a whole allocation alive until its old deadline), hash tables sized for the
        peak, refilled per-source budgets and cached addresses. O(live allocations), for
        the I/O layer to call once many allocations have ended, never per packet."""
        self.ended_since_compact = 0
        self._drop_stale_timers()
        # Dicts never shrink as entries go; a copy is sized for what is left.
        self.allocations = dict(self.allocations)
        self.peer_connections = dict(self.peer_connections)
        self.table.compact()
        self._per_user = Counter(self._per_user)
        self.unsigned_budget.prune(now)
        # Caches by client, nonce or key: cheap to fill again, but their entries of gone
        # clients, spread over the heap, would keep its pages from the OS.
        clear_address_cache()
        forget_decoded()
        integrity.forget_templates()
        self.auth.forget_cached()
        self._mapped_v4 = {}

    def _drop_stale_timers(self) -> None:
        """Rebuild the timer heap without the entries of closed allocations."""
        self._timers = [t for t in self._timers if not t[2].closed]
        heapq.heapify(self._timers)

    def _delete(self, allocation: Allocation, reason: str, now: float) -> list[Action]:
        allocation.close()  # its routes leave the table before its sockets close
        self.allocations.pop(allocation.five_tuple, None)
        self.ended_since_compact += 1
        # A deleted allocation's timer entry would stay until its old deadline (up to
        # max_lifetime): under churn, drop the stale entries once they dominate.
        if len(self._timers) > 2 * len(self.allocations) + 64:
            self._drop_stale_timers()
        self._uncount(allocation.quota_user)
        self.binder.release(allocation.relay)
        self.pools[allocation.family].put(allocation.relay.port)
        if allocation.relay6 is not None:
            self.binder.release(allocation.relay6)
            self.pools[FAMILY_IPV6].put(allocation.relay6.port)
        for connection_id in allocation.peer_connections or ():
            self.peer_connections.pop(connection_id, None)
        deleted = AllocationDeleted(allocation, reason, now)
        # A UDP allocation leaves nothing behind in the I/O layer: its sockets are released.
        return [deleted, StopRelaying(allocation)] if allocation.is_tcp else [deleted]

    def _uncount(self, quota_user: str) -> None:
        self._per_user[quota_user] -= 1
        if self._per_user[quota_user] <= 0:
            del self._per_user[quota_user]

    def _malformed(self, data: bytes, five_tuple: FiveTuple) -> list[Action]:
        """RFC 8489 §6.3: a malformed request gets 400 if we can tell it was a request."""
        if len(data) < 20 or data[0] & 0x01 or data[1] & 0x10:  # not the request class
            return []
        txid = bytes(data[8:20])
        method, _ = split_message_type(int.from_bytes(data[0:2], "big"))
        response = Message(method, MessageClass.ERROR, txid, (ErrorCode(400, "Bad Request"),))
        return [Reply(encode(response)), RequestHandled(method, 400, five_tuple[1])]

    def _request(self, msg: Message, five_tuple: FiveTuple, now: float) -> Reply | None:
        client = five_tuple[1]
        fingerprint = msg.fingerprint_offset is not None
        if msg.method == Method.BINDING:
            unknown = msg.unknown_comprehension_required()
            if unknown:
                exc = errors.UnknownAttributesError(attributes=[UnknownAttributes(unknown)])
                return self._error(msg, exc, None, five_tuple, now)
            return self._reply(msg, client, [XorMappedAddress(*client)], fingerprint=fingerprint)
        # A retransmitted Allocate gets the very same answer (RFC 8656 §7.2 step 2).
        existing = self.allocations.get(five_tuple)
        if (
            msg.method == Method.ALLOCATE
            and existing is not None
            and existing.allocate_transaction == msg.transaction_id
        ):
            self._events.append(RequestHandled(msg.method, 0, client))
            return Reply(existing.allocate_response)
        candidate: Candidate | None = None
        try:
            handler = self._handlers.get(msg.method)
            if handler is None:
                raise errors.BadRequest("method not supported over this transport")
            candidate = self._authenticate(msg, five_tuple, now)
            # RFC 8489 §6.3: unknown attributes are looked at once the request is
            # authenticated, so the 420 is signed and probing needs credentials.
            unknown = msg.unknown_comprehension_required()
            if unknown:
                raise errors.UnknownAttributesError(attributes=[UnknownAttributes(unknown)])
            # RFC 8656 §5: only the allocation's own credentials may touch it; a second
            # Allocate on the 5-tuple is a 437 whoever sends it (§7.2 step 2).
            if (
                existing is not None
                and msg.method != Method.ALLOCATE
                and existing.username != candidate.username
            ):
                raise errors.WrongCredentials
            attributes = handler(msg, five_tuple, candidate, now)
        except errors.StunErrorResponse as exc:
            if (
                exc.code in (401, 438)
                and five_tuple[0] == "udp"  # a TCP/TLS handshake already proved the source
                and not self.unsigned_budget.allow(client[0], now)
            ):
                self._events.append(ReplySuppressed(client, exc.code))
                return None
            return self._error(msg, exc, candidate, five_tuple, now)
        if attributes is None:
            return None
        if msg.method == Method.ALLOCATE:
            allocation = self.allocations[five_tuple]
            reply = self._reply(
                msg,
                client,
                attributes,
                key=candidate.key,
                sha256=allocation.use_sha256,
                fingerprint=fingerprint,
            )
            allocation.allocate_response = reply.data
            return reply
        sha256 = msg.integrity_sha256_offset is not None
        return self._reply(
            msg, client, attributes, key=candidate.key, sha256=sha256, fingerprint=fingerprint
        )

    def _reply(
        self,
        msg: Message,
        client: Address,
        attributes: Sequence[Attribute | bytes],
        *,
        code: int = 0,
        key: bytes | None = None,
        sha256: bool = False,
        fingerprint: bool = False,
    ) -> Reply:
        msg_class = MessageClass.ERROR if code else MessageClass.SUCCESS
        if self._software_tlv:
            attributes = [*attributes, *self._software_tlv]
        self._events.append(RequestHandled(msg.method, code, client))
        txid = msg.transaction_id
        return Reply(
            finish(
                message_type(msg.method, msg_class),
                txid,
                encode_attributes(attributes, txid),
                integrity_key=key,
                integrity_sha256=sha256,
                integrity_sha1=not sha256,
                fingerprint=fingerprint,
            )
        )

    def _error(
        self,
        msg: Message,
        exc: errors.StunErrorResponse,
        candidate: Candidate | None,
        five_tuple: FiveTuple,
        now: float,
    ) -> Reply:
        # The detail tells a developer which rule was broken; only authenticated clients
        # get it, so an unauthenticated (possibly spoofed) request earns a small reply.
        reason = f"{exc.reason}: {exc.detail}" if exc.detail and candidate else exc.reason
        attributes: list[Attribute | bytes] = [ErrorCode(exc.code, reason), *exc.attributes]
        if exc.code in (401, 438):
            attributes += [
                self._challenge_realm,
                Nonce(self.auth.make_nonce(five_tuple[1][0], now)),
                _ALGORITHMS_TLV,
            ]
        key = candidate.key if candidate is not None and exc.signed else None
        sha256 = msg.integrity_sha256_offset is not None
        fingerprint = msg.fingerprint_offset is not None
        return self._reply(
            msg,
            five_tuple[1],
            attributes,
            code=exc.code,
            key=key,
            sha256=sha256,
            fingerprint=fingerprint,
        )

    # -- authentication (RFC 8489 §9.2.4) ------------------------------------------------

    def _authenticate(self, msg: Message, five_tuple: FiveTuple, now: float) -> Candidate:
        client = five_tuple[1]
        has_mi = msg.integrity_offset is not None or msg.integrity_sha256_offset is not None
        if not has_mi:
            self._events.append(AuthFailed(client, None, AuthFailure.NO_CREDENTIALS))
            raise errors.Unauthorized
        username_attr = msg.get(Username)
        user_hash = msg.get(UserHash)
        realm = msg.get(Realm)
        nonce = msg.get(Nonce)
        if (username_attr is None and user_hash is None) or realm is None or nonce is None:
            raise errors.BadRequest("MESSAGE-INTEGRITY without USERNAME, REALM and NONCE")
        name = username_attr.value if username_attr is not None else None
        if not self.auth.nonce_is_valid(nonce.value, client[0], now):
            self._events.append(AuthFailed(client, name, AuthFailure.STALE_NONCE))
            raise errors.StaleNonce
        algorithm = self._password_algorithm(msg)
        if name is None and user_hash is not None:
            name = self.auth.username_for_userhash(user_hash.value)
            if name is None:
                self._events.append(AuthFailed(client, None, AuthFailure.UNKNOWN_USER))
                raise errors.Unauthorized
        assert name is not None
        found = self.auth.candidates(name, now, algorithm)
        if isinstance(found, AuthFailure):
            self._events.append(AuthFailed(client, name, found))
            raise errors.Unauthorized
        if realm.value != self.config.realm:
            self._events.append(AuthFailed(client, name, AuthFailure.BAD_PASSWORD))
            raise errors.Unauthorized
        sha256 = msg.integrity_sha256_offset is not None
        for candidate in found:
            if (
                integrity.verify_integrity_sha256(msg, candidate.key)
                if sha256
                else integrity.verify_integrity(msg, candidate.key)
            ):
                return candidate
        self._events.append(AuthFailed(client, name, AuthFailure.BAD_PASSWORD))
        raise errors.Unauthorized

    def _password_algorithm(self, msg: Message) -> int:
        """RFC 8489 §9.2.4: the client echoes our PASSWORD-ALGORITHMS and picks one."""
        offered = msg.get(PasswordAlgorithms)
        chosen = msg.get(PasswordAlgorithm)
        if offered is None and chosen is None:
            return PASSWORD_ALGORITHM_MD5
        if offered is None or chosen is None or offered.algorithms != SUPPORTED_ALGORITHMS:
            raise errors.BadRequest("PASSWORD-ALGORITHMS does not match what we offered")
        if (chosen.algorithm, chosen.parameters) not in SUPPORTED_ALGORITHMS:
            raise errors.BadRequest("unsupported PASSWORD-ALGORITHM")
        return chosen.algorithm

    # -- Allocate (RFC 8656 §7.2) --------------------------------------------------------

    def _lifetime(self, msg: Message, *, zero_deletes: bool) -> int:
        """RFC 8656 §7.2/§7.3: at least the default, at most the maximum; 0 on Refresh."""
        limits = self.config.allocations
        requested = msg.get(Lifetime)
        if requested is None:
            return limits.default_lifetime
        if requested.value == 0 and zero_deletes:
            return 0
        return max(min(requested.value, limits.max_lifetime), limits.default_lifetime)

    def _allocate(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        client = five_tuple[1]
        # Step 2: one allocation per 5-tuple (retransmissions were answered earlier).
        if five_tuple in self.allocations:
            raise errors.AllocationMismatch
        # Step 3: UDP relaying, or TCP relaying (RFC 6062) for clients on TCP/TLS.
        transport = msg.get(RequestedTransport)
        if transport is None:
            raise errors.BadRequest("REQUESTED-TRANSPORT missing")
        if transport.protocol not in (TRANSPORT_UDP, TRANSPORT_TCP):
            raise errors.UnsupportedTransport
        token = msg.get(ReservationToken)
        even_port = msg.get(EvenPort)
        requested_family = msg.get(RequestedAddressFamily)
        additional_family = msg.get(AdditionalAddressFamily)
        tcp = transport.protocol == TRANSPORT_TCP
        if tcp:
            # RFC 6062 §5.1: TCP relaying needs a TCP control connection, and the
            # UDP-only options make no sense for it.
            if five_tuple[0] == "udp":
                raise errors.BadRequest("TCP relaying needs a TCP or TLS connection")
            if (
                token is not None
                or even_port is not None
                or additional_family is not None
                or msg.get(DontFragment) is not None
            ):
                raise errors.BadRequest("option not allowed with REQUESTED-TRANSPORT TCP")
        # Step 5/6: a reservation token excludes EVEN-PORT and address family choices.
        if token is not None and (even_port is not None or requested_family is not None):
            raise errors.BadRequest("RESERVATION-TOKEN with EVEN-PORT or family")
        if additional_family is not None and (
            requested_family is not None
            or token is not None
            or (even_port is not None and even_port.reserve)
        ):
            # RFC 8656 §7.2 steps 5 and 8: a dual-stack allocation cannot reserve a port.
            raise errors.BadRequest(
                "ADDITIONAL-ADDRESS-FAMILY with REQUESTED-ADDRESS-FAMILY or a reservation"
            )
        family = FAMILY_IPV4
        if token is not None:
            # RFC 8656 §7.2 step 5: the token alone names the reserved port, so its
            # family too (REQUESTED-ADDRESS-FAMILY may not come with it).
            reserved = self._read_token(token.value, now)
            if reserved is None:
                raise errors.InsufficientCapacity("unknown or expired RESERVATION-TOKEN")
            family = reserved[1]
        if requested_family is not None:
            family = requested_family.family
            if family not in (FAMILY_IPV4, FAMILY_IPV6) or family not in self.relay_ips:
                raise errors.AddressFamilyNotSupported
        extra: list[Attribute] = []
        dual_stack = False
        if additional_family is not None:
            if additional_family.family != FAMILY_IPV6:
                raise errors.BadRequest("ADDITIONAL-ADDRESS-FAMILY must ask for IPv6")
            dual_stack = FAMILY_IPV6 in self.relay_ips
            if not dual_stack:
                # RFC 8656 §7.2: without an IPv6 relay, allocate IPv4 alone and say why.
                extra.append(AddressErrorCode(FAMILY_IPV6, 440, "Address Family not Supported"))
        if family not in self.relay_ips:
            raise errors.AddressFamilyNotSupported
        # Step 7: quotas.
        quotas = self.config.quotas
        if (
            quotas.allocations_per_user
            and self._per_user[candidate.quota_user] >= quotas.allocations_per_user
        ) or (
            quotas.allocations_total
            and len(self.allocations) + len(self._reservations) >= quotas.allocations_total
        ):
            self._events.append(QuotaRejected(client, candidate.username))
            raise errors.AllocationQuotaReached
        # Step 8: a node taken out of rotation sends new clients elsewhere.
        if self.draining:
            alternate = self.config.alternate_server
            if alternate:
                host, port = split_host_port(alternate)
                raise errors.TryAlternate(attributes=[AlternateServer(host, port)])
            raise errors.InsufficientCapacity("server is draining")
        dont_fragment = msg.get(DontFragment) is not None
        if tcp:
            relay, reservation = self._bind_tcp_relay(family), None
        else:
            relay, reservation = self._bind_relay(
                family, token, even_port, dont_fragment, now, quota_user=candidate.quota_user
            )
        relay6: RelaySocket | None = None
        relayed6: Address | None = None
        if dual_stack:
            try:
                relay6, _ = self._bind_relay(
                    FAMILY_IPV6, None, None, dont_fragment, now, quota_user=candidate.quota_user
                )
            except errors.InsufficientCapacity:
                extra.append(AddressErrorCode(FAMILY_IPV6, 508, "Insufficient Capacity"))
            else:
                relayed6 = (self.relay_ips[FAMILY_IPV6], relay6.port)
        lifetime = self._lifetime(msg, zero_deletes=False)
        relayed = (self.relay_ips[family], relay.port)
        allocation = Allocation(
            five_tuple=five_tuple,
            username=candidate.username,
            quota_user=candidate.quota_user,
            key=candidate.key,
            relay=relay,
            relayed_address=relayed,
            family=family,
            created_at=now,
            expires_at=now + lifetime,
            allocate_transaction=msg.transaction_id,
            allocate_response=b"",
            table=self.table,
            use_sha256=msg.integrity_sha256_offset is not None,
            relay6=relay6,
            relayed_address6=relayed6,
            peer_connections={} if tcp else None,
        )
        self.allocations[five_tuple] = allocation
        self._per_user[candidate.quota_user] += 1
        self._schedule(allocation)
        self._events.append(AllocationCreated(allocation))
        self._events.append(StartRelaying(allocation))
        attributes: list[Attribute] = [XorRelayedAddress(*relayed)]
        if relayed6 is not None:
            attributes.append(XorRelayedAddress(*relayed6))
        attributes += [
            Lifetime(lifetime),
            XorMappedAddress(*client),
        ]
        if reservation is not None:
            attributes.append(ReservationToken(reservation))
        return attributes + extra

    def _bind_relay(
        self,
        family: int,
        token: ReservationToken | None,
        even_port: EvenPort | None,
        dont_fragment: bool,
        now: float,
        *,
        quota_user: str,
    ) -> tuple[RelaySocket, bytes | None]:
        pool = self.pools[family]
        if token is not None:
            reserved = self._read_token(token.value, now)
            if reserved is None or reserved[1] != family:
                raise errors.InsufficientCapacity("unknown or expired RESERVATION-TOKEN")
            held = self._reservations.pop(token.value, None)
            if held is not None:
                self._uncount(held.quota_user)
            elif pool.min_port <= reserved[0] <= pool.max_port:
                # Our own port, no longer held for this token: it was used already.
                raise errors.InsufficientCapacity("RESERVATION-TOKEN already used")
            relay = self.binder.bind(family, reserved[0], dont_fragment)
            if relay is None:
                raise errors.InsufficientCapacity("reserved port could not be bound")
            return relay, None
        for _ in range(_BIND_ATTEMPTS):
            if even_port is None:
                port = pool.take_random()
            else:
                port = pool.random_even_pair() if even_port.reserve else pool.random_even()
                if port is not None:
                    pool.take(port)
            if port is None:
                break
            relay = self.binder.bind(family, port, dont_fragment)
            if relay is None:
                # Someone outside pyturn holds it: try another, but keep it in the pool
                # because that process may let it go.
                pool.put(port)
                continue
            if even_port is not None and even_port.reserve:
                pool.take(port + 1)
                reservation = self._make_token(port + 1, family, now)
                self._reservations[reservation] = _Reservation(
                    port + 1, family, now + RESERVATION_LIFETIME, quota_user
                )
                self._per_user[quota_user] += 1
                return relay, reservation
            return relay, None
        raise errors.InsufficientCapacity("no relay port free")

    def _make_token(self, port: int, family: int, now: float) -> bytes:
        """A RESERVATION-TOKEN any worker process can redeem (they share the secret).

        Port, then 15 bits of the expiry time and the family bit, then a 4-byte MAC: a
        client on another 5-tuple may land on another worker than the one that reserved.
        """
        expiry = (int(now + RESERVATION_LIFETIME) & 0x7FFF) | (
            0x8000 if family == FAMILY_IPV6 else 0
        )
        body = port.to_bytes(2, "big") + expiry.to_bytes(2, "big")
        return body + self._token_mac(body)

    def _token_mac(self, body: bytes) -> bytes:
        return hmac.new(self._nonce_secret, b"reservation" + body, hashlib.sha256).digest()[:4]

    def _read_token(self, token: bytes, now: float) -> tuple[int, int] | None:
        """(port, family) of a valid, unexpired token of ours, else None."""
        body, mac = token[:4], token[4:]
        if not hmac.compare_digest(mac, self._token_mac(body)):
            return None
        word = int.from_bytes(body[2:4], "big")
        if ((word & 0x7FFF) - int(now)) & 0x7FFF > RESERVATION_LIFETIME:
            return None  # past its expiry (the difference wraps around)
        family = FAMILY_IPV6 if word & 0x8000 else FAMILY_IPV4
        return int.from_bytes(body[:2], "big"), family

    def _bind_tcp_relay(self, family: int) -> RelaySocket:
        pool = self.pools[family]
        for _ in range(_BIND_ATTEMPTS):
            port = pool.take_random()
            if port is None:
                break
            relay = self.binder.bind_tcp(family, port)
            if relay is not None:
                return relay
            pool.put(port)
        raise errors.InsufficientCapacity("no relay port free")

    # -- Refresh (RFC 8656 §7.3) ---------------------------------------------------------

    def _refresh(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._allocation(five_tuple)
        requested_family = msg.get(RequestedAddressFamily)
        if requested_family is not None and requested_family.family != allocation.family:
            raise errors.PeerAddressFamilyMismatch
        lifetime = self._lifetime(msg, zero_deletes=True)
        if lifetime == 0:
            self._events += self._delete(allocation, "refresh", now)
            return [Lifetime(0)]
        allocation.expires_at = now + lifetime
        self._schedule(allocation)
        self._events.append(AllocationRefreshed(allocation, lifetime))
        return [Lifetime(lifetime)]

    # -- CreatePermission (RFC 8656 §9) and ChannelBind (§12) -----------------------------

    def _allocation(self, five_tuple: FiveTuple) -> Allocation:
        allocation = self.allocations.get(five_tuple)
        if allocation is None:
            raise errors.AllocationMismatch
        return allocation

    def _udp_allocation(self, five_tuple: FiveTuple) -> Allocation:
        allocation = self._allocation(five_tuple)
        if allocation.is_tcp:
            raise errors.BadRequest("not for a TCP allocation")
        return allocation

    def _check_peer(self, allocation: Allocation, peer: XorPeerAddress) -> None:
        family = FAMILY_IPV6 if ":" in peer.host else FAMILY_IPV4
        if not allocation.serves_family(family):
            raise errors.PeerAddressFamilyMismatch
        if not self.policy.is_allowed(peer.host):
            self._events.append(
                PeerDenied(allocation.five_tuple[1], allocation.username, peer.address)
            )
            raise errors.Forbidden("peer address not allowed")

    def _create_permission(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._allocation(five_tuple)
        peers = msg.get_all(XorPeerAddress)
        if not peers:
            raise errors.BadRequest("XOR-PEER-ADDRESS missing")
        for peer in peers:  # all or nothing: check every peer before installing any
            self._check_peer(allocation, peer)
        new = {p.host for p in peers} - allocation.permissions.keys()
        if len(allocation.permissions) + len(new) > self.config.quotas.permissions_per_allocation:
            raise errors.InsufficientCapacity("too many permissions")
        for peer in peers:
            allocation.permit(peer.host, now)
        self._schedule(allocation)
        return []

    def _channel_bind(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        allocation = self._udp_allocation(five_tuple)
        channel = msg.get(ChannelNumber)
        peer = msg.get(XorPeerAddress)
        if channel is None or peer is None:
            raise errors.BadRequest("CHANNEL-NUMBER and XOR-PEER-ADDRESS are required")
        number = channel.number
        highest = (
            LEGACY_CHANNEL_MAX if self.config.allocations.legacy_channel_numbers else CHANNEL_MAX
        )
        if not CHANNEL_MIN <= number <= highest:
            raise errors.BadRequest(f"channel number outside 0x4000-0x{highest:04X}")
        bound_peer = allocation.channel_peers.get(number)
        if bound_peer is not None and bound_peer != peer.address:
            raise errors.BadRequest("channel already bound to another peer")
        bound_header = allocation.channel_headers.get(peer.address)
        if bound_header is not None and int.from_bytes(bound_header, "big") != number:
            raise errors.BadRequest("peer already bound to another channel")
        self._check_peer(allocation, peer)
        if (
            bound_peer is None
            and len(allocation.channel_peers) >= self.config.quotas.channels_per_allocation
        ):
            raise errors.InsufficientCapacity("too many channels")
        if (
            peer.host not in allocation.permissions
            and len(allocation.permissions) >= self.config.quotas.permissions_per_allocation
        ):
            raise errors.InsufficientCapacity("too many permissions")
        allocation.bind_channel(number, peer.address, now)
        self._schedule(allocation)
        return []

    # -- TCP relaying (RFC 6062) --------------------------------------------------------

    def _new_connection_id(self) -> int:
        while True:
            connection_id = int.from_bytes(self.random.token(4), "big")
            if connection_id and connection_id not in self.peer_connections:
                return connection_id

    def _connect(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute] | None:
        """RFC 6062 §5.2: open a TCP connection to a peer; the answer waits for it."""
        allocation = self._allocation(five_tuple)
        if not allocation.is_tcp:
            raise errors.BadRequest("Connect needs a TCP allocation")
        peer = msg.get(XorPeerAddress)
        if peer is None:
            raise errors.BadRequest("XOR-PEER-ADDRESS missing")
        self._check_peer(allocation, peer)
        connections = allocation.peer_connections
        assert connections is not None
        if any(c.peer == peer.address for c in connections.values()):
            raise errors.ConnectionAlreadyExists
        if len(connections) >= self.config.quotas.permissions_per_allocation:
            raise errors.InsufficientCapacity("too many peer connections")
        connection = PeerConnection(
            connection_id=self._new_connection_id(),
            allocation=allocation,
            peer=peer.address,
            state=CONNECTING,
            bind_deadline=float("inf"),
            transaction_id=msg.transaction_id,
            sha256=msg.integrity_sha256_offset is not None,
            fingerprint=msg.fingerprint_offset is not None,
        )
        connections[connection.connection_id] = connection
        self.peer_connections[connection.connection_id] = connection
        self._events.append(ConnectToPeer(connection))
        return None

    def peer_connected(self, connection_id: int, ok: bool, now: float) -> list[Action]:
        """The outcome of a `ConnectToPeer`: answer the Connect request (success or 447)."""
        connection = self.peer_connections.get(connection_id)
        if connection is None or connection.state != CONNECTING:
            return []
        allocation = connection.allocation
        attributes: list[Attribute]
        if ok:
            connection.state = WAITING_FOR_BIND
            connection.bind_deadline = now + CONNECTION_BIND_TIMEOUT
            self._schedule(allocation)
            msg_class, code = MessageClass.SUCCESS, 0
            attributes = [ConnectionId(connection_id)]
        else:
            self._forget_connection(connection)
            error = errors.ConnectionTimeoutOrFailure()
            msg_class, code = MessageClass.ERROR, error.code
            attributes = [ErrorCode(error.code, error.reason)]
        response = Message(
            Method.CONNECT, msg_class, connection.transaction_id, (*attributes, *self._software)
        )
        data = encode(
            response,
            integrity_key=allocation.key,
            integrity_sha256=connection.sha256,
            integrity_sha1=not connection.sha256,
            fingerprint=connection.fingerprint,
        )
        return [
            SendToClient(allocation, data),
            RequestHandled(Method.CONNECT, code, allocation.five_tuple[1]),
        ]

    def peer_connection_arrived(
        self, allocation: Allocation, peer: Address, now: float
    ) -> tuple[PeerConnection | None, list[Action]]:
        """RFC 6062 §5.3: a peer connected to a relayed address; None means refuse it."""
        connections = allocation.peer_connections
        if (
            allocation.closed
            or connections is None
            or peer[0] not in allocation.permissions
            or not self.policy.is_allowed(peer[0])
            or any(c.peer == peer for c in connections.values())
            or len(connections) >= self.config.quotas.permissions_per_allocation
        ):
            return None, []
        connection = PeerConnection(
            connection_id=self._new_connection_id(),
            allocation=allocation,
            peer=peer,
            state=WAITING_FOR_BIND,
            bind_deadline=now + CONNECTION_BIND_TIMEOUT,
        )
        connections[connection.connection_id] = connection
        self.peer_connections[connection.connection_id] = connection
        self._schedule(allocation)
        indication = Message(
            Method.CONNECTION_ATTEMPT,
            MessageClass.INDICATION,
            self.random.token(12),
            (XorPeerAddress(*peer), ConnectionId(connection.connection_id)),
        )
        return connection, [SendToClient(allocation, encode(indication))]

    def _connection_bind(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute] | None:
        """RFC 6062 §5.4: a new client data connection claims a peer connection."""
        if five_tuple[0] == "udp" or five_tuple in self.allocations:
            raise errors.BadRequest("ConnectionBind belongs on a new TCP data connection")
        connection_id = msg.get(ConnectionId)
        if connection_id is None:
            raise errors.BadRequest("CONNECTION-ID missing")
        connection = self.peer_connections.get(connection_id.value)
        if connection is None or connection.state != WAITING_FOR_BIND:
            raise errors.BadRequest("unknown CONNECTION-ID")
        if connection.allocation.username != candidate.username:
            raise errors.WrongCredentials
        connection.state = BOUND
        connection.bind_deadline = float("inf")
        self._events.append(JoinPeerConnection(connection))
        return []

    def peer_connection_closed(self, connection_id: int) -> list[Action]:
        """Either side of a peer connection went away: forget it, close the other side."""
        connection = self.peer_connections.get(connection_id)
        if connection is None:
            return []
        self._forget_connection(connection)
        return [ClosePeerConnection(connection)]

    def _forget_connection(self, connection: PeerConnection) -> None:
        self.peer_connections.pop(connection.connection_id, None)
        if connection.allocation.peer_connections is not None:
            connection.allocation.peer_connections.pop(connection.connection_id, None)

    def _expire_peer_connections(self, allocation: Allocation, now: float) -> list[Action]:
        """RFC 6062 §5.2/§5.3: no ConnectionBind within 30 s closes the peer connection."""
        if not allocation.peer_connections:
            return []
        late = [c for c in allocation.peer_connections.values() if c.bind_deadline <= now]
        for connection in late:
            self._forget_connection(connection)
        return [ClosePeerConnection(c) for c in late]

    # -- Send indication (RFC 8656 §11.2) ------------------------------------------------

    def _send_indication(self, msg: Message, five_tuple: FiveTuple) -> SendToPeer | None:
        allocation = self.allocations.get(five_tuple)
        if allocation is None or allocation.is_tcp:
            return None
        peer = msg.get(XorPeerAddress)
        data = msg.get(Data)
        if peer is None or data is None:
            return None
        return self.table.send_to(five_tuple, peer.address, data.value)


__all__ = [
    "Action",
    "AllocationCreated",
    "AllocationDeleted",
    "AllocationRefreshed",
    "AuthFailed",
    "Event",
    "PeerDenied",
    "QuotaRejected",
    "Reply",
    "ReplySuppressed",
    "RequestHandled",
    "SendToPeer",
    "StartRelaying",
    "StopRelaying",
    "TurnServer",
]
