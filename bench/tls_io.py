#!/usr/bin/env python3
"""Python's two ways to run TLS on a non-blocking socket, timed on this machine.

- SSLObject with memory BIOs: the event loop reads ciphertext from the socket into a
  buffer, feeds the incoming BIO and pulls plaintext out (asyncio's and uvloop's SSL
  transports work this way); writes go the other way round through the outgoing BIO.
- SSLSocket: OpenSSL reads and writes the socket itself.

A child process sends (or receives) small TLS records over loopback TCP, one record per
TURN frame as a browser's closed loop does; this process times its own CPU per record
for each way. TLS 1.3 and 1.2, a 100-byte and a 1000-byte frame. Loopback only; every
run is bounded by a record count.

    .venv/bin/python bench/tls_io.py
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDS = 50_000
HOST = "127.0.0.1"

_PEER = r"""
import socket, ssl, sys
host, port, version, size, count, role = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
sock = ctx.wrap_socket(socket.create_connection((host, int(port))))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
frame = b"\x40\x00" + int(size).to_bytes(2, "big") + b"\x00" * int(size)
if role == "send":
    for _ in range(int(count)):
        sock.sendall(frame)
else:
    want = int(count) * len(frame)
    while want > 0:
        got = sock.recv(65536)
        if not got:
            break
        want -= len(got)
sock.close()
"""


def certificate(directory: Path) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("tls_io: the openssl command makes the test certificate; install it")
    subprocess.run(  # noqa: S603 (fixed argv)
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


def accept(
    context: ssl.SSLContext, version: str, size: int, role: str
) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    argv = [sys.executable, "-c", _PEER, HOST, str(port), version, str(size), str(RECORDS), role]
    child = subprocess.Popen(argv)  # noqa: S603 (this interpreter, fixed script)
    listener.settimeout(20)
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, child


def handshake_with_bios(
    context: ssl.SSLContext, conn: socket.socket
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """The server side of a handshake on memory BIOs, the socket blocking meanwhile."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=True)
    conn.settimeout(20)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                conn.sendall(outgoing.read())
            incoming.write(conn.recv(65536))
    if outgoing.pending:
        conn.sendall(outgoing.read())
    return obj, incoming, outgoing


def receive_with_bios(context: ssl.SSLContext, conn: socket.socket, frame: bytes) -> float:
    total = RECORDS * len(frame)
    obj, incoming, _ = handshake_with_bios(context, conn)
    buffer = bytearray(262144)
    view = memoryview(buffer)
    got = 0
    started = time.thread_time()
    while got < total:
        n = conn.recv_into(buffer)
        if not n:
            break
        incoming.write(view[:n])
        while True:
            try:
                got += len(obj.read(262144))
            except ssl.SSLWantReadError:
                break
    return time.thread_time() - started


def receive_with_socket(context: ssl.SSLContext, conn: socket.socket, frame: bytes) -> float:
    total = RECORDS * len(frame)
    tls = context.wrap_socket(conn, server_side=True)
    tls.settimeout(20)
    got = 0
    started = time.thread_time()
    while got < total:
        data = tls.recv(262144)
        if not data:
            break
        got += len(data)
        # Drain what OpenSSL already decrypted, as an event loop's reader would.
        while tls.pending():
            got += len(tls.recv(262144))
    return time.thread_time() - started


def send_with_bios(context: ssl.SSLContext, conn: socket.socket, frame: bytes) -> float:
    obj, _, outgoing = handshake_with_bios(context, conn)
    started = time.thread_time()
    for _ in range(RECORDS):
        obj.write(frame)
        conn.sendall(outgoing.read())
    return time.thread_time() - started


def send_with_socket(context: ssl.SSLContext, conn: socket.socket, frame: bytes) -> float:
    tls = context.wrap_socket(conn, server_side=True)
    tls.settimeout(20)
    started = time.thread_time()
    for _ in range(RECORDS):
        tls.sendall(frame)
    return time.thread_time() - started


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyturn-tls-io-") as directory:
        cert, key = certificate(Path(directory))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        print(f"{RECORDS} records per figure, CPU us per record in this process")
        print(f"{'TLS':4} {'frame':>6} {'direction':9} {'SSLObject+BIO':>14} {'SSLSocket':>10}")
        for version in ("1.3", "1.2"):
            for size in (100, 1000):
                frame = b"\x40\x00" + size.to_bytes(2, "big") + b"\x00" * size
                figures = []
                for direction, ways in (
                    ("receive", (receive_with_bios, receive_with_socket)),
                    ("send", (send_with_bios, send_with_socket)),
                ):
                    row = []
                    for way in ways:
                        role = "send" if direction == "receive" else "receive"
                        conn, child = accept(context, version, size, role)
                        try:
                            cpu = way(context, conn, frame)
                        finally:
                            child.wait(timeout=60)
                            conn.close()
                        row.append(cpu / RECORDS * 1e6)
                    figures.append((direction, row))
                for direction, (bios, sock) in figures:
                    print(f"{version:4} {size:6} {direction:9} {bios:14.2f} {sock:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
