"""relay.external_address "auto": the relay's public address, as STUN servers see it.

A Binding request goes from the relay's own address (so a NAT maps it as it maps relayed
traffic) to each server of relay.discover in turn, until one answers; its
XOR-MAPPED-ADDRESS is what clients are then told. Workers ask at start (none answering
stops the start) and every relay.discover_interval seconds after (none answering keeps
the address they have).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from pyturn.config import parse_stun_url
from pyturn.wire.attributes import XorMappedAddress
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id

# Retransmissions of one request (RFC 8489 §6.2.1 in short): the server is asked at 0,
# 0.5 and 1.5 s, and given until 2.5 s.
_SENDS = (0.0, 0.5, 1.5)
_WAIT = 2.5


class DiscoveryError(Exception):
    """No STUN server of relay.discover answered; says what each one did."""


class _Answers(asyncio.DatagramProtocol):
    def __init__(self, txid: bytes, server: tuple[str, int]) -> None:
        self.txid = txid
        self.server = server
        self.mapped: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(
        self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        if self.mapped.done() or (addr[0], addr[1]) != self.server or data[8:20] != self.txid:
            return
        try:
            message = decode(data)
        except DecodeError:
            return
        mapped = message.get(XorMappedAddress)
        if message.msg_class == MessageClass.SUCCESS and mapped is not None:
            self.mapped.set_result(mapped.host)


async def _ask(bind_ip: str, version: int, server: tuple[str, int]) -> str | None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((bind_ip, 0))
    except OSError:
        sock.close()
        raise
    txid = new_transaction_id()
    request = encode(Message(Method.BINDING, MessageClass.REQUEST, txid, ()), fingerprint=True)
    transport, answers = await loop.create_datagram_endpoint(
        lambda: _Answers(txid, server), sock=sock
    )
    try:
        started = loop.time()
        for at in _SENDS:
            await asyncio.sleep(max(started + at - loop.time(), 0))
            if answers.mapped.done():
                break
            transport.sendto(request, server)
        try:
            return await asyncio.wait_for(
                asyncio.shield(answers.mapped), max(started + _WAIT - loop.time(), 0.01)
            )
        except TimeoutError:
            return None
    finally:
        transport.close()


async def discover(bind_ip: str, version: int, servers: Sequence[str]) -> tuple[str, str]:
    """(the IP address the first answering server saw, that server's URL)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    problems = []
    for url in servers:
        host, port = parse_stun_url(url)
        try:
            found = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            problems.append(f"{url}: {exc.strerror or exc}")
            continue
        address = found[0][4]
        server = (str(address[0]), int(address[1]))
        try:
            mapped = await _ask(bind_ip, version, server)
        except OSError as exc:
            problems.append(f"{url}: {exc.strerror or exc}")
            continue
        if mapped is not None:
            return mapped, url
        problems.append(f"{url}: no answer within {_WAIT:g} s")
    raise DiscoveryError("; ".join(problems) or "no STUN server listed")
