"""Passing RFC 6062 data connections between workers (pyturn.net.handover).

The peek at a new connection's first message, the packet layout, and the supervisor's
relay between worker slots over real Unix socketpairs, with a real TCP connection as the
descriptor that travels. The whole path, from turnutils_uclient through several worker
processes, is in tests/interop/test_rfc6062.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from pyturn.net.handover import (
    BOUNCED,
    MAX_CARRIED,
    HandoverRelay,
    claimed_connection,
    decode_packet,
    encode_packet,
)
from pyturn.wire.attributes import ConnectionId, Username
from pyturn.wire.channel_data import encode_channel_data
from pyturn.wire.message import Message, MessageClass, Method, encode

TXID = b"\x01" * 12
STEP_TIMEOUT = 5.0


def _connection_bind(connection_id: int | None) -> bytes:
    attributes = (ConnectionId(connection_id),) if connection_id is not None else ()
    message = Message(
        Method.CONNECTION_BIND, MessageClass.REQUEST, TXID, (*attributes, Username("alice"))
    )
    return encode(message, integrity_key=b"k" * 16)


def test_a_whole_connection_bind_first_names_its_connection_id() -> None:
    """What the accepting worker needs to find the owner: the CONNECTION-ID, whose low
    8 bits name the worker; bytes after the message do not matter."""
    bind = _connection_bind(0xABCDEF01)
    assert claimed_connection(bytearray(bind)) == (True, 0xABCDEF01)
    assert claimed_connection(bytearray(bind + b"\xfepayload")) == (True, 0xABCDEF01)


def test_an_incomplete_first_message_waits_for_more() -> None:
    bind = _connection_bind(0xABCDEF01)
    for size in (0, 1, 19, 20, len(bind) - 1):
        assert claimed_connection(bytearray(bind[:size])) == (False, None), size


def test_anything_else_first_stays_on_the_accepting_worker() -> None:
    """A Binding or Allocate, ChannelData, bytes that are not STUN, or a ConnectionBind
    without CONNECTION-ID (the core answers it 400) are decided at once: not a handover."""
    binding = encode(Message(Method.BINDING, MessageClass.REQUEST, TXID))
    allocate = encode(Message(Method.ALLOCATE, MessageClass.REQUEST, TXID))
    for first in (
        binding,
        allocate,
        encode_channel_data(0x4000, b"x" * 8, pad=True),
        b"\xfe",
        b"GET / HTTP/1.1\r\n\r\n",
        _connection_bind(None),
    ):
        assert claimed_connection(bytearray(first)) == (True, None), first


def test_a_packet_keeps_its_target_flags_header_and_bytes() -> None:
    header = {"from": 1, "tuple": ["tcp", "192.0.2.1", 5000, "127.0.0.1", 3478], "proxied": False}
    data = _connection_bind(0x102) + b"\x00" * MAX_CARRIED
    packet = encode_packet(2, header, data, BOUNCED)
    assert decode_packet(packet) == (2, BOUNCED, header, data)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (the client's end, the end a worker accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=STEP_TIMEOUT)
        accepted, _ = listener.accept()
    accepted.settimeout(STEP_TIMEOUT)
    yield client, accepted
    client.close()
    accepted.close()


def _relay_once(
    tcp_pair: tuple[socket.socket, socket.socket], alive: set[int]
) -> tuple[int, bytes, socket.socket]:
    """Worker 0 sends the accepted connection towards worker 1 through a supervisor
    relay whose live slots are `alive`; returns (the slot that got it, its packet, the
    socket made from the descriptor it got)."""
    _, accepted = tcp_pair
    header = {"from": 0, "tuple": ["tcp", "127.0.0.1", 1, "127.0.0.1", 2], "proxied": False}
    packet = encode_packet(1, header, b"first bytes")

    async def scenario() -> tuple[int, bytes, list[int]]:
        loop = asyncio.get_running_loop()
        relay = HandoverRelay(loop, 2, alive.__contains__)
        try:
            for child in relay.children:
                child.setblocking(False)
            socket.send_fds(relay.children[0], [packet], [accepted.fileno()])
            for _ in range(int(STEP_TIMEOUT / 0.01)):
                for slot, child in enumerate(relay.children):
                    with contextlib.suppress(BlockingIOError):
                        got, fds, _, _ = socket.recv_fds(child, 65536, 1)
                        return slot, got, fds
                await asyncio.sleep(0.01)
            raise AssertionError(f"no packet came out of the relay within {STEP_TIMEOUT} s")
        finally:
            relay.close()

    slot, got, fds = asyncio.run(scenario())
    assert len(fds) == 1
    return slot, got, socket.socket(fileno=fds[0])


def test_the_supervisor_relays_a_connection_to_the_worker_it_names(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """The descriptor that arrives is the same connection: the accepting worker may
    close its own, and the client still talks to whoever holds the new one."""
    client, accepted = tcp_pair
    slot, packet, sock = _relay_once(tcp_pair, alive={0, 1})
    with sock:
        assert slot == 1
        target, flags, header, data = decode_packet(packet)
        assert (target, flags, header["from"], data) == (1, 0, 0, b"first bytes")
        accepted.close()
        client.sendall(b"to the owner")
        sock.settimeout(STEP_TIMEOUT)
        assert sock.recv(64) == b"to the owner"
        sock.sendall(b"from the owner")
        assert client.recv(64) == b"from the owner"


def test_a_connection_for_a_slot_without_a_worker_comes_back_marked(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """The owner died and is not back yet: the accepting worker gets its connection back,
    flagged, and answers the ConnectionBind itself (400 unknown CONNECTION-ID)."""
    client, _ = tcp_pair
    slot, packet, sock = _relay_once(tcp_pair, alive={0})
    with sock:
        assert slot == 0
        target, flags, _, data = decode_packet(packet)
        assert (target, flags, data) == (0, BOUNCED, b"first bytes")
        client.sendall(b"still here")
        sock.settimeout(STEP_TIMEOUT)
        assert sock.recv(64) == b"still here"


def test_the_relay_closes_its_copies_of_the_descriptors(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Every descriptor the supervisor receives is closed once sent on: the connection
    ends when the workers' copies do."""
    before = len(os.listdir("/proc/self/fd"))
    _, _, sock = _relay_once(tcp_pair, alive={0, 1})
    sock.close()
    assert len(os.listdir("/proc/self/fd")) == before
