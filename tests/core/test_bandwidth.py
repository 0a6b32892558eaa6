"""Bandwidth limits in the core: the bucket rule, and the server applying it (no sockets).

Time is the clock value the core is given, so each rule is checked to the byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.core import bandwidth
from pyturn.core.bandwidth import (
    ADMITTED,
    BURST_NS,
    DROPPED,
    LAST_DROP,
    PER_ALLOCATION,
    PER_USER,
    TO_CLIENT,
    TO_PEER,
    TOTAL,
    USER_BUCKET,
)
from pyturn.core.forwarding import SendToPeer, new_counters
from pyturn.core.node import LocalNodeState
from pyturn.wire.attributes import ErrorCode
from tests.core.turn_client import (
    OTHER_CLIENT,
    PEER,
    T0,
    MakeServer,
    TurnTestClient,
    frame_for_client,
    make_config,
)

RATE = 10_000  # bytes per second
SECOND = 1_000_000_000


def offer(rates: bandwidth.Rates, size: int, every_ns: int, seconds: float) -> int:
    """Bytes one allocation gets through, offering `size` bytes every `every_ns`."""
    counters = new_counters()
    buckets = bandwidth.new_buckets()
    passed = 0
    for n in range(int(seconds * SECOND / every_ns)):
        if bandwidth.admit(counters, rates, buckets, TO_PEER, size, 10 * SECOND + n * every_ns):
            continue
        passed += size
    return passed


def test_a_bucket_lets_the_rate_through_plus_one_burst() -> None:
    # 4x the rate for 10 s: the rate, plus 200 ms worth, plus the packet that found the
    # bucket just under the tolerance.
    passed = offer(bandwidth.new_rates(RATE), 100, 2_500_000, 10)
    assert RATE * 10 <= passed <= RATE * 10 + RATE * BURST_NS // SECOND + 100


def test_below_the_rate_everything_passes() -> None:
    assert offer(bandwidth.new_rates(RATE), 100, 20_000_000, 10) == 100 * 500


def test_no_rate_is_no_limit() -> None:
    assert offer(bandwidth.new_rates(), 1000, 1000, 0.01) == 1000 * 10_000


def test_a_refusal_charges_nothing_and_says_which_limit() -> None:
    counters = new_counters()
    counters[USER_BUCKET] = 2
    buckets = bandwidth.new_buckets(3)
    now = 5 * SECOND
    for rates, reason in (
        (bandwidth.new_rates(RATE, 0, 0), PER_ALLOCATION),
        (bandwidth.new_rates(0, RATE, 0), PER_USER),
        (bandwidth.new_rates(0, 0, RATE), TOTAL),
    ):
        # Empty the bucket: 300 ms worth is past the 200 ms tolerance.
        assert bandwidth.admit(counters, rates, buckets, TO_PEER, 3 * RATE // 10, now) == ADMITTED
        before = (tuple(counters), tuple(buckets))
        assert bandwidth.admit(counters, rates, buckets, TO_PEER, 1, now) == reason
        assert (tuple(counters), tuple(buckets)) == before
        # The other direction has buckets of its own.
        assert bandwidth.admit(counters, rates, buckets, TO_CLIENT, 1, now) == ADMITTED
        waited = bandwidth.wait(counters, rates, buckets, TO_PEER, now)
        assert waited == 100_000_000
        assert bandwidth.admit(counters, rates, buckets, TO_PEER, 1, now + waited) == ADMITTED
        counters = new_counters()
        counters[USER_BUCKET] = 2
        buckets = bandwidth.new_buckets(3)


def test_allocations_of_one_user_share_its_bucket() -> None:
    rates = bandwidth.new_rates(0, RATE, 0)
    buckets = bandwidth.new_buckets(4)
    mine, also_mine, theirs = new_counters(), new_counters(), new_counters()
    mine[USER_BUCKET] = also_mine[USER_BUCKET] = 2
    theirs[USER_BUCKET] = 3
    now = SECOND
    assert bandwidth.admit(mine, rates, buckets, TO_PEER, 3 * RATE // 10, now) == ADMITTED
    assert bandwidth.admit(also_mine, rates, buckets, TO_PEER, 1, now) == PER_USER
    assert bandwidth.admit(theirs, rates, buckets, TO_PEER, 1, now) == ADMITTED


def test_the_node_is_at_capacity_while_its_total_drops() -> None:
    buckets = bandwidth.new_buckets()
    assert not bandwidth.at_capacity(buckets, 100 * SECOND)
    bandwidth.count_drop(new_counters(), buckets, TO_PEER, TOTAL, size=10, now=100 * SECOND)
    assert buckets[LAST_DROP] == 100 * SECOND
    assert bandwidth.at_capacity(buckets, 101 * SECOND)
    assert not bandwidth.at_capacity(buckets, 102 * SECOND)
    # Drops for other limits say nothing about the node.
    counters = new_counters()
    bandwidth.count_drop(counters, buckets, TO_CLIENT, PER_USER, size=7, now=200 * SECOND)
    assert not bandwidth.at_capacity(buckets, 200 * SECOND)
    assert counters[DROPPED + 3 + PER_USER - 1] == 7
    assert bandwidth.dropped(counters, TO_CLIENT) == 7
    assert bandwidth.dropped(counters, TO_PEER) == 0


# -- the server ---------------------------------------------------------------------------


def relaying(make_server: MakeServer, **rates: object) -> tuple[TurnTestClient, int]:
    server = make_server({"bandwidth": rates})
    client = TurnTestClient(server)
    assert client.allocate().ok
    assert client.channel_bind(0x4000, PEER).ok
    return client, 0x4000


def relayed(actions: Sequence[object]) -> int:
    return sum(len(a.data) for a in actions if isinstance(a, SendToPeer))


def test_channel_data_over_the_limit_is_dropped_and_counted(make_server: MakeServer) -> None:
    client, channel = relaying(make_server, per_allocation=RATE)
    payload = b"x" * 1000
    # 20 datagrams at one instant: 200 ms worth passes (2000 bytes), and one more.
    passed = sum(relayed(client.channel_data(channel, payload, now=T0)) for _ in range(20))
    assert passed == 3000
    allocation = client.server.allocations[client.five_tuple]
    assert allocation.bytes_to_peer == 3000
    assert bandwidth.dropped(allocation.counters, TO_PEER) == 17_000
    # A quiet second refills the bucket to its burst, not to a second's worth.
    later = T0 + 1.0
    passed = sum(relayed(client.channel_data(channel, payload, now=later)) for _ in range(20))
    assert passed == 3000


def test_send_indications_and_data_from_the_peer_count_too(make_server: MakeServer) -> None:
    client, _ = relaying(make_server, per_allocation=RATE)
    payload = b"y" * 1000
    passed = sum(relayed(client.send_indication(PEER, payload, now=T0)) for _ in range(10))
    assert passed == 3000
    allocation = client.server.allocations[client.five_tuple]
    # The peer's direction: reference path at time 0 ns, its own bucket.
    frames = [frame_for_client(allocation, PEER, payload) for _ in range(10)]
    assert sum(frame is not None for frame in frames) == 3
    assert bandwidth.dropped(allocation.counters, TO_CLIENT) == 7000


def test_a_reload_changes_the_limit_of_running_allocations(make_server: MakeServer) -> None:
    client, channel = relaying(make_server)
    payload = b"z" * 1000
    assert sum(relayed(client.channel_data(channel, payload, now=T0)) for _ in range(20)) == 20_000
    client.server.reconfigure(make_config({"bandwidth": {"per_allocation": "80 kbit/s"}}))
    later = T0 + 10
    passed = sum(relayed(client.channel_data(channel, payload, now=later)) for _ in range(20))
    assert passed == 3000
    client.server.reconfigure(make_config())
    assert (
        sum(relayed(client.channel_data(channel, payload, now=later)) for _ in range(20)) == 20_000
    )


def test_a_users_allocations_share_a_bucket_and_other_users_do_not(
    make_server: MakeServer,
) -> None:
    server = make_server({"bandwidth": {"per_user": RATE}})
    alice = TurnTestClient(server)
    alice2 = TurnTestClient(server, client=OTHER_CLIENT)
    bob = TurnTestClient(server, "bob", "bobpw", client=("203.0.113.9", 40003))
    for c in (alice, alice2, bob):
        assert c.allocate().ok
        assert c.channel_bind(0x4000, PEER).ok
    buckets = {
        c: server.allocations[c.five_tuple].counters[USER_BUCKET] for c in (alice, alice2, bob)
    }
    assert buckets[alice] == buckets[alice2] != buckets[bob]
    assert 0 not in buckets.values()
    payload = b"u" * 1000
    passed = sum(relayed(alice.channel_data(0x4000, payload, now=T0)) for _ in range(5))
    passed += sum(relayed(alice2.channel_data(0x4000, payload, now=T0)) for _ in range(5))
    assert passed == 3000
    assert sum(relayed(bob.channel_data(0x4000, payload, now=T0)) for _ in range(5)) == 3000


def test_a_users_bucket_goes_back_when_it_holds_nothing() -> None:
    node = LocalNodeState(users=2)
    assert node.hold("alice", 0, 0)
    assert node.hold("alice", 0, 0)
    assert node.hold("bob", 0, 0)
    alice, bob = node.user_bucket("alice"), node.user_bucket("bob")
    assert {alice, bob} == {2, 3}
    node.release("alice")
    assert node.user_bucket("alice") == alice
    node.release("alice")
    assert node.user_bucket("alice") == 0
    assert node.hold("carol", 0, 0)
    assert node.user_bucket("carol") == alice  # reused, and emptied
    start = alice * bandwidth.BUCKET_WORDS
    assert list(node.buckets[start : start + bandwidth.BUCKET_WORDS]) == [0] * 4


def test_allocate_gets_508_while_the_total_limit_drops(make_server: MakeServer) -> None:
    client, channel = relaying(make_server, total=RATE)
    payload = b"t" * 1000
    for _ in range(20):
        client.channel_data(channel, payload, now=T0)
    newcomer = TurnTestClient(client.server, "bob", "bobpw", client=OTHER_CLIENT)
    refused = newcomer.allocate(now=T0 + 1)
    assert refused.code == 508
    assert refused.need(ErrorCode).reason.endswith("bandwidth at capacity (bandwidth.total)")
    # Running allocations keep relaying, at the node's rate.
    assert relayed(client.channel_data(channel, payload, now=T0 + 1)) == 1000
    assert newcomer.allocate(now=T0 + 3).ok


def share_the_total(
    offers: list[tuple[float, int]], seconds: int = 10, size: int = 1000
) -> list[int]:
    """Allocations offering (rate in bytes/s, phase in ns) in `size`-byte packets with a
    steady beat, against a total of RATE: the bytes each gets through."""
    rates = bandwidth.new_rates(0, 0, RATE)
    buckets = bandwidth.new_buckets()
    senders = [new_counters() for _ in offers]
    arrivals = sorted(
        (100 * SECOND + phase + n * int(SECOND * size / rate), i)
        for i, (rate, phase) in enumerate(offers)
        for n in range(int(seconds * rate / size))
    )
    got = [0] * len(offers)
    for at, i in arrivals:
        if bandwidth.admit(senders[i], rates, buckets, TO_PEER, size, at) == ADMITTED:
            got[i] += size
    return got


def test_allocations_over_the_total_share_it_about_equally() -> None:
    # Two calls at 1.5x the total each, one always a little ahead of the other: the first
    # to come would take nearly all of it; the fair share keeps them within 10%.
    got = share_the_total([(1.5 * RATE, 0), (1.5 * RATE, 300_000)])
    assert 0.95 * RATE * 10 <= sum(got) <= 1.05 * RATE * 10
    assert min(got) >= 0.45 * sum(got), got


def test_two_calls_starting_together_share_from_their_first_second() -> None:
    """No window counted before them: the fair share comes from the window so far. With
    the window before's count alone, their first second was first come, first served:
    the one whose packets came first took it, two thirds of 3 s in all."""
    got = share_the_total([(1.5 * RATE, 0), (1.5 * RATE, 0)], seconds=3, size=100)
    assert min(got) >= 0.45 * sum(got), got


def test_a_light_sender_keeps_its_traffic_and_a_heavy_one_gets_the_rest() -> None:
    got = share_the_total([(0.2 * RATE, 0), (3 * RATE, 100_000)])
    assert got[0] >= 0.98 * 0.2 * RATE * 10, got
    assert got[1] >= 0.75 * RATE * 10, got  # the total is not left unused
    assert sum(got) <= 1.05 * RATE * 10


# How far ahead of now a bucket's TAT is: around the burst (200 ms) and its half.
offsets = st.one_of(
    st.sampled_from([-SECOND, 0, 50_000_000, 100_000_000, 200_000_000, 300_000_000, SECOND]),
    st.integers(-SECOND, 2 * SECOND),
)
State = tuple[bandwidth.Counters, bandwidth.Words]


def admit_at(state: State, rates: bandwidth.Rates, direction: int, now: int) -> int:
    counters, buckets = state
    return bandwidth.admit(counters, rates, buckets, direction, 0, now)


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(offsets, offsets, offsets, offsets),
    st.tuples(st.sampled_from([0, RATE]), st.sampled_from([0, RATE]), st.sampled_from([0, RATE])),
    st.sampled_from([TO_PEER, TO_CLIENT]),
)
def test_wait_is_when_admit_lets_bytes_through_again(
    ahead: tuple[int, int, int, int], rates: tuple[int, int, int], direction: int
) -> None:
    """What a stream waits for: at now + wait the limits let bytes through, a nanosecond
    earlier they do not (unless there was nothing to wait for)."""
    now = 100 * SECOND
    own, fair, user, total = (now + a for a in ahead)

    def state() -> State:
        counters = new_counters()
        counters[USER_BUCKET] = 2
        counters[bandwidth.TAT + direction] = own
        counters[bandwidth.FAIR_TAT + direction] = fair
        buckets = bandwidth.new_buckets(3)
        buckets[2 * bandwidth.BUCKET_WORDS + direction] = user
        buckets[direction] = total
        return counters, buckets

    limits = bandwidth.new_rates(*rates)
    counters, buckets = state()
    waited = bandwidth.wait(counters, limits, buckets, direction, now)
    assert waited >= 0
    assert admit_at(state(), limits, direction, now + waited) == ADMITTED
    if waited:
        assert admit_at(state(), limits, direction, now + waited - 1) != ADMITTED
