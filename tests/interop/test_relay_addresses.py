"""Several relay addresses of one family on a real server with two workers: each
allocation's socket is bound on the address its XOR-RELAYED-ADDRESS names, peers reach
it there, and coturn's turnutils_uclient relays through them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyturn.probe import ProbeClient, ProbeTarget, connect
from tests.interop.server_process import LOOPBACK, PASSWORD, USER, ServerFactory, ServerProcess
from tests.interop.test_coturn_migration import (
    Deployment,
    import_coturn,
    pyturn_config,
    running_coturn,
    running_pyturn,
)
from tests.interop.test_turnutils import (  # echo_peer: a fixture
    CLIENTS,
    assert_all_echoed,
    echo_peer,  # noqa: F401
    run_uclient,
)

pytestmark = pytest.mark.interop

MORE = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(
        {"workers": 2, "relay": {"more_addresses": [{"address": ip} for ip in MORE]}}
    )


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(3.0)
    yield sock
    sock.close()


def client_of(server: ServerProcess) -> ProbeClient:
    target = ProbeTarget("turn", LOOPBACK, server.udp_port, "udp")
    client = connect(target, server.udp_address, USER, PASSWORD, timeout=3.0)
    client.challenge()
    return client


def test_each_allocation_relays_from_the_address_it_is_told(
    server: ServerProcess, peer: socket.socket
) -> None:
    clients = [client_of(server) for _ in range(6)]
    try:
        hosts = []
        for number, client in enumerate(clients):
            relayed, _ = client.allocate()
            hosts.append(relayed[0])
            client.create_permission(peer.getsockname())
            payload = f"to the peer {number}".encode()
            client.send_indication(peer.getsockname(), payload)
            data, source = peer.recvfrom(2048)
            assert (data, source) == (payload, relayed)
            # The peer answers the address it was told; the socket bound there hears it.
            peer.sendto(payload[::-1], relayed)
            assert client.receive(3.0) == (peer.getsockname(), payload[::-1])
    finally:
        for client in clients:
            client.close()
    # Six clients on two workers: one worker has three or more, and takes all three.
    assert set(hosts) == {LOOPBACK, *MORE}


def test_turnutils_uclient_relays_through_several_addresses(
    server: ServerProcess,
    echo_peer: int,  # noqa: F811 (the fixture imported above)
) -> None:
    mark = server.log_mark()
    run = run_uclient(server, echo_peer)
    assert_all_echoed(server, mark, run, USER)
    relayed = [fields["relayed"] for fields in server.events("allocation created", since=mark)]
    assert len(relayed) >= CLIENTS
    assert {address.rsplit(":", 1)[0] for address in relayed} <= {LOOPBACK, *MORE}


def relayed_hosts(address: tuple[str, int], count: int) -> list[str]:
    """The relayed IPv4 address of `count` fresh UDP allocations at `address`."""
    hosts = []
    for _ in range(count):
        target = ProbeTarget("turn", address[0], address[1], "udp")
        client = connect(target, address, USER, PASSWORD, timeout=3.0)
        try:
            client.challenge()
            hosts.append(client.allocate()[0][0])
        finally:
            client.close()
    return hosts


def test_two_relay_ips_converted_from_coturn_are_used_as_coturn_uses_them(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "two-relay-ips.conf"
    conf.write_text(
        f"realm=example.org\nlt-cred-mech\nuser={USER}:{PASSWORD}\nallow-loopback-peers\n"
        f"relay-ip={LOOPBACK}\nrelay-ip={MORE[0]}\n"
    )
    deployment = Deployment("two-relay-ips", conf, [])
    imported = import_coturn(deployment)
    assert imported.config["relay"]["more_addresses"] == [{"address": MORE[0]}]
    # The migration test's coturn relays from 127.0.0.1 and ::1 (its relay-ip lines are
    # replaced for loopback); one more gives it this config's two IPv4 relay addresses.
    with running_coturn(deployment, tmp_path / "coturn", [f"--relay-ip={MORE[0]}"]) as coturn:
        coturn_hosts = relayed_hosts(coturn.udp_address, 6)
    config = pyturn_config(imported.config)
    with running_pyturn(config, tmp_path / "pyturn") as server:
        pyturn_hosts = relayed_hosts(server.udp_address, 6)
    assert set(coturn_hosts) == {LOOPBACK, MORE[0]}, coturn_hosts
    assert set(pyturn_hosts) == set(coturn_hosts), pyturn_hosts
