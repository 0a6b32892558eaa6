"""The TURN server as a state machine: bytes and a clock value in, actions out.

`TurnServer.receive(data, five_tuple, now)` handles one datagram or stream frame from a
client and returns what to do (pyturn/core/actions.py): replies, datagrams for peers,
wiring, and events for metrics and logs. `expire(now)` ages allocations;
`next_deadline()` says when to call it again. Nothing here touches a socket or reads a
clock.

This file is the request pipeline: classify, decode, authenticate (RFC 8489 §9.2.4),
dispatch to one handler per method, build the reply or the error; and the timers. The
handlers live by feature: Allocate and Refresh in allocate.py, CreatePermission,
ChannelBind and Send in relaying.py, RFC 6062 in tcp_relaying.py; relay ports and
reservation tokens in relay_ports.py; what the data plane forwards in forwarding.py.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pyturn.config import Config, RelayConfig, split_host_port
from pyturn.core import errors
from pyturn.core.actions import (
    Action,
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    ClosePeerConnection,
    ConnectToPeer,
    Event,
    JoinPeerConnection,
    PeerDenied,
    QuotaRejected,
    Reply,
    ReplySuppressed,
    RequestHandled,
    SendToClient,
    StartRelaying,
    StopRelaying,
)
from pyturn.core.allocate import AllocateRequests
from pyturn.core.allocation import (
    Allocation,
    PeerConnection,
    RelayBinder,
)
from pyturn.core.auth import (
    SUPPORTED_ALGORITHMS,
    Authenticator,
    AuthFailure,
    Candidate,
    UserKeys,
)
from pyturn.core.bandwidth import USER_BUCKET
from pyturn.core.forwarding import FiveTuple, ForwardingTable, SendToPeer
from pyturn.core.node import LocalNodeState, NodeState, PortPool
from pyturn.core.policy import PeerPolicy
from pyturn.core.randomness import RandomSource, SystemRandom
from pyturn.core.relay_ports import RelayPorts, _Reservation
from pyturn.core.relaying import SLOW_PATH, RelayingRequests
from pyturn.core.sessions import SessionMatch, active_revocations, describe
from pyturn.core.tcp_relaying import MAX_WORKERS, TcpRelaying
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    MAGIC_COOKIE,
    PASSWORD_ALGORITHM_MD5,
    Address,
    Attribute,
    ErrorCode,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    Software,
    UnknownAttributes,
    UserHash,
    Username,
    XorMappedAddress,
    clear_address_cache,
    xor_address_value,
)
from pyturn.wire.channel_data import (
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
_ALGORITHMS_TLV = encode_tlv(PasswordAlgorithms(SUPPORTED_ALGORITHMS))


# A handler returns the success response's attributes, or None when the answer comes
# later (a Connect waits for the TCP handshake with the peer).
_Handler = Callable[[Message, FiveTuple, Candidate, float], list[Attribute] | None]


class TurnServer(AllocateRequests, RelayingRequests, TcpRelaying):
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
        worker_index: int = 0,
        node: NodeState | None = None,
    ) -> None:
        if not 0 <= worker_index < MAX_WORKERS:
            raise ValueError(f"worker_index must be in [0, {MAX_WORKERS}), got {worker_index}")
        self.worker_index = worker_index
        self.binder = binder
        # Ports, CONNECTION-IDs, transaction IDs and the secret: one source, seedable.
        self.random = random or SystemRandom()
        self._nonce_secret = nonce_secret or self.random.token(32)
        # What the data plane forwards (the I/O layer may make it first, to hand it to
        # its relay sockets); the allocations' methods keep it in step.
        self.table = table if table is not None else ForwardingTable(self.random)
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.draining = False
        self.redirect_turn = 0
        self.relay_turns: dict[int, int] = {}
        # Allocations and reserved ports per user and in all, source budgets and relay
        # ports: counted for the node, whatever the number of workers.
        ports = config.relay.max_port - config.relay.min_port + 1
        self.node: NodeState = node if node is not None else LocalNodeState(users=2 * ports)
        self.table.buckets = self.node.buckets
        self.node.on_rebucket = self._rebucket
        self._timers: list[tuple[float, int, Allocation]] = []
        self._seq = itertools.count()
        # What the request being handled returns: handlers append their actions and
        # events here, and `receive` returns the list, so every output leaves one way.
        self._out: list[Action] = []
        # Encoded XOR-MAPPED-ADDRESS attributes of IPv4 clients (see _answer_binding).
        self._mapped_v4: dict[Address, bytes] = {}
        self._relay_ipv4 = relay_ipv4
        self._relay_ipv6 = relay_ipv6
        # Users and secrets from the store, if the config names one (use_stored).
        self._stored_users: Mapping[str, UserKeys] = {}
        self._stored_secrets: tuple[str, ...] = ()
        self.reconfigure(config)
        self.ports = RelayPorts(
            config.relay.min_port,
            config.relay.max_port,
            binder,
            random=self.random,
            secret=self._nonce_secret,
            node=self.node,
        )
        self._handlers: dict[int, _Handler] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
            Method.CONNECT: self._connect,
            Method.CONNECTION_BIND: self._connection_bind,
            # Only with auth.secure_stun: else Binding is answered before handlers.
            Method.BINDING: self._binding,
        }
        self.peer_connections: dict[int, PeerConnection] = {}
        # `pyturn revoke`: user (or REST username) -> when the revocation ends.
        self.revoked: Mapping[str, float] = {}
        # Allocations deleted since the last `compact`, for the I/O layer to decide when.
        self.ended_since_compact = 0

    def use_stored(self, users: Mapping[str, UserKeys], secrets: Sequence[str]) -> None:
        """Authenticate with the config's users and secrets and these from the store
        (pyturn/store), from the next request on. Nonces stay valid (their secret stays);
        a name in both is the config's."""
        config = self.config
        self._stored_users, self._stored_secrets = users, tuple(secrets)
        self.auth = Authenticator(
            config.realm,
            config.auth.users,
            (*config.auth.secrets, *(s for s in secrets if s not in config.auth.secrets)),
            nonce_lifetime=config.auth.nonce_lifetime,
            nonce_secret=self._nonce_secret,
            stored=users,
            rest_separator=config.auth.rest_separator,
        )

    def _rebucket(self, user: str, bucket: int) -> None:
        """The node gave `user` another bandwidth bucket: its allocations follow."""
        for allocation in self.allocations.values():
            if allocation.quota_user == user:
                allocation.counters[USER_BUCKET] = bucket

    @property
    def pools(self) -> dict[int, PortPool]:
        """Free relay ports by address family (for metrics)."""
        return self.ports.pools

    @property
    def _reservations(self) -> dict[bytes, _Reservation]:
        return self.ports.reservations

    def reconfigure(self, config: Config) -> list[Action]:
        """Take new users, secrets, policy, quotas and lifetimes; allocations stay.

        Returns what a tightened peer policy closes: RFC 6062 peer connections to peers
        it now denies (their permissions and channels are simply dropped).
        """
        self.config = config
        self.use_stored(self._stored_users, self._stored_secrets)
        self.policy = PeerPolicy(config.peers.allow, config.peers.deny)
        self._secure_stun = config.auth.secure_stun
        self.redirects = [split_host_port(s) for s in config.redirect_allocations]
        self._end_expired = config.auth.end_expired_sessions
        if self._end_expired:
            # Allocations made before the switch get their credential's end as a deadline.
            for allocation in self.allocations.values():
                self._schedule(allocation)
        rates = config.bandwidth
        self.table.set_rates(rates.per_allocation, rates.per_user, rates.total)
        limits = config.limits
        self.node.set_budget(limits.unauthenticated_burst, limits.unauthenticated_rate)
        # A tightened policy applies at once: nothing may be sent to a peer it now denies.
        closed: list[Action] = []
        for allocation in self.allocations.values():
            allocation.forget_peers(lambda ip: not self.policy.is_allowed(ip))
            for connection in list((allocation.peer_connections or {}).values()):
                if not self.policy.is_allowed(connection.peer[0]):
                    self._forget_connection(connection)
                    closed.append(ClosePeerConnection(connection))
        self._tell_relay_addresses(config.relay)
        self._software = (Software(config.software),) if config.software else ()
        # The constant attributes of replies, encoded once.
        self._software_tlv = tuple(encode_tlv(a) for a in self._software)
        self._challenge_realm = encode_tlv(Realm(config.realm))
        return closed

    def _tell_relay_addresses(self, relay: RelayConfig) -> None:
        """What clients are told in XOR-RELAYED-ADDRESS, by family and address index."""
        self.relay_ips: dict[int, str] = {}
        v4 = relay.fixed_external(4) or self._relay_ipv4
        if v4:
            self.relay_ips[FAMILY_IPV4] = v4
        v6 = relay.fixed_external(6) or self._relay_ipv6
        if v6 and relay.address6:
            self.relay_ips[FAMILY_IPV6] = v6
        self.relay_choices: dict[int, tuple[str, ...]] = {
            family: (
                primary,
                *(
                    extra.external_address or extra.address
                    for extra in relay.more_of(4 if family == FAMILY_IPV4 else 6)
                ),
            )
            for family, primary in self.relay_ips.items()
        }

    def use_discovered_address(self, family: int, ip: str) -> None:
        """relay.external_address(6) "auto": the address a STUN server saw, for the
        allocations made from now on (those made before keep theirs)."""
        if family == FAMILY_IPV4:
            self._relay_ipv4 = ip
        else:
            self._relay_ipv6 = ip
        self._tell_relay_addresses(self.config.relay)

    # -- entry points --------------------------------------------------------------------

    def receive(self, data: bytes, five_tuple: FiveTuple, now: float) -> list[Action]:
        """Handle one datagram (UDP) or one frame (TCP/TLS) from a client."""
        kind = data[:2]
        # Binding first: it is what most clients send most (a Binding request is never
        # ChannelData, whose first byte is 0x40-0x7F, so the order changes no outcome).
        if kind == _BINDING_REQUEST_TYPE and not self._secure_stun:
            answer = self._answer_binding(data, five_tuple[1])
            if answer is not None:
                return answer
        elif is_channel_data(data):
            send = self.table.from_client(data, five_tuple, self.table.ns(now))
            return [send] if send is not None else []
        elif kind == _SEND_INDICATION_TYPE:
            fast = self._route_send_indication(data, five_tuple, now)
            if fast is not SLOW_PATH:
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
        self._out = []
        out = self._out
        if msg.msg_class == MessageClass.REQUEST:
            reply = self._request(msg, five_tuple, now)
            if reply is not None:
                out.append(reply)
        elif msg.msg_class == MessageClass.INDICATION and msg.method == Method.SEND:
            send = self._send_indication(msg, five_tuple, now)
            if send is not None:
                out.append(send)
        self._out = []
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
            if self._end_expired and allocation.credential_expires_at <= now:
                out += self._delete(allocation, "credential expired", now)
                continue
            allocation.expire(now)
            out += self._expire_peer_connections(allocation, now)
            self._schedule(allocation)
        self.ports.expire(now)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [t[0] for t in self._timers[:1]]
        reserved = self.ports.next_deadline()
        if reserved is not None:
            deadlines.append(reserved)
        return min(deadlines, default=None)

    def connection_closed(self, five_tuple: FiveTuple, now: float) -> list[Action]:
        """RFC 8656 §3.1: over TCP/TLS, an allocation ends with its connection."""
        allocation = self.allocations.get(five_tuple)
        return self._delete(allocation, "connection closed", now) if allocation else []

    def kick(self, match: SessionMatch, now: float, reason: str = "kicked") -> list[Action]:
        """End the allocations `match` names now (`pyturn kick`): their relays stop at
        once, and the client's next Refresh gets 437."""
        out: list[Action] = []
        for allocation in [a for a in self.allocations.values() if match.matches(a)]:
            out += self._delete(allocation, reason, now)
        return out

    def set_revocations(self, revoked: Mapping[str, float], now: float) -> list[Action]:
        """Refuse these users (401) until each one's time (`pyturn revoke`), and end the
        allocations they hold."""
        self.revoked = revoked = active_revocations(revoked, now)
        out: list[Action] = []
        if revoked:
            for allocation in list(self.allocations.values()):
                if allocation.username in revoked or allocation.quota_user in revoked:
                    out += self._delete(allocation, "revoked", now)
        return out

    def sessions(self, match: SessionMatch, now: float) -> list[dict[str, Any]]:
        """`pyturn sessions`: this process's allocations that `match` names."""
        return [
            describe(allocation, now, self.worker_index)
            for allocation in self.allocations.values()
            if match.matches(allocation)
        ]

    def close_all(self, now: float) -> list[Action]:
        out: list[Action] = []
        for allocation in list(self.allocations.values()):
            out += self._delete(allocation, "shutdown", now)
        return out

    # -- plumbing ------------------------------------------------------------------------

    def _schedule(self, allocation: Allocation) -> None:
        at = allocation.next_deadline()
        if self._end_expired and allocation.credential_expires_at < at:
            at = allocation.credential_expires_at
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
        self.node.compact(now)
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
        self.node.release(allocation.quota_user)
        self.ports.release(allocation)
        for connection_id in allocation.peer_connections or ():
            self.peer_connections.pop(connection_id, None)
        deleted = AllocationDeleted(allocation, reason, now)
        # A UDP allocation leaves nothing behind in the I/O layer: its sockets are released.
        return [deleted, StopRelaying(allocation)] if allocation.is_tcp else [deleted]

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
        if msg.method == Method.BINDING and not self._secure_stun:
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
            self._out.append(RequestHandled(msg.method, 0, client))
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
                and not self.node.allow_unsigned(client[0], now)
            ):
                self._out.append(ReplySuppressed(client, exc.code))
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
        self._out.append(RequestHandled(msg.method, code, client))
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
            self._out.append(AuthFailed(client, None, AuthFailure.NO_CREDENTIALS))
            raise errors.Unauthorized
        username_attr = msg.get(Username)
        user_hash = msg.get(UserHash)
        realm = msg.get(Realm)
        nonce = msg.get(Nonce)
        if (username_attr is None and user_hash is None) or realm is None or nonce is None:
            raise errors.BadRequest("MESSAGE-INTEGRITY without USERNAME, REALM and NONCE")
        name = username_attr.value if username_attr is not None else None
        if not self.auth.nonce_is_valid(nonce.value, client[0], now):
            self._out.append(AuthFailed(client, name, AuthFailure.STALE_NONCE))
            raise errors.StaleNonce
        algorithm = self._password_algorithm(msg)
        if name is None and user_hash is not None:
            name = self.auth.username_for_userhash(user_hash.value)
            if name is None:
                self._out.append(AuthFailed(client, None, AuthFailure.UNKNOWN_USER))
                raise errors.Unauthorized
        assert name is not None
        found = self.auth.candidates(name, now, algorithm)
        if isinstance(found, AuthFailure):
            self._out.append(AuthFailed(client, name, found))
            raise errors.Unauthorized
        if realm.value != self.config.realm:
            self._out.append(AuthFailed(client, name, AuthFailure.BAD_PASSWORD))
            raise errors.Unauthorized
        sha256 = msg.integrity_sha256_offset is not None
        for candidate in found:
            if (
                integrity.verify_integrity_sha256(msg, candidate.key)
                if sha256
                else integrity.verify_integrity(msg, candidate.key)
            ):
                if self.revoked and self._is_revoked(candidate, now):
                    self._out.append(AuthFailed(client, name, AuthFailure.REVOKED))
                    raise errors.Unauthorized
                return candidate
        self._out.append(AuthFailed(client, name, AuthFailure.BAD_PASSWORD))
        raise errors.Unauthorized

    def _binding(
        self, msg: Message, five_tuple: FiveTuple, candidate: Candidate, now: float
    ) -> list[Attribute]:
        """RFC 8489 §7.3 with the long-term credentials (coturn's secure-stun)."""
        return [XorMappedAddress(*five_tuple[1])]

    def _is_revoked(self, candidate: Candidate, now: float) -> bool:
        revoked = self.revoked
        until = max(revoked.get(candidate.username, 0.0), revoked.get(candidate.quota_user, 0.0))
        return until > now

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


# The actions and events, importable from here as before the split.
__all__ = [
    "Action",
    "AllocationCreated",
    "AllocationDeleted",
    "AllocationRefreshed",
    "AuthFailed",
    "ClosePeerConnection",
    "ConnectToPeer",
    "Event",
    "JoinPeerConnection",
    "PeerDenied",
    "QuotaRejected",
    "Reply",
    "ReplySuppressed",
    "RequestHandled",
    "SendToClient",
    "SendToPeer",
    "StartRelaying",
    "StopRelaying",
    "TurnServer",
]
