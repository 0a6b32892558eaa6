"""A SQLite store (`store: sqlite:///PATH`): pyturn's own tables, and coturn's userdb.

pyturn writes two tables of its own, created on first use:

    pyturn_users(realm, name, md5_key, sha256_key)   the RFC 8489 §9.2.2 keys, as hex
    pyturn_secrets(realm, value, added_at)           REST secrets; the newest is current

A file that coturn's `turnadmin -b FILE` made (tables `turnusers_lt(realm, name, hmackey)`
and `turn_secret(realm, value)`) is read as it is: its users have MD5 keys only, as in
coturn, and keep working without a password reset. Where a name is in both, pyturn's
row wins. Removing a user or secret removes it from both.

`version()` is SQLite's `PRAGMA data_version` on one long-lived connection: it moves when
another connection (the CLI, turnadmin, another worker) commits, and costs no disk read.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping

from pyturn.core.auth import UserKeys
from pyturn.core.node import NO_FLEET, FleetCounts
from pyturn.store import Snapshot, StoreError
from pyturn.wire.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from pyturn.wire.integrity import long_term_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pyturn_users (
    realm TEXT NOT NULL, name TEXT NOT NULL, md5_key TEXT NOT NULL, sha256_key TEXT,
    PRIMARY KEY (realm, name));
CREATE TABLE IF NOT EXISTS pyturn_secrets (
    realm TEXT NOT NULL, value TEXT NOT NULL, added_at REAL NOT NULL,
    PRIMARY KEY (realm, value));
"""
# A writer holding the file: wait this long (s) before saying it is locked.
_BUSY_TIMEOUT = 2.0


class SqliteStore:
    def __init__(self, path: str, *, create: bool = False) -> None:
        """`create`: the commands' store, which makes the file and pyturn's tables and
        writes; without it (the server's) the file is opened read-only, so a service
        that may not write to /var (systemd's ProtectSystem=strict) reads it all the same."""
        self.path = path
        try:
            if create:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self._db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
                self._db.executescript(_SCHEMA)
            else:
                if not os.path.exists(path):
                    raise StoreError(f"store {path}: no such file (`pyturn user add` makes it)")
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT, isolation_level=None
                )
            self._own = self._has_table("pyturn_users")
            self._own_secrets = self._has_table("pyturn_secrets")
            self._coturn = self._has_table("turnusers_lt")
            self._coturn_secrets = self._has_table("turn_secret")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store {path}: {exc}") from exc

    def _has_table(self, name: str) -> bool:
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return found is not None

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    def version(self) -> int:
        (version,) = self._run("PRAGMA data_version")[0]
        assert isinstance(version, int)
        return version

    def snapshot(self, realm: str) -> Snapshot:
        users: dict[str, UserKeys] = {}
        if self._coturn:
            for name, hmackey in self._run(
                "SELECT name, hmackey FROM turnusers_lt WHERE realm = ?", (realm,)
            ):
                key = _hex(hmackey)
                if isinstance(name, str) and key is not None and len(key) == 16:
                    users[name] = UserKeys(key)
        own_users = self._own and self._run(
            "SELECT name, md5_key, sha256_key FROM pyturn_users WHERE realm = ?", (realm,)
        )
        for name, md5, sha256 in own_users or ():
            key = _hex(md5)
            if isinstance(name, str) and key is not None:
                users[name] = UserKeys(key, _hex(sha256))
        own_secrets = self._own_secrets and self._run(
            "SELECT value FROM pyturn_secrets WHERE realm = ? ORDER BY added_at DESC", (realm,)
        )
        secrets = [str(value) for (value,) in own_secrets or ()]
        if self._coturn_secrets:
            secrets += [
                str(value)
                for (value,) in self._run("SELECT value FROM turn_secret WHERE realm = ?", (realm,))
                if str(value) not in secrets
            ]
        return Snapshot(users, tuple(secrets))

    def add_user(self, name: str, realm: str, password: str) -> None:
        md5 = long_term_key(name, realm, password, PASSWORD_ALGORITHM_MD5).hex()
        sha256 = long_term_key(name, realm, password, PASSWORD_ALGORITHM_SHA256).hex()
        self._run(
            "INSERT OR REPLACE INTO pyturn_users (realm, name, md5_key, sha256_key)"
            " VALUES (?, ?, ?, ?)",
            (realm, name, md5, sha256),
        )

    def remove_user(self, name: str, realm: str) -> bool:
        with self._transaction():
            removed = self._changes(
                "DELETE FROM pyturn_users WHERE realm = ? AND name = ?", realm, name
            )
            if self._coturn:
                removed += self._changes(
                    "DELETE FROM turnusers_lt WHERE realm = ? AND name = ?", realm, name
                )
        return removed > 0

    def add_secret(self, value: str, realm: str) -> None:
        self._run(
            "INSERT OR REPLACE INTO pyturn_secrets (realm, value, added_at) VALUES (?, ?, ?)",
            (realm, value, time.time()),
        )

    def remove_secret(self, value: str, realm: str) -> bool:
        with self._transaction():
            removed = self._changes(
                "DELETE FROM pyturn_secrets WHERE realm = ? AND value = ?", realm, value
            )
            if self._coturn_secrets:
                removed += self._changes(
                    "DELETE FROM turn_secret WHERE realm = ? AND value = ?", realm, value
                )
        return removed > 0

    def share_holdings(self, node: str, worker: int, held: Mapping[str, int]) -> FleetCounts:
        return NO_FLEET  # a file on one node: there is no fleet to share with

    def _changes(self, sql: str, *args: object) -> int:
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._run("ROLLBACK")
            raise
        self._run("COMMIT")

    def close(self) -> None:
        self._db.close()


def _hex(value: object) -> bytes | None:
    """A key stored as hex text (as coturn stores them), or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        return None
