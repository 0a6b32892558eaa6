"""The SQLite store (pyturn/store): pyturn's tables, coturn's userdb, the commands.

coturn's own `turnadmin -b FILE` makes the coturn databases here, as operators made them.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyturn.cli import cli
from pyturn.config import ConfigError, parse_config
from pyturn.core.auth import Authenticator, AuthFailure, Candidate, UserKeys
from pyturn.core.node import FleetCounts, LocalNodeState
from pyturn.store import Snapshot, StoreError, open_store
from pyturn.store.redis_store import HOLDINGS_TTL
from pyturn.wire.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from pyturn.wire.integrity import long_term_key
from tests.redis_server import RedisServer, free_tcp_port

REALM = "example.org"


def url(path: Path) -> str:
    return f"sqlite://{path}"


def test_users_and_secrets_round_trip_as_keys_only(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    store = open_store(url(db), create=True)
    store.add_user("alice", REALM, "alicepw")
    store.add_user("bob", "other.realm", "bobpw")
    store.add_secret("old-secret", REALM)
    store.add_secret("new-secret", REALM)
    snapshot = store.snapshot(REALM)
    assert snapshot.users == {
        "alice": UserKeys(
            long_term_key("alice", REALM, "alicepw", PASSWORD_ALGORITHM_MD5),
            long_term_key("alice", REALM, "alicepw", PASSWORD_ALGORITHM_SHA256),
        )
    }
    assert snapshot.secrets == ("new-secret", "old-secret")  # the newest first
    # Keys, never the password.
    assert b"alicepw" not in db.read_bytes()
    assert store.remove_user("alice", REALM)
    assert not store.remove_user("alice", REALM)
    assert store.remove_secret("old-secret", REALM)
    assert store.snapshot(REALM).users == {}
    assert store.snapshot(REALM).secrets == ("new-secret",)
    store.close()


def test_the_version_moves_when_another_connection_writes(tmp_path: Path) -> None:
    reader = open_store(url(tmp_path / "users.db"), create=True)
    writer = open_store(url(tmp_path / "users.db"), create=True)
    before = reader.version()
    assert reader.version() == before
    writer.add_user("alice", REALM, "pw")
    assert reader.version() != before
    reader.close()
    writer.close()


@pytest.fixture
def coturn_db(tmp_path: Path) -> Path:
    """A userdb made by coturn's turnadmin: alice (MD5 key only) and a REST secret."""
    turnadmin = shutil.which("turnadmin")
    if turnadmin is None:
        pytest.fail("turnadmin (Debian package coturn) is missing: run make system-deps")
    db = tmp_path / "turndb"
    for args in (
        ["-a", "-u", "alice", "-r", REALM, "-p", "alicepw"],
        ["-a", "-u", "carol", "-r", REALM, "-p", "carolpw"],
        ["-s", "coturn-secret", "-r", REALM],
    ):
        subprocess.run(
            [turnadmin, *args, "-b", str(db)], check=True, capture_output=True, timeout=30
        )
    return db


def test_a_coturn_userdb_is_read_as_it_is(coturn_db: Path) -> None:
    # As the server opens it: read-only, and coturn's tables alone.
    reader = open_store(url(coturn_db))
    assert reader.snapshot(REALM) == open_store(url(coturn_db), create=True).snapshot(REALM)
    reader.close()
    store = open_store(url(coturn_db), create=True)
    snapshot = store.snapshot(REALM)
    md5 = long_term_key("alice", REALM, "alicepw", PASSWORD_ALGORITHM_MD5)
    assert snapshot.users["alice"] == UserKeys(md5)  # coturn keeps MD5 keys only
    assert snapshot.secrets == ("coturn-secret",)
    # pyturn's own row wins; removing takes the name out of both.
    store.add_user("carol", REALM, "newpw")
    sha256 = long_term_key("carol", REALM, "newpw", PASSWORD_ALGORITHM_SHA256)
    assert store.snapshot(REALM).users["carol"].sha256 == sha256
    assert store.remove_user("carol", REALM)
    assert "carol" not in store.snapshot(REALM).users
    assert store.remove_secret("coturn-secret", REALM)
    assert store.snapshot(REALM).secrets == ()
    store.close()
    rows = sqlite3.connect(coturn_db).execute("SELECT name FROM turnusers_lt").fetchall()
    assert rows == [("alice",)]


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        open_store(url(tmp_path / "absent.db"))
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(broken)):
        open_store(url(broken))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgres://x", "must be a store URL"),
        ("redis://", "must be a store URL"),
        ("sqlite:///", "must be a store URL"),
    ],
)
def test_bad_store_urls_are_refused_naming_the_key(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": value})
    assert caught.value.path == "store"
    assert expected in str(caught.value)


def test_stored_users_authenticate_with_either_key_and_the_config_wins() -> None:
    md5 = long_term_key("dave", REALM, "davepw", PASSWORD_ALGORITHM_MD5)
    sha256 = long_term_key("dave", REALM, "davepw", PASSWORD_ALGORITHM_SHA256)
    config = parse_config({"realm": REALM, "auth": {"users": {"erin": "configpw"}}})
    auth = Authenticator(
        REALM,
        config.auth.users,
        stored={
            "dave": UserKeys(md5, sha256),
            "erin": UserKeys(b"\x00" * 16),
            "frank": UserKeys(b"\x01" * 16),
        },
    )
    assert auth.candidates("dave", 0.0) == (Candidate("dave", "dave", md5),)
    assert auth.candidates("dave", 0.0, PASSWORD_ALGORITHM_SHA256) == (
        Candidate("dave", "dave", sha256),
    )
    erin = long_term_key("erin", REALM, "configpw", PASSWORD_ALGORITHM_MD5)
    assert auth.candidates("erin", 0.0) == (Candidate("erin", "erin", erin),)
    # A user with an MD5 key only cannot use SHA-256 (as a config user with a key).
    assert auth.candidates("frank", 0.0, PASSWORD_ALGORITHM_SHA256) == AuthFailure.BAD_PASSWORD
    assert auth.candidates("nobody", 0.0) == AuthFailure.UNKNOWN_USER


def config_file(tmp_path: Path, store: str | None) -> Path:
    path = tmp_path / "pyturn.yaml"
    path.write_text(f"realm: {REALM}\n" + (f"store: {store}\n" if store else ""))
    return path


def test_the_commands_manage_users_and_secrets(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    config = str(config_file(tmp_path, url(db)))
    runner = CliRunner()
    added = runner.invoke(
        cli, ["user", "add", "alice", "-c", config, "--password-stdin"], input="alicepw\n"
    )
    assert added.exit_code == 0, added.output
    assert db.exists()
    assert runner.invoke(cli, ["user", "list", "-c", config]).output == "alice\n"
    changed = runner.invoke(
        cli, ["user", "set-password", "alice", "-c", config, "--password-stdin"], input="pw2\n"
    )
    assert changed.exit_code == 0, changed.output
    store = open_store(url(db))
    md5 = long_term_key("alice", REALM, "pw2", PASSWORD_ALGORITHM_MD5)
    assert store.snapshot(REALM).users["alice"].md5 == md5
    missing = runner.invoke(
        cli, ["user", "set-password", "zed", "-c", config, "--password-stdin"], input="x\n"
    )
    assert missing.exit_code == 1
    assert "no user zed" in missing.output

    made = runner.invoke(cli, ["secret", "add", "-c", config])
    assert made.exit_code == 0, made.output
    value = made.output.strip()
    assert len(value) >= 40
    assert store.snapshot(REALM).secrets == (value,)
    listed = runner.invoke(cli, ["secret", "list", "-c", config]).output
    assert listed == f"{value[:6]}...\n"
    assert value not in listed
    assert runner.invoke(cli, ["secret", "remove", value[:6], "-c", config]).exit_code == 0
    assert runner.invoke(cli, ["user", "remove", "alice", "-c", config]).exit_code == 0
    assert store.snapshot(REALM) == store.snapshot(REALM).__class__({}, ())
    gone = runner.invoke(cli, ["user", "remove", "alice", "-c", config])
    assert gone.exit_code == 1
    store.close()


def test_the_commands_need_a_store_in_the_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["user", "add", "alice", "-c", str(config_file(tmp_path, None)), "--password-stdin"],
        input="pw\n",
    )
    assert result.exit_code == 1
    assert "no `store:` set" in result.output


def test_the_server_opens_the_store_read_only(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    open_store(url(db), create=True).close()
    with pytest.raises(StoreError, match="readonly"):
        open_store(url(db)).add_user("x", REALM, "pw")


# -- Redis ----------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def test_redis_users_and_secrets_round_trip_in_coturns_keys(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url)
    store.add_user("alice", REALM, "alicepw")
    store.add_secret("old-secret", REALM)
    store.add_secret("new-secret", REALM)
    snapshot = store.snapshot(REALM)
    md5 = long_term_key("alice", REALM, "alicepw", PASSWORD_ALGORITHM_MD5)
    sha256 = long_term_key("alice", REALM, "alicepw", PASSWORD_ALGORITHM_SHA256)
    assert snapshot.users == {"alice": UserKeys(md5, sha256)}
    assert snapshot.secrets == ("new-secret", "old-secret")
    with redis_server.client() as client:
        # What coturn reads: the MD5 key as hex, under its own key name.
        assert client.get(f"turn/realm/{REALM}/user/alice/key") == md5.hex()
        strings = [key for key in client.keys("*") if client.type(key) == "string"]
        assert "alicepw" not in [client.get(key) for key in strings]
        # The secrets where turnadmin -s puts them (a set), which coturn reads.
        assert client.smembers(f"turn/realm/{REALM}/secret") == {"old-secret", "new-secret"}
    assert store.remove_user("alice", REALM)
    assert not store.remove_user("alice", REALM)
    assert store.remove_secret("old-secret", REALM)
    assert store.snapshot(REALM) == Snapshot({}, ("new-secret",))
    store.close()


def test_a_coturn_redis_userdb_is_read_as_it_is(redis_server: RedisServer) -> None:
    """Keys as coturn's schema.userdb.redis sets them: an MD5 key, a clear password, and
    secrets under arbitrary ids."""
    gorst = long_term_key("gorst", REALM, "hero", PASSWORD_ALGORITHM_MD5)
    with redis_server.client() as client:
        client.set(f"turn/realm/{REALM}/user/gorst/key", gorst.hex())
        client.set(f"turn/realm/{REALM}/user/whirrun/password", "sword")
        client.set(f"turn/realm/{REALM}/secret/1368426581", "logen")
        client.set("turn/realm/other.org/user/nobody/key", gorst.hex())
    store = open_store(redis_server.url)
    version = store.version()
    snapshot = store.snapshot(REALM)
    assert snapshot.users == {
        "gorst": UserKeys(gorst),
        "whirrun": UserKeys(
            long_term_key("whirrun", REALM, "sword", PASSWORD_ALGORITHM_MD5),
            long_term_key("whirrun", REALM, "sword", PASSWORD_ALGORITHM_SHA256),
        ),
    }
    assert snapshot.secrets == ("logen",)
    # pyturn's commands move the version; a new password replaces coturn's clear one.
    store.add_user("whirrun", REALM, "newsword")
    assert store.version() != version
    with redis_server.client() as client:
        assert client.get(f"turn/realm/{REALM}/user/whirrun/password") is None
    store.close()


def test_a_redis_password_comes_from_a_file(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret-redis").start()
    try:
        with pytest.raises(StoreError, match=r"127\.0\.0\.1"):
            open_store(server.url)  # no password
        (tmp_path / "redis-password").write_text("s3cret-redis\n")
        store = open_store(f"{server.url}?password_file={tmp_path}/redis-password")
        store.add_user("alice", REALM, "pw")
        assert list(store.snapshot(REALM).users) == ["alice"]
        store.close()
    finally:
        server.stop()


def test_an_unreachable_redis_is_a_store_error_naming_it_without_its_password() -> None:
    with pytest.raises(StoreError) as caught:
        open_store(f"redis://:hunter2@127.0.0.1:{free_tcp_port()}/0")
    assert "redis://127.0.0.1:" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_nodes_share_their_holdings_and_a_silent_node_lapses(redis_server: RedisServer) -> None:
    first, second = open_store(redis_server.url), open_store(redis_server.url)
    assert first.share_holdings("node-a", 0, {"alice": 2}) == FleetCounts({}, 0)
    assert second.share_holdings("node-a", 1, {"alice": 1, "bob": 1}) == FleetCounts({}, 0)
    # A node counts the others', never its own workers' (those are in its shared memory).
    assert second.share_holdings("node-b", 0, {"bob": 3}) == FleetCounts({"alice": 3, "bob": 1}, 4)
    assert first.share_holdings("node-a", 0, {}) == FleetCounts({"bob": 3}, 3)
    with redis_server.client() as client:
        assert client.exists("pyturn/holdings/node-a/0") == 0  # nothing held, nothing kept
        ttl = client.ttl("pyturn/holdings/node-b/0")
        assert 0 < ttl <= HOLDINGS_TTL  # a node that stops refreshing stops counting
    first.close()
    second.close()


def test_the_quotas_count_the_fleets_holdings() -> None:
    node = LocalNodeState(users=8)
    node.fleet = FleetCounts({"alice": 2}, 5)
    assert node.hold("alice", 3, 0)
    assert not node.hold("alice", 3, 0)  # 1 here + 2 elsewhere
    assert node.hold("bob", 3, 7)
    assert not node.hold("carol", 3, 7)  # 2 here + 5 elsewhere


def test_a_redis_userdb_made_by_turnadmin_is_read_as_it_is(redis_server: RedisServer) -> None:
    turnadmin = shutil.which("turnadmin")
    if turnadmin is None:
        pytest.fail("turnadmin (Debian package coturn) is missing: run make system-deps")
    where = f"ip=127.0.0.1 port={redis_server.port} dbname=0"
    for args in (
        ["-a", "-u", "zed", "-r", REALM, "-p", "zedpw"],
        ["-s", "from-turnadmin", "-r", REALM],
    ):
        subprocess.run([turnadmin, *args, "-N", where], check=True, capture_output=True, timeout=30)
    store = open_store(redis_server.url)
    store.add_secret("from-pyturn", REALM)
    snapshot = store.snapshot(REALM)
    assert snapshot.users == {
        "zed": UserKeys(long_term_key("zed", REALM, "zedpw", PASSWORD_ALGORITHM_MD5))
    }
    assert snapshot.secrets == ("from-pyturn", "from-turnadmin")  # pyturn's newest first
    assert store.remove_secret("from-turnadmin", REALM)
    assert store.snapshot(REALM).secrets == ("from-pyturn",)
    store.close()


def test_a_locked_file_is_a_clear_error_after_a_short_wait(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    config = str(config_file(tmp_path, url(db)))
    open_store(url(db), create=True).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program in the middle of a write
    try:
        result = CliRunner().invoke(
            cli, ["user", "add", "alice", "-c", config, "--password-stdin"], input="pw\n"
        )
        assert result.exit_code == 1
        assert f"store {db}: database is locked" in result.output
    finally:
        holder.execute("ROLLBACK")
        holder.close()
