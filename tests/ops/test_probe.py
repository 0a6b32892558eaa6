"""`pyturn probe` against pyturn, against coturn's turnserver, and against nothing."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyturn.probe import ProbeTarget, connect, parse_turn_url
from tests.interop.server_process import LOOPBACK, next_relay_range, require_tool
from tests.net.certs import make_certificate
from tests.ops.conftest import StartServer

STEPS = (
    "binding",
    "allocate, no credentials",
    "allocate A",
    "allocate B",
    "create permissions",
    "relay A->B (Send/Data)",
    "channel bind",
    "relay B->A (ChannelData)",
    "refresh, lifetime 0",
)


def probe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyturn", "probe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    for step in STEPS:
        assert f"ok    {step} " in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1].startswith("PASS  every step passed in ")


def free_port(kind: socket.SocketKind = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- against pyturn --------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_passes_against_pyturn(start_server: StartServer, transport: str) -> None:
    server = start_server()
    url = f"turn:{LOOPBACK}:{server.ports[transport]}?transport={transport}"
    assert_passed(probe(url, "--user", "alice", "--password", "alicepw"))


def test_probe_makes_rest_credentials_from_a_secret(start_server: StartServer) -> None:
    server = start_server()
    result = probe(f"turn:{LOOPBACK}:{server.udp_port}", "--user", "x", "--secret", "rest-secret")
    assert_passed(result)
    assert ":x'" in result.stdout.splitlines()[0]  # the username is <expiry>:x


def test_a_wrong_password_fails_naming_the_step_and_the_reason(start_server: StartServer) -> None:
    server = start_server()
    result = probe(f"turn:{LOOPBACK}:{server.udp_port}", "--user", "alice", "--password", "no")
    assert result.returncode == 1
    assert "FAIL  allocate A" in result.stdout
    assert "401 Unauthorized: wrong username or password for realm 'example.org'" in (result.stdout)


def test_a_peer_policy_refusing_the_relay_address_is_explained(start_server: StartServer) -> None:
    server = start_server({"peers": {"allow": []}})
    result = probe(f"turn:{LOOPBACK}:{server.udp_port}", "--user", "alice", "--password", "alicepw")
    assert result.returncode == 1
    assert "FAIL  create permissions" in result.stdout
    assert "403" in result.stdout
    assert "peer policy refuses its own relay address 127.0.0.1" in result.stdout


def test_a_draining_server_fails_the_probe_with_508(start_server: StartServer) -> None:
    server = start_server({"shutdown_timeout": 10})
    target = ProbeTarget("turn", LOOPBACK, server.udp_port, "udp")
    holder = connect(target, (LOOPBACK, server.udp_port), "alice", "alicepw", timeout=3)
    try:
        holder.challenge()
        holder.allocate()
        mark = server.log_mark()
        server.signal(signal.SIGTERM)
        server.wait_for_log("draining ", since=mark)
        result = probe(
            f"turn:{LOOPBACK}:{server.udp_port}", "--user", "alice", "--password", "alicepw"
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert "FAIL  allocate A" in result.stdout
    assert "508 Insufficient Capacity" in result.stdout
    assert "the server is draining or out of relay ports" in result.stdout


# -- against nothing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        ("udp", "connection refused: nothing answers on UDP 127.0.0.1:"),
        ("tcp", "failed: Connection refused"),
    ],
)
def test_probe_fails_clearly_against_a_closed_port(transport: str, message: str) -> None:
    port = free_port(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
    started = time.monotonic()
    result = probe(
        f"turn:{LOOPBACK}:{port}?transport={transport}", "--user", "u", "--password", "p"
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "FAIL  binding" in result.stdout
    assert message in result.stdout
    assert result.stdout.splitlines()[-1].startswith("probe failed at 'binding': ")
    assert "Traceback" not in result.stderr


def test_probe_times_out_when_nothing_answers() -> None:
    """A UDP socket that never answers (no ICMP either): the per-step timeout applies."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        port = silent.getsockname()[1]
        result = probe(
            f"turn:{LOOPBACK}:{port}", "--user", "u", "--password", "p", "--timeout", "0.6"
        )
    assert result.returncode == 1
    assert "no answer from turn:127.0.0.1:" in result.stdout
    assert "within 0.6 s" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["http://example.org", "--user", "u", "--password", "p"], "not a TURN URL"),
        (["turn:example.org?transport=sctp", "--user", "u", "--password", "p"], "udp or tcp"),
        (["turns:example.org?transport=udp", "--user", "u", "--password", "p"], "DTLS"),
        (["turn:example.org"], "--user and --password"),
        (["turn:example.org", "--user", "u", "--password", "p", "--secret", "s"], "not both"),
    ],
)
def test_bad_command_lines_exit_2_with_a_message(args: list[str], fragment: str) -> None:
    result = probe(*args)
    assert result.returncode == 2
    assert fragment in result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("turn:192.0.2.1", ProbeTarget("turn", "192.0.2.1", 3478, "udp")),
        (
            "turn:turn.example.org:3479?transport=tcp",
            ProbeTarget("turn", "turn.example.org", 3479, "tcp"),
        ),
        ("turns:turn.example.org", ProbeTarget("turns", "turn.example.org", 5349, "tcp")),
        ("turn:[2001:db8::1]:3478?transport=UDP", ProbeTarget("turn", "2001:db8::1", 3478, "udp")),
    ],
)
def test_turn_urls_parse_as_rfc_7065_says(url: str, expected: ProbeTarget) -> None:
    assert parse_turn_url(url) == expected


# -- against coturn --------------------------------------------------------------------


@dataclass
class Coturn:
    port: int
    tls_port: int
    ca_file: Path


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn's turnserver on loopback with user u:p in realm r, TCP, UDP and TLS."""
    turnserver = require_tool("turnserver")
    directory = tmp_path_factory.mktemp("coturn")
    cert, key = make_certificate(directory)
    port, tls_port = free_port(), free_port(socket.SOCK_STREAM)
    min_port, max_port = next_relay_range()
    log = (directory / "turnserver.log").open("w")
    process = subprocess.Popen(
        [
            *(turnserver, "--lt-cred-mech", "--user", "u:p", "--realm", "r"),
            *("--listening-ip", LOOPBACK, "--relay-ip", LOOPBACK, "--allow-loopback-peers"),
            *("-p", str(port), "--tls-listening-port", str(tls_port), "--no-dtls"),
            *("--cert", str(cert), "--pkey", str(key), "--no-cli"),
            *("--min-port", str(min_port), "--max-port", str(max_port)),
            *("--pidfile", str(directory / "pid"), "--db", str(directory / "turndb")),
            *("--log-file", "stdout", "--simple-log"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=directory,
    )
    try:
        # Ready once it answers a Binding request over TCP (bounded: 10 s).
        target = ProbeTarget("turn", LOOPBACK, port, "tcp")
        deadline = time.monotonic() + 10
        while True:
            try:
                client = connect(target, (LOOPBACK, port), "u", "p", timeout=0.5)
                client.binding()
                client.close()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield Coturn(port, tls_port, cert)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_probe_passes_against_coturn(coturn: Coturn, transport: str) -> None:
    url = f"turn:{LOOPBACK}:{coturn.port}?transport={transport}"
    assert_passed(probe(url, "--user", "u", "--password", "p"))


@pytest.mark.interop
def test_probe_passes_against_coturn_over_tls_checking_its_certificate(coturn: Coturn) -> None:
    url = f"turns:localhost:{coturn.tls_port}"
    assert_passed(probe(url, "--user", "u", "--password", "p", "--ca-file", str(coturn.ca_file)))


@pytest.mark.interop
def test_probe_refuses_an_untrusted_certificate_unless_told_to(coturn: Coturn) -> None:
    url = f"turns:localhost:{coturn.tls_port}"
    result = probe(url, "--user", "u", "--password", "p")
    assert result.returncode == 1
    assert "TLS handshake with" in result.stdout
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout
    assert_passed(probe(url, "--user", "u", "--password", "p", "--insecure"))


@pytest.mark.interop
def test_probe_reports_coturns_401_for_a_wrong_password(coturn: Coturn) -> None:
    result = probe(f"turn:{LOOPBACK}:{coturn.port}", "--user", "u", "--password", "wrong")
    assert result.returncode == 1
    assert "wrong username or password for realm 'r'" in result.stdout
