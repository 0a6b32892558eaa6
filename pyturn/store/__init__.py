"""Where users and REST secrets live besides the YAML file: the `store:` config key.

`open_store(url)` opens the store a URL names; the server reads a `Snapshot` of it (every
user's long-term keys and every secret, for its realm) and checks `version()` about twice
a second, taking a new snapshot when it moved, so a change made by `pyturn user` or
`pyturn secret` (or by coturn's `turnadmin`) reaches every worker within a second
without a restart. Only keys are stored, never passwords (RFC 8489 §9.2.2).

- `sqlite:///PATH`: pyturn/store/sqlite.py, which also reads coturn's SQLite userdb;
- `redis://HOST:PORT/DB`, `rediss://...`: pyturn/store/redis_store.py, for several
  nodes, in coturn's Redis keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pyturn.config import REDIS_SCHEMES, SQLITE_PREFIX, store_url_problem
from pyturn.core.auth import UserKeys
from pyturn.core.node import FleetCounts


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a store holds for one realm: users' keys, and REST secrets newest first."""

    users: dict[str, UserKeys]
    secrets: tuple[str, ...]


class StoreError(Exception):
    """The store cannot be opened or read (its message says which file and why)."""


class Store(Protocol):
    def version(self) -> int:
        """A number that changes whenever anyone changes the store."""

    def snapshot(self, realm: str) -> Snapshot: ...

    def add_user(self, name: str, realm: str, password: str) -> None:
        """Add or replace a user (its MD5 and SHA-256 keys)."""

    def remove_user(self, name: str, realm: str) -> bool:
        """False when there was no such user."""

    def add_secret(self, value: str, realm: str) -> None: ...

    def remove_secret(self, value: str, realm: str) -> bool: ...

    def share_holdings(self, node: str, worker: int, held: Mapping[str, int]) -> FleetCounts:
        """Publish what worker `worker` of node `node` holds per user (it lapses unless
        published again: a node that died stops counting), and return what every other
        node holds. A store of one node (SQLite) shares nothing."""

    def close(self) -> None: ...


def is_remote(url: str) -> bool:
    """A store on the network, which may be down for a while (Redis), not a file."""
    return url.startswith(REDIS_SCHEMES)


def open_store(url: str, *, create: bool = False) -> Store:
    """The store `url` names; `create` (the commands') makes a missing SQLite file and
    may write, else a SQLite file is opened read-only and must exist."""
    problem = store_url_problem(url)
    if problem is not None:
        raise StoreError(f"store {url!r}: {problem}")
    # Imported here: a server runs one backend, and need not load the other.
    if is_remote(url):
        from pyturn.store.redis_store import RedisStore  # noqa: PLC0415

        return RedisStore(url)
    from pyturn.store.sqlite import SqliteStore  # noqa: PLC0415

    return SqliteStore("/" + url[len(SQLITE_PREFIX) :].lstrip("/"), create=create)
