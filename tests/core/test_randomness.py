"""The core draws every random value from one injectable source: a seed pins them.

Relay ports (RFC 8656 §7.2 asks for unpredictable ones), CONNECTION-IDs (RFC 6062 §5.2)
and the secret behind nonces and reservation tokens all come from `TurnServer.random`.
"""

from __future__ import annotations

from pyturn.core.randomness import SeededRandom, SystemRandom
from pyturn.core.server import ConnectToPeer, TurnServer
from pyturn.wire.attributes import TRANSPORT_TCP, XorPeerAddress, XorRelayedAddress
from pyturn.wire.message import Method
from tests.core.turn_client import CLIENT, FakeBinder, TurnTestClient, make_config

WIDE_RANGE = {"relay": {"min_port": 50000, "max_port": 59999}}
PEER = ("8.8.8.8", 443)


def _seeded(seed: int) -> TurnServer:
    return TurnServer(
        make_config(WIDE_RANGE), FakeBinder(), relay_ipv4="192.0.2.10", random=SeededRandom(seed)
    )


def _relayed_ports(server: TurnServer, count: int = 5) -> list[int]:
    ports = []
    for index in range(count):
        client = TurnTestClient(server, client=(CLIENT[0], CLIENT[1] + index))
        ports.append(client.allocate().need(XorRelayedAddress).port)
    return ports


def _connection_id(server: TurnServer) -> int:
    client = TurnTestClient(server, transport="tcp")
    assert client.allocate(transport=TRANSPORT_TCP).code == 0
    (action,) = client.request(Method.CONNECT, [XorPeerAddress(*PEER)]).events_of(ConnectToPeer)
    assert isinstance(action, ConnectToPeer)
    return action.connection.connection_id


def test_the_same_seed_picks_the_same_relay_ports() -> None:
    assert _relayed_ports(_seeded(7)) == _relayed_ports(_seeded(7))


def test_another_seed_picks_other_relay_ports() -> None:
    assert _relayed_ports(_seeded(7)) != _relayed_ports(_seeded(8))


def test_the_same_seed_gives_the_same_connection_ids() -> None:
    assert _connection_id(_seeded(3)) == _connection_id(_seeded(3))
    assert _connection_id(_seeded(3)) != _connection_id(_seeded(4))


def test_the_same_seed_gives_the_same_nonces() -> None:
    """The nonce secret comes from the source too, so a seeded server's 401 is fixed."""
    nonces = []
    for server in (_seeded(5), _seeded(5), _seeded(6)):
        client = TurnTestClient(server)
        client.fetch_nonce()
        nonces.append(client.nonce)
    assert nonces[0] == nonces[1] != nonces[2]


def test_the_system_source_draws_below_its_bound_and_fresh_tokens() -> None:
    source = SystemRandom()
    assert all(0 <= source.below(3) < 3 for _ in range(1000))
    assert {source.below(3) for _ in range(1000)} == {0, 1, 2}
    assert len({source.token(12) for _ in range(1000)}) == 1000
