"""The /metrics, /live and /ready endpoint in-process: readiness, limits, bad requests."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pyturn.config import parse_config
from pyturn.core.auth import mint_rest_credential
from pyturn.net import http
from pyturn.net.http import OpsApp, Request, start_ops_server
from pyturn.net.worker import Worker
from pyturn.web.basic_auth import BasicAuth

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


class FixedNode:
    """A node with fixed answers: the tests here are about HTTP, not about TURN."""

    def __init__(self, secret: str | None = "s3cret") -> None:  # noqa: S107 (a test secret)
        self.secret = secret
        self.minted = 0

    def readiness(self) -> str | None:
        return None

    async def exposition(self) -> bytes:
        return b"metrics 1\n"

    async def relayed_bytes(self) -> dict[str, int]:
        return {"client_to_peer": 0, "peer_to_client": 0}

    def facts(self) -> dict[str, Any]:
        return {
            "state": "serving",
            "workers": [{"index": 0, "pid": 1, "ready": True}],
            "listeners": [{"transport": "udp", "address": LOOPBACK, "port": 3478}],
            "relay": {"address": LOOPBACK, "ports": [49152, 65535]},
        }

    async def test_credential(self, ttl: int, user: str) -> dict[str, Any] | None:
        if self.secret is None:
            return None
        self.minted += 1
        return mint_rest_credential(self.secret, int(time.time()) + ttl, user)


def app(auth: BasicAuth | None = None, node: FixedNode | None = None) -> OpsApp:
    return OpsApp(node or FixedNode(), auth=auth)


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


async def one_answer(request: bytes, ops: OpsApp | None = None) -> bytes:
    server, address = await start_ops_server(ops or app(), LOOPBACK, 0)
    try:
        return await exchange(address, request)
    finally:
        server.close()


def answer_to(request: bytes, ops: OpsApp | None = None) -> bytes:
    answers: list[bytes] = []

    async def test() -> None:
        answers.append(await one_answer(request, ops))

    run(test)
    return answers[0]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", b"text/html"),
        ("/test", b"text/html"),
        ("/assets/status.js", b"text/javascript"),
        ("/assets/test.js", b"text/javascript"),
        ("/assets/pages.css", b"text/css"),
        ("/favicon.ico", b"image/svg+xml"),
        ("/status.json", b"application/json"),
        ("/test/ice.json", b"application/json"),
    ],
)
def test_the_pages_are_served_with_a_policy_that_allows_only_their_own_files(
    path: str, content_type: bytes
) -> None:
    answer = answer_to(get(path))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 200
    assert b"Content-Type: " + content_type in head
    assert b"Content-Security-Policy: default-src 'none'; script-src 'self';" in head
    assert b"X-Content-Type-Options: nosniff" in head
    assert b"frame-ancestors 'none'" in head
    assert body


def test_the_pages_load_nothing_from_elsewhere() -> None:
    for path in ("/", "/test", "/assets/status.js", "/assets/test.js", "/assets/pages.css"):
        body = answer_to(get(path)).partition(b"\r\n\r\n")[2]
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body
        assert b"innerHTML" not in body
        assert b"<script>" not in body  # inline script: the policy would block it anyway


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/../etc/passwd"), 404),
        (get("/assets/../status.html"), 404),
        (get("/assets/%2e%2e/%2e%2e/pyturn/config.py"), 404),
        (get("/assets/status.js%00.html"), 404),
        (get("/assets/"), 404),
        (get("//status.json"), 404),
        (get("/assets\\status.js"), 404),
        (get("/web/__init__.py"), 404),
        (b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n Folded: header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nCookie: " + b"c" * 9000 + b"\r\n\r\n", 431),
        (get("/", "DELETE"), 405),
        (get("/test/ice.json", "POST"), 405),
    ],
)
def test_hostile_requests_get_4xx(request_bytes: bytes, status: int) -> None:
    node = FixedNode()
    answer = answer_to(request_bytes, app(node=node))
    assert status_of(answer) == status
    assert node.minted == 0


@pytest.mark.parametrize(
    "path",
    [
        "/?q=<script>alert(1)</script>",
        "/test?user=%3Cscript%3Ealert(1)%3C/script%3E",
        "/status.json?<script>",
        "/nowhere/<script>alert(1)</script>",
        "/%0d%0aSet-Cookie:%20stolen=1",
    ],
)
def test_nothing_from_the_request_comes_back_in_an_answer(path: str) -> None:
    answer = answer_to(get(path))
    assert b"alert(" not in answer
    assert b"%3C" not in answer
    assert b"Set-Cookie" not in answer
    assert b"stolen" not in answer


def test_a_query_string_does_not_change_a_page() -> None:
    plain = answer_to(get("/test")).partition(b"\r\n\r\n")[2]
    assert answer_to(get("/test?mode=users&x=<b>")).partition(b"\r\n\r\n")[2] == plain


def authorized(path: str, user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"GET {path} HTTP/1.1\r\nAuthorization: Basic {token}\r\n\r\n".encode()


@pytest.mark.parametrize("path", ["/", "/metrics", "/status.json", "/test", "/test/ice.json"])
def test_metrics_auth_guards_everything_but_the_health_checks(path: str) -> None:
    auth = BasicAuth.from_text("prometheus:scrape-pw\n")
    denied = answer_to(get(path), app(auth))
    assert status_of(denied) == 401
    assert b'WWW-Authenticate: Basic realm="pyturn"' in denied
    assert status_of(answer_to(authorized(path, "prometheus", "nope"), app(auth))) == 401
    assert status_of(answer_to(authorized(path, "prometheus", "scrape-pw"), app(auth))) == 200
    for health in ("/live", "/ready"):
        assert status_of(answer_to(get(health), app(auth))) == 200


def ice(ops: OpsApp, peer: str, authorization: str | None = None) -> dict[str, Any]:
    headers = {"authorization": authorization} if authorization else {}
    answer = asyncio.run(ops.respond(Request("GET", "/test/ice.json", headers, peer)))
    assert answer.status == 200
    document: dict[str, Any] = json.loads(answer.body)
    return document


def test_credentials_are_minted_for_this_host_or_behind_metrics_auth_only() -> None:
    node = FixedNode()
    assert ice(app(node=node), "127.0.0.1")["mode"] == "rest"
    assert ice(app(node=node), "::1")["mode"] == "rest"
    assert node.minted == 2
    refused = ice(app(node=node), "192.0.2.7")
    assert refused["mode"] == "refused"
    assert "credential" not in refused
    assert node.minted == 2
    auth = BasicAuth.from_text("ops:pw\n")
    token = "Basic " + base64.b64encode(b"ops:pw").decode()
    minted = ice(app(auth, node), "192.0.2.7", token)
    assert minted["mode"] == "rest"
    assert minted["username"].endswith(":pyturn-test-page")
    assert node.minted == 3


def test_without_a_rest_secret_the_test_page_asks_for_a_user() -> None:
    document = ice(app(node=FixedNode(secret=None)), "127.0.0.1")
    assert document["mode"] == "users"
    assert "credential" not in document
    assert document["listeners"] == [{"transport": "udp", "address": LOOPBACK, "port": 3478}]
