"""RFC 6062 with several workers: a data connection goes to the worker that owns it.

A client claims a peer connection with ConnectionBind on a new TCP or TLS connection
(RFC 6062 §5.4), and whichever worker accepts that connection may not be the one that
holds the peer connection. The CONNECTION-ID names its worker in its low 8 bits
(pyturn/core/tcp_relaying.py), so the accepting worker peeks at the first message of
every new stream connection, and when it is a ConnectionBind for another worker it
passes the connection on, with the bytes it has already read, and the owner adopts it
as if it had accepted it: its core sees the ConnectionBind first.

- TCP: the socket itself travels (SCM_RIGHTS), and the accepting worker closes its own
  descriptor; from then on it has nothing to do with the connection.
- TLS: the TLS state cannot leave the process that holds it, so the accepting worker
  keeps the TLS connection and sends one end of a new Unix socketpair instead; it then
  pipes the plaintext between the two, and the owner sees a "tls" connection from the
  client's address.

Descriptors cannot travel on the JSON-lines control channel (an asyncio stream), so
each worker slot has a second socketpair with the supervisor, SOCK_SEQPACKET: one
packet per connection, with its descriptor attached. The supervisor relays a packet to
the worker it names; direct channels between workers would take N*(N-1)/2 pairs that
would all have to be remade when a worker restarts, where the supervisor's pairs are
made once per slot and handed to each worker started in that slot. When no worker runs
in the named slot (it died and has not been restarted yet), the supervisor sends the
packet back, and the accepting worker adopts the connection itself: its core answers
400 unknown CONNECTION-ID, as a worker that lost its peer connections must.

A packet is a fixed prefix (target slot, flags, header length), a JSON header (the
sender, the client's 5-tuple, whether the descriptor is a TLS proxy), then the bytes
already read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from pyturn.core.allocation import FiveTuple
from pyturn.core.tcp_relaying import connection_id_worker
from pyturn.logs import format_address
from pyturn.net.stream import MAX_PENDING, StreamConnection
from pyturn.net.tcp_relay import PipeEnd
from pyturn.wire.attributes import ConnectionId
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import MessageClass, Method, decode, message_type

log = logging.getLogger(__name__)

# Target slot, flags, JSON header length.
_PREFIX = struct.Struct("!HBH")
BOUNCED = 1
# What a packet may carry besides its header: a connection that sent more than one
# whole frame's worth before its ConnectionBind was answered is handled where it landed.
MAX_CARRIED = MAX_PENDING
_MAX_PACKET = _PREFIX.size + 1024 + MAX_CARRIED
# Packets read per wake-up, so that one busy channel cannot hold the loop.
_BATCH = 64
_CONNECTION_BIND = message_type(Method.CONNECTION_BIND, MessageClass.REQUEST).to_bytes(2, "big")

# Makes the owner's StreamConnection: (the client's 5-tuple, the bytes already read).
MakeStream = Callable[[FiveTuple, bytes], StreamConnection]


def claimed_connection(buffer: bytes | bytearray) -> tuple[bool, int | None]:
    """Peek at the start of a new stream connection: (decided, CONNECTION-ID).

    (True, id) when it starts with a whole ConnectionBind request carrying CONNECTION-ID;
    (True, None) when it starts with anything else; (False, None) while the first
    message is not complete and may still be one.
    """
    if len(buffer) < 20:
        return (bool(buffer) and buffer[0] >= 0x40), None
    if buffer[:2] != _CONNECTION_BIND:
        return True, None
    size = 20 + int.from_bytes(buffer[2:4], "big")
    if size > MAX_PENDING:
        return True, None
    if len(buffer) < size:
        return False, None
    try:
        attribute = decode(bytes(buffer[:size])).get(ConnectionId)
    except DecodeError:
        return True, None
    return True, None if attribute is None else attribute.value


def encode_packet(target: int, header: dict[str, Any], data: bytes, flags: int = 0) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(target, flags, len(head)) + head + data


def decode_packet(packet: bytes) -> tuple[int, int, dict[str, Any], bytes]:
    """(target slot, flags, header, data); ValueError for a malformed packet."""
    target, flags, size = _PREFIX.unpack_from(packet)
    end = _PREFIX.size + size
    header = json.loads(packet[_PREFIX.size : end])
    if not isinstance(header, dict):
        raise ValueError("handover header is not an object")
    return target, flags, header, packet[end:]


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One packet and its descriptors, or None when none is waiting; EOFError when the
    other end has gone. A truncated packet comes back empty, its descriptors closed."""
    try:
        packet, fds, flags, _ = socket.recv_fds(sock, _MAX_PACKET, 1)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        log.debug("handover channel read failed: %s", exc)
        return None
    if not packet and not fds:
        raise EOFError
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        log.warning("handover packet truncated (%d bytes): dropped", len(packet))
        _close_all(fds)
        return b"", []
    return packet, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class HandoverRelay:
    """The supervisor's side: one SOCK_SEQPACKET pair per worker slot.

    `children[slot]` is the end for the workers of `slot` (handed to each one started
    there); the supervisor reads the other end and forwards each packet to the slot it
    names, or back to its sender when `alive(slot)` says no worker runs there.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, count: int, alive: Callable[[int], bool]
    ) -> None:
        self.loop = loop
        self.alive = alive
        self.ends: list[socket.socket] = []
        self.children: list[socket.socket] = []
        for slot in range(count):
            end, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            end.setblocking(False)
            self.ends.append(end)
            self.children.append(child)
            loop.add_reader(end.fileno(), self._relay, slot)

    def _relay(self, origin: int) -> None:
        end = self.ends[origin]
        for _ in range(_BATCH):
            try:
                received = _receive(end)
            except EOFError:
                self.loop.remove_reader(end.fileno())
                return
            if received is None:
                return
            packet, fds = received
            try:
                if len(packet) >= _PREFIX.size:
                    self._forward(origin, packet, fds)
            finally:
                # send_fds put copies in the packet: these are the supervisor's own.
                _close_all(fds)

    def _forward(self, origin: int, packet: bytes, fds: list[int]) -> None:
        target, flags, size = _PREFIX.unpack_from(packet)
        try:
            if not (target < len(self.ends) and self.alive(target)):
                raise ConnectionError(f"no worker in slot {target}")
            socket.send_fds(self.ends[target], [packet], fds)
        except OSError as exc:
            # Back to the worker that accepted it, which answers the ConnectionBind.
            log.debug("handover from worker %d to %d sent back: %s", origin, target, exc)
            bounced = bytearray(packet)
            _PREFIX.pack_into(bounced, 0, origin, flags | BOUNCED, size)
            with contextlib.suppress(OSError):
                socket.send_fds(self.ends[origin], [bytes(bounced)], fds)

    def close(self) -> None:
        for end in self.ends:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(end.fileno())
            end.close()
        for child in self.children:
            child.close()
        self.ends.clear()
        self.children.clear()


class Handover:
    """A worker's side: passes data connections on, and adopts those passed to it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        index: int,
        count: int,
        make_stream: MakeStream,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.index = index
        self.count = count
        self.make_stream = make_stream
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- passing a connection on ---------------------------------------------------------

    def hand_over(self, conn: StreamConnection, buffer: bytearray) -> bool | None:
        """StreamConnection's `hand_over`: once `buffer` (what `conn` has read so far)
        holds a whole first message, pass `conn` on if that is a ConnectionBind whose
        CONNECTION-ID names another worker, and say whether it went (None: not whole)."""
        decided, connection_id = claimed_connection(buffer)
        if not decided:
            return None
        if connection_id is None:
            return False
        target = connection_id_worker(connection_id)
        transport, five_tuple = conn.transport, conn.five_tuple
        data = bytes(buffer)
        if (
            target == self.index
            or target >= self.count
            or transport is None
            or five_tuple is None
            or len(data) > MAX_CARRIED
        ):
            return False
        proxied = transport.get_extra_info("ssl_object") is not None
        header = {
            "from": self.index,
            "tuple": [five_tuple[0], *five_tuple[1], *five_tuple[2]],
            "proxied": proxied,
        }
        packet = encode_packet(target, header, data)
        if not proxied:
            raw = transport.get_extra_info("socket")
            if raw is None or not self._send(packet, raw.fileno()):
                return False
            # The descriptor is in the packet now; ours goes, and the connection stays up.
            transport.pause_reading()
            conn.close()
        else:
            near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sent = self._send(packet, far.fileno())
            finally:
                far.close()
            if not sent:
                near.close()
                return False
            self._proxy(conn, near)
        log.debug(
            "data connection handed over client=%s transport=%s worker=%d connection_id=%#x",
            format_address(five_tuple[1]),
            five_tuple[0],
            target,
            connection_id,
        )
        return True

    def _send(self, packet: bytes, fd: int) -> bool:
        try:
            socket.send_fds(self.sock, [packet], [fd])
        except OSError as exc:  # full (BlockingIOError) or gone: the connection stays
            log.debug("handover channel refused a connection: %s", exc)
            return False
        return True

    def _proxy(self, conn: StreamConnection, near: socket.socket) -> None:
        """Keep the TLS connection and pipe its plaintext to `near`, whose other end the
        owner now reads as the client's connection."""
        client_end = conn.become_pipe()
        if client_end is None:
            near.close()
            return
        near.setblocking(False)

        async def connect() -> None:
            owner_end = PipeEnd(lambda: None)
            try:
                await self.loop.connect_accepted_socket(lambda: owner_end, near)
            except OSError:
                near.close()
                client_end.close()
                return
            if client_end.transport is None:  # the client left meanwhile
                owner_end.close()
                return
            client_end.join(owner_end)

        self._spawn(connect())

    # -- adopting one ----------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(_BATCH):
            try:
                received = _receive(self.sock)
            except EOFError:  # the supervisor is gone; its control channel says so too
                self.loop.remove_reader(self.sock.fileno())
                return
            if received is None:
                return
            packet, fds = received
            if not fds:
                continue
            try:
                _, flags, header, data = decode_packet(packet)
                items = header["tuple"]
                five_tuple: FiveTuple = (
                    str(items[0]),
                    (str(items[1]), int(items[2])),
                    (str(items[3]), int(items[4])),
                )
                proxied = bool(header["proxied"])
            except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
                log.warning("malformed handover packet dropped: %s", exc)
                _close_all(fds)
                continue
            self._adopt(fds[0], five_tuple, data, proxied, bounced=bool(flags & BOUNCED))

    def _adopt(
        self, fd: int, five_tuple: FiveTuple, data: bytes, proxied: bool, *, bounced: bool
    ) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            _close_all([fd])
            return
        sock.setblocking(False)
        log.debug(
            "data connection %s client=%s transport=%s proxied=%s",
            # Sent back: no worker runs in the slot its CONNECTION-ID names.
            "returned" if bounced else "taken over",
            format_address(five_tuple[1]),
            five_tuple[0],
            "yes" if proxied else "no",
        )
        protocol = self.make_stream(five_tuple, data)

        async def adopt() -> None:
            try:
                await self.loop.connect_accepted_socket(lambda: protocol, sock)
            except OSError as exc:
                log.debug("adopting a data connection from %s failed: %s", five_tuple[1], exc)
                sock.close()

        self._spawn(adopt())

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in self._tasks:
            task.cancel()
