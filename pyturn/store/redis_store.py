"""A Redis (or Valkey) store: `store: redis://HOST:PORT/DB` or `rediss://...`, for
several nodes that share their users and secrets.

Keys are coturn's, so a coturn Redis userdb works as it is and coturn's tools still see
what pyturn writes:

    turn/realm/<realm>/user/<name>/key        the MD5 long-term key, as hex
    turn/realm/<realm>/user/<name>/password   coturn's clear-text alternative (read only)
    turn/realm/<realm>/secret                 the REST secrets, a set (as turnadmin -s
                                              writes it; pyturn keeps when it added each
                                              in pyturn/realm/<realm>/secret-added)
    turn/realm/<realm>/secret/<id>            a REST secret, the older schema (read only)

and pyturn adds `pyturn/realm/<realm>/user/<name>/sha256` (the SHA-256 key),
`pyturn/version`, a counter its commands increment on every change, so that the servers
see their changes within a poll, and `pyturn/holdings/<node>/<worker>`, a hash of what
each worker holds per user, which lapses HOLDINGS_TTL seconds after its last refresh:
the quotas of each node count the others' (see `share_holdings`). Changes made by
other tools (coturn's turnadmin, redis-cli) move no counter: the servers read
everything again every EXTERNAL_REFRESH seconds for those.

A password for the Redis server can come from a file (`?password_file=PATH`), so that
it stays out of the config.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import redis

from pyturn.core.auth import UserKeys
from pyturn.core.node import FleetCounts
from pyturn.store import Snapshot, StoreError
from pyturn.wire.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from pyturn.wire.integrity import long_term_key

VERSION_KEY = "pyturn/version"
HOLDINGS = "pyturn/holdings/"
# A worker refreshes its holdings every poll (0.5 s); a node that died stops counting
# this long after its last refresh.
HOLDINGS_TTL = 5
EXTERNAL_REFRESH = 10
_TIMEOUT = 2.0
_SCAN_COUNT = 1000

T = TypeVar("T")


def connect(url: str, *, timeout: float | None = _TIMEOUT) -> tuple[redis.Redis, str]:
    """A client for `url` (no connection made yet), and how to name it in messages:
    the URL without its password. `timeout` None waits without end (pub/sub)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    password_file = query.pop("password_file", [None])[0]
    options: dict[str, Any] = {}
    if password_file:
        try:
            options["password"] = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(f"store {url}: password_file: {exc}") from exc
    clean = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    host = parts.hostname or "localhost"
    where = f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"
    try:
        client = redis.Redis.from_url(
            clean,
            socket_timeout=timeout,
            socket_connect_timeout=_TIMEOUT,
            decode_responses=True,
            **options,
        )
    except ValueError as exc:
        raise StoreError(f"store {where}: {exc}") from exc
    return client, where


class RedisStore:
    def __init__(self, url: str) -> None:
        self._redis, self.where = connect(url)
        self._call(self._redis.ping)

    def _call(self, operation: Callable[..., T], *args: Any) -> T:
        try:
            return operation(*args)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.where}: {exc}") from exc

    def version(self) -> int:
        counter = int(self._call(self._redis.get, VERSION_KEY) or 0)
        return (counter << 32) | int(time.time() // EXTERNAL_REFRESH) & 0xFFFFFFFF

    def _scan(self, pattern: str) -> list[str]:
        return list(self._call(lambda: list(self._redis.scan_iter(pattern, count=_SCAN_COUNT))))

    def _values(self, keys: list[str]) -> list[str | None]:
        values: list[str | None] = []
        for start in range(0, len(keys), _SCAN_COUNT):
            chunk = self._call(self._redis.mget, keys[start : start + _SCAN_COUNT])
            # decode_responses: strings, or None for a key gone since the scan.
            values += [value if isinstance(value, str) else None for value in chunk]
        return values

    def snapshot(self, realm: str) -> Snapshot:
        prefix = f"turn/realm/{realm}/user/"
        keys = self._scan(prefix + "*")
        found = dict(zip(keys, self._values(keys), strict=True))
        sha_prefix = f"pyturn/realm/{realm}/user/"
        sha_keys = self._scan(sha_prefix + "*/sha256")
        sha256 = {
            key[len(sha_prefix) : -len("/sha256")]: value
            for key, value in zip(sha_keys, self._values(sha_keys), strict=True)
        }
        users: dict[str, UserKeys] = {}
        for key, value in found.items():
            if value is None:
                continue
            name, _, kind = key[len(prefix) :].rpartition("/")
            if kind == "password" and name not in users:
                users[name] = UserKeys(
                    long_term_key(name, realm, value, PASSWORD_ALGORITHM_MD5),
                    long_term_key(name, realm, value, PASSWORD_ALGORITHM_SHA256),
                )
            elif kind == "key" and (md5 := _hex(value)) is not None and len(md5) == 16:
                users[name] = UserKeys(md5, _hex(sha256.get(name)))
        return Snapshot(users, self._secrets(realm))

    def _secrets(self, realm: str) -> tuple[str, ...]:
        keys = self._scan(f"turn/realm/{realm}/secret/*")
        pairs = [(key, value) for key, value in zip(keys, self._values(keys), strict=True) if value]
        # Newest first where the id is a time (coturn's schema examples).
        pairs.sort(key=lambda pair: _number(pair[0].rpartition("/")[2]), reverse=True)
        values = [value for _, value in pairs if value is not None]
        collection = f"turn/realm/{realm}/secret"
        if self._call(self._redis.type, collection) == "set":
            scored: list[Any] = self._call(
                lambda: list(self._redis.zrange(_added(realm), 0, -1, withscores=True))
            )
            added = {str(pair[0]): float(pair[1]) for pair in scored}
            members = [str(m) for m in self._call(self._redis.smembers, collection)]
            # pyturn's newest first, then the ones only turnadmin added.
            values = sorted(members, key=lambda m: -added.get(m, -1.0)) + values
        return tuple(dict.fromkeys(values))

    def _change(self, apply: Callable[[Any], object]) -> None:
        """Run `apply` on a transaction that also moves the version."""

        def run() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                apply(pipe)
                pipe.incr(VERSION_KEY)
                pipe.execute()

        self._call(run)

    def add_user(self, name: str, realm: str, password: str) -> None:
        md5 = long_term_key(name, realm, password, PASSWORD_ALGORITHM_MD5).hex()
        sha256 = long_term_key(name, realm, password, PASSWORD_ALGORITHM_SHA256).hex()

        def apply(pipe: Any) -> None:
            pipe.set(f"turn/realm/{realm}/user/{name}/key", md5)
            pipe.set(f"pyturn/realm/{realm}/user/{name}/sha256", sha256)
            # A clear-text password coturn kept would now be the wrong one.
            pipe.delete(f"turn/realm/{realm}/user/{name}/password")

        self._change(apply)

    def remove_user(self, name: str, realm: str) -> bool:
        keys = [
            f"turn/realm/{realm}/user/{name}/key",
            f"turn/realm/{realm}/user/{name}/password",
            f"pyturn/realm/{realm}/user/{name}/sha256",
        ]
        if not self._call(self._redis.exists, *keys[:2]):
            return False
        self._change(lambda pipe: pipe.delete(*keys))
        return True

    def add_secret(self, value: str, realm: str) -> None:
        """Into the set turnadmin writes (and coturn reads), with the time it was added
        beside it (pyturn's own sorted set), so that the newest shows first."""

        def apply(pipe: Any) -> None:
            pipe.sadd(f"turn/realm/{realm}/secret", value)
            pipe.zadd(_added(realm), {value: time.time()})

        self._change(apply)

    def remove_secret(self, value: str, realm: str) -> bool:
        keys = self._scan(f"turn/realm/{realm}/secret/*")
        matching = [k for k, v in zip(keys, self._values(keys), strict=True) if v == value]
        collection = f"turn/realm/{realm}/secret"
        in_set = self._call(self._redis.type, collection) == "set" and bool(
            self._call(self._redis.sismember, collection, value)
        )
        if not matching and not in_set:
            return False

        def apply(pipe: Any) -> None:
            if matching:
                pipe.delete(*matching)
            if in_set:
                pipe.srem(collection, value)
            pipe.zrem(_added(realm), value)

        self._change(apply)
        return True

    def share_holdings(self, node: str, worker: int, held: Mapping[str, int]) -> FleetCounts:
        """Quotas across nodes: each worker writes its holdings, reads the others'.

        Counts are as fresh as the last poll of each worker (about 0.5 s): two nodes that
        take a user's last place within that time can both give it, and the quota is
        exceeded by that much until the allocations end. Allocates never wait on Redis.
        """
        mine = f"{HOLDINGS}{node}/{worker}"

        def publish() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(mine)
                if held:
                    pipe.hset(mine, mapping=dict(held.items()))
                    pipe.expire(mine, HOLDINGS_TTL)
                pipe.execute()

        self._call(publish)
        users: Counter[str] = Counter()
        for key in self._scan(HOLDINGS + "*"):
            if key.startswith(f"{HOLDINGS}{node}/"):
                continue  # this node's own: counted in its shared memory already
            for user, count in self._call(self._redis.hgetall, key).items():
                users[str(user)] += int(count)
        return FleetCounts(dict(users), users.total())

    def close(self) -> None:
        self._redis.close()


def _hex(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        return None


def _added(realm: str) -> str:
    return f"pyturn/realm/{realm}/secret-added"


def _number(text: str) -> int:
    return int(text) if text.isdigit() else -1
