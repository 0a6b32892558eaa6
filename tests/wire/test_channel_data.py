"""ChannelData framing (RFC 8656 §12.4-§12.5) and the TCP/TLS stream framer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.wire.channel_data import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    LEGACY_CHANNEL_MAX,
    StreamFramer,
    channel_header,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, Method, decode, encode
from tests.strategies import channel_data_frames, messages

TXID = bytes(range(12))
BINDING = encode(Message(Method.BINDING, MessageClass.REQUEST, TXID))


# -- encode / decode ---------------------------------------------------------------------


def test_channel_data_is_a_4_byte_header_then_the_data() -> None:
    """RFC 8656 §12.4: channel number (16 bits), length (16 bits), application data."""
    frame = encode_channel_data(0x4001, b"hello")
    assert frame == b"\x40\x01\x00\x05hello"
    assert decode_channel_data(frame) == (0x4001, b"hello")
    assert channel_header(0x4FFF, 0x1234) == b"\x4f\xff\x12\x34"


def test_channel_data_over_a_stream_is_padded_but_the_length_is_not() -> None:
    """RFC 8656 §12.5: over TCP/TLS the data is padded to 4 bytes; length excludes padding."""
    frame = encode_channel_data(0x4001, b"hello", pad=True)
    assert frame == b"\x40\x01\x00\x05hello\x00\x00\x00"
    assert encode_channel_data(0x4001, b"four", pad=True) == b"\x40\x01\x00\x04four"


def test_udp_padding_after_the_data_is_ignored() -> None:
    """RFC 8656 §12.5: a UDP datagram may carry padding beyond the length; it is ignored."""
    assert decode_channel_data(b"\x40\x01\x00\x05hello\x00\x00\x00") == (0x4001, b"hello")
    assert decode_channel_data(b"\x40\x01\x00\x00garbage") == (0x4001, b"")


@pytest.mark.parametrize("channel", [CHANNEL_MIN, 0x4321, CHANNEL_MAX])
def test_channel_numbers_0x4000_to_0x4fff_are_valid(channel: int) -> None:
    """RFC 8656 §12: channel numbers 0x4000 through 0x4FFF."""
    assert decode_channel_data(encode_channel_data(channel, b"x")) == (channel, b"x")
    assert is_channel_data(encode_channel_data(channel, b"x"))


@pytest.mark.parametrize("channel", [0x0000, 0x0001, 0x3FFF, 0x8000, 0xBFFF, 0xFFFF])
def test_channel_numbers_outside_0x4000_to_0x7fff_are_rejected(channel: int) -> None:
    """RFC 8656 §12, RFC 7983 §7: below 0x4000 is STUN, from 0x8000 RTP/DTLS, never ChannelData."""
    frame = channel_header(channel, 1) + b"x"
    with pytest.raises(DecodeError, match="channel number"):
        decode_channel_data(frame)
    with pytest.raises(ValueError, match="channel number"):
        encode_channel_data(channel, b"x")


@pytest.mark.parametrize("channel", [0x5000, 0x6ABC, LEGACY_CHANNEL_MAX])
def test_legacy_channel_numbers_up_to_0x7fff_still_parse(channel: int) -> None:
    """RFC 5766 §11 allowed 0x4000-0x7FFF (RFC 8656 §12 reserves 0x5000-0x7FFF).

    The codec parses the legacy range; whether a channel there may be bound is the
    server's decision (`allocations.legacy_channel_numbers`), and frames on unbound
    channels are dropped there.
    """
    assert LEGACY_CHANNEL_MAX == 0x7FFF
    assert decode_channel_data(encode_channel_data(channel, b"x")) == (channel, b"x")


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x40", b"\x40\x01\x00", b"\x40\x01\x00\x01", b"\x40\x01\x00\x06hello"],
    ids=["empty", "1-byte", "3-bytes", "length-1-no-data", "length-past-end"],
)
def test_short_or_overlong_channel_data_is_rejected(frame: bytes) -> None:
    """RFC 8656 §12.5: the header must be complete and the length must fit the datagram."""
    with pytest.raises(DecodeError):
        decode_channel_data(frame)


def test_a_payload_larger_than_65535_bytes_cannot_be_encoded() -> None:
    """RFC 8656 §12.4: the length field is 16 bits."""
    assert len(encode_channel_data(0x4000, bytes(0xFFFF))) == 4 + 0xFFFF
    with pytest.raises(ValueError, match="65535"):
        encode_channel_data(0x4000, bytes(0x10000))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", False),
        (b"\x3f", False),
        (b"\x40", True),
        (b"\x4f\xff", True),
        (b"\x7f\xff", True),
        (b"\x80", False),
        (b"\xff", False),
    ],
)
def test_is_channel_data_looks_at_the_first_byte(data: bytes, expected: bool) -> None:
    """RFC 5766 §11: top two bits 01 (RFC 7983 §7 narrows ChannelData to 64-79)."""
    assert is_channel_data(data) is expected


# -- StreamFramer ------------------------------------------------------------------------


def test_the_framer_holds_a_partial_stun_message_until_it_completes() -> None:
    """RFC 8489 §6.2.2, RFC 8656 §12.5: over TCP the STUN length field frames messages."""
    framer = StreamFramer()
    framer.feed(BINDING[:3])
    assert framer.frames() == []
    assert framer.pending == 3
    framer.feed(BINDING[3:10])
    assert framer.frames() == []
    assert framer.pending == 10
    framer.feed(BINDING[10:])
    assert framer.frames() == [BINDING]
    assert framer.pending == 0


def test_the_framer_waits_for_channel_data_padding_and_strips_it() -> None:
    """RFC 8656 §12.5: over TCP the padding is sent and is not part of the frame."""
    framer = StreamFramer()
    framer.feed(b"\x40\x01\x00\x05hello")
    assert framer.frames() == []  # the three padding bytes have not arrived yet
    assert framer.pending == 9
    framer.feed(b"\x00\x00")
    assert framer.frames() == []
    framer.feed(b"\x00")
    assert framer.frames() == [b"\x40\x01\x00\x05hello"]
    assert framer.pending == 0


def test_the_framer_splits_back_to_back_frames_fed_at_once() -> None:
    """RFC 8656 §12.5: a stream carries STUN messages and ChannelData back to back."""
    framer = StreamFramer()
    cd = encode_channel_data(0x4002, b"abc", pad=True)
    framer.feed(BINDING + cd + BINDING + cd[:2])
    assert framer.frames() == [BINDING, b"\x40\x02\x00\x03abc", BINDING]
    assert framer.pending == 2


def test_an_empty_channel_data_frame_is_a_bare_header() -> None:
    """RFC 8656 §12.4: a zero-length ChannelData message is valid."""
    framer = StreamFramer()
    framer.feed(b"\x40\x00\x00\x00" + BINDING)
    assert framer.frames() == [b"\x40\x00\x00\x00", BINDING]


def test_the_framer_passes_legacy_channel_numbers_through() -> None:
    """RFC 5766 §11: 0x5000-0x7FFF frames are ChannelData; the server decides about them."""
    framer = StreamFramer()
    framer.feed(encode_channel_data(0x7ABC, b"legacy", pad=True) + BINDING)
    assert framer.frames() == [b"\x7a\xbc\x00\x06legacy", BINDING]


@pytest.mark.parametrize("first", [0x80, 0x81, 0xBF, 0xC0, 0xFF])
def test_the_framer_raises_on_a_byte_that_starts_neither_stun_nor_channel_data(
    first: int,
) -> None:
    """RFC 8656 §12.5: on a stream only STUN (00) and ChannelData (01) frames can follow."""
    framer = StreamFramer()
    framer.feed(bytes([first, 0, 0, 0]))
    with pytest.raises(DecodeError, match=f"0x{first:02x}"):
        framer.frames()


def test_the_framer_raises_on_a_0x80_byte_after_a_valid_frame() -> None:
    """RFC 8656 §12.5: once framing is lost the stream cannot be resynchronised."""
    framer = StreamFramer()
    framer.feed(BINDING)
    assert framer.frames() == [BINDING]
    framer.feed(b"\x80\x00\x00\x00")
    with pytest.raises(DecodeError):
        framer.frames()
    with pytest.raises(DecodeError):  # and it stays broken
        framer.frames()


def test_the_framer_refuses_a_stun_length_that_is_not_a_multiple_of_4() -> None:
    """RFC 8489 §5: the message length is always a multiple of 4."""
    framer = StreamFramer()
    framer.feed(b"\x00\x01\x00\x05")
    with pytest.raises(DecodeError, match="multiple of 4"):
        framer.frames()


def test_fewer_than_4_bytes_are_held_without_judging_them() -> None:
    """A frame's first 4 bytes are needed before it can be classified."""
    framer = StreamFramer()
    framer.feed(b"\x80\x00\x00")
    assert framer.frames() == []
    assert framer.pending == 3


def _wire_size(frames: list[bytes]) -> int:
    """Bytes these frames took on the stream: ChannelData is padded (RFC 8656 §12.5)."""
    return sum(len(f) + (-len(f) % 4 if f[0] >= 0x40 else 0) for f in frames)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[int]]:
    """A stream of STUN messages and padded ChannelData frames, and where to cut it."""
    stream = b""
    expected: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            frame = encode(draw(messages(max_attributes=3)))
            stream += frame
        else:
            channel, data = draw(channel_data_frames())
            frame = encode_channel_data(channel, data)
            stream += encode_channel_data(channel, data, pad=True)
        expected.append(frame)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12, unique=True))
    return stream, expected, sorted(cuts)


@settings(max_examples=300, deadline=None)
@given(case=_streams())
def test_the_framer_recovers_every_frame_however_the_stream_is_chunked(
    case: tuple[bytes, list[bytes], list[int]],
) -> None:
    """RFC 8656 §12.5, RFC 6544 §3: TCP has no message boundaries; framing must not care."""
    stream, expected, cuts = case
    framer = StreamFramer()
    got: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        framer.feed(stream[start:cut])
        start = cut
        got.extend(framer.frames())
        # Everything fed and not yet released as a frame is held back.
        assert framer.pending == cut - _wire_size(got)
    assert got == expected
    assert framer.pending == 0
    for frame in got:
        if frame[0] < 0x40:
            decode(frame)
        else:
            decode_channel_data(frame)


@settings(max_examples=200, deadline=None)
@given(case=_streams())
def test_the_framer_fed_one_byte_at_a_time_yields_each_frame_as_it_completes(
    case: tuple[bytes, list[bytes], list[int]],
) -> None:
    """RFC 8656 §12.5: a frame is released exactly when its last (padding) byte arrives."""
    stream, expected, _ = case
    framer = StreamFramer()
    got: list[bytes] = []
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1])
        got.extend(framer.frames())
        assert framer.pending == i + 1 - _wire_size(got)
        # Nothing complete is ever held back.
        assert framer.pending < (len(stream) - _wire_size(got)) or framer.pending == 0
    assert got == expected
    assert framer.pending == 0
