"""coturn's own TURN client (turnutils_uclient) relaying through pyturn to turnutils_peer.

turnutils_peer is coturn's UDP echo server; uclient allocates, installs permissions or
channels, sends 50 messages per client (-m 2 clients) to the peer through the relay
and counts the echoes. Every address involved is 127.0.0.1.

Note on flags (from `turnutils_uclient` 4.6.1's usage text): `-c` means "no RTCP
connections", not "no channels"; the Send-indication mode is `-s` ("use send method").
Both are exercised.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyturn.core.auth import rest_password, rest_username
from pyturn.net import batch
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    REST_SECRET,
    USER,
    ServerFactory,
    ServerProcess,
    base_config,
    relayed_packets,
    require_tool,
    stop_process,
)

pytestmark = pytest.mark.interop

MESSAGES = 50
CLIENTS = 2
TOOL_TIMEOUT = 30.0


@dataclass(frozen=True)
class UclientRun:
    returncode: int
    output: str

    @property
    def sent(self) -> int | None:
        found = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=\d+\s*$", self.output, re.M)
        return int(found[-1]) if found else None

    @property
    def received(self) -> int | None:
        found = re.findall(r"tot_send_msgs=\d+, tot_recv_msgs=(\d+)\s*$", self.output, re.M)
        return int(found[-1]) if found else None

    @property
    def lost(self) -> int | None:
        found = re.findall(r"Total lost packets (\d+)", self.output)
        return int(found[-1]) if found else None


def free_udp_port(host: str = LOOPBACK) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_echo(port: int, host: str = LOOPBACK, timeout: float = 5.0) -> None:
    """Probe the UDP echo peer until it answers (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(0.1)
        for _ in range(int(timeout / 0.1) + 1):
            sock.sendto(b"probe", (host, port))
            try:
                if sock.recv(64) == b"probe":
                    return
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"turnutils_peer on {host} port {port} did not echo within {timeout} s")


@contextlib.contextmanager
def turnutils_peer(host: str = LOOPBACK) -> Iterator[int]:
    """coturn's UDP echo server (turnutils_peer) on `host`, once it echoes; yields its port."""
    tool = require_tool("turnutils_peer")
    port = free_udp_port(host)
    process = subprocess.Popen(
        [tool, "-p", str(port), "-L", host],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port, host)
        yield port
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def echo_peer() -> Iterator[int]:
    """turnutils_peer listening on 127.0.0.1:<free port>; yields the port."""
    with turnutils_peer() as port:
        yield port


def run_uclient(
    server: ServerProcess,
    peer_port: int,
    *flags: str,
    user: str = USER,
    password: str | None = PASSWORD,
    secret: str | None = None,
) -> UclientRun:
    port = server.tcp_port if "-t" in flags else server.udp_port
    return uclient_at(port, peer_port, *flags, user=user, password=password, secret=secret)


def uclient_at(
    port: int,
    peer_port: int,
    *flags: str,
    user: str = USER,
    password: str | None = PASSWORD,
    secret: str | None = None,
) -> UclientRun:
    """turnutils_uclient against 127.0.0.1:`port` (any TURN server: pyturn or coturn)."""
    tool = require_tool("turnutils_uclient")
    credentials = ["-u", user]
    credentials += ["-W", secret] if secret is not None else ["-w", password or ""]
    command = [
        tool,
        *flags,
        "-p",
        str(port),
        "-e",
        LOOPBACK,
        "-r",
        str(peer_port),
        *credentials,
        "-n",
        str(MESSAGES),
        "-m",
        str(CLIENTS),
        "-l",
        "170",
        LOOPBACK,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    return UclientRun(result.returncode, result.stdout + result.stderr)


def packets_for(server: ServerProcess, mark: int, user: str) -> tuple[int, int]:
    """(to_peer, to_client) packets of the allocations of users matching regex `user`
    deleted since `mark`, from the server's "allocation deleted" lines."""
    counts = [
        relayed_packets(fields)
        for fields in server.events("allocation deleted", since=mark)
        if re.fullmatch(user, fields.get("user", ""))
    ]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def assert_all_echoed(server: ServerProcess, mark: int, run: UclientRun, user: str) -> None:
    total = MESSAGES * CLIENTS
    assert run.returncode == 0, run.output
    assert run.lost == 0, run.output
    assert run.sent == total, run.output
    assert run.received == total, run.output
    # uclient deletes its allocations (Refresh, LIFETIME 0) before it exits; the server
    # logs how much each one relayed. Unused allocations it leaves behind only expire.
    deadline = time.monotonic() + 5.0
    for _ in range(50):
        if packets_for(server, mark, user) == (total, total):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert packets_for(server, mark, user) == (total, total), server.log_since(mark)


@pytest.mark.parametrize(
    ("flags", "transport"),
    [
        pytest.param((), "udp", id="udp-channels"),
        pytest.param(("-s",), "udp", id="udp-send-indications"),
        pytest.param(("-t",), "tcp", id="tcp-channels"),
    ],
)
def test_uclient_relays_every_message_to_the_peer_and_back(
    turn_server: ServerProcess, echo_peer: int, flags: tuple[str, ...], transport: str
) -> None:
    """RFC 8656 §7-§12: Allocate, permissions/channels, Send/Data or ChannelData, Refresh.

    coturn's client must get all 100 echoes with no loss, over UDP with channels (the
    default), with Send/Data indications (-s) and over TCP (-t, with ChannelData padded to
    4 bytes, RFC 8656 §12.5). The REST tests below run without the RTCP allocations (-c).
    """
    mark = turn_server.log_mark()
    run = run_uclient(turn_server, echo_peer, *flags)
    assert_all_echoed(turn_server, mark, run, USER)
    created = turn_server.events("allocation created", since=mark)
    assert created, turn_server.log_since(mark)
    assert {(fields["user"], fields["transport"]) for fields in created} == {(USER, transport)}


def test_uclient_with_the_rest_api_shared_secret_relays_every_message(
    turn_server: ServerProcess, echo_peer: int
) -> None:
    """TURN REST API (draft-uberti-behave-turn-rest): `-W secret` makes uclient derive
    `<expiry>:alice` and base64(HMAC-SHA1(secret, username)); the server accepts it."""
    mark = turn_server.log_mark()
    run = run_uclient(turn_server, echo_peer, user=USER, password=None, secret=REST_SECRET)
    assert_all_echoed(turn_server, mark, run, rf"\d+:{USER}")


def test_uclient_with_a_computed_rest_credential_relays_every_message(
    turn_server: ServerProcess, echo_peer: int
) -> None:
    """TURN REST API credential computed by pyturn, given to uclient as -u/-w."""
    username = rest_username(int(time.time()) + 600, "carol")
    mark = turn_server.log_mark()
    run = run_uclient(
        turn_server, echo_peer, "-c", user=username, password=rest_password(REST_SECRET, username)
    )
    assert_all_echoed(turn_server, mark, run, re.escape(username))


def test_uclient_with_an_expired_rest_credential_gets_no_allocation(
    server_factory: ServerFactory, echo_peer: int
) -> None:
    """An expired REST username is refused with 401 (RFC 8489 §9.2.4) and logged.

    A server of its own: auth-failure log lines are rate-limited per client address.
    """
    server = server_factory()
    username = rest_username(int(time.time()) - 3600, "mallory")
    run = run_uclient(
        server, echo_peer, "-c", user=username, password=rest_password(REST_SECRET, username)
    )
    assert run.returncode != 0 or not run.received, run.output
    server.wait_for_event("auth failed", user=username, reason="expired_rest_credential")
    assert not server.events("allocation created"), server.log_text


def test_the_session_server_reads_and_writes_udp_in_batches(turn_server: ServerProcess) -> None:
    """With the native module built (test_batch checks that it is), the server uses it."""
    if not batch.NATIVE:
        pytest.skip("the native batching module is not built here")
    turn_server.wait_for_log(r"udp i/o: recvmmsg/sendmmsg batches")


@pytest.mark.parametrize("flags", [(), ("-s",)], ids=["channels", "send-indications"])
def test_uclient_relays_every_message_through_the_pure_python_udp_path(
    tmp_path: Path, echo_peer: int, flags: tuple[str, ...]
) -> None:
    """PYTURN_NO_NATIVE=1: one system call per datagram, the same results."""
    with ServerProcess(base_config(), tmp_path, env={"PYTURN_NO_NATIVE": "1"}) as server:
        server.wait_for_log(r"udp i/o: one system call per datagram")
        mark = server.log_mark()
        run = run_uclient(server, echo_peer, *flags)
        assert_all_echoed(server, mark, run, USER)
