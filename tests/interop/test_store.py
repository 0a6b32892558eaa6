"""Users and secrets from a SQLite store, changed under a running server (`store:`).

The changes are made as an operator makes them, by the `pyturn user` / `pyturn secret`
commands in their own processes (and by coturn's turnadmin), while a server with two
workers runs; clients on several 5-tuples (so on either worker) must see each change
within a second, with no reload.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pyturn.core.auth import rest_password, rest_username
from pyturn.probe import ProbeError
from pyturn.store.redis_store import HOLDINGS_TTL
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
from tests.interop.server_process import (
    run_pyturn as pyturn,
)
from tests.interop.test_turnutils import assert_all_echoed, run_uclient, turnutils_peer
from tests.interop.turn_wire_client import error_code, open_client
from tests.redis_server import RedisServer

pytestmark = pytest.mark.interop

WITHIN = 1.0  # seconds a change may take to reach every worker
# After a store was down, a worker polls every 2 s at most (MAX_BACKOFF), and the poll
# that finds it back may have started by waiting out a connection timeout (2 s).
POLL_SLACK = 4.5
CLIENTS = 6  # 5-tuples per check: with two workers, both are all but surely among them
# Every check starts with 401s from one source address: more than the default budget.
OPEN_BUDGET = {"unauthenticated_burst": 100_000, "unauthenticated_rate": 100_000.0}


@pytest.fixture
def stored(tmp_path: Path, server_factory: ServerFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A two-worker server whose store holds dave; the config file the commands use."""
    config = merge_config(
        base_config(), {"workers": 2, "store": f"sqlite://{tmp_path}/users.db", "auth": None}
    )
    config_path = tmp_path / "commands.yaml"
    config_path.write_text(yaml.safe_dump(config))
    add_user(config_path, "dave", "davepw")
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


def admits(server: ServerProcess, username: str, password: str) -> Callable[[], bool]:
    """Whether Allocates by `username` succeed on every one of CLIENTS 5-tuples."""
    return lambda: allocate_codes(server, username, password) == [0] * CLIENTS


def add_user(config: Path | str, name: str, password: str) -> None:
    """`pyturn user add`, in a process of its own as an operator runs it."""
    command = ("user", "add", name, "-c", str(config), "--password-stdin")
    added = pyturn(*command, stdin=f"{password}\n")
    assert added.returncode == 0, added.stderr


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

    add_user(config, "erin", "erinpw")
    took = within(WITHIN, admits(server, "erin", "erinpw"))
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
    took = within(WITHIN, admits(server, username, password))
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


# -- Redis: a fleet of nodes ------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def commands_config(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "commands.yaml"
    path.write_text(yaml.safe_dump({"realm": REALM, "store": store}))
    return path


def test_two_nodes_sharing_redis_see_a_new_user_at_once(
    tmp_path: Path, server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    config = str(commands_config(tmp_path, redis_server.url))
    overrides = {"workers": 2, "store": redis_server.url, "limits": OPEN_BUDGET}
    nodes = [server_factory(overrides), server_factory(overrides)]
    for node in nodes:
        node.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
        assert set(allocate_codes(node, "ivan", "ivanpw")) == {401}
    add_user(config, "ivan", "ivanpw")
    for node in nodes:
        took = within(WITHIN, admits(node, "ivan", "ivanpw"))
        print(f"user add reached a node's two workers in {took:.2f} s")


def test_relaying_and_known_users_outlive_a_redis_restart(
    tmp_path: Path, server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """Redis stops: the running allocation keeps relaying, users already known keep
    authenticating, and the log says the store is unreadable; it comes back (with its
    data): a user added meanwhile is taken."""
    config = str(commands_config(tmp_path, redis_server.url))
    add_user(config, "judy", "judypw")
    server = server_factory({"store": redis_server.url, "limits": OPEN_BUDGET})
    within(WITHIN, admits(server, "judy", "judypw"))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(3)
    client = open_client("udp", server.udp_address, username="judy", password="judypw")
    try:
        client.login()
        client.allocate()
        client.create_permission(peer.getsockname())
        mark = server.log_mark()
        redis_server.stop()
        server.wait_for_log("store unreadable, keeping the users and secrets it had", since=mark)
        client.send_indication(peer.getsockname(), b"during the outage")
        assert peer.recv(100) == b"during the outage"
        assert allocate_codes(server, "judy", "judypw") == [0] * CLIENTS
        redis_server.start()
        with redis_server.client() as direct:
            assert direct.get(f"turn/realm/{REALM}/user/judy/key")  # the data came back
        add_user(config, "kim", "kimpw")
        within(WITHIN + POLL_SLACK, admits(server, "kim", "kimpw"))
    finally:
        client.close()
        peer.close()


def test_a_node_starts_without_redis_and_takes_its_users_when_it_answers(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    redis_server = RedisServer(tmp_path)  # not started yet: its port is closed
    server = server_factory({"store": redis_server.url, "limits": OPEN_BUDGET})
    assert "store unreachable, serving the config's users until it answers" in server.log_text
    assert allocate_codes(server, "alice", "alicepw") == [0] * CLIENTS  # the config's user
    redis_server.start()
    try:
        config = str(commands_config(tmp_path, redis_server.url))
        add_user(config, "lena", "lenapw")
        within(WITHIN + POLL_SLACK, admits(server, "lena", "lenapw"))
    finally:
        redis_server.stop()


def test_quotas_hold_across_nodes_and_a_dead_nodes_holdings_lapse(
    tmp_path: Path, server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """quotas.allocations_per_user 2 on two nodes sharing Redis (one of two workers):
    alice's one allocation on each leaves her none on either; when one node dies (SIGKILL,
    no goodbye), its holdings stop counting within a few seconds."""
    overrides = {
        "store": redis_server.url,
        "limits": OPEN_BUDGET,
        "quotas": {"allocations_per_user": 2},
    }
    first = server_factory({**overrides, "workers": 2})
    second = server_factory({**overrides, "workers": 1})
    first.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    held = []
    for node in (first, second):
        client = open_client("udp", node.udp_address)
        held.append(client)
        client.login()
        client.allocate()
    try:
        # After a poll (0.5 s) each node counts the other's allocation.
        took = within(WITHIN + 0.5, lambda: set(allocate_codes(first, "alice", "alicepw")) == {486})
        print(f"the other node's allocation counted after {took:.2f} s")
        assert set(allocate_codes(second, "alice", "alicepw")) == {486}
        assert second.process is not None
        second.process.kill()  # one process: the node is gone with it
        second.process.wait(timeout=10)
        took = within(HOLDINGS_TTL + 2, admits_one(first, "alice", "alicepw"))
        print(f"a dead node's holdings lapsed after {took:.2f} s")
    finally:
        for client in held:
            client.close()


def admits_one(server: ServerProcess, username: str, password: str) -> Callable[[], bool]:
    """Whether one more Allocate by `username` succeeds (and is kept)."""

    def check() -> bool:
        client = open_client("udp", server.udp_address, username=username, password=password)
        client.login()
        msg = client.allocate_with([RequestedTransport(TRANSPORT_UDP)])
        client.close()
        return msg.msg_class == MessageClass.SUCCESS

    return check
