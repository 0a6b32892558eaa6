"""Hostile sequences for the whole TURN core, driven by hypothesis.

The same harness as the atheris target `fuzz/fuzz_core.py`
(`tests/hostile/core_harness.py`): several 5-tuples (UDP, TCP control and data
connections, TLS, an IPv6 client) send arbitrary bytes, mutated STUN, or requests that
are validly signed but weird (denied peers in every IPv6 spelling, reserved channel
numbers, stale nonces, foreign CONNECTION-IDs, RESERVATION-TOKENs of other clients), while
the clock moves across every lifetime edge. After every step nothing may have been
relayed to a denied or unpermitted peer, no relay port or socket may leak, quotas and
per-allocation caps must hold; at the end, when every lifetime has run out, everything
must be back (RFC 8656 §7-§12, RFC 6062 §5, RFC 8489 §6.3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyturn.core.auth import SUPPORTED_ALGORITHMS
from pyturn.wire.attributes import (
    AdditionalAddressFamily,
    Attribute,
    ChannelNumber,
    ConnectionId,
    Data,
    DontFragment,
    EvenPort,
    Lifetime,
    PasswordAlgorithm,
    PasswordAlgorithms,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    UnknownAttribute,
    XorPeerAddress,
)
from pyturn.wire.channel_data import channel_header
from pyturn.wire.message import Message, MessageClass, Method, encode
from tests.hostile.core_harness import (
    AUTH_MODES,
    CLIENTS,
    PEERS,
    TIME_STEPS,
    Closed,
    Drain,
    Harness,
    Op,
    PeerArrived,
    PeerClosed,
    PeerConnected,
    Raw,
    Signed,
    Step,
    Timer,
    decode_steps,
    encode_steps,
    request_template,
)
from tests.hostile.core_seeds import seed_scenarios
from tests.strategies import (
    body_attributes,
    hosts,
    mutated_encodings,
    ports,
    stun_shaped_bytes,
    transaction_ids,
    uint16,
    uint32,
)

# PYTURN_FUZZ_EXAMPLES=20000 for a longer run (see SECURITY.md); 300 in `make test`.
FUZZ_EXAMPLES = int(os.environ.get("PYTURN_FUZZ_EXAMPLES", "300"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

clients = st.integers(0, len(CLIENTS) - 1)
time_steps = st.one_of(
    st.sampled_from(TIME_STEPS), st.floats(0, 4000, allow_nan=False, allow_infinity=False)
)
peer_hosts = st.one_of(st.sampled_from(PEERS), hosts)
turn_methods = st.one_of(
    st.sampled_from(
        [
            Method.ALLOCATE,
            Method.REFRESH,
            Method.CREATE_PERMISSION,
            Method.CHANNEL_BIND,
            Method.CONNECT,
            Method.CONNECTION_BIND,
        ]
    ),
    st.sampled_from([Method.BINDING, Method.SEND, Method.DATA, Method.CONNECTION_ATTEMPT]),
    st.integers(0, 0xFFF),
)

# Attributes a TURN request carries, with the values at the edges of what is allowed.
turn_attributes: st.SearchStrategy[Attribute] = st.one_of(
    st.builds(RequestedTransport, st.sampled_from([17, 6, 0, 255])),
    st.builds(Lifetime, st.one_of(st.sampled_from([0, 1, 599, 600, 3600, 3601]), uint32)),
    st.builds(XorPeerAddress, peer_hosts, ports),
    st.builds(
        ChannelNumber,
        st.one_of(
            st.sampled_from([0, 0x3FFF, 0x4000, 0x4001, 0x4FFF, 0x5000, 0x7FFF, 0x8000]), uint16
        ),
    ),
    st.builds(EvenPort, st.booleans()),
    # Small tokens and ids are replaced by ones the server really issued.
    st.builds(
        ReservationToken,
        st.one_of(
            st.integers(0, 3).map(lambda i: bytes(7) + bytes((i,))),
            st.binary(min_size=8, max_size=8),
        ),
    ),
    st.builds(ConnectionId, st.one_of(st.integers(0, 15), uint32)),
    st.builds(RequestedAddressFamily, st.sampled_from([1, 2, 0, 3])),
    st.builds(AdditionalAddressFamily, st.sampled_from([2, 1, 0])),
    st.just(DontFragment()),
    st.builds(Data, st.binary(max_size=64)),
    st.builds(PasswordAlgorithm, st.sampled_from([1, 2, 3]), st.just(b"")),
    st.builds(
        PasswordAlgorithms,
        st.one_of(st.just(SUPPORTED_ALGORITHMS), st.just(((2, b""),))),
    ),
    st.builds(UnknownAttribute, st.sampled_from([0x0033, 0x7FFF, 0xC001]), st.binary(max_size=8)),
    body_attributes,
)


@st.composite
def signed_requests(draw: st.DrawFn) -> Signed:
    """A request that the harness signs as its 5-tuple's user (or mis-signs, per `auth`)."""
    attributes = draw(st.lists(turn_attributes, max_size=6))
    data = request_template(draw(turn_methods), attributes, draw(transaction_ids))
    auth = draw(st.sampled_from(AUTH_MODES).filter(lambda m: m != "valid") | st.just("valid"))
    return Signed(data, auth, draw(st.booleans()))


@st.composite
def send_indications(draw: st.DrawFn) -> Raw:
    attrs = (XorPeerAddress(draw(peer_hosts), draw(ports)), Data(draw(st.binary(max_size=64))))
    message = Message(Method.SEND, MessageClass.INDICATION, draw(transaction_ids), attrs)
    return Raw(encode(message, fingerprint=draw(st.booleans())))


@st.composite
def channel_data(draw: st.DrawFn) -> Raw:
    number = draw(st.one_of(st.integers(0x4000, 0x4003), st.integers(0x4000, 0x7FFF)))
    payload = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(payload)), uint16))
    return Raw(channel_header(number, length) + payload + draw(st.binary(max_size=3)))


raw_ops: st.SearchStrategy[Op] = st.one_of(
    st.binary(max_size=200).map(Raw),
    mutated_encodings.map(Raw),
    stun_shaped_bytes().map(Raw),
    send_indications(),
    channel_data(),
)
event_ops: st.SearchStrategy[Op] = st.one_of(
    st.just(Timer()),
    st.just(Closed()),
    st.just(Drain()),
    st.builds(PeerConnected, st.integers(0, 3), st.booleans()),
    st.builds(PeerArrived, st.integers(0, 3), st.integers(0, len(PEERS) - 1)),
    st.builds(PeerClosed, st.integers(0, 3)),
)
ops: st.SearchStrategy[Op] = st.one_of(signed_requests(), signed_requests(), raw_ops, event_ops)
steps = st.builds(Step, clients, time_steps, ops)

SEEDS = seed_scenarios()
seed_prefixes = st.sampled_from(sorted(SEEDS)).map(lambda name: list(SEEDS[name]))


def run(sequence: Sequence[Step]) -> Harness:
    harness = Harness()
    harness.run(sequence)
    return harness


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_each_seed_scenario_keeps_the_invariants(name: str) -> None:
    harness = run(SEEDS[name])
    assert harness.replies > 0


def test_the_seed_scenarios_do_what_they_are_named_for() -> None:
    """The fuzzers start from these: they must reach relaying, reservations and RFC 6062."""
    assert run(SEEDS["udp-relay"]).relayed == 2
    assert run(SEEDS["reservation"]).tokens
    assert run(SEEDS["tcp-relay"]).connection_ids


@FUZZ_SETTINGS
@given(st.lists(steps, max_size=40))
def test_any_sequence_of_steps_keeps_the_invariants(sequence: list[Step]) -> None:
    run(sequence)


@FUZZ_SETTINGS
@given(seed_prefixes, st.lists(steps, max_size=25))
def test_weird_requests_after_a_normal_start_keep_the_invariants(
    prefix: list[Step], sequence: list[Step]
) -> None:
    """Valid-but-weird signed requests against live allocations, channels and connections."""
    run(prefix + sequence)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_the_fuzzers_byte_format_takes_any_input(data: bytes) -> None:
    """What fuzz/fuzz_core.py runs for each libFuzzer input."""
    run(decode_steps(data))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_byte_format_round_trips_the_seeds(name: str) -> None:
    data = encode_steps(SEEDS[name])
    assert encode_steps(decode_steps(data)) == data
