"""The operations endpoint: metrics, health checks and the pages, over tiny HTTP/1.1.

Prometheus, load balancers, Kubernetes probes and a browser send short GETs and read
one answer each, so this is an `asyncio.Protocol` on `loop.create_server`, not a web
framework: it reads one request head of at most `MAX_REQUEST_HEAD` bytes (and at most
`MAX_HEADERS` lines) within `REQUEST_TIMEOUT` seconds, answers it with `Connection:
close`, and hangs up. At most `MAX_CONNECTIONS` are open at once; more are closed on
arrival. Paths are looked up in fixed tables, never joined to file names.

- `GET /metrics`: the Prometheus text exposition.
- `GET /live`: 200 while the event loop runs (this very answer proves it).
- `GET /ready`: 200 once every listener is bound, 503 while starting or draining.
- `GET /` and `/status.json`: the status page and what it shows (pyturn/web).
- `GET /test` and `/test/ice.json`: the browser test page, and the TURN servers and
  (with a REST secret) a short-lived credential it tests with.

With `metrics.auth`, everything but /live and /ready asks for basic authentication.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST

from pyturn import __version__
from pyturn.logs import format_address
from pyturn.net.errors import StartupError
from pyturn.web import load_assets
from pyturn.web.basic_auth import AuthFileError, BasicAuth
from pyturn.web.status import SAMPLE_INTERVAL, RateHistory, summarize

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
MAX_HEADERS = 64
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
# How long a credential minted for the test page lasts.
TEST_CREDENTIAL_TTL = 600
TEST_CREDENTIAL_USER = "pyturn-test-page"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
# Every answer: the pages load only their own scripts and styles, talk only to this
# origin, cannot be framed, and no other site can read an answer.
_SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Cross-Origin-Resource-Policy: same-origin\r\n"
    "Cache-Control: no-store\r\n"
)
_OPEN_PATHS = frozenset({"/live", "/ready"})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    # Header names in lower case; a repeated header keeps its last value.
    headers: Mapping[str, str] = field(default_factory=dict)
    # The client's IP address.
    peer: str = "127.0.0.1"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class NodeView(Protocol):
    """What the endpoint reads of the node: a single worker or the supervisor."""

    def readiness(self) -> str | None:
        """None when ready for new clients, else why not ("starting", "draining")."""

    async def exposition(self) -> bytes:
        """The Prometheus text of the whole node."""

    async def relayed_bytes(self) -> dict[str, int]:
        """Application bytes relayed each way since start ("client_to_peer",
        "peer_to_client"), cheaper to get than the whole exposition."""

    def facts(self) -> dict[str, Any]:
        """Version-independent facts for the status page: mode, workers, listeners, relay."""

    async def test_credential(self, ttl: int, user: str) -> dict[str, Any] | None:
        """A REST credential (username, credential) made with the node's secret, or
        None when the node has none."""


def _json(document: object, status: int = 200) -> Response:
    return Response(status, json.dumps(document).encode(), _JSON)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class OpsApp:
    """Routes a request to a response; the only I/O is asking the node."""

    def __init__(self, view: NodeView, *, auth: BasicAuth | None = None) -> None:
        self.view = view
        self.auth = auth
        self.assets = load_assets()
        self.history = RateHistory()
        self.started_at = time.time()

    def reload_auth(self, path: str | None) -> None:
        """Read metrics.auth's file again (a reload): passwords change without a restart."""
        try:
            self.auth = BasicAuth.load(path)
        except AuthFileError as exc:
            log.error("reload: %s; the ops port keeps its previous users", exc)

    async def respond(self, request: Request) -> Response:
        path = request.path
        known = path in self.assets or path in _ROUTES
        if not known:
            return Response(404, b"not found: try /, /test, /metrics, /live or /ready\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n")
        if (
            self.auth is not None
            and path not in _OPEN_PATHS
            and not self.auth.allows(request.headers.get("authorization"))
        ):
            return Response(
                401,
                b"authentication required (metrics.auth)\n",
                headers=(("WWW-Authenticate", 'Basic realm="pyturn", charset="UTF-8"'),),
            )
        asset = self.assets.get(path)
        if asset is not None:
            return Response(200, asset[1], asset[0])
        return await _ROUTES[path](self, request)

    async def _metrics(self, request: Request) -> Response:
        return Response(200, await self.view.exposition(), CONTENT_TYPE_LATEST)

    async def _live(self, request: Request) -> Response:
        return Response(200, b"live\n")

    async def _ready(self, request: Request) -> Response:
        why_not = self.view.readiness()
        if why_not is None:
            return Response(200, b"ready\n")
        return Response(503, f"not ready: {why_not}\n".encode())

    async def _status(self, request: Request) -> Response:
        summary = summarize((await self.view.exposition()).decode())
        now = time.time()
        return _json(
            {
                "version": __version__,
                "now": now,
                "started_at": self.started_at,
                "uptime": now - self.started_at,
                "not_ready": self.view.readiness(),
                **self.view.facts(),
                **summary,
                "rates": self.history.rates(),
                "sample_interval": SAMPLE_INTERVAL,
            }
        )

    async def _test_ice(self, request: Request) -> Response:
        """The TURN servers to test, and a credential when the node has a REST secret.

        Minting hands out use of the relay, so without metrics.auth it is done only
        for a browser on this host (the ops port's default, 127.0.0.1)."""
        facts = self.view.facts()
        document: dict[str, Any] = {"listeners": facts["listeners"], "mode": "users"}
        if self.auth is None and not _is_loopback(request.peer):
            document["mode"] = "refused"
            document["why"] = (
                "credentials are minted only for a browser on this host unless metrics.auth "
                "is set; enter a username and password instead"
            )
            return _json(document)
        minted = await self.view.test_credential(TEST_CREDENTIAL_TTL, TEST_CREDENTIAL_USER)
        if minted is not None:
            document.update(minted, mode="rest", ttl=TEST_CREDENTIAL_TTL)
            log.info("test page: credential %s minted for %s", minted["username"], request.peer)
        return _json(document)

    async def sample(self) -> None:
        """One point of the status page's traffic chart: every few seconds, even with
        no page open, so only the two byte counters, not the whole exposition."""
        self.history.add(time.time(), await self.view.relayed_bytes())


_ROUTES: dict[str, Callable[[OpsApp, Request], Awaitable[Response]]] = {
    "/metrics": OpsApp._metrics,
    "/live": OpsApp._live,
    "/ready": OpsApp._ready,
    "/status.json": OpsApp._status,
    "/test/ice.json": OpsApp._test_ice,
}


def parse_head(head: bytes, peer: str) -> Request | Response:
    """The request in a head (without its final blank line), or the error answer."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return Response(400, b"bad request\n")
    if len(lines) - 1 > MAX_HEADERS:
        return Response(431, b"too many header lines\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return Response(400, b"bad header line\n")
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1], headers, peer)


class _Connection(asyncio.Protocol):
    def __init__(self, app: OpsApp, connections: set[_Connection]) -> None:
        self.app = app
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.answering: asyncio.Task[None] | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.connections) >= MAX_CONNECTIONS:
            self.transport.abort()
            return
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        self.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        self._send("GET", Response(408, b"request timeout\n"))

    def data_received(self, data: bytes) -> None:
        if self.answered or self.answering is not None:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST_HEAD:
                self._send("GET", Response(431, b"request head too large\n"))
            return
        if end > MAX_REQUEST_HEAD:
            self._send("GET", Response(431, b"request head too large\n"))
            return
        request = parse_head(bytes(self.buffer[:end]), self.peer)
        if isinstance(request, Response):
            self._send("GET", request)
            return
        self.answering = asyncio.get_running_loop().create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            response = await self.app.respond(request)
        except Exception:
            log.exception("ops endpoint: %s %s failed", request.method, request.path)
            response = Response(503, b"internal error\n")
        self._send(request.method, response)

    def _send(self, method: str, response: Response) -> None:
        transport = self.transport
        if self.answered or transport is None:
            return
        self.answered = True
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"{_SECURITY_HEADERS}{extra}"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        transport.write(head if method == "HEAD" else head + response.body)
        transport.close()  # after the buffered answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.answering is not None and not self.answering.done():
            self.answering.cancel()
        self.connections.discard(self)
        self.transport = None


class OpsServer:
    """The listening endpoint and the sampler behind the status page's chart."""

    def __init__(self, server: asyncio.Server, sampler: asyncio.Task[None]) -> None:
        self.server = server
        self.sampler = sampler

    def close(self) -> None:
        self.sampler.cancel()
        self.server.close()


async def _sample_forever(app: OpsApp) -> None:
    while True:
        try:
            await app.sample()
        except Exception:
            log.exception("ops endpoint: sampling traffic for the status page failed")
        await asyncio.sleep(SAMPLE_INTERVAL)


def log_ops_endpoint(address: tuple[str, int], auth: str | None) -> None:
    where = format_address(address)
    log.info(
        "metrics on http://%s/metrics, status page on /, browser test on /test, health "
        "checks on /live and /ready%s",
        where,
        f"; basic authentication from {auth}" if auth else "",
    )


async def start_ops_server(
    app: OpsApp, address: str, port: int
) -> tuple[OpsServer, tuple[str, int]]:
    """Bind the endpoint; returns the server and the address it is bound to."""
    loop = asyncio.get_running_loop()
    connections: set[_Connection] = set()
    try:
        server = await loop.create_server(
            lambda: _Connection(app, connections), host=address, port=port, backlog=128
        )
    except OSError as exc:
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        raise StartupError(
            f"cannot serve metrics on {where} (metrics.address, metrics.port): "
            f"{exc.strerror or exc}"
        ) from exc
    sockname = server.sockets[0].getsockname()
    sampler = loop.create_task(_sample_forever(app))
    return OpsServer(server, sampler), (str(sockname[0]), int(sockname[1]))
