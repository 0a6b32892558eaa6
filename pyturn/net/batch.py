"""Many UDP datagrams per call: recvmmsg/sendmmsg when the native module is built.

`pyturn.net._batch` (C, compiled at install time by hatch_build.py; this part of it is
_udp_batch.c) reads or writes up to 32 datagrams per system call. Without it the same
functions below make one call per datagram, so behaviour is identical and only the
speed differs. `NATIVE` says which one runs; the start-up log line names it. These know
sockets and bytes only: the relay fast path built on them is pyturn/net/fastpath.py.
"""

from __future__ import annotations

import _socket
import errno
import os
from collections.abc import Callable

from pyturn.wire.attributes import Address

# ICMP errors queued on a UDP socket by an earlier datagram: they concern one peer.
_STALE = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EMSGSIZE,
    }
)
_UNSENDABLE = _STALE | {
    errno.EACCES,
    errno.EPERM,
    errno.EINVAL,
    errno.EAFNOSUPPORT,
    errno.EADDRNOTAVAIL,
}
_MAX_DATAGRAM = 65535


def _recv_batch(sock: _socket.socket, limit: int) -> list[tuple[bytes, Address]]:
    out: list[tuple[bytes, Address]] = []
    recvfrom = sock.recvfrom
    stale = 0
    while len(out) < limit:
        try:
            data, addr = recvfrom(_MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno in _STALE and stale < 64:
                stale += 1
                continue
            if out or exc.errno in _STALE:
                break
            raise
        out.append((data, addr if len(addr) == 2 else addr[:2]))
    return out


def _send_one(sock: _socket.socket, data: bytes, address: Address) -> bool:
    """False when the socket buffer is full (the caller drops the rest)."""
    try:
        sock.sendto(data, address)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno not in _UNSENDABLE:
            return False
    return True


def _send_batch(sock: _socket.socket, items: list[tuple[bytes, Address]]) -> int:
    sent = 0
    for data, address in items:
        if not _send_one(sock, data, address):
            break
        sent += 1
    return sent


def _send_many_to(sock: _socket.socket, address: Address, frames: list[bytes]) -> int:
    return _send_batch(sock, [(frame, address) for frame in frames])


RecvBatch = Callable[[_socket.socket, int], list[tuple[bytes, Address]]]
SendBatch = Callable[[_socket.socket, list[tuple[bytes, Address]]], int]
SendManyTo = Callable[[_socket.socket, Address, list[bytes]], int]


def _forget_addresses() -> None:
    """The pure-Python functions keep no address cache."""


recv_batch: RecvBatch = _recv_batch
send_batch: SendBatch = _send_batch
send_many_to: SendManyTo = _send_many_to
# Drops the native module's cache of client address tuples: those of gone clients would
# otherwise pin freed memory (the worker calls it when many allocations have ended).
forget_addresses: Callable[[], None] = _forget_addresses
NATIVE = False

if not os.environ.get("PYTURN_NO_NATIVE"):
    try:
        from pyturn.net import _batch
    except ImportError:
        pass
    else:
        recv_batch = _batch.recv_batch
        send_batch = _batch.send_batch
        send_many_to = _batch.send_many_to
        forget_addresses = _batch.forget_addresses
        NATIVE = True


def describe() -> str:
    """For the start-up log: which UDP I/O path this process runs."""
    if NATIVE:
        return "udp i/o: recvmmsg/sendmmsg batches, ChannelData relayed natively (native module)"
    return "udp i/o: one system call per datagram (native module not built or disabled)"
