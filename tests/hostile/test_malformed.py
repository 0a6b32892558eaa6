"""Malformed traffic over real sockets: each is dropped or answered 400, and the server
keeps serving (RFC 8489 §6.3, §14; RFC 8656 §12.5; RFC 7983).

After every hostile input an honest client (from 127.0.0.2) allocates, binds a channel
and relays both ways through a loopback echo peer, then deletes its allocation.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import pytest

from pyturn.wire.attributes import (
    MAGIC_COOKIE,
    TRANSPORT_UDP,
    Fingerprint,
    MessageIntegrity,
    Nonce,
    Padding,
    RequestedTransport,
    Software,
    UnknownAttribute,
)
from pyturn.wire.channel_data import channel_header
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.hostile.client import (
    EchoPeer,
    TurnClient,
    assert_clean_log,
    code_of,
    honest_session,
    relay_round_trip,
    run,
)
from tests.interop.server_process import ServerProcess, base_config, merge_config

COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
QUIET = 0.3  # how long to listen for an answer that must not come
MAX_UDP = 65507  # largest IPv4 UDP payload


def header(msg_type: int, length: int, txid: bytes | None = None) -> bytes:
    return struct.pack("!HH", msg_type, length) + COOKIE + (txid or new_transaction_id())


def tlv(attr_type: int, value: bytes, padding: bytes | None = None) -> bytes:
    pad = padding if padding is not None else b"\x00" * (-len(value) % 4)
    return struct.pack("!HH", attr_type, len(value)) + value + pad


BINDING = 0x0001
ALLOCATE = 0x0003


def binding_with(body: bytes, length: int | None = None) -> bytes:
    return header(BINDING, len(body) if length is None else length) + body


def signed_allocate(client: TurnClient) -> bytes:
    assert client.codec.nonce is not None
    return client.codec.encode_request(Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)])


def with_duplicate_integrity(message: bytes, second: bytes) -> bytes:
    """`message` (ending in MESSAGE-INTEGRITY) with a second MESSAGE-INTEGRITY after it."""
    extra = tlv(MessageIntegrity.TYPE, second)
    length = int.from_bytes(message[2:4], "big") + len(extra)
    return message[:2] + length.to_bytes(2, "big") + message[4:] + extra


# -- datagrams that are dropped or answered 400 ---------------------------------------------

# name -> (datagram, expected: None = dropped, else the error code)
MALFORMED_DATAGRAMS: dict[str, tuple[bytes, int | None]] = {
    "truncated header (10 bytes)": (header(BINDING, 0)[:10], None),
    "truncated header (19 bytes)": (header(BINDING, 0)[:19], None),
    "length field longer than the datagram": (binding_with(b"", length=8), 400),
    "length field shorter than the datagram": (
        binding_with(tlv(Software.TYPE, b"abcd"), length=4),
        400,
    ),
    "length not a multiple of 4": (binding_with(tlv(Software.TYPE, b"abc", b""), 7), 400),
    # SOFTWARE "abcde" with the next attribute where its 3 padding bytes belong.
    "padding missing": (
        binding_with(tlv(Software.TYPE, b"abcde", b"") + tlv(0x8023, b"xyz", b"")),
        400,
    ),
    "attribute runs past the end": (
        binding_with(struct.pack("!HH", Software.TYPE, 64) + b"abcd"),
        400,
    ),
    "attribute header cut in half": (binding_with(b"\x80\x22"), 400),
    "FINGERPRINT not last": (
        binding_with(tlv(Fingerprint.TYPE, b"\x00" * 4) + tlv(Software.TYPE, b"abcd")),
        400,
    ),
    "wrong magic cookie": (struct.pack("!HH", BINDING, 0) + b"\x21\x12\xa4\x43" + bytes(12), None),
    "response class (not a request)": (header(0x0101, 8)[:20], None),
    "indication with a bad length": (header(0x0016, 8), None),
    "top bits 10 (not STUN, not ChannelData)": (b"\x80" + header(BINDING, 0)[1:], None),
    "ChannelData, no allocation": (channel_header(0x4000, 4) + b"abcd", None),
    "ChannelData, length past the datagram": (channel_header(0x4000, 400) + b"abcd", None),
    "ChannelData, channel 0x3FFF": (channel_header(0x3FFF, 4) + b"abcd", None),
    "empty datagram": (b"", None),
    "64 KB of garbage": (b"\xff" * MAX_UDP, None),
    "64 KB STUN whose length field lies": (
        header(BINDING, 0xFFFC) + b"\x00" * (MAX_UDP - 20),
        400,
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_DATAGRAMS))
def test_a_malformed_datagram_is_dropped_or_answered_400_and_the_server_keeps_serving(
    module_server: ServerProcess, echo_peer: EchoPeer, name: str
) -> None:
    datagram, expected = MALFORMED_DATAGRAMS[name]

    async def scenario() -> None:
        attacker = await TurnClient.open(module_server.udp_address)
        try:
            if expected is None:
                attacker.send(datagram)
                await asyncio.sleep(QUIET)
                assert attacker.inbox.received == 0, "a malformed datagram was answered"
            else:
                reply = await attacker.transact(datagram)
                assert code_of(reply) == expected
                assert reply is not None and reply.transaction_id == datagram[8:20]
        finally:
            attacker.close()
        await honest_session(module_server.udp_address, echo_peer)

    run(scenario())


def test_padding_bytes_are_ignored_whatever_they_hold(module_server: ServerProcess) -> None:
    """RFC 8489 §14: padding may hold any value and is ignored."""
    datagram = binding_with(tlv(Software.TYPE, b"abc", b"\xff"))

    async def scenario() -> int | None:
        client = await TurnClient.open(module_server.udp_address)
        try:
            return code_of(await client.transact(datagram))
        finally:
            client.close()

    assert run(scenario()) == 0


def test_a_fingerprint_mismatch_is_dropped_silently(
    module_server: ServerProcess, echo_peer: EchoPeer
) -> None:
    """RFC 8489 §14.7: a wrong FINGERPRINT means the datagram is not STUN: no answer."""

    async def scenario() -> None:
        client = await TurnClient.open(module_server.udp_address)
        try:
            good = client.codec.encode_request(Method.BINDING, auth=False, fingerprint=True)
            bad = good[:-1] + bytes((good[-1] ^ 0x01,))
            client.send(bad)
            await asyncio.sleep(QUIET)
            assert client.inbox.received == 0
            assert code_of(await client.transact(good)) == 0
        finally:
            client.close()
        await honest_session(module_server.udp_address, echo_peer)

    run(scenario())


def test_a_duplicate_message_integrity_is_ignored_not_trusted(
    module_server: ServerProcess, echo_peer: EchoPeer
) -> None:
    """RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY (but -SHA256 and FINGERPRINT) are
    ignored. A right first MI authenticates whatever follows; a wrong first MI is a 401
    even with a right one after it."""

    async def scenario() -> tuple[int | None, int | None]:
        client = await TurnClient.open(module_server.udp_address)
        try:
            challenge = await client.transact(
                client.codec.encode_request(Method.ALLOCATE, auth=False)
            )
            assert challenge is not None
            nonce = challenge.get(Nonce)
            assert nonce is not None
            client.codec.nonce = nonce.value
            good = signed_allocate(client)
            forged = good[:-20] + bytes(20)
            # A wrong MI with the right one behind it: the first decides.
            wrong_first = await client.transact(with_duplicate_integrity(forged, good[-20:]))
            right_first = await client.transact(with_duplicate_integrity(good, bytes(20)))
            if code_of(right_first) == 0:
                assert code_of(await client.refresh(0)) == 0
            return code_of(wrong_first), code_of(right_first)
        finally:
            client.close()

    assert run(scenario()) == (401, 0)
    run(honest_session(module_server.udp_address, echo_peer))


def test_channel_data_for_an_unbound_channel_reaches_no_peer(
    module_server: ServerProcess, echo_peer: EchoPeer
) -> None:
    """RFC 8656 §12.5: ChannelData on a channel not bound is discarded; a bound channel of
    the same allocation still relays."""

    async def scenario() -> None:
        client = await TurnClient.open(module_server.udp_address)
        try:
            assert code_of(await client.allocate()) == 0
            await relay_round_trip(client, echo_peer, channel=0x4001)
            before = echo_peer.echoed
            for number in (0x4000, 0x4002, 0x4FFF, 0x5000, 0x7FFF):
                client.channel_data(number, b"unbound")
            client.send(channel_header(0x4001, 1000) + b"too short")
            await asyncio.sleep(QUIET)
            assert echo_peer.echoed == before
            assert client.inbox.relayed.empty()
            await relay_round_trip(client, echo_peer, channel=0x4001)
            assert code_of(await client.refresh(0)) == 0
        finally:
            client.close()

    run(scenario())


def test_oversize_datagrams_are_relayed_or_dropped_without_harm(
    module_server: ServerProcess, echo_peer: EchoPeer
) -> None:
    """64 KB both ways: a 64 KB Binding with a comprehension-optional padding attribute is
    answered; 64 KB of ChannelData is relayed and echoed; a 64 KB datagram from the peer,
    which would need a Data indication larger than any UDP datagram, is dropped."""

    async def scenario() -> None:
        client = await TurnClient.open(module_server.udp_address)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        try:
            padded = client.codec.encode_request(
                Method.BINDING, [UnknownAttribute(0x8888, bytes(MAX_UDP - 27))], auth=False
            )
            assert len(padded) == MAX_UDP - 3
            assert code_of(await client.transact(padded)) == 0
            assert code_of(await client.allocate()) == 0
            assert client.relayed is not None
            assert code_of(await client.channel_bind(0x4003, echo_peer.address)) == 0
            big = bytes(range(256)) * 255 + b"end"  # 65283 bytes
            client.channel_data(0x4003, big)
            got = await client.receive(3.0)
            assert got == (0x4003, big)
            # From a second peer port (same IP, so permitted): no channel, so a Data
            # indication, 36 bytes larger than the datagram: too large for UDP.
            peer.sendto(bytes(MAX_UDP), client.relayed)
            assert await client.receive(QUIET) is None
            peer.sendto(b"small", client.relayed)
            assert await client.receive(2.0) == (peer.getsockname(), b"small")
            assert code_of(await client.refresh(0)) == 0
        finally:
            peer.close()
            client.close()
        await honest_session(module_server.udp_address, echo_peer)

    run(scenario())


# -- streams ----------------------------------------------------------------------------------

FIRST_MESSAGE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose first-message timeout is 1 s instead of 5 s."""
    config = merge_config(
        base_config(), {"limits": {"first_message_timeout": FIRST_MESSAGE_TIMEOUT}}
    )
    with ServerProcess(config, tmp_path_factory.mktemp("pyturn-streams")) as server:
        yield server
    assert_clean_log(server)


# name -> (bytes sent on a fresh TCP connection, whether a good Binding goes first).
# A lie on a connection's first frame is held only until the first-message timeout; one
# after a good Binding (which disarms that timer) cannot be resynchronised or would need
# more than 64 KiB pending, and closes the connection by itself.
STREAM_LIES: dict[str, tuple[bytes, bool]] = {
    "STUN length 65532, nothing follows": (header(BINDING, 0xFFFC), False),
    "ChannelData length 65535, nothing follows": (channel_header(0x4000, 0xFFFF), False),
    "header cut in half": (header(BINDING, 0)[:10], False),
    "STUN length not a multiple of 4": (header(BINDING, 7) + bytes(7), True),
    "first byte 0x80": (b"\x80" + bytes(19), True),
    "first byte 0xFF": (b"\xff" + bytes(19), True),
    "STUN length 65532, 65530 bytes follow": (header(BINDING, 0xFFFC) + bytes(65_530), True),
}
CLOSE_WITHIN = FIRST_MESSAGE_TIMEOUT + 4.0


@pytest.mark.parametrize("name", sorted(STREAM_LIES))
def test_a_tcp_stream_that_lies_about_lengths_is_closed_and_the_server_keeps_serving(
    stream_server: ServerProcess, echo_peer: EchoPeer, name: str
) -> None:
    data, binding_first = STREAM_LIES[name]

    async def scenario() -> None:
        liar = await TurnClient.open(stream_server.tcp_address, transport="tcp")
        try:
            if binding_first:
                assert code_of(await liar.binding()) == 0
            liar.send(data)
            assert await liar.wait_closed(CLOSE_WITHIN), f"still open after {CLOSE_WITHIN} s"
        finally:
            liar.close()
        await honest_session(stream_server.tcp_address, echo_peer, transport="tcp")
        await honest_session(stream_server.udp_address, echo_peer)

    run(scenario())


def test_a_tcp_stream_of_many_small_frames_split_anywhere_is_served(
    stream_server: ServerProcess,
) -> None:
    """Frames cut at every byte boundary still parse (RFC 8656 §3.1 framing)."""

    async def scenario() -> int:
        client = await TurnClient.open(stream_server.tcp_address, transport="tcp")
        try:
            requests = [
                client.codec.encode_request(Method.BINDING, auth=False, fingerprint=i % 2 == 0)
                for i in range(50)
            ]
            blob = b"".join(requests)
            futures = []
            loop = asyncio.get_running_loop()
            for request in requests:
                future: asyncio.Future[bytes] = loop.create_future()
                client.inbox.waiting[bytes(request[8:20])] = future
                futures.append(future)
            for i in range(0, len(blob), 7):
                client.send(blob[i : i + 7])
                await asyncio.sleep(0)
            answers = await asyncio.wait_for(asyncio.gather(*futures), 5.0)
            return sum(1 for raw in answers if code_of(decode(raw)) == 0)
        finally:
            client.close()

    assert run(scenario()) == 50


def test_a_tcp_connection_without_an_allocation_cannot_idle_forever(
    stream_server: ServerProcess,
) -> None:
    async def scenario() -> bool:
        idler = await TurnClient.open(stream_server.tcp_address, transport="tcp")
        try:
            assert code_of(await idler.binding()) == 0
            idler.send(header(BINDING, 0xFFFC))  # and then nothing
            return await idler.wait_closed(FIRST_MESSAGE_TIMEOUT * 2)
        finally:
            idler.close()

    assert run(scenario()), "an allocation-less connection outlived twice the timeout"


def test_a_tcp_stream_carrying_two_messages_in_one_write_gets_both_answers(
    stream_server: ServerProcess,
) -> None:
    async def scenario() -> list[int | None]:
        client = await TurnClient.open(stream_server.tcp_address, transport="tcp")
        try:
            first = client.codec.encode_request(Method.BINDING, auth=False)
            second = encode(
                Message(
                    Method.BINDING, MessageClass.REQUEST, new_transaction_id(), (Padding(b"x" * 5),)
                )
            )
            loop = asyncio.get_running_loop()
            futures = {}
            for request in (first, second):
                futures[bytes(request[8:20])] = loop.create_future()
            client.inbox.waiting.update(futures)
            client.send(first + second)
            answers = await asyncio.wait_for(asyncio.gather(*futures.values()), 5.0)
            return [code_of(decode(raw)) for raw in answers]
        finally:
            client.close()

    assert run(scenario()) == [0, 0]
