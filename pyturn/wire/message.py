"""STUN message header, methods, classes, and the encode/decode of whole messages.

RFC 8489 §5: a 20-byte header (type, length, magic cookie, 96-bit transaction id)
followed by TLV attributes padded to 4 bytes.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from pyturn.wire import integrity as _integrity
from pyturn.wire.attributes import (
    MAGIC_COOKIE,
    AdditionalAddressFamily,
    Attribute,
    ChannelNumber,
    DontFragment,
    EvenPort,
    Fingerprint,
    IceControlled,
    IceControlling,
    Lifetime,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Priority,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    Software,
    UnknownAttribute,
    UseCandidate,
    Username,
    decode_attribute,
)
from pyturn.wire.errors import DecodeError

HEADER_SIZE = 20
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_HEADER = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")

A = TypeVar("A", bound=Attribute)


class Method(IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A  # RFC 6062
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


def message_type(method: int, msg_class: int) -> int:
    """RFC 8489 §5: the class bits C1 C0 sit between method bits M3/M4 and M6/M7."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((msg_class & 0b01) << 4)
        | ((msg_class & 0b10) << 7)
    )


def split_message_type(value: int) -> tuple[int, int]:
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    msg_class = ((value >> 4) & 0b01) | ((value >> 7) & 0b10)
    return method, msg_class


def new_transaction_id() -> bytes:
    return secrets.token_bytes(12)


@dataclass(slots=True)
class Message:
    """A decoded (or to-be-encoded) STUN message; treat it as a value.

    `method` stays an int so that messages with a method we do not know still decode
    (and can be answered 400); compare it against `Method`. Not frozen: a frozen
    dataclass sets each field through object.__setattr__, a sixth of a decode.
    """

    method: int
    msg_class: MessageClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    # The bytes as received; integrity checks hash exactly these.
    raw: bytes = field(default=b"", compare=False, repr=False)
    # Byte offsets in `raw` of the MESSAGE-INTEGRITY(-SHA256) attribute headers.
    integrity_offset: int | None = field(default=None, compare=False, repr=False)
    integrity_sha256_offset: int | None = field(default=None, compare=False, repr=False)
    fingerprint_offset: int | None = field(default=None, compare=False, repr=False)
    # Padding bytes as received: RFC 5769 pads with spaces, and a byte-exact re-encode
    # (which its MESSAGE-INTEGRITY depends on) must reproduce them.
    padding: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)
    # The first attribute of each type, made by `decode`: a request handler asks for
    # many types, most of them absent. Not an init field, so `dataclasses.replace`
    # (which may change `attributes`) does not carry it over.
    first: dict[type[Attribute], Attribute] | None = field(
        default=None, init=False, compare=False, repr=False
    )

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of this type (RFC 8489 §14: later duplicates are ignored)."""
        first = self.first
        if first is not None:
            return first.get(kind)  # type: ignore[return-value]
        for attr in self.attributes:
            if type(attr) is kind:
                return attr
        return None

    def get_all(self, kind: type[A]) -> list[A]:
        return [attr for attr in self.attributes if type(attr) is kind]

    def unknown_comprehension_required(self) -> tuple[int, ...]:
        """Types to list in a 420's UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1)."""
        seen: list[int] = []
        for attr in self.attributes:
            if (
                isinstance(attr, UnknownAttribute)
                and attr.comprehension_required
                and attr.type not in seen
            ):
                seen.append(attr.type)
        return tuple(seen)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 7983): top two bits zero and the magic cookie."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE


def decode(data: bytes) -> Message:
    """Decode one STUN message occupying all of `data`.

    RFC 8489 §14.5/§14.6: attributes after MESSAGE-INTEGRITY are ignored except
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; after MESSAGE-INTEGRITY-SHA256 only
    FINGERPRINT; and FINGERPRINT must be the last attribute.
    """
    data = bytes(data)
    end = len(data)
    if end < HEADER_SIZE:
        raise DecodeError("shorter than a STUN header")
    msg_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise DecodeError("top two bits of a STUN message must be zero")
    if cookie != MAGIC_COOKIE:
        raise DecodeError("wrong magic cookie")
    if length % 4:
        raise DecodeError("message length is not a multiple of 4")
    if HEADER_SIZE + length != end:
        raise DecodeError(f"length field says {length} but {end - HEADER_SIZE} follow")
    method, msg_class = split_message_type(msg_type)

    attributes: list[Attribute] = []
    paddings: list[bytes] = []
    first: dict[type[Attribute], Attribute] = {}
    mi_offset = mi256_offset = fp_offset = None
    memo = _MEMO
    unpack_tlv = _TLV.unpack_from
    pos = HEADER_SIZE
    while pos < end:
        if pos + 4 > end:
            raise DecodeError("attribute header truncated")
        attr_type, attr_len = unpack_tlv(data, pos)
        value_end = pos + 4 + attr_len
        padded_end = value_end + (-attr_len % 4)
        if padded_end > end:
            raise DecodeError(f"attribute 0x{attr_type:04x} runs past the end of the message")
        if fp_offset is not None:
            raise DecodeError("FINGERPRINT must be the last attribute")
        if (mi_offset is not None and attr_type not in _AFTER_MI) or (
            mi256_offset is not None and attr_type != _FINGERPRINT
        ):
            pos = padded_end
            continue  # ignored
        value = data[pos + 4 : value_end]
        if attr_type in _MEMO_TYPES:
            key = (attr_type, value)
            attr = memo.get(key)
            if attr is None:
                attr = decode_attribute(attr_type, value, transaction_id)
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                memo[key] = attr
        else:
            attr = decode_attribute(attr_type, value, transaction_id)
        attributes.append(attr)
        paddings.append(data[value_end:padded_end])
        kind = type(attr)
        if kind not in first:
            first[kind] = attr
        if attr_type == _MESSAGE_INTEGRITY:
            mi_offset = pos
        elif attr_type == _MESSAGE_INTEGRITY_SHA256:
            mi256_offset = pos
        elif attr_type == _FINGERPRINT:
            fp_offset = pos
        pos = padded_end

    # Positional, in field order: keyword arguments cost a fifth of the call.
    message = Message(
        method,
        _CLASSES[msg_class],
        transaction_id,
        tuple(attributes),
        data,
        mi_offset,
        mi256_offset,
        fp_offset,
        tuple(paddings),
    )
    message.first = first
    return message


# Attributes are immutable and a server sees the same few values over and over (the
# realm, usernames, a client's nonce, REQUESTED-TRANSPORT, LIFETIME), so decoded ones
# are kept by (type, value). Only types whose value alone decides the result: the XOR
# addresses depend on the transaction ID, and integrity values never repeat.
_MEMO_TYPES = frozenset(
    cls.TYPE
    for cls in (
        Username,
        Realm,
        Nonce,
        Software,
        RequestedTransport,
        Lifetime,
        RequestedAddressFamily,
        AdditionalAddressFamily,
        EvenPort,
        DontFragment,
        PasswordAlgorithm,
        PasswordAlgorithms,
        ChannelNumber,
        Priority,
        UseCandidate,
        IceControlled,
        IceControlling,
    )
)
_MEMO_SIZE = 4096
_MEMO: dict[tuple[int, bytes], Attribute] = {}


def forget_decoded() -> None:
    """Empty the cache of decoded attributes (nonces and usernames of gone clients)."""
    _MEMO.clear()


_MESSAGE_INTEGRITY = MessageIntegrity.TYPE
_MESSAGE_INTEGRITY_SHA256 = MessageIntegritySha256.TYPE
_FINGERPRINT = Fingerprint.TYPE
_CLASSES = tuple(MessageClass)  # by value, 0-3: cheaper than calling the enum
_AFTER_MI = frozenset({MessageIntegritySha256.TYPE, Fingerprint.TYPE})


_ZEROS = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # by len(value) % 4


def _tlv(attr_type: int, value: bytes, padding: bytes | None = None) -> bytes:
    size = len(value)
    zeros = _ZEROS[size & 3]
    if padding is None or len(padding) != len(zeros):
        padding = zeros
    return _TLV.pack(attr_type, size) + value + padding


def encode_attributes(
    attributes: Sequence[Attribute | bytes],
    transaction_id: bytes,
    paddings: Sequence[bytes] | None = None,
) -> bytes:
    """The TLVs of `attributes`, padded with `paddings` where they fit, else with zeros.

    A `bytes` item is an attribute encoded already (see `encode_tlv`), for the constant
    ones a server sends again and again (REALM, PASSWORD-ALGORITHMS, SOFTWARE).
    """
    if paddings is not None and len(paddings) == len(attributes):
        return b"".join(
            [
                attr
                if isinstance(attr, bytes)
                else _tlv(attr.attr_type, attr.encode(transaction_id), paddings[i])
                for i, attr in enumerate(attributes)
            ]
        )
    pack = _TLV.pack
    parts: list[bytes] = []
    for attr in attributes:
        if isinstance(attr, bytes):
            parts.append(attr)
            continue
        value = attr.encode(transaction_id)
        size = len(value)
        parts += (pack(attr.attr_type, size), value, _ZEROS[size & 3])
    return b"".join(parts)


def encode_tlv(attribute: Attribute) -> bytes:
    """`attribute` as `encode_attributes` writes it, for one whose value does not depend
    on the transaction ID (not the XOR addresses)."""
    return encode_attributes((attribute,), bytes(12))


def encode(
    message: Message,
    *,
    integrity_key: bytes | None = None,
    integrity_sha256: bool = False,
    integrity_sha1: bool = True,
    fingerprint: bool = False,
) -> bytes:
    """Encode `message`, then append the integrity attributes and FINGERPRINT asked for.

    With `integrity_key`, MESSAGE-INTEGRITY (unless `integrity_sha1` is false) and, with
    `integrity_sha256`, MESSAGE-INTEGRITY-SHA256 are computed over what precedes them
    (RFC 8489 §14.5-14.6). Attributes already in `message` are written as they are, so a
    decoded message re-encodes byte for byte.
    """
    txid = message.transaction_id
    return finish(
        message_type(message.method, message.msg_class),
        txid,
        encode_attributes(message.attributes, txid, message.padding),
        integrity_key=integrity_key,
        integrity_sha256=integrity_sha256,
        integrity_sha1=integrity_sha1,
        fingerprint=fingerprint,
    )


def finish(
    msg_type: int,
    transaction_id: bytes,
    body: bytes,
    *,
    integrity_key: bytes | None = None,
    integrity_sha256: bool = False,
    integrity_sha1: bool = True,
    fingerprint: bool = False,
) -> bytes:
    """Header + already-encoded attribute bytes, then integrity and FINGERPRINT."""
    header_tail = _COOKIE + transaction_id
    if integrity_key is not None:
        if integrity_sha1:
            # The length covers the MESSAGE-INTEGRITY attribute itself (RFC 8489 §14.5).
            head = struct.pack("!HH", msg_type, len(body) + 24) + header_tail
            mac = _integrity.hmac_sha1(integrity_key, head + body)
            body += _tlv(MessageIntegrity.TYPE, mac)
        if integrity_sha256:
            head = struct.pack("!HH", msg_type, len(body) + 36) + header_tail
            mac = _integrity.hmac_sha256(integrity_key, head + body)
            body += _tlv(MessageIntegritySha256.TYPE, mac)
    if fingerprint:
        head = struct.pack("!HH", msg_type, len(body) + 8) + header_tail
        body += _tlv(Fingerprint.TYPE, _integrity.crc(head + body).to_bytes(4, "big"))
    return struct.pack("!HH", msg_type, len(body)) + header_tail + body


def build(
    method: int,
    msg_class: MessageClass,
    transaction_id: bytes,
    attributes: Iterable[Attribute] = (),
) -> Message:
    return Message(method, msg_class, transaction_id, tuple(attributes))
