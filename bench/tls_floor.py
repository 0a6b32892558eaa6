#!/usr/bin/env python3
"""What a TCP or TLS connection costs a server before any TURN: C against Python.

Figure 11 (`bench/run.py`) times whole TURN cycles: connect, TLS handshake, Allocate,
401, authenticated Allocate, Refresh(0), close. This takes the TURN out: a client
(`bench/tls_floor.c`, in C) cycles connect, handshake, three 100-byte requests and
their 100-byte answers, close, with 64 connections at once, against servers that only
answer:

- `C`: a one-thread epoll server in C with OpenSSL on the socket (coturn's kind);
- `uvloop server`: a protocol under uvloop's `create_server(ssl=...)`;
- `uvloop accepted`: accepted in Python, then `connect_accepted_socket(ssl=...)`, the
  way pyturn serves its TLS listeners (`pyturn/net/stream.py`);
- `SSLSocket`: a non-blocking `ssl.SSLSocket` on `add_reader`, OpenSSL on the socket as
  in C, the rest in Python.

The Python servers use pyturn's TLS context (`pyturn/net/tls.py`). Each figure is the
server's CPU per cycle, the median of alternating runs, the server pinned to one core
and the client to the other. The difference between a Python server and `C` is what a
native connection layer could save pyturn at most; the rest of a TURN cycle is TURN.
Loopback only; every run is bounded in time.

    .venv/bin/python bench/tls_floor.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "tls_floor.c"
BINARY = BENCH_DIR / "build" / "tls_floor"
HOST = "127.0.0.1"
SERVER_CORE, CLIENT_CORE = 0, 1
INFLIGHT = 64
ANSWER = b"a" * 100
SERVERS = ("C", "uvloop server", "uvloop accepted", "SSLSocket")


def build() -> None:
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("tls_floor: no C compiler (cc) found")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    argv = [cc, "-O2", "-Wall", "-Wextra", "-o", str(BINARY), str(SOURCE), "-lssl", "-lcrypto"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(f"tls_floor: building {SOURCE.name} failed:\n{done.stderr}")


# -- the Python servers (run as `tls_floor.py --serve KIND PORT TRANSPORT CERT KEY`) ------


class Answerer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)


class SocketAnswerer:
    """A connection on `add_reader`: a non-blocking SSLSocket (or plain socket)."""

    __slots__ = ("handshaken", "loop", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.handshaken = not isinstance(sock, ssl.SSLSocket)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        sock = self.sock
        try:
            if not self.handshaken:
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                self.handshaken = True
            data = sock.recv(262144)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            return
        sock.send(ANSWER)


async def serve(kind: str, port: int, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, port), backlog=1024)
    listener.setblocking(False)
    if kind == "uvloop server":
        await loop.create_server(Answerer, sock=listener, ssl=context)
    else:
        tasks: set[asyncio.Task[None]] = set()

        async def take(conn: socket.socket) -> None:
            # A client stopped mid-handshake at the end of a run resets its connection.
            with contextlib.suppress(OSError, ssl.SSLError):
                await loop.connect_accepted_socket(Answerer, conn, ssl=context)

        def accept() -> None:
            for _ in range(64):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    return
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if kind == "SSLSocket":
                    if context is not None:
                        conn = context.wrap_socket(
                            conn, server_side=True, do_handshake_on_connect=False
                        )
                    SocketAnswerer(loop, conn)
                else:
                    task = loop.create_task(take(conn))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        loop.add_reader(listener.fileno(), accept)
    # The measuring script holds our stdin: when it goes, so do we.
    parent_gone: asyncio.Future[None] = loop.create_future()

    def stdin_readable() -> None:
        if not parent_gone.done():
            parent_gone.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    print("listening", flush=True)
    await parent_gone


def serve_main(kind: str, port: int, transport: str, cert: str, key: str) -> None:
    sys.path.insert(0, str(BENCH_DIR.parent))
    from pyturn.net.tls import TlsContext  # noqa: PLC0415 (the repository's, when run here)

    context = TlsContext(cert, key).context if transport == "tls" else None
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(kind, port, context))


# -- the measurement ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(core: int, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        return argv
    return [taskset, "-c", str(core), *argv]


def measure(server: str, transport: str, cert: str, key: str, seconds: float) -> float:
    """The server's CPU microseconds per cycle in one run."""
    port = free_port()
    if server == "C":
        argv = [str(BINARY), "server", str(port), transport, cert, key]
    else:
        argv = [sys.executable, __file__, "--serve", server, str(port), transport, cert, key]
    proc = subprocess.Popen(  # noqa: S603
        pinned(SERVER_CORE, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"listening":
            raise SystemExit(f"tls_floor: the {server} server did not start")
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        client = [str(BINARY), "client", str(port), transport, str(INFLIGHT), str(seconds)]
        done = subprocess.run(  # noqa: S603
            pinned(CLIENT_CORE, client), capture_output=True, timeout=seconds + 30, check=True
        )
        spent = cpu_seconds(proc.pid) - before
        result = json.loads(done.stdout)
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    cycles = float(result["cycles_ps"]) * seconds
    if cycles <= 0:
        raise SystemExit(f"tls_floor: no cycle completed against the {server} server")
    return spent / cycles * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per figure")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, port, transport, cert, key = args.serve
        serve_main(kind, int(port), transport, cert, key)
        return 0
    seconds = min(max(args.seconds, 1.0), 30.0)
    build()
    sys.path.insert(0, str(BENCH_DIR))
    from tls_io import certificate  # noqa: PLC0415 (beside this script)

    with tempfile.TemporaryDirectory(prefix="pyturn-tls-floor-") as directory:
        cert, key = certificate(Path(directory))
        figures: dict[tuple[str, str], list[float]] = {}
        for _ in range(max(args.rounds, 1)):
            for transport in ("tcp", "tls"):
                for server in SERVERS:
                    figure = measure(server, transport, cert, key, seconds)
                    figures.setdefault((server, transport), []).append(figure)
    print(
        "server CPU per connection cycle (connect, the TLS 1.2 handshake over TLS, "
        f"3 x 100 B request and answer, close), {INFLIGHT} connections at once; "
        f"median of {max(args.rounds, 1)} runs of {seconds:.0f} s"
    )
    print(f"{'server':16} {'TCP us':>7} {'TLS 1.2 us':>11} {'TLS - TCP':>10}  runs (TCP; TLS)")
    for server in SERVERS:
        tcp = statistics.median(figures[(server, "tcp")])
        tls = statistics.median(figures[(server, "tls")])
        runs = "; ".join(
            " ".join(f"{figure:.0f}" for figure in figures[(server, transport)])
            for transport in ("tcp", "tls")
        )
        print(f"{server:16} {tcp:7.0f} {tls:11.0f} {tls - tcp:10.0f}  {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
