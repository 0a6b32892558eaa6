"""The fleet's keys and channel in a real redis-server (pyturn/store/fleet.py)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyturn.store import StoreError
from pyturn.store.fleet import REVOKED, SESSIONS, FleetListener, RedisFleet
from tests.redis_server import RedisServer, free_tcp_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def test_revocations_are_one_hash_for_the_fleet(redis_server: RedisServer) -> None:
    a, b = RedisFleet(redis_server.url, "a:1"), RedisFleet(redis_server.url, "b:2")
    a.revoke("alice", math.inf)
    a.revoke("bob", 1_800_000_000.5)
    assert b.revocations() == {"alice": math.inf, "bob": 1_800_000_000.5}
    with redis_server.client() as client:
        assert client.hgetall(REVOKED) == {"alice": "inf", "bob": "1800000000.5"}
        client.hset(REVOKED, "carol", "tomorrow")  # written by hand, wrongly
    assert "carol" not in b.revocations()
    assert b.unrevoke(["alice", "nobody"]) == 1
    assert set(a.revocations()) == {"bob"}


def test_forgetting_ended_revocations_keeps_one_renewed_meanwhile(
    redis_server: RedisServer,
) -> None:
    fleet = RedisFleet(redis_server.url, "a:1")
    fleet.revoke("ended", 100.0)
    fleet.revoke("renewed", 100.0)
    fleet.revoke("forever", math.inf)
    fleet.revoke("renewed", 500.0)  # another node, before this one prunes
    assert fleet.forget_ended(200.0) == 1
    assert fleet.revocations() == {"renewed": 500.0, "forever": math.inf}


def test_sessions_published_by_each_node_are_listed_with_their_node(
    redis_server: RedisServer,
) -> None:
    a, b = RedisFleet(redis_server.url, "a:1"), RedisFleet(redis_server.url, "b:2")
    a.publish_sessions([{"user": "alice"}])
    b.publish_sessions([{"user": "bob"}, {"user": "carol"}])
    rows = sorted(a.fleet_sessions(), key=lambda row: row["user"])
    assert rows == [
        {"user": "alice", "node": "a:1"},
        {"user": "bob", "node": "b:2"},
        {"user": "carol", "node": "b:2"},
    ]
    with redis_server.client() as client:
        assert 0 < client.ttl(SESSIONS + "a:1") <= 15
        client.set(SESSIONS + "c:3", "not json")
    assert len(a.fleet_sessions()) == 3


def test_the_listener_hears_other_nodes_and_not_itself(redis_server: RedisServer) -> None:
    heard: list[dict[str, Any]] = []
    refreshed = threading.Event()
    listener = FleetListener(redis_server.url, "b:2", heard.append, refreshed.set)
    listener.start()
    try:
        assert refreshed.wait(5)
        other, itself = RedisFleet(redis_server.url, "a:1"), RedisFleet(redis_server.url, "b:2")
        assert other.kick({"user": "alice"}) == 0  # b listens; a does not count itself
        itself.kick({"user": "bob"})
        other.revoke("carol", math.inf)
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heard == [
            {"op": "kick", "origin": "a:1", "match": {"user": "alice"}},
            {"op": "revoked", "origin": "a:1"},
        ]
    finally:
        listener.close()


def test_an_unreachable_redis_is_a_store_error() -> None:
    fleet = RedisFleet(f"redis://127.0.0.1:{free_tcp_port()}/0", "a:1")
    with pytest.raises(StoreError, match=r"store redis://127\.0\.0\.1"):
        fleet.revocations()
