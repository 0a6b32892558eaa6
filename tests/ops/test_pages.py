"""The pages' endpoints on a real pyturn with two workers: what they report, metrics.auth
from a file (and its reload), and hostile requests that change nothing."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.interop.server_process import LOOPBACK, REST_SECRET, ServerStartError
from tests.ops.conftest import StartServer
from tests.ops.helpers import (
    HTTP_TIMEOUT,
    OpsServer,
    Peer,
    basic_authorization,
    ops_config,
    relay_round_trip,
    value,
)

pytestmark = pytest.mark.interop


def status(server: OpsServer) -> dict[str, Any]:
    code, body = server.get("/status.json")
    assert code == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def raw(server: OpsServer, request: bytes) -> bytes:
    with socket.create_connection(server.metrics_address, timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_status_document_counts_what_the_workers_hold(start_server: StartServer) -> None:
    server = start_server({"workers": 2})
    idle = status(server)
    assert idle["state"] == "serving"
    assert idle["not_ready"] is None
    assert [w["ready"] for w in idle["workers"]] == [True, True]
    assert {(entry["transport"], entry["port"]) for entry in idle["listeners"]} == {
        ("udp", server.udp_port),
        ("tcp", server.tcp_port),
    }
    assert idle["relay"]["ports"] == [
        server.config["relay"]["min_port"],
        server.config["relay"]["max_port"],
    ]

    peer = Peer()
    clients = [server.client("udp"), server.client("tcp")]
    try:
        for client in clients:
            client.allocate()
            client.create_permission(peer.address)
            relay_round_trip(client, peer, b"status page " * 10)
        busy = status(server)
        samples = server.scrape()
    finally:
        for client in clients:
            client.close()
        peer.close()
    assert busy["allocations"]["udp"] == 1
    assert busy["allocations"]["tcp"] == 1
    assert busy["permissions"] == 2
    free = value(samples, "pyturn_relay_ports_available", family="ipv4")
    assert busy["relay_ports_available"]["ipv4"] == free
    sent = sum(
        value(samples, "pyturn_relayed_bytes_total", direction="client_to_peer", transport=t)
        for t in ("udp", "tcp", "tls")
    )
    assert busy["relayed_bytes"]["client_to_peer"] == sent == 2 * len(b"status page " * 10)


def test_a_minted_credential_is_made_with_the_servers_secret(start_server: StartServer) -> None:
    server = start_server({"workers": 2, "auth": {"users": None}})
    code, body = server.get("/test/ice.json")
    assert code == 200
    minted = json.loads(body)
    assert minted["mode"] == "rest"
    # The same username and password as `pyturn credentials` makes from the secret.
    client = server.client("udp", user=minted["username"], password=minted["credential"])
    try:
        relayed, lifetime = client.allocate()
    finally:
        client.close()
    assert relayed[0] == LOOPBACK
    assert lifetime > 0
    assert REST_SECRET not in body


def test_metrics_auth_asks_every_page_but_health_checks_and_reloads(
    start_server: StartServer, tmp_path: Path
) -> None:
    users = tmp_path / "ops-users"
    users.write_text("prometheus:first-pw\n")
    server = start_server({"workers": 2, "metrics": {"auth": str(users)}})
    assert server.get("/live")[0] == 200
    assert server.get("/ready")[0] == 200
    for path in ("/", "/metrics", "/status.json", "/test/ice.json"):
        assert server.get(path)[0] == 401
        assert server.get(path, basic_authorization("prometheus", "wrong"))[0] == 401
        assert server.get(path, basic_authorization("prometheus", "first-pw"))[0] == 200

    users.write_text("prometheus:second-pw\n")
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log("config reload sent", since=mark)
    assert server.get("/metrics", basic_authorization("prometheus", "second-pw"))[0] == 200
    assert server.get("/metrics", basic_authorization("prometheus", "first-pw"))[0] == 401

    # A broken file on reload keeps the users the ops port had.
    users.write_text("no colon\n")
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log("the ops port keeps its previous users", since=mark)
    assert server.get("/metrics", basic_authorization("prometheus", "second-pw"))[0] == 200


def test_an_unreadable_auth_file_stops_the_start(tmp_path: Path) -> None:
    server = OpsServer(ops_config({"metrics": {"auth": str(tmp_path / "absent")}}), tmp_path)
    with pytest.raises(ServerStartError):
        server.start()
    server.stop()
    assert "metrics.auth: " + str(tmp_path / "absent") + ": No such file" in server.log_text


def test_hostile_requests_to_a_real_server_get_4xx_and_change_nothing(
    start_server: StartServer,
) -> None:
    server = start_server({"workers": 2})
    before = server.scrape()
    requests = [
        (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
        (b"GET /assets/%2e%2e/test.js HTTP/1.1\r\n\r\n", 404),
        (b"GET /?<script>alert(1)</script> HTTP/1.1\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nX-Huge: " + b"h" * 20_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 500 + b"\r\n", 431),
        (b"GET /test/ice.json HTTP/1.1\r\nHost: evil\r\nbad header\r\n\r\n", 400),
        (b"PUT /status.json HTTP/1.1\r\n\r\n", 405),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", 400),
    ]
    for request, expected in requests:
        answer = raw(server, request)
        assert int(answer.split(b" ", 2)[1]) == expected, request[:40]
        assert b"alert(" not in answer
    assert "credential" not in server.log_text.split("metrics on", 1)[1]
    after = server.scrape()
    for name in (
        "pyturn_allocations",
        "pyturn_auth_failures_total",
        "pyturn_requests_total",
    ):
        assert {k: v for k, v in before.items() if k[0] == name} == {
            k: v for k, v in after.items() if k[0] == name
        }
    assert server.get("/ready")[0] == 200
