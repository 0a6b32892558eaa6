"""SIGHUP reloads, SIGTERM drains, a second signal stops at once: on a real process."""

from __future__ import annotations

import signal
import time

import pytest
import yaml

from pyturn.probe import ProbeError
from pyturn.wire.attributes import AlternateServer, ErrorCode, RequestedTransport
from pyturn.wire.message import Method
from tests.interop.server_process import PASSWORD, USER
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, Peer, relay_round_trip, value

ALLOCATE_UDP = [RequestedTransport(17)]


def rewrite_config(server: OpsServer, **changes: object) -> None:
    config = dict(server.config, **changes)
    server.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def reload(server: OpsServer, expect: str) -> None:
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log(expect, since=mark)


def refused_allocate_code(server: OpsServer, user: str = USER, password: str = PASSWORD) -> int:
    client = server.client(user=user, password=password)
    try:
        code = client.request(Method.ALLOCATE, ALLOCATE_UDP).get(ErrorCode)
    finally:
        client.close()
    assert code is not None, "the Allocate succeeded"
    return code.code


def test_sighup_adds_and_removes_users_without_dropping_a_live_allocation(
    start_server: StartServer,
) -> None:
    server = start_server({"auth": {"users": {"alice": "alicepw", "bob": "bobpw"}}})
    peer = Peer()
    alice = server.client()
    try:
        alice.allocate()
        alice.create_permission(peer.address)
        relay_round_trip(alice, peer, b"before the reload")

        auth = dict(server.config["auth"], users={"alice": "alicepw", "carol": "carolpw"})
        rewrite_config(server, auth=auth)
        reload(server, r"config reloaded .*users=2")

        # The live allocation still relays, both ways, and can still be refreshed.
        relay_round_trip(alice, peer, b"after the reload")
        alice.refresh(600)
        # The added user can allocate; the removed one is refused with 401.
        carol = server.client(user="carol", password="carolpw")
        carol.allocate()
        carol.close()
        assert refused_allocate_code(server, "bob", "bobpw") == 401
        samples = server.scrape()
        assert value(samples, "pyturn_config_reloads_total", result="success") == 1
        assert value(samples, "pyturn_allocations_deleted_total", reason="shutdown") == 0
    finally:
        alice.close()
        peer.close()


def test_an_invalid_config_on_sighup_is_refused_and_the_old_one_stays(
    start_server: StartServer,
) -> None:
    server = start_server()
    server.config_path.write_text(
        yaml.safe_dump(dict(server.config, realm="changed", colour="red"))
    )
    reload(server, r"ERROR .*config reload refused, keeping the running config: .*colour")
    # Still the old realm and users.
    alice = server.client()
    try:
        assert alice.realm == server.config["realm"]
        alice.allocate()
    finally:
        alice.close()
    samples = server.scrape()
    assert value(samples, "pyturn_config_reloads_total", result="failure") == 1
    assert value(samples, "pyturn_config_reloads_total", result="success") == 0


def test_sigterm_drains_live_allocations_refuses_new_ones_and_exits_0_when_they_end(
    start_server: StartServer,
) -> None:
    server = start_server({"shutdown_timeout": 20})
    peer = Peer()
    alice = server.client()
    try:
        alice.allocate()
        alice.create_permission(peer.address)
        mark = server.log_mark()
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"draining .*allocations=1", since=mark)

        assert server.get("/ready") == (503, "not ready: draining\n")
        assert server.get("/live") == (200, "live\n")
        assert value(server.scrape(), "pyturn_draining") == 1
        # RFC 8656 §7.2 step 8 (no alternate server configured): 508.
        assert refused_allocate_code(server) == 508
        # The live allocation keeps relaying.
        relay_round_trip(alice, peer, b"while draining")
        # When the last allocation ends, the process exits 0.
        started = time.monotonic()
        alice.refresh(0)
        assert server.wait_exit(timeout=5) == 0
        assert time.monotonic() - started < 5
    finally:
        alice.close()
        peer.close()
    assert "drained: every allocation has ended" in server.log_text


def test_draining_with_an_alternate_server_answers_300_try_alternate(
    start_server: StartServer,
) -> None:
    server = start_server({"shutdown_timeout": 20, "alternate_server": "127.0.0.1:3479"})
    alice = server.client()
    newcomer = server.client()
    try:
        alice.allocate()
        mark = server.log_mark()
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"draining ", since=mark)
        response = newcomer.request(Method.ALLOCATE, ALLOCATE_UDP)
        code = response.get(ErrorCode)
        assert code is not None and code.code == 300
        assert response.get(AlternateServer) == AlternateServer("127.0.0.1", 3479)
        with pytest.raises(ProbeError, match="300 Try Alternate"):
            newcomer.allocate()
    finally:
        alice.close()
        newcomer.close()


def test_a_drain_ends_when_shutdown_timeout_passes(start_server: StartServer) -> None:
    server = start_server({"shutdown_timeout": 1.0})
    alice = server.client()
    try:
        alice.allocate()
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(timeout=5) == 0
        elapsed = time.monotonic() - started
    finally:
        alice.close()
    assert 0.9 <= elapsed < 4
    server.wait_for_log(r"shutdown_timeout \(1 s\) passed: closing 1 allocations")
    server.wait_for_log(r"allocation deleted .*reason=shutdown")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_while_draining_stops_at_once(
    start_server: StartServer, second: signal.Signals
) -> None:
    server = start_server({"shutdown_timeout": 30})
    alice = server.client()
    try:
        alice.allocate()
        mark = server.log_mark()
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"draining ", since=mark)
        started = time.monotonic()
        server.signal(second)
        assert server.wait_exit(timeout=5) == 0
        assert time.monotonic() - started < 2
    finally:
        alice.close()
    server.wait_for_log(rf"{second.name} again: stopping at once")


def test_sigterm_without_allocations_stops_at_once(start_server: StartServer) -> None:
    server = start_server({"shutdown_timeout": 30})
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=5) == 0
    assert time.monotonic() - started < 2
