"""The native fast path and the reference path read one forwarding table and must agree.

Hypothesis writes a table through its only writer (`ForwardingTable.permit`, `revoke`,
`bind`, `unbind`) and feeds the same datagrams to `ForwardingTable.from_client` /
`from_peer` (Python) and to `_batch.route_client_datagram` / `route_peer_datagram`
(the C functions that `forward_channel_data` and `serve_relay[s]` route with). No
server, no sockets: same table, same bytes, same answer, same counters (RFC 8656 §11,
§12.5-§12.7). The bandwidth limits too: hypothesis picks the rates, which user bucket
each allocation has and how time passes, and each datagram is offered to both paths from
the same state (counters and node buckets), which must then be the same again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.core import bandwidth
from pyturn.core.bandwidth import FIRST_USER_BUCKET, USER_BUCKET
from pyturn.core.forwarding import Flow, ForwardingTable, new_counters
from pyturn.wire.attributes import Address
from pyturn.wire.channel_data import channel_header, is_channel_data

_batch: ModuleType | None
try:
    from pyturn.net import _batch
except ImportError:  # pragma: no cover - the build test fails loudly in that case
    _batch = None

pytestmark = pytest.mark.skipif(_batch is None, reason="native module not built")

LOCALS: list[Address] = [("192.0.2.10", 3478), ("2001:db8::10", 3478)]
CLIENTS: list[Address] = [("203.0.113.7", 40001), ("203.0.113.7", 40002), ("2001:db8::7", 5)]
PEER_IPS = ["198.51.100.1", "198.51.100.2", "2001:db8:1::1"]
PEERS: list[Address] = [(ip, port) for ip in PEER_IPS for port in (9000, 9001)]
CHANNELS = [0x4000, 0x4001, 0x4FFF, 0x7FFF]
# Bytes per second: none, tight enough that 40-byte datagrams run over, or loose.
RATES = [0, 0, 50, 400, 10**6]
# Between two datagrams: nothing, a little, about a burst, a long quiet spell.
STEPS = [0, 1_000, 1_000_000, 150_000_000, 2_000_000_000]
USER_BUCKETS = 2


@pytest.fixture(autouse=True)
def _no_limits_after() -> Iterator[None]:
    """The native path keeps the last rates it was given: leave it unlimited."""
    yield
    if _batch is not None:
        _batch.set_bandwidth(bandwidth.new_rates(), bandwidth.new_buckets())


class FixedRandom:
    """The same bytes every time: the Data indications of both paths compare equal."""

    def token(self, size: int) -> bytes:
        return bytes(range(1, size + 1))

    def below(self, n: int) -> int:
        return 0


@dataclass(eq=False)
class Relay:
    key: int
    port: int = 50000

    def sendto(self, data: bytes, peer: Address, /) -> None:
        raise AssertionError("routing never sends")


@dataclass
class World:
    """A table and the allocations (flows, one relay per family each) it was written for."""

    # A constant transaction ID, so that both paths make the same Data indications.
    table: ForwardingTable = field(default_factory=lambda: ForwardingTable(FixedRandom()))
    flows: list[tuple[Flow, Relay, Relay]] = field(default_factory=list)
    # What the core would hold: channel bindings per flow, for revoke's `channels` callback.
    bound: dict[int, dict[int, Address]] = field(default_factory=dict)


def relay_for(entry: tuple[Flow, Relay, Relay], ip: str) -> Relay:
    return entry[2] if ":" in ip else entry[1]


flows = st.lists(
    st.tuples(
        st.sampled_from(["udp", "udp", "tcp"]),
        st.sampled_from(CLIENTS),
        st.sampled_from(LOCALS),
    ),
    min_size=1,
    max_size=3,
    unique=True,
)
# Binds and permits outnumber the rest, so that most tables hold routes.
operations = st.lists(
    st.tuples(
        st.sampled_from(["permit", "permit", "bind", "bind", "bind", "revoke", "unbind"]),
        st.integers(0, 2),
        st.sampled_from(CHANNELS),
        st.sampled_from(PEERS),
    ),
    max_size=24,
)

Op = tuple[str, int, int, Address]
FiveTuples = list[tuple[str, Address, Address]]


limits = st.tuples(st.sampled_from(RATES), st.sampled_from(RATES), st.sampled_from(RATES))
Limits = tuple[int, int, int]


def build(five_tuples: FiveTuples, ops: list[Op], rates: Limits = (0, 0, 0)) -> World:
    world = World()
    table = world.table
    table.set_rates(*rates)
    table.buckets = bandwidth.new_buckets(FIRST_USER_BUCKET + USER_BUCKETS)
    assert _batch is not None
    _batch.set_bandwidth(table.rates, table.buckets)
    for index, (transport, client, local) in enumerate(five_tuples):
        flow: Flow = (transport, client, local, new_counters())
        # 0: a user without a bucket; users share the others.
        flow[3][USER_BUCKET] = [0, FIRST_USER_BUCKET, FIRST_USER_BUCKET + 1][index % 3]
        world.flows.append((flow, Relay(100 + 2 * index), Relay(101 + 2 * index)))
        world.bound[index] = {}
    for op, which, number, peer in ops:
        index = which % len(world.flows)
        entry = world.flows[index]
        flow, bound = entry[0], world.bound[index]
        relay = relay_for(entry, peer[0])

        def channels(ip: str, bound: dict[int, Address] = bound) -> list[tuple[Address, int]]:
            return [(p, n) for n, p in bound.items() if p[0] == ip]

        if op == "permit":
            world.table.permit(flow, relay, peer[0], channels)
        elif op == "revoke":
            world.table.revoke(flow, relay, peer[0], channels)
        elif op == "bind":
            if number in bound or peer in bound.values():
                continue  # the core refuses a second binding of either (RFC 8656 §12.2)
            bound[number] = peer
            permitted = (flow[0], flow[1], flow[2], peer[0]) in world.table.to_peer_by_ip
            world.table.bind(flow, relay, number, peer, permitted)
        elif number in bound:
            gone = bound.pop(number)
            world.table.unbind(flow, relay_for(entry, gone[0]), number, gone)
    return world


def channel_data(numbers: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """ChannelData on those channel numbers, sometimes with a wrong length or padding."""
    return st.builds(
        lambda n, data, extra, pad: channel_header(n, max(len(data) + extra, 0)) + data + pad,
        numbers,
        st.binary(max_size=40),
        st.sampled_from([0, 0, 0, 1, -1]),  # a length past the datagram, or short of it
        st.sampled_from([b"", b"\x00\x00", b"\x00"]),
    )


State = tuple[list[tuple[int, ...]], tuple[int, ...]]


def _state(world: World) -> State:
    """Every allocation's counters (buckets and drops included), and the node's buckets."""
    return [tuple(flow[3]) for flow, _, _ in world.flows], tuple(world.table.buckets)


def _restore(world: World, state: State) -> None:
    for (flow, _, _), counters in zip(world.flows, state[0], strict=True):
        flow[3][:] = new_counters()
        for i, value in enumerate(counters):
            flow[3][i] = value
    for i, value in enumerate(state[1]):
        world.table.buckets[i] = value


@settings(max_examples=300, deadline=None)
@given(flows, operations, limits, st.data())
def test_client_to_peer_routes_agree(
    five_tuples: FiveTuples, ops: list[Op], rates: Limits, data: st.DataObject
) -> None:
    """RFC 8656 §12.5: both paths relay ChannelData on a bound channel of the client's
    allocation, drop the rest (over a limit too), and count and charge alike."""
    assert _batch is not None
    world = build(five_tuples, ops, rates)
    table = world.table
    # Half aimed at the table's channels, half anything a client might send.
    bound = [(k[1], k[2], k[3]) for k in table.to_peer_by_channel]
    anyone = st.tuples(
        st.sampled_from(CLIENTS),
        st.sampled_from(LOCALS),
        st.sampled_from([*CHANNELS, 0x4002, 0x3FFF]),
    )
    aimed = st.one_of(st.sampled_from(bound), anyone) if bound else anyone
    frames = aimed.flatmap(
        lambda t: st.tuples(
            st.just((t[0], t[1])), st.one_of(channel_data(st.just(t[2])), st.binary(max_size=8))
        )
    )
    datagrams = data.draw(st.lists(st.tuples(frames, st.sampled_from(STEPS)), max_size=12))
    now = 10**12
    for ((client, local), datagram), step in datagrams:
        now += step
        if not is_channel_data(datagram):
            continue  # never offered to either: STUN goes to the core
        before = _state(world)
        reference = table.from_client(datagram, ("udp", client, local), now)
        after_python = _state(world)
        _restore(world, before)
        native = _batch.route_client_datagram(
            table.to_peer_by_channel, local, client, datagram, now
        )
        if reference is None:
            assert native is None
        else:
            assert native == (reference.relay.key, reference.peer, reference.data)
        # The C path counted and charged exactly what the Python path did.
        assert _state(world) == after_python


@settings(max_examples=300, deadline=None)
@given(flows, operations, limits, st.data())
def test_peer_to_client_routes_agree(
    five_tuples: FiveTuples, ops: list[Op], rates: Limits, data: st.DataObject
) -> None:
    """RFC 8656 §11.3/§12.6: with a permission for the peer's IP, both make the same frame
    for the same client (ChannelData with a channel to the peer, else a Data
    indication), counted and charged alike; without one, or over a limit, neither
    relays anything."""
    assert _batch is not None
    world = build(five_tuples, ops, rates)
    table = world.table
    # Half aimed at the table's routes back, half at any relay from any peer.
    routes = list(table.to_client_by_peer) + [
        (key, (ip, port)) for key, ip in table.to_client_by_ip for port in (9000, 9001)
    ]
    relay_keys = [relay.key for _, *relays in world.flows for relay in relays]
    anyone = st.tuples(st.sampled_from([*relay_keys, 999]), st.sampled_from(PEERS))
    aimed = st.one_of(st.sampled_from(routes), anyone) if routes else anyone
    datagrams = data.draw(
        st.lists(st.tuples(aimed, st.binary(max_size=40), st.sampled_from(STEPS)), max_size=12)
    )
    now = 10**12
    for (relay_key, peer), datagram, step in datagrams:
        now += step
        before = _state(world)
        reference = table.from_peer(relay_key, peer, datagram, now)
        after_python = _state(world)
        _restore(world, before)
        native = _batch.route_peer_datagram(
            table.to_client_by_peer,
            table.to_client_by_ip,
            table.data_indication,
            relay_key,
            peer,
            datagram,
            now,
        )
        assert _state(world) == after_python
        if native is None:
            assert reference is None
            continue
        assert reference is not None
        assert native[0] is reference[0]  # the very flow: same client, same counters
        assert native[1] == reference[1]


# Up to 2**62 ns (146 years of a monotonic clock): the arithmetic has room to spare.
words = st.integers(0, 2**62)
times = st.sampled_from([0, 10**9, 10**12, 10**12 + 5 * 10**8, 2**62])
# Times, window numbers and counts of allocations sending that the rule compares.
SPECIAL_WORDS = [0, 10**12, 1000, (999 << 24) | 2, (1000 << 24) | 3, (1000 << 24) | (2**24 - 1)]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(SPECIAL_WORDS), words), min_size=16, max_size=16),
    st.tuples(
        st.sampled_from([0, 1, 7, 10**6, 10**12]),
        st.sampled_from([0, 1, 10**6]),
        st.sampled_from([0, 3, 10**9]),
    ),
    st.lists(st.one_of(st.sampled_from(SPECIAL_WORDS), words), min_size=12, max_size=12),
    st.integers(0, 1),
    st.integers(0, 70_000),
    times,
    st.sampled_from([0, FIRST_USER_BUCKET, FIRST_USER_BUCKET + 1]),  # the last: none
)
def test_the_native_admit_is_the_reference_admit(  # noqa: PLR0917
    counters: list[int],
    rates: Limits,
    buckets: list[int],
    direction: int,
    size: int,
    now: int,
    user: int,
) -> None:
    """bandwidth.admit and _batch.admit, from any state: the same answer and charges."""
    assert _batch is not None
    counters[USER_BUCKET] = user
    states = []
    answers = []
    for rule in (bandwidth.admit, _batch.admit):
        mine = new_counters()
        for i, value in enumerate(counters):
            mine[i] = value
        node = bandwidth.new_buckets(FIRST_USER_BUCKET + 1)
        for i, value in enumerate(buckets):
            node[i] = value
        answers.append(rule(mine, bandwidth.new_rates(*rates), node, direction, size, now))
        states.append((tuple(mine), tuple(node)))
    assert answers[0] == answers[1]
    assert states[0] == states[1]


def test_a_revoked_permission_stops_channel_data_from_the_peer_in_both_paths() -> None:
    """RFC 8656 §12.1: a channel outlives its permission, but data from the peer stops
    with the permission; a new permission brings it back, in C as in Python."""
    assert _batch is not None
    world = build([("udp", CLIENTS[0], LOCALS[0])], [("bind", 0, 0x4000, PEERS[0])])
    table = world.table
    flow, relay, _ = world.flows[0]
    peer = PEERS[0]

    def channels(ip: str) -> list[tuple[Address, int]]:
        return [(peer, 0x4000)] if ip == peer[0] else []

    def from_peer() -> object:
        return _batch.route_peer_datagram(
            table.to_client_by_peer,
            table.to_client_by_ip,
            table.data_indication,
            relay.key,
            peer,
            b"hi",
            0,
        )

    frame = b"\x40\x00\x00\x02hi"
    table.permit(flow, relay, peer[0], channels)
    assert from_peer() == (flow, frame)
    table.revoke(flow, relay, peer[0], channels)
    assert from_peer() is None
    assert table.from_peer(relay.key, peer, b"hi", 0) is None
    # The client may still send on the channel: its binding lives 600 s.
    to_peer = _batch.route_client_datagram(
        table.to_peer_by_channel, LOCALS[0], CLIENTS[0], frame, 0
    )
    assert to_peer == (relay.key, peer, b"hi")
    table.permit(flow, relay, peer[0], channels)
    assert from_peer() == (flow, frame)
