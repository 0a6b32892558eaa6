"""What the nodes of a fleet tell each other through a Redis store, besides users.

    pyturn/revoked               a hash: revoked user -> Unix time the revocation ends
                                 ("inf": until removed), the fleet's one list
    pyturn/sessions/<node>       each node's live allocations as JSON, for `pyturn
                                 sessions --fleet`; it lapses SESSIONS_TTL s after the
                                 node's last refresh, so a dead node drops out
    pyturn/control (channel)     pub/sub: {"op": "kick", "match": ...} and
                                 {"op": "revoked"}, which every node acts on at once

Every call blocks: the node runs them on a thread (pyturn/net/node_control.py).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis

from pyturn.store import StoreError
from pyturn.store.redis_store import connect

log = logging.getLogger(__name__)

REVOKED = "pyturn/revoked"
SESSIONS = "pyturn/sessions/"
CHANNEL = "pyturn/control"
SESSIONS_TTL = 15
# Besides the messages (which a node misses while Redis is away), how often a node
# reads the revocations again.
REFRESH_INTERVAL = 10.0
_RETRY = 2.0

T = TypeVar("T")

# Atomic, so that a revocation renewed meanwhile is not removed with the ended one.
_FORGET_ENDED = """
local removed = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ends = tonumber(entries[i + 1])
  if ends and ends <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], entries[i])
    removed = removed + 1
  end
end
return removed
"""


class RedisFleet:
    def __init__(self, url: str, node: str) -> None:
        self.url = url
        self.node = node
        self._redis, self.where = connect(url)
        self._forget = self._redis.register_script(_FORGET_ENDED)

    def _call(self, operation: Callable[..., T], *args: Any) -> T:
        try:
            return operation(*args)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.where}: {exc}") from exc

    def revocations(self) -> dict[str, float]:
        found: Mapping[Any, Any] = self._call(lambda: self._redis.hgetall(REVOKED))
        out = {}
        for user, until in found.items():
            try:
                out[str(user)] = float(until)
            except ValueError:
                log.warning(
                    "ignoring %s's revocation in %s: %r is not a time", user, REVOKED, until
                )
        return out

    def revoke(self, user: str, until: float) -> None:
        def run() -> None:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(REVOKED, user, "inf" if math.isinf(until) else repr(until))
                pipe.publish(CHANNEL, self._message("revoked"))
                pipe.execute()

        self._call(run)

    def unrevoke(self, users: list[str]) -> int:
        """Remove these revocations (ended ones too); how many there were."""

        def run() -> int:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(REVOKED, *users)
                pipe.publish(CHANNEL, self._message("revoked"))
                removed, _ = pipe.execute()
            return int(removed)

        return self._call(run)

    def forget_ended(self, now: float) -> int:
        """Remove the revocations that ended by `now`, and only those: another node may
        have just revoked the same user again."""
        return int(self._call(lambda: self._forget(keys=[REVOKED], args=[now])))

    def kick(self, match: Mapping[str, Any]) -> int:
        """Ask every other node to end the allocations `match` names; how many nodes
        listen (each acts on its own allocations)."""
        receivers = self._call(self._redis.publish, CHANNEL, self._message("kick", match=match))
        return max(int(receivers) - 1, 0)  # this node listens too, and ignores its own

    def publish_sessions(self, sessions: list[dict[str, Any]]) -> None:
        text = json.dumps(sessions, separators=(",", ":"))
        self._call(self._redis.set, SESSIONS + self.node, text, SESSIONS_TTL)

    def fleet_sessions(self) -> list[dict[str, Any]]:
        """Every node's allocations as it last published them, each row with its "node"."""
        keys = self._call(lambda: list(self._redis.scan_iter(SESSIONS + "*", count=1000)))
        out: list[dict[str, Any]] = []
        for key, text in zip(keys, self._call(self._redis.mget, keys) if keys else [], strict=True):
            if not isinstance(text, str):
                continue  # lapsed since the scan
            node = key[len(SESSIONS) :]
            try:
                rows = json.loads(text)
            except ValueError:
                continue
            out += [{**row, "node": node} for row in rows if isinstance(row, dict)]
        return out

    def _message(self, op: str, **fields: Any) -> str:
        return json.dumps({"op": op, "origin": self.node, **fields}, separators=(",", ":"))

    def close(self) -> None:
        self._redis.close()


class FleetListener:
    """A thread subscribed to the fleet's channel. `on_message` gets the other nodes'
    messages, `on_refresh` is called on every (re)subscription and every
    REFRESH_INTERVAL seconds; both on this thread, so they must hand over to the loop."""

    def __init__(
        self,
        url: str,
        node: str,
        on_message: Callable[[dict[str, Any]], None],
        on_refresh: Callable[[], None],
    ) -> None:
        self.url = url
        self.node = node
        self.on_message = on_message
        self.on_refresh = on_refresh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyturn-fleet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3.0)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.RedisError, StoreError, OSError) as exc:
                if not failing:
                    log.warning(
                        "fleet channel on the store: %s; retrying every %.0f s", exc, _RETRY
                    )
                failing = True
            else:
                return
            self._stop.wait(_RETRY)

    def _listen(self) -> None:
        client, _ = connect(self.url, timeout=REFRESH_INTERVAL)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            self.on_refresh()
            refreshed = time.monotonic()
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self._deliver(message.get("data"))
                if time.monotonic() - refreshed >= REFRESH_INTERVAL:
                    refreshed = time.monotonic()
                    self.on_refresh()
        finally:
            pubsub.close()
            client.close()

    def _deliver(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, str) else None
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("origin") == self.node:
            return
        self.on_message(message)
