"""Bound sockets for pyturn's listeners: one place for the options they all need."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

from pyturn.config import Listener
from pyturn.logs import format_address
from pyturn.net.errors import StartupError

log = logging.getLogger(__name__)

# Stream listeners queue this many connections not yet accepted.
LISTEN_BACKLOG = 1024


def bound_socket(
    kind: int,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int | None = None,
) -> socket.socket:
    """A non-blocking socket of `kind` (SOCK_DGRAM or SOCK_STREAM) bound to (host, port).

    IPv6 when `host` has a colon, and then IPv6-only, so that an IPv4 socket can hold the
    same port. Stream sockets get SO_REUSEADDR (a restart must not wait for TIME_WAIT)
    and listen with `backlog`. `reuse_port` shares the port with other sockets of this
    user: the workers' listeners, or an RFC 6062 relay's outgoing connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listener_sockets(listener: Listener, count: int = 1) -> list[socket.socket]:
    """The bound sockets of one `listen` entry, or StartupError naming it.

    UDP: `count` sockets on the same port with SO_REUSEPORT (with count > 1), one per
    worker; the kernel hashes each client's addresses to one of them, and keeps doing so
    while they all stay open. TCP and TLS: one listening socket, whatever `count`; the
    workers that share it accept from it in turn. Port 0 picks a free port, which the
    other sockets then take: the port is `getsockname()[1]` of any of them.
    """
    kind = socket.SOCK_DGRAM if listener.transport == "udp" else socket.SOCK_STREAM
    host, port = listener.address, listener.port
    udp = kind == socket.SOCK_DGRAM
    backlog = None if udp else LISTEN_BACKLOG
    made: list[socket.socket] = []
    try:
        for _ in range(count if udp else 1):
            made.append(
                bound_socket(kind, host, port, reuse_port=udp and count > 1, backlog=backlog)
            )
            port = made[0].getsockname()[1]
    except OSError as exc:
        for sock in made:
            sock.close()
        # The OS words ("Address already in use"), not Python's longer wrapping of them.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        where = format_address((host, port))
        raise StartupError(f"cannot listen on {listener.transport} {where}: {reason}") from exc
    return made


def accept_ready(
    sock: socket.socket, limit: int, where: str
) -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """The connections already waiting on a non-blocking listening socket, up to `limit`
    per call (the rest wait for the loop's next turn), each as (socket, (host, port))."""
    for _ in range(limit):
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("accept on %s failed: %s", where, exc)
            return
        yield conn, (str(address[0]), int(address[1]))
