"""The control socket of a real server, and the commands that use it.

`pyturn sessions|kick|revoke|reload|drain` against real `pyturn serve` processes with two
workers (the supervisor serves the socket and asks the workers) and with one (the
worker serves it itself); hostile clients on the socket; the socket file's life.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyturn.core.auth import rest_password, rest_username
from pyturn.net.control_socket import IDLE_TIMEOUT, MAX_CLIENTS, REQUEST_LIMIT
from pyturn.probe import ProbeClient, ProbeError
from tests.interop.server_process import REST_SECRET, USER, ServerStartError
from tests.interop.server_process import run_pyturn as pyturn
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, Peer, ops_config, value, wait_until

CLIENTS = 6  # 5-tuples per check: with two workers, both are all but surely among them
OPEN_BUDGET = {"unauthenticated_burst": 100_000, "unauthenticated_rate": 100_000.0}


def control(tmp_path: Path, workers: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "workers": workers,
        "control": {"socket": str(tmp_path / "ctl.sock"), "state_file": str(tmp_path / "s.json")},
        "limits": OPEN_BUDGET,
        **extra,
    }


def ask(path: Path, payload: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """Send raw bytes on the socket, read one answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # A socket that is busy answers at once and hangs up without reading: its answer
        # is still there to read.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(payload)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return answer


def sessions(path: Path, *args: str) -> list[dict[str, Any]]:
    result = pyturn("sessions", "--json", "--socket", str(path), *args)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def allocated(server: OpsServer, count: int, user: str = USER) -> list[ProbeClient]:
    clients = []
    for _ in range(count):
        client = server.client(user=user)
        client.allocate()
        clients.append(client)
    return clients


def allocate_codes(server: OpsServer, count: int = CLIENTS) -> list[int | None]:
    """The answer to an Allocate on `count` new 5-tuples: None for success, else the code."""
    codes: list[int | None] = []
    for _ in range(count):
        client = server.client()
        try:
            client.allocate()
            codes.append(None)
        except ProbeError as exc:
            codes.append(int(str(exc).split("refused: ")[1][:3]))
        finally:
            client.close()
    return codes


@pytest.fixture
def two_workers(start_server: StartServer, tmp_path: Path) -> tuple[OpsServer, Path]:
    server = start_server(control(tmp_path))
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    return server, tmp_path / "ctl.sock"


# -- the commands -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sessions_lists_every_allocation_of_the_node_and_kick_ends_them(
    start_server: StartServer, tmp_path: Path, workers: int
) -> None:
    server = start_server(control(tmp_path, workers))
    path = tmp_path / "ctl.sock"
    clients = allocated(server, CLIENTS)
    rows = sessions(path)
    assert len(rows) == CLIENTS
    assert {row["user"] for row in rows} == {USER}
    # The relayed addresses are the ones the clients were given.
    assert {row["relayed"][0] for row in rows} == {
        f"{c.relayed[0]}:{c.relayed[1]}" for c in clients if c.relayed is not None
    }
    assert {row["worker"] for row in rows} <= set(range(workers))
    kick = pyturn("kick", "--user", USER, "--socket", str(path))
    assert kick.returncode == 0, kick.stderr
    assert kick.stdout.strip() == f"kicked {CLIENTS} allocations on this node"
    assert sessions(path) == []
    assert len(server.events("allocation deleted")) == CLIENTS
    assert {e["reason"] for e in server.events("allocation deleted")} == {"kicked"}
    samples = server.scrape()
    assert value(samples, "pyturn_allocations_deleted_total", reason="kicked") == CLIENTS
    for client in clients:
        with pytest.raises(ProbeError, match="437"):
            client.refresh(600)
        client.close()


def test_a_kicked_allocation_stops_relaying_at_once(two_workers: tuple[OpsServer, Path]) -> None:
    server, path = two_workers
    peer = Peer()
    client = allocated(server, 1)[0]
    client.create_permission(peer.address)
    client.channel_bind(0x4001, peer.address)
    client.send_channel_data(0x4001, b"before")
    assert peer.sock.recvfrom(100)[0] == b"before"
    assert client.relayed is not None
    relayed = f"{client.relayed[0]}:{client.relayed[1]}"
    assert pyturn("kick", "--relayed", relayed, "--socket", str(path)).returncode == 0
    client.send_channel_data(0x4001, b"after")
    client.send_indication(peer.address, b"after")
    peer.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        peer.sock.recvfrom(100)


def test_a_revoked_user_is_kicked_then_refused_on_every_worker(
    two_workers: tuple[OpsServer, Path],
) -> None:
    server, path = two_workers
    clients = allocated(server, 2)
    result = pyturn("revoke", "--user", USER, "--for", "10m", "--socket", str(path))
    assert result.returncode == 0, result.stderr
    assert "2 allocations ended" in result.stdout
    assert allocate_codes(server) == [401] * CLIENTS
    server.wait_for_event("auth failed", user=USER, reason="revoked")
    listing = pyturn("revoke", "--list", "--socket", str(path))
    assert listing.stdout.startswith(f"{USER}\tuntil 20")
    assert pyturn("revoke", "--remove", "--user", USER, "--socket", str(path)).returncode == 0
    assert allocate_codes(server) == [None] * CLIENTS
    for client in clients:
        client.close()


def test_a_revocation_outlives_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    first = start_server(control(tmp_path))
    path = tmp_path / "ctl.sock"
    assert pyturn("revoke", "--user", USER, "--socket", str(path)).returncode == 0
    assert first.stop() == 0
    second = start_server(control(tmp_path))
    second.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    assert allocate_codes(second) == [401] * CLIENTS
    listing = pyturn("revoke", "--list", "--socket", str(path))
    assert listing.stdout == f"{USER}\tuntil removed\n"


def test_a_restarted_worker_starts_with_the_revocations(
    two_workers: tuple[OpsServer, Path],
) -> None:
    server, path = two_workers
    assert pyturn("revoke", "--user", USER, "--socket", str(path)).returncode == 0
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
    mark = server.log_mark()
    os.kill(int(children.read_text().split()[0]), signal.SIGKILL)
    server.wait_for_log(r"restarting it", since=mark, timeout=5)
    # Back to two ready workers: /ready says 200 only then.
    wait_until(lambda: server.get("/ready")[0] == 200, timeout=10)
    assert allocate_codes(server, 2 * CLIENTS) == [401] * (2 * CLIENTS)


def test_reload_through_the_socket_says_why_a_bad_config_is_refused(
    two_workers: tuple[OpsServer, Path],
) -> None:
    server, path = two_workers
    good = pyturn("reload", "--socket", str(path))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == "config reloaded"
    server.wait_for_log("config reload taken by 2 of 2 workers")
    config = yaml.safe_load(server.config_path.read_text())
    config["listening_port"] = 3478
    server.config_path.write_text(yaml.safe_dump(config))
    bad = pyturn("reload", "--socket", str(path))
    assert bad.returncode == 1
    assert "listening_port" in bad.stderr
    assert "config refused, still running the old one" in bad.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_through_the_socket_stops_the_server(
    start_server: StartServer, tmp_path: Path, workers: int
) -> None:
    server = start_server(control(tmp_path, workers, shutdown_timeout=5))
    path = tmp_path / "ctl.sock"
    client = allocated(server, 1)[0]
    result = pyturn("drain", "--socket", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "draining: new allocations refused"
    server.wait_for_log("draining")
    # A worker with nothing to drain stops at once: a new client that the kernel hashes
    # to its socket gets no answer at all.
    with pytest.raises(ProbeError, match=r"508|no answer"):
        server.client().allocate()
    client.refresh(0)  # the last allocation ends: the drain is over
    assert server.wait_exit(10) == 0
    assert not path.exists()


def test_the_commands_find_the_socket_through_the_config(
    two_workers: tuple[OpsServer, Path],
) -> None:
    server, _ = two_workers
    result = pyturn("sessions", "-c", str(server.config_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "no sessions"


def test_the_commands_say_clearly_when_no_server_runs(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    for command in (["sessions"], ["kick", "--user", "x"], ["revoke", "--list"], ["reload"]):
        result = pyturn(*command, "--socket", str(path))
        assert result.returncode == 1
        assert result.stderr.strip() == f"Error: pyturn is not running: nothing answers on {path}"
    config = tmp_path / "pyturn.yaml"
    config.write_text(yaml.safe_dump(ops_config(control(tmp_path))))
    result = pyturn("drain", "-c", str(config))
    assert result.returncode == 1
    assert "pyturn is not running" in result.stderr


def test_kick_without_a_target_is_a_usage_error(tmp_path: Path) -> None:
    result = pyturn("kick", "--socket", str(tmp_path / "ctl.sock"))
    assert result.returncode == 2
    assert "give --user, --client or --relayed" in result.stderr
    result = pyturn("revoke", "--user", "x", "--for", "soon", "--socket", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "not a duration" in result.stderr


# -- the socket itself ----------------------------------------------------------------------


def test_the_socket_is_a_socket_with_mode_0660(two_workers: tuple[OpsServer, Path]) -> None:
    _, path = two_workers
    found = os.lstat(path)
    assert stat.S_ISSOCK(found.st_mode)
    assert stat.S_IMODE(found.st_mode) == 0o660


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"hello\n", "not a JSON object"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"[1, 2]\n", 'a request is a JSON object with an "op"'),
        (b'{"op": 5}\n', 'a request is a JSON object with an "op"'),
        (b'{"op": "format-disk"}\n', "unknown op 'format-disk'"),
        (b'{"op": "kick", "match": {}}\n', "kick needs --user, --client or --relayed"),
        (b'{"op": "kick", "match": {"client": "::x"}}\n', "not an address"),
        (b'{"op": "kick", "match": "alice"}\n', "match must be an object"),
        (b'{"op": "revoke", "user": "a", "for": -1}\n', '"for" must be a number of seconds'),
        (b'{"op": "revoke", "user": "a", "for": "1h"}\n', '"for" must be a number of seconds'),
        (b'{"op": "revoke"}\n', "revoke needs a user"),
        (b'{"op": "sessions", "fleet": true}\n', "--fleet needs a Redis store"),
    ],
)
def test_malformed_requests_get_an_error_answer(
    two_workers: tuple[OpsServer, Path], payload: bytes, error: str
) -> None:
    server, path = two_workers
    answer = ask(path, payload)
    assert answer["ok"] is False
    assert answer["error"].startswith(error)
    assert ask(path, b'{"op": "ping"}\n')["ok"] is True
    assert "Traceback" not in server.log_text


def test_a_huge_request_is_refused_and_the_socket_serves_on(
    two_workers: tuple[OpsServer, Path],
) -> None:
    _, path = two_workers
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        # The server may close while we are still writing.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"op": "ping", "pad": "' + b"x" * (4 * REQUEST_LIMIT))
        answer = read_answer(sock)
    assert answer == {"ok": False, "error": f"request longer than {REQUEST_LIMIT} bytes"}
    assert ask(path, b'{"op": "ping"}\n')["workers"] == 2


def test_a_stalled_half_written_request_does_not_block_other_clients(
    two_workers: tuple[OpsServer, Path],
) -> None:
    _, path = two_workers
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(path))
    stalled.sendall(b'{"op": "sess')
    started = time.monotonic()
    assert ask(path, b'{"op": "sessions"}\n') == {"ok": True, "sessions": [], "missing_workers": 0}
    assert time.monotonic() - started < 2
    # The stalled client is dropped once its idle time is over.
    stalled.settimeout(IDLE_TIMEOUT + 5)
    assert stalled.recv(100) == b""
    stalled.close()


def test_several_requests_on_one_connection_and_a_client_that_reads_nothing(
    two_workers: tuple[OpsServer, Path],
) -> None:
    _, path = two_workers
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b'{"op": "ping"}\n\n{"op": "revocations"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += sock.recv(65536)
        first, second = (json.loads(line) for line in data.splitlines())
        assert first["workers"] == 2
        assert second == {"ok": True, "revoked": {}}
    # Many requests, never read: the server must not buffer answers without end.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as greedy:
        greedy.connect(str(path))
        greedy.settimeout(2)
        try:
            for _ in range(2000):
                greedy.sendall(b'{"op": "ping"}\n' * 50)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        assert ask(path, b'{"op": "ping"}\n')["ok"] is True


def test_more_than_max_clients_at_once_are_told_the_socket_is_busy(
    two_workers: tuple[OpsServer, Path],
) -> None:
    _, path = two_workers
    held = []
    for _ in range(MAX_CLIENTS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        held.append(sock)
    # Each held client is being served (blocked reading), so the next one is one too many.
    wait_until(lambda: ask(path, b'{"op": "ping"}\n')["ok"] is False, timeout=5)
    answer = ask(path, b'{"op": "ping"}\n')
    assert answer == {"ok": False, "error": f"busy: {MAX_CLIENTS} control clients already"}
    for sock in held:
        sock.close()
    wait_until(lambda: ask(path, b'{"op": "ping"}\n')["ok"] is True, timeout=5)


def test_a_socket_file_left_by_a_crashed_server_is_replaced(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(control(tmp_path))
    path = tmp_path / "ctl.sock"
    assert first.process is not None
    first.process.kill()  # the supervisor: no clean-up
    first.process.wait(10)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    # Its workers notice the supervisor has gone and stop.
    time.sleep(0.5)
    second = start_server(control(tmp_path))
    assert ask(path, b'{"op": "ping"}\n')["pid"] == second.pid


def test_a_second_server_does_not_take_a_running_servers_socket(
    start_server: StartServer, tmp_path: Path
) -> None:
    first = start_server(control(tmp_path))
    path = tmp_path / "ctl.sock"
    with pytest.raises(ServerStartError, match="another server is running on it"):
        start_server(control(tmp_path))
    assert ask(path, b'{"op": "ping"}\n')["pid"] == first.pid


def test_a_file_that_is_not_a_socket_is_left_alone(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(ServerStartError, match="exists and is not a socket: not replacing it"):
        start_server(control(tmp_path, 1))
    assert path.read_text() == "precious"


def test_without_the_sockets_directory_the_server_runs_and_says_so(
    start_server: StartServer, tmp_path: Path
) -> None:
    overrides = control(tmp_path)
    overrides["control"]["socket"] = str(tmp_path / "missing" / "ctl.sock")
    server = start_server(overrides)
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    server.wait_for_log(r"no control socket: its directory .*missing does not exist")
    status, _ = server.get("/ready")
    assert status == 200


def test_a_corrupt_state_file_stops_the_start(start_server: StartServer, tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"revoked": {"alice": "later"}}')
    with pytest.raises(ServerStartError, match=r"control.state_file .*s.json"):
        start_server(control(tmp_path))


def test_the_state_file_is_private(two_workers: tuple[OpsServer, Path], tmp_path: Path) -> None:
    _, path = two_workers
    assert pyturn("revoke", "--user", "mallory", "--socket", str(path)).returncode == 0
    state = tmp_path / "s.json"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert json.loads(state.read_text()) == {"revoked": {"mallory": None}}


def test_a_worker_that_does_not_answer_is_reported_and_kick_fails(
    two_workers: tuple[OpsServer, Path],
) -> None:
    server, path = two_workers
    stuck = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
    os.kill(stuck, signal.SIGSTOP)
    try:
        listed = pyturn("sessions", "--socket", str(path))
        assert listed.returncode == 0
        assert "warning: 1 workers did not answer (restarting?)" in listed.stderr
        kicked = pyturn("kick", "--user", USER, "--socket", str(path))
        assert kicked.returncode == 1
        assert "their allocations were not kicked; run kick again" in kicked.stderr
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert pyturn("kick", "--user", USER, "--socket", str(path)).returncode == 0


def test_end_expired_sessions_ends_an_allocation_when_its_credential_expires(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(control(tmp_path, auth={"end_expired_sessions": True}))
    path = tmp_path / "ctl.sock"
    name = rest_username(int(time.time()) + 2, "carol")
    short = server.client(user=name, password=rest_password(REST_SECRET, name))
    short.allocate()
    lasting = allocated(server, 1)[0]
    assert {row["quota_user"] for row in sessions(path)} == {"carol", USER}
    event = server.wait_for_event("allocation deleted", timeout=5, reason="credential_expired")
    assert event["user"] == name
    assert [row["user"] for row in sessions(path)] == [USER]
    lasting.refresh(600)
