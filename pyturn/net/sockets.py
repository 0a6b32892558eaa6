"""Bound sockets for pyturn's listeners: one place for the options they all need."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)


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
