"""STUN attributes as typed values, one length-checked codec per attribute type.

Covers RFC 8489 (STUN), RFC 8656 (TURN), RFC 6062 (TURN-TCP), RFC 6156 (TURN-IPv6),
RFC 5780 (NAT behaviour discovery) and the ICE attributes of RFC 8445, so that a
Binding request from a browser never earns a 420. Anything else decodes to
`UnknownAttribute`, which keeps its raw bytes.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Self

from pyturn.wire.errors import DecodeError

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# REQUESTED-TRANSPORT protocol numbers (IANA protocol numbers).
TRANSPORT_UDP = 17
TRANSPORT_TCP = 6

# PASSWORD-ALGORITHM values (RFC 8489 §18.5).
PASSWORD_ALGORITHM_MD5 = 0x0001
PASSWORD_ALGORITHM_SHA256 = 0x0002

# RFC 8489 §14: length limits in bytes for the text attributes. A USERNAME is sent in
# fewer than 509 bytes but must parse up to 763 for RFC 5389 compatibility (§14.3).
_MAX_USERNAME = 763
_MAX_TEXT = 763

Address = tuple[str, int]


@lru_cache(maxsize=4096)
def _pack_ip(host: str) -> tuple[int, bytes]:
    # Cached: a server encodes the same few client and peer addresses over and over.
    # Dotted-quad IPv4 first, in C: inet_pton takes exactly what ip_address takes for
    # IPv4 (four decimal octets, no leading zeros); anything else goes the long way.
    try:
        return FAMILY_IPV4, socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError, TypeError):
        pass
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {host!r}") from exc
    return (FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6), ip.packed


def clear_address_cache() -> None:
    """Empty the address cache, whose entries of long-gone clients would otherwise stay."""
    _pack_ip.cache_clear()


def _unpack_address(value: bytes, mask: bytes | None) -> Address:
    """Decode the shared MAPPED-ADDRESS layout; `mask` is the XOR key for the X- forms."""
    if len(value) < 4 or value[0] != 0:
        raise DecodeError("address attribute too short or reserved byte set")
    family, port = value[1], int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if family == FAMILY_IPV4:
        if len(raw) != 4:
            raise DecodeError("IPv4 address attribute must be 8 bytes")
    elif family == FAMILY_IPV6:
        if len(raw) != 16:
            raise DecodeError("IPv6 address attribute must be 20 bytes")
    else:
        raise DecodeError(f"unknown address family {family}")
    if mask is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor(raw, mask)
    if family == FAMILY_IPV4:
        return "%d.%d.%d.%d" % tuple(raw), port  # noqa: UP031 (fastest form, per packet)
    return str(ipaddress.IPv6Address(raw)), port


def _pack_address(host: str, port: int) -> bytes:
    family, raw = _pack_ip(host)
    return struct.pack("!BBH", 0, family, port) + raw


def xor_address_value(host: str, port: int, transaction_id: bytes) -> bytes:
    """The value of an XOR-MAPPED/PEER/RELAYED-ADDRESS attribute (RFC 8489 §14.2).

    Public for the relay fast paths, which build whole messages without attribute objects.
    """
    family, raw = _pack_ip(host)
    mask = (
        MAGIC_COOKIE
        if family == FAMILY_IPV4
        else (MAGIC_COOKIE << 96) | int.from_bytes(transaction_id, "big")
    )
    address = (int.from_bytes(raw, "big") ^ mask).to_bytes(len(raw), "big")
    return bytes((0, family)) + (port ^ (MAGIC_COOKIE >> 16)).to_bytes(2, "big") + address


def _xor(raw: bytes, mask: bytes) -> bytes:
    """raw XOR the first len(raw) bytes of mask (RFC 8489 §14.2), as one integer op."""
    size = len(raw)
    value = int.from_bytes(raw, "big") ^ int.from_bytes(mask[:size], "big")
    return value.to_bytes(size, "big")


def _text(value: bytes, limit: int, name: str) -> str:
    if len(value) > limit:
        raise DecodeError(f"{name} longer than {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{name} is not UTF-8") from exc


def _exact(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise DecodeError(f"{name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Attribute:
    """Base of every typed attribute; `TYPE` is the 16-bit attribute type."""

    TYPE: ClassVar[int] = -1

    @property
    def attr_type(self) -> int:
        return self.TYPE

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        raise NotImplementedError

    def encode(self, transaction_id: bytes) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UnknownAttribute(Attribute):
    """An attribute this codec has no type for, kept as raw bytes."""

    type: int
    value: bytes

    @property
    def attr_type(self) -> int:
        return self.type

    @property
    def comprehension_required(self) -> bool:
        # RFC 8489 §14: 0x0000-0x7FFF must be understood or the request refused with 420.
        return self.type < 0x8000

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value


# -- address attributes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PlainAddress(Attribute):
    host: str
    port: int

    @property
    def address(self) -> Address:
        return self.host, self.port

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(*_unpack_address(value, None))

    def encode(self, transaction_id: bytes) -> bytes:
        return _pack_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class _XorAddress(Attribute):
    """RFC 8489 §14.2: port XOR the cookie's top half, address XOR cookie (+ txid for v6)."""

    host: str
    port: int

    @property
    def address(self) -> Address:
        return self.host, self.port

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(*_unpack_address(value, _COOKIE_BYTES + transaction_id))

    def encode(self, transaction_id: bytes) -> bytes:
        return xor_address_value(self.host, self.port, transaction_id)


@dataclass(frozen=True, slots=True)
class MappedAddress(_PlainAddress):
    TYPE: ClassVar[int] = 0x0001


@dataclass(frozen=True, slots=True)
class XorPeerAddress(_XorAddress):
    TYPE: ClassVar[int] = 0x0012


@dataclass(frozen=True, slots=True)
class XorRelayedAddress(_XorAddress):
    TYPE: ClassVar[int] = 0x0016


@dataclass(frozen=True, slots=True)
class XorMappedAddress(_XorAddress):
    TYPE: ClassVar[int] = 0x0020


@dataclass(frozen=True, slots=True)
class AlternateServer(_PlainAddress):
    TYPE: ClassVar[int] = 0x8023


@dataclass(frozen=True, slots=True)
class ResponseOrigin(_PlainAddress):
    TYPE: ClassVar[int] = 0x802B


@dataclass(frozen=True, slots=True)
class OtherAddress(_PlainAddress):
    TYPE: ClassVar[int] = 0x802C


# -- text attributes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Text(Attribute):
    value: str
    LIMIT: ClassVar[int] = _MAX_TEXT

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_text(value, cls.LIMIT, cls.__name__))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Username(_Text):
    TYPE: ClassVar[int] = 0x0006
    LIMIT: ClassVar[int] = _MAX_USERNAME


@dataclass(frozen=True, slots=True)
class Realm(_Text):
    TYPE: ClassVar[int] = 0x0014


@dataclass(frozen=True, slots=True)
class Nonce(_Text):
    TYPE: ClassVar[int] = 0x0015


@dataclass(frozen=True, slots=True)
class AlternateDomain(_Text):
    TYPE: ClassVar[int] = 0x8003


@dataclass(frozen=True, slots=True)
class Software(_Text):
    TYPE: ClassVar[int] = 0x8022


# -- opaque byte attributes --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bytes(Attribute):
    value: bytes
    SIZE: ClassVar[int | None] = None

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if cls.SIZE is not None:
            _exact(value, cls.SIZE, cls.__name__)
        return cls(bytes(value))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value


@dataclass(frozen=True, slots=True)
class MessageIntegrity(_Bytes):
    TYPE: ClassVar[int] = 0x0008
    SIZE: ClassVar[int | None] = 20


@dataclass(frozen=True, slots=True)
class MessageIntegritySha256(_Bytes):
    """RFC 8489 §14.6: 16 to 32 bytes, a multiple of 4 (a truncated HMAC-SHA256)."""

    TYPE: ClassVar[int] = 0x001C

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if not 16 <= len(value) <= 32 or len(value) % 4:
            raise DecodeError("MESSAGE-INTEGRITY-SHA256 must be 16-32 bytes, a multiple of 4")
        return cls(bytes(value))


@dataclass(frozen=True, slots=True)
class Data(_Bytes):
    TYPE: ClassVar[int] = 0x0013


@dataclass(frozen=True, slots=True)
class UserHash(_Bytes):
    TYPE: ClassVar[int] = 0x001E
    SIZE: ClassVar[int | None] = 32


@dataclass(frozen=True, slots=True)
class ReservationToken(_Bytes):
    TYPE: ClassVar[int] = 0x0022
    SIZE: ClassVar[int | None] = 8


@dataclass(frozen=True, slots=True)
class Padding(_Bytes):
    TYPE: ClassVar[int] = 0x0026


# -- integer attributes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Uint(Attribute):
    value: int
    SIZE: ClassVar[int] = 4

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(int.from_bytes(_exact(value, cls.SIZE, cls.__name__), "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.value.to_bytes(self.SIZE, "big")


@dataclass(frozen=True, slots=True)
class Lifetime(_Uint):
    TYPE: ClassVar[int] = 0x000D


@dataclass(frozen=True, slots=True)
class Priority(_Uint):
    TYPE: ClassVar[int] = 0x0024


@dataclass(frozen=True, slots=True)
class ConnectionId(_Uint):
    TYPE: ClassVar[int] = 0x002A


@dataclass(frozen=True, slots=True)
class Fingerprint(_Uint):
    TYPE: ClassVar[int] = 0x8028


@dataclass(frozen=True, slots=True)
class IceControlled(_Uint):
    TYPE: ClassVar[int] = 0x8029
    SIZE: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class IceControlling(_Uint):
    TYPE: ClassVar[int] = 0x802A
    SIZE: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class _Flag(Attribute):
    """An attribute whose presence is its meaning (RFC 8656 DONT-FRAGMENT, ICE USE-CANDIDATE)."""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        _exact(value, 0, cls.__name__)
        return cls()

    def encode(self, transaction_id: bytes) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class DontFragment(_Flag):
    TYPE: ClassVar[int] = 0x001A


@dataclass(frozen=True, slots=True)
class UseCandidate(_Flag):
    TYPE: ClassVar[int] = 0x0025


# -- structured attributes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelNumber(Attribute):
    """RFC 8656 §18.1: a 16-bit channel number followed by 16 reserved bits."""

    TYPE: ClassVar[int] = 0x000C
    number: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(int.from_bytes(_exact(value, 4, "CHANNEL-NUMBER")[:2], "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.number.to_bytes(2, "big") + b"\x00\x00"


@dataclass(frozen=True, slots=True)
class RequestedTransport(Attribute):
    """RFC 8656 §18.11: an IANA protocol number and 24 reserved bits."""

    TYPE: ClassVar[int] = 0x0019
    protocol: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_exact(value, 4, "REQUESTED-TRANSPORT")[0])

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((self.protocol, 0, 0, 0))


@dataclass(frozen=True, slots=True)
class _Family(Attribute):
    """RFC 8656 §18.7/§18.8: one family byte and 24 reserved bits."""

    family: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_exact(value, 4, cls.__name__)[0])

    def encode(self, transaction_id: bytes) -> bytes:
        return bytes((self.family, 0, 0, 0))


@dataclass(frozen=True, slots=True)
class RequestedAddressFamily(_Family):
    TYPE: ClassVar[int] = 0x0017


@dataclass(frozen=True, slots=True)
class AdditionalAddressFamily(_Family):
    TYPE: ClassVar[int] = 0x8000


@dataclass(frozen=True, slots=True)
class EvenPort(Attribute):
    """RFC 8656 §18.10: one byte whose top bit R asks to reserve the next port too."""

    TYPE: ClassVar[int] = 0x0018
    reserve: bool

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) != 1:
            raise DecodeError("EVEN-PORT must be 1 byte")
        return cls(bool(value[0] & 0x80))

    def encode(self, transaction_id: bytes) -> bytes:
        return b"\x80" if self.reserve else b"\x00"


@dataclass(frozen=True, slots=True)
class ChangeRequest(Attribute):
    """RFC 5780 §7.2: flags A (change IP) and B (change port)."""

    TYPE: ClassVar[int] = 0x0003
    change_ip: bool
    change_port: bool

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        flags = int.from_bytes(_exact(value, 4, "CHANGE-REQUEST"), "big")
        return cls(bool(flags & 0x4), bool(flags & 0x2))

    def encode(self, transaction_id: bytes) -> bytes:
        return ((0x4 if self.change_ip else 0) | (0x2 if self.change_port else 0)).to_bytes(
            4, "big"
        )


@dataclass(frozen=True, slots=True)
class ResponsePort(Attribute):
    """RFC 5780 §7.5: a 16-bit port and 16 reserved bits."""

    TYPE: ClassVar[int] = 0x0027
    port: int

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(int.from_bytes(_exact(value, 4, "RESPONSE-PORT")[:2], "big"))

    def encode(self, transaction_id: bytes) -> bytes:
        return self.port.to_bytes(2, "big") + b"\x00\x00"


def _split_code(value: bytes, name: str) -> tuple[int, str]:
    """Class (hundreds) and number from the 4-byte ERROR-CODE layout, then the reason."""
    if len(value) < 4:
        raise DecodeError(f"{name} too short")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise DecodeError(f"{name} has code {klass}{number:02d} outside 300-699")
    return klass * 100 + number, _text(value[4:], _MAX_TEXT, name)


@dataclass(frozen=True, slots=True)
class ErrorCode(Attribute):
    """RFC 8489 §14.8: code as class*100 + number, and a UTF-8 reason phrase."""

    TYPE: ClassVar[int] = 0x0009
    code: int
    reason: str = ""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(*_split_code(value, "ERROR-CODE"))

    def encode(self, transaction_id: bytes) -> bytes:
        return struct.pack("!HBB", 0, self.code // 100, self.code % 100) + self.reason.encode()


@dataclass(frozen=True, slots=True)
class AddressErrorCode(Attribute):
    """RFC 8656 §18.12: the failing address family, then an ERROR-CODE-like body."""

    TYPE: ClassVar[int] = 0x8001
    family: int
    code: int
    reason: str = ""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        code, reason = _split_code(value, "ADDRESS-ERROR-CODE")
        return cls(value[0], code, reason)

    def encode(self, transaction_id: bytes) -> bytes:
        head = struct.pack("!BBBB", self.family, 0, self.code // 100, self.code % 100)
        return head + self.reason.encode()


@dataclass(frozen=True, slots=True)
class UnknownAttributes(Attribute):
    """RFC 8489 §14.9: the 16-bit types a 420 response could not understand."""

    TYPE: ClassVar[int] = 0x000A
    types: tuple[int, ...]

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        if len(value) % 2:
            raise DecodeError("UNKNOWN-ATTRIBUTES length must be even")
        return cls(tuple(int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)))

    def encode(self, transaction_id: bytes) -> bytes:
        return b"".join(t.to_bytes(2, "big") for t in self.types)


@dataclass(frozen=True, slots=True)
class Icmp(Attribute):
    """RFC 8656 §18.13: the ICMP type, code and error data seen for a relayed packet."""

    TYPE: ClassVar[int] = 0x8004
    icmp_type: int
    icmp_code: int
    error_data: int = 0

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        _, icmp_type, icmp_code, data = struct.unpack("!HBBI", _exact(value, 8, "ICMP"))
        return cls(icmp_type, icmp_code, data)

    def encode(self, transaction_id: bytes) -> bytes:
        return struct.pack("!HBBI", 0, self.icmp_type, self.icmp_code, self.error_data)


def _decode_algorithms(value: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(value):
        if pos + 4 > len(value):
            raise DecodeError("password algorithm entry truncated")
        algorithm, length = struct.unpack_from("!HH", value, pos)
        end = pos + 4 + length
        if end > len(value):
            raise DecodeError("password algorithm parameters run past the attribute")
        out.append((algorithm, bytes(value[pos + 4 : end])))
        pos = end + (-length % 4)
    return tuple(out)


def _encode_algorithm(algorithm: int, parameters: bytes) -> bytes:
    body = struct.pack("!HH", algorithm, len(parameters)) + parameters
    return body + b"\x00" * (-len(parameters) % 4)


@dataclass(frozen=True, slots=True)
class PasswordAlgorithm(Attribute):
    """RFC 8489 §14.12: the algorithm the client chose for the long-term key."""

    TYPE: ClassVar[int] = 0x001D
    algorithm: int
    parameters: bytes = b""

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        entries = _decode_algorithms(value)
        if len(entries) != 1:
            raise DecodeError("PASSWORD-ALGORITHM must hold exactly one algorithm")
        return cls(*entries[0])

    def encode(self, transaction_id: bytes) -> bytes:
        return _encode_algorithm(self.algorithm, self.parameters)


@dataclass(frozen=True, slots=True)
class PasswordAlgorithms(Attribute):
    """RFC 8489 §14.11: the algorithms the server offers, in order of preference."""

    TYPE: ClassVar[int] = 0x8002
    algorithms: tuple[tuple[int, bytes], ...]

    @classmethod
    def decode(cls, value: bytes, transaction_id: bytes) -> Self:
        return cls(_decode_algorithms(value))

    def encode(self, transaction_id: bytes) -> bytes:
        return b"".join(_encode_algorithm(a, p) for a, p in self.algorithms)


ATTRIBUTE_TYPES: dict[int, type[Attribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        ChangeRequest,
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        Data,
        Realm,
        Nonce,
        XorRelayedAddress,
        RequestedAddressFamily,
        EvenPort,
        RequestedTransport,
        DontFragment,
        MessageIntegritySha256,
        PasswordAlgorithm,
        UserHash,
        XorMappedAddress,
        ReservationToken,
        Priority,
        UseCandidate,
        Padding,
        ResponsePort,
        ConnectionId,
        AdditionalAddressFamily,
        AddressErrorCode,
        PasswordAlgorithms,
        AlternateDomain,
        Icmp,
        Software,
        AlternateServer,
        Fingerprint,
        IceControlled,
        IceControlling,
        ResponseOrigin,
        OtherAddress,
    )
}


def decode_attribute(attr_type: int, value: bytes, transaction_id: bytes) -> Attribute:
    """Decode one attribute value; unknown types come back as `UnknownAttribute`."""
    cls = ATTRIBUTE_TYPES.get(attr_type)
    if cls is None:
        return UnknownAttribute(attr_type, bytes(value))
    try:
        return cls.decode(value, transaction_id)
    except DecodeError:
        raise
    except (ValueError, struct.error, IndexError) as exc:
        raise DecodeError(f"bad attribute 0x{attr_type:04x}: {exc}") from exc
