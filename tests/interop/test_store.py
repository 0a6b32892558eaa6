"""Users and secrets from a SQLite store, changed under a running server (`store:`).

The changes are made as an operator makes them, by the `pyturn user` / `pyturn secret`
commands in their own processes (and by coturn's turnadmin), while a server with two
workers runs; clients on several 5-tuples (so on either worker) must see each change
within a second, with no reload.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pyturn.core.auth import rest_password, rest_username
from pyturn.probe import ProbeError
from pyturn.wire.attributes import TRANSPORT_UDP, RequestedTransport
from pyturn.wire.message import MessageClass
from tests.interop.server_process import (
    REALM,
    ServerFactory,
    ServerProcess,
    ServerStartError,
    base_config,
    merge_config,
)
from tests.interop.test_turnutils import assert_all_echoed, run_uclient, turnutils_peer
from tests.interop.turn_wire_client import error_code, open_client

pytestmark = pytest.mark.interop

WITHIN = 1.0  # seconds a change may take to reach every worker
CLIENTS = 6  # 5-tuples per check: with two workers, both are all but surely among them
# Every check starts with 401s from one source address: more than the default budget.
OPEN_BUDGET = {"unauthenticated_burst": 100_000, "unauthenticated_rate": 100_000.0}


def pyturn(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyturn", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def stored(tmp_path: Path, server_factory: ServerFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A two-worker server whose store holds dave; the config file the commands use."""
    config = merge_config(
        base_config(), {"workers": 2, "store": f"sqlite://{tmp_path}/users.db", "auth": None}
    )
    config_path = tmp_path / "commands.yaml"
    config_path.write_text(yaml.safe_dump(config))
    added = pyturn(
        "user", "add", "dave", "-c", str(config_path), "--password-stdin", stdin="davepw\n"
    )
    assert added.returncode == 0, added.stderr
    server = server_factory({"workers": 2, "store": config["store"], "limits": OPEN_BUDGET})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    yield server, config_path


def allocate_codes(server: ServerProcess, username: str, password: str) -> list[int | None]:
    """The answer to an Allocate on each of CLIENTS new 5-tuples (0: success)."""
    codes: list[int | None] = []
    for _ in range(CLIENTS):
        client = open_client("udp", server.udp_address, username=username, password=password)
        try:
            client.login()
            msg = client.allocate_with([RequestedTransport(TRANSPORT_UDP)])
            codes.append(0 if msg.msg_class == MessageClass.SUCCESS else error_code(msg))
            if msg.msg_class == MessageClass.SUCCESS:
                client.refresh(0)
        except ProbeError:
            codes.append(None)
        finally:
            client.close()
    return codes


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """How long until `condition()` held, polling; fails after `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_users_added_and_removed_by_the_command_count_at_once(
    stored: tuple[ServerProcess, Path],
) -> None:
    server, config = stored
    assert allocate_codes(server, "dave", "davepw") == [0] * CLIENTS
    assert set(allocate_codes(server, "erin", "erinpw")) == {401}

    added = pyturn("user", "add", "erin", "-c", str(config), "--password-stdin", stdin="erinpw\n")
    assert added.returncode == 0, added.stderr
    took = within(WITHIN, lambda: allocate_codes(server, "erin", "erinpw") == [0] * CLIENTS)
    print(f"user add reached both workers in {took:.2f} s")

    removed = pyturn("user", "remove", "erin", "-c", str(config))
    assert removed.returncode == 0, removed.stderr
    took = within(WITHIN, lambda: set(allocate_codes(server, "erin", "erinpw")) == {401})
    print(f"user remove reached both workers in {took:.2f} s")
    assert allocate_codes(server, "dave", "davepw") == [0] * CLIENTS


def test_a_rest_secret_added_by_the_command_counts_at_once(
    stored: tuple[ServerProcess, Path],
) -> None:
    server, config = stored
    made = pyturn("secret", "add", "-c", str(config))
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    username = rest_username(int(time.time()) + 3600, "frank")
    password = rest_password(secret, username)
    took = within(WITHIN, lambda: allocate_codes(server, username, password) == [0] * CLIENTS)
    print(f"secret add reached both workers in {took:.2f} s")


@pytest.fixture
def echo_peer() -> Iterator[int]:
    """turnutils_peer (UDP echo) on loopback; yields its port."""
    with turnutils_peer() as port:
        yield port


def test_a_coturn_userdb_serves_coturns_client_unchanged(
    tmp_path: Path, server_factory: ServerFactory, echo_peer: int
) -> None:
    """A userdb made by coturn's turnadmin, as a coturn deployment has it: coturn's own
    turnutils_uclient relays every message with the user and the REST secret in it."""
    turnadmin = shutil.which("turnadmin")
    assert turnadmin is not None, "turnadmin (Debian package coturn) is missing"
    db = tmp_path / "turndb"
    for args in (["-a", "-u", "gina", "-r", REALM, "-p", "ginapw"], ["-s", "shared", "-r", REALM]):
        subprocess.run([turnadmin, *args, "-b", str(db)], check=True, capture_output=True)
    server = server_factory({"store": f"sqlite://{db}", "auth": {"users": {}, "secrets": []}})
    mark = server.log_mark()
    assert_all_echoed(
        server, mark, run_uclient(server, echo_peer, user="gina", password="ginapw"), "gina"
    )
    mark = server.log_mark()
    run = run_uclient(server, echo_peer, "-c", user="henry", password=None, secret="shared")
    assert_all_echoed(server, mark, run, r"\d+:henry")


def test_a_broken_store_stops_the_start_with_a_clear_error(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database at all" * 200)
    with pytest.raises(ServerStartError) as caught:
        server_factory({"store": f"sqlite://{broken}"})
    assert f"store {broken}: file is not a database" in str(caught.value)
