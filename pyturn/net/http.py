"""The operations endpoint: /metrics, /live and /ready over a tiny HTTP/1.1 server.

Prometheus, load balancers and Kubernetes probes send one short GET and read one answer,
so this is an `asyncio.Protocol` on `loop.create_server`, not a web framework: it reads
one request head of at most `MAX_REQUEST_HEAD` bytes within `REQUEST_TIMEOUT` seconds,
answers it with `Connection: close`, and hangs up. At most `MAX_CONNECTIONS` are open at
once; more are closed on arrival. Bodies are built synchronously on the event loop: a
scrape of a server with thousands of allocations takes milliseconds.

- `GET /metrics`: the Prometheus text exposition.
- `GET /live`: 200 while the event loop runs (this very answer proves it).
- `GET /ready`: 200 once every listener is bound, 503 while starting or draining.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST

from pyturn.net.errors import StartupError

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT


class OpsApp:
    """Routes a request line to a response; no I/O, so tests can call it directly."""

    def __init__(
        self,
        metrics: Callable[[], bytes],
        readiness: Callable[[], str | None],
        *,
        gather: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """`readiness()` returns None when ready, else why not ("starting", "draining").

        `gather`, when given, collects /metrics asynchronously (from worker processes);
        `metrics` is then only used by callers of `respond` outside the server.
        """
        self.metrics = metrics
        self.readiness = readiness
        self.gather = gather

    def respond(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/live", "/ready"):
            return Response(404, b"not found: try /metrics, /live or /ready\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n")
        if path == "/metrics":
            return Response(200, self.metrics(), CONTENT_TYPE_LATEST)
        if path == "/live":
            return Response(200, b"live\n")
        why_not = self.readiness()
        if why_not is None:
            return Response(200, b"ready\n")
        return Response(503, f"not ready: {why_not}\n".encode())


class _Connection(asyncio.Protocol):
    def __init__(self, app: OpsApp, connections: set[_Connection]) -> None:
        self.app = app
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.gathering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.connections) >= MAX_CONNECTIONS:
            self.transport.abort()
            return
        self.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        self._send("GET", Response(408, b"request timeout\n"))

    def data_received(self, data: bytes) -> None:
        if self.answered:
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
        request_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._send("GET", Response(400, b"bad request\n"))
            return
        method, target, _ = parts
        gather = self.app.gather
        if gather is not None and method in ("GET", "HEAD") and target.split("?")[0] == "/metrics":
            self.gathering = asyncio.get_running_loop().create_task(self._gathered(method, gather))
            return
        try:
            response = self.app.respond(method, target)
        except Exception:
            log.exception("ops endpoint: %s %s failed", method, target)
            response = Response(503, b"internal error\n")
        self._send(method, response)

    async def _gathered(self, method: str, gather: Callable[[], Awaitable[bytes]]) -> None:
        try:
            body = await gather()
        except Exception:
            log.exception("ops endpoint: gathering metrics failed")
            self._send(method, Response(503, b"internal error\n"))
            return
        self._send(method, Response(200, body, CONTENT_TYPE_LATEST))

    def _send(self, method: str, response: Response) -> None:
        transport = self.transport
        if self.answered or transport is None:
            return
        self.answered = True
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        transport.write(head if method == "HEAD" else head + response.body)
        transport.close()  # after the buffered answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.connections.discard(self)
        self.transport = None


async def start_ops_server(
    app: OpsApp, address: str, port: int
) -> tuple[asyncio.Server, tuple[str, int]]:
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
    return server, (str(sockname[0]), int(sockname[1]))
