"""ChannelData framing (RFC 8656 §12.4) and the TCP/TLS stream framer.

A ChannelData message is a 4-byte header (channel number, data length) and the data.
Over UDP the data need not be padded; over TCP and TLS it is padded to a multiple of
4 bytes, and that padding is not counted in the length field.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyturn.wire.errors import DecodeError

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF  # RFC 8656 §12: the channels a client may bind
# RFC 5766 allowed binding up to 0x7FFF; frames in 0x5000-0x7FFF still parse so that a
# server configured for such legacy clients can relay them.
LEGACY_CHANNEL_MAX = 0x7FFF
MAX_STUN_SIZE = 65535 + 20


def is_channel_data(data: bytes) -> bool:
    """The top two bits are 01 (RFC 5766 §11); STUN messages have 00."""
    return bool(data) and 0x40 <= data[0] <= 0x7F


def channel_header(channel: int, length: int) -> bytes:
    return ((channel << 16) | length).to_bytes(4, "big")


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    if not CHANNEL_MIN <= channel <= LEGACY_CHANNEL_MAX:
        raise ValueError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    if len(data) > 0xFFFF:
        raise ValueError("ChannelData payload larger than 65535 bytes")
    frame = channel_header(channel, len(data)) + data
    if pad:
        frame += b"\x00" * (-len(data) % 4)
    return frame


def decode_channel_data(frame: bytes) -> tuple[int, bytes]:
    """Split a ChannelData datagram into (channel, data).

    RFC 8656 §12.5: over UDP the datagram may carry padding after the data, which is
    ignored; a length running past the datagram makes it malformed.
    """
    if len(frame) < 4:
        raise DecodeError("ChannelData shorter than its header")
    channel = int.from_bytes(frame[0:2], "big")
    length = int.from_bytes(frame[2:4], "big")
    if not CHANNEL_MIN <= channel <= LEGACY_CHANNEL_MAX:
        raise DecodeError(f"channel number 0x{channel:04x} outside 0x4000-0x7FFF")
    if 4 + length > len(frame):
        raise DecodeError("ChannelData length runs past the datagram")
    return channel, bytes(frame[4 : 4 + length])


@dataclass(slots=True)
class StreamFramer:
    """Splits a TCP/TLS byte stream into whole STUN messages and ChannelData frames.

    Feed bytes with `feed`, then take complete frames from `frames()` until it returns
    none. A frame whose first bits are neither STUN (00) nor ChannelData (01) raises
    `DecodeError` once the frames before it have been returned: the stream cannot be
    resynchronised and the connection should be closed.
    """

    buffer: bytearray

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def frames(self) -> list[bytes]:
        """Complete frames in arrival order; ChannelData frames lose their padding."""
        out: list[bytes] = []
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 4:
            first = buf[pos]
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            if first < 0x40:
                size = 20 + length
                if length % 4:
                    raise DecodeError("STUN length on a stream is not a multiple of 4")
                if size > len(buf) - pos:
                    break
                out.append(bytes(buf[pos : pos + size]))
                pos += size
            elif first <= 0x7F:
                size = 4 + length + (-length % 4)
                if size > len(buf) - pos:
                    break
                out.append(bytes(buf[pos : pos + 4 + length]))
                pos += size
            else:
                if out:
                    # Hand over the good frames first (a final Refresh must not be lost);
                    # the next call raises on this byte.
                    break
                raise DecodeError(f"stream byte 0x{first:02x} starts neither STUN nor ChannelData")
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self.buffer)
