"""The /metrics, /live and /ready endpoint in-process: readiness, limits, bad requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from pyturn.config import parse_config
from pyturn.net import http
from pyturn.net.http import OpsApp, start_ops_server
from pyturn.net.worker import Worker

LOOPBACK = "127.0.0.1"


async def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send raw bytes, read the whole answer until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=20))


def test_ready_is_503_until_every_listener_is_bound_and_the_worker_says_so() -> None:
    config = parse_config(
        {
            "listen": [{"transport": "udp", "address": LOOPBACK, "port": 0}],
            "relay": {"address": LOOPBACK, "min_port": 45000, "max_port": 45009},
            "metrics": {"address": LOOPBACK, "port": 0},
        }
    )

    async def test() -> None:
        worker = Worker(config)
        assert worker.readiness() == "starting"
        await worker.start()
        try:
            assert worker.metrics_address is not None
            # Bound, but serve() has not yet called mark_ready: still not ready.
            answer = await exchange(worker.metrics_address, get("/ready"))
            assert status_of(answer) == 503
            assert answer.endswith(b"not ready: starting\n")
            assert status_of(await exchange(worker.metrics_address, get("/live"))) == 200
            worker.mark_ready(time.perf_counter())
            assert status_of(await exchange(worker.metrics_address, get("/ready"))) == 200
        finally:
            worker.shutdown()

    run(test)


def app() -> OpsApp:
    return OpsApp(lambda: b"metrics 1\n", lambda: None)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/live"), 200),
        (get("/metrics"), 200),
        (get("/ready", "HEAD"), 200),
        (get("/metrics", "POST"), 405),
        (get("/admin"), 404),
        (b"GET /live\r\n\r\n", 400),
        (b"\x16\x03\x01 hello\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", 431),
    ],
)
def test_requests_get_the_right_status(request_bytes: bytes, status: int) -> None:
    async def test() -> None:
        server, address = await start_ops_server(app(), LOOPBACK, 0)
        try:
            answer = await exchange(address, request_bytes)
        finally:
            server.close()
        assert status_of(answer) == status
        assert b"Connection: close\r\n" in answer

    run(test)


def test_a_head_request_gets_headers_only() -> None:
    async def test() -> None:
        server, address = await start_ops_server(app(), LOOPBACK, 0)
        try:
            answer = await exchange(address, get("/metrics", "HEAD"))
        finally:
            server.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Content-Length: 10" in head
        assert body == b""

    run(test)


def test_a_client_that_sends_no_request_is_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.2)

    async def test() -> None:
        server, address = await start_ops_server(app(), LOOPBACK, 0)
        try:
            answer = await exchange(address, b"GET /li")
        finally:
            server.close()
        assert status_of(answer) == 408

    run(test)


def test_connections_beyond_the_limit_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)

    async def test() -> None:
        server, address = await start_ops_server(app(), LOOPBACK, 0)
        idle = [await asyncio.open_connection(*address) for _ in range(2)]
        try:
            await asyncio.sleep(0.05)
            answer = await exchange(address, get("/live"))
            assert answer == b""  # aborted on arrival
        finally:
            for _, writer in idle:
                writer.close()
            server.close()
        await asyncio.sleep(0.05)
        server2, address2 = await start_ops_server(app(), LOOPBACK, 0)
        try:
            assert status_of(await exchange(address2, get("/live"))) == 200
        finally:
            server2.close()

    run(test)
