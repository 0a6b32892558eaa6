"""Typed STUN attributes: round trips, length checks and unknown attributes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyturn.wire import attributes as a
from pyturn.wire.attributes import ATTRIBUTE_TYPES, decode_attribute
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, Method, decode, encode
from tests.strategies import ATTRIBUTE_STRATEGIES, transaction_ids, unknown_attributes

TXID = bytes(range(12))
COOKIE = a.MAGIC_COOKIE.to_bytes(4, "big")

ALL_TYPES = sorted(ATTRIBUTE_TYPES.items())


def _type_id(item: tuple[int, type[a.Attribute]]) -> str:
    return f"0x{item[0]:04x}-{item[1].__name__}"


def test_every_attribute_type_has_a_strategy() -> None:
    """A new attribute type in ATTRIBUTE_TYPES must get a strategy in tests/strategies.py."""
    assert set(ATTRIBUTE_STRATEGIES) == set(ATTRIBUTE_TYPES.values())


def test_the_table_is_keyed_by_each_classs_own_type() -> None:
    """RFC 8489 §18.3: each attribute type number maps to exactly one codec."""
    for number, cls in ATTRIBUTE_TYPES.items():
        assert number == cls.TYPE
        assert 0 <= number <= 0xFFFF


@pytest.mark.parametrize("item", ALL_TYPES, ids=_type_id)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), txid=transaction_ids)
def test_every_attribute_type_round_trips(
    item: tuple[int, type[a.Attribute]], data: st.DataObject, txid: bytes
) -> None:
    """RFC 8489 §14: decoding an attribute's encoding gives back the same value."""
    number, cls = item
    attr = data.draw(ATTRIBUTE_STRATEGIES[cls])
    assert type(attr) is cls
    assert attr.attr_type == number
    value = attr.encode(txid)
    assert len(value) <= 0xFFFF
    assert cls.decode(value, txid) == attr
    assert decode_attribute(number, value, txid) == attr
    # ... and inside a whole message, with padding to a 4-byte boundary.
    message = Message(Method.BINDING, MessageClass.REQUEST, txid, (attr,))
    assert decode(encode(message)) == message


@settings(max_examples=100, deadline=None)
@given(attr=unknown_attributes, txid=transaction_ids)
def test_unknown_attributes_keep_their_raw_bytes(attr: a.UnknownAttribute, txid: bytes) -> None:
    """RFC 8489 §14: an attribute the codec does not know decodes as its raw value."""
    got = decode_attribute(attr.type, attr.value, txid)
    assert got == attr
    assert isinstance(got, a.UnknownAttribute)
    assert got.comprehension_required is (attr.type < 0x8000)


# -- addresses ---------------------------------------------------------------------------

ADDRESS_TYPES = [
    a.MappedAddress,
    a.XorMappedAddress,
    a.XorPeerAddress,
    a.XorRelayedAddress,
    a.AlternateServer,
    a.ResponseOrigin,
    a.OtherAddress,
]
BAD_ADDRESS_VALUES = {
    "empty": b"",
    "three bytes": b"\x00\x01\x00",
    "header only": b"\x00\x01\x12\x34",
    "IPv4 address 3 bytes": b"\x00\x01\x12\x34" + b"\x01\x02\x03",
    "IPv4 address 5 bytes": b"\x00\x01\x12\x34" + b"\x01\x02\x03\x04\x05",
    "IPv4 family with 16 bytes": b"\x00\x01\x12\x34" + bytes(16),
    "IPv6 address 15 bytes": b"\x00\x02\x12\x34" + bytes(15),
    "IPv6 address 17 bytes": b"\x00\x02\x12\x34" + bytes(17),
    "IPv6 family with 4 bytes": b"\x00\x02\x12\x34" + bytes(4),
    "family 0": b"\x00\x00\x12\x34" + bytes(4),
    "family 3": b"\x00\x03\x12\x34" + bytes(4),
    "family 0xff": b"\x00\xff\x12\x34" + bytes(16),
    "reserved byte set": b"\x01\x01\x12\x34" + bytes(4),
}


@pytest.mark.parametrize("cls", ADDRESS_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", BAD_ADDRESS_VALUES.values(), ids=BAD_ADDRESS_VALUES.keys())
def test_malformed_address_attributes_raise_decode_error(
    cls: type[a.Attribute], value: bytes
) -> None:
    """RFC 8489 §14.1-§14.2: 8 bytes for IPv4, 20 for IPv6, family 0x01 or 0x02."""
    with pytest.raises(DecodeError):
        decode_attribute(cls.TYPE, value, TXID)


def test_xor_mapped_address_matches_a_hand_computed_ipv4_encoding() -> None:
    """RFC 8489 §14.2: X-Port = port XOR 0x2112, X-Address = address XOR the cookie."""
    port, ip = 32853, bytes([192, 0, 2, 1])
    expected = (
        b"\x00\x01"
        + (port ^ 0x2112).to_bytes(2, "big")
        + bytes(x ^ y for x, y in zip(ip, COOKIE, strict=True))
    )
    assert a.XorMappedAddress("192.0.2.1", port).encode(TXID) == expected
    assert a.XorMappedAddress.decode(expected, TXID) == a.XorMappedAddress("192.0.2.1", port)


def test_xor_ipv6_addresses_are_masked_with_cookie_and_transaction_id() -> None:
    """RFC 8489 §14.2: an IPv6 X-Address is XORed with the cookie followed by the txid."""
    ip = bytes.fromhex("20010db8000000000000000000000001")
    expected = (
        b"\x00\x02"
        + (443 ^ 0x2112).to_bytes(2, "big")
        + bytes(x ^ y for x, y in zip(ip, COOKIE + TXID, strict=True))
    )
    assert a.XorPeerAddress("2001:db8::1", 443).encode(TXID) == expected
    assert a.XorPeerAddress.decode(expected, TXID) == a.XorPeerAddress("2001:db8::1", 443)
    # A different transaction id unmasks to a different address.
    assert a.XorPeerAddress.decode(expected, bytes(12)).host != "2001:db8::1"


def test_plain_mapped_address_is_not_xored() -> None:
    """RFC 8489 §14.1: MAPPED-ADDRESS carries the port and address as they are."""
    value = a.MappedAddress("10.1.2.3", 3478).encode(TXID)
    assert value == b"\x00\x01" + (3478).to_bytes(2, "big") + bytes([10, 1, 2, 3])


def test_encoding_an_address_attribute_with_a_hostname_is_refused() -> None:
    """RFC 8489 §14.1: the attribute carries an IP address; a name is a caller error."""
    with pytest.raises(ValueError, match="not an IP address"):
        a.XorMappedAddress("example.org", 1).encode(TXID)


def test_address_accessor_returns_host_and_port() -> None:
    assert a.XorRelayedAddress("198.51.100.7", 50000).address == ("198.51.100.7", 50000)


# -- text --------------------------------------------------------------------------------

TEXT_TYPES = [a.Username, a.Realm, a.Nonce, a.Software, a.AlternateDomain]
TEXT_LIMITS: dict[type[a.Attribute], int] = {
    a.Username: 763,
    a.Realm: 763,
    a.Nonce: 763,
    a.Software: 763,
}


@pytest.mark.parametrize("cls", TEXT_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [b"\xff", b"abc\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_text_attributes_that_are_not_utf8_raise_decode_error(
    cls: type[a.Attribute], value: bytes
) -> None:
    """RFC 8489 §14.3, §14.9, §14.10, §14.14: the value is UTF-8 (RFC 3629)."""
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_attribute(cls.TYPE, value, TXID)


@pytest.mark.parametrize("cls", list(TEXT_LIMITS), ids=lambda c: c.__name__)
def test_text_attributes_are_accepted_up_to_their_byte_limit(cls: type[a.Attribute]) -> None:
    """RFC 8489 §14.3 (USERNAME parses up to 763 bytes), §14.9/§14.10/§14.14 (< 764)."""
    limit = TEXT_LIMITS[cls]
    assert decode_attribute(cls.TYPE, b"x" * limit, TXID) == cls("x" * limit)  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", list(TEXT_LIMITS), ids=lambda c: c.__name__)
def test_text_attributes_one_byte_over_their_limit_raise_decode_error(
    cls: type[a.Attribute],
) -> None:
    """RFC 8489 §14.3: a receiver parses USERNAME up to 763 bytes; the others less than 764."""
    with pytest.raises(DecodeError, match="longer than"):
        decode_attribute(cls.TYPE, b"x" * (TEXT_LIMITS[cls] + 1), TXID)


def test_the_username_limit_counts_bytes_not_characters() -> None:
    """RFC 8489 §14.3: 255 three-byte characters are 765 bytes, over the 763-byte limit."""
    value = ("\u3042" * 255).encode()
    assert len(value) == 765
    with pytest.raises(DecodeError):
        decode_attribute(a.Username.TYPE, value, TXID)
    assert decode_attribute(a.Username.TYPE, value[:-3], TXID) == a.Username("\u3042" * 254)


@pytest.mark.parametrize("size", [513, 763])
def test_a_username_of_up_to_763_bytes_parses_for_rfc_5389_compatibility(size: int) -> None:
    """RFC 8489 §14.3: a receiver MUST be able to parse a USERNAME of 763 or fewer octets."""
    assert decode_attribute(a.Username.TYPE, b"u" * size, TXID) == a.Username("u" * size)


def test_text_round_trips_through_utf8() -> None:
    """RFC 8489 §14.3: USERNAME is UTF-8, so non-ASCII text survives the wire."""
    name = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert a.Username(name).encode(TXID) == name.encode("utf-8")
    assert a.Username.decode(name.encode("utf-8"), TXID) == a.Username(name)


# -- fixed sizes -------------------------------------------------------------------------

WRONG_SIZES: list[tuple[type[a.Attribute], int]] = [
    (a.MessageIntegrity, 0),
    (a.MessageIntegrity, 19),
    (a.MessageIntegrity, 21),
    (a.MessageIntegrity, 32),
    (a.MessageIntegritySha256, 0),
    (a.MessageIntegritySha256, 12),
    (a.MessageIntegritySha256, 15),
    (a.MessageIntegritySha256, 17),
    (a.MessageIntegritySha256, 18),
    (a.MessageIntegritySha256, 30),
    (a.MessageIntegritySha256, 36),
    (a.UserHash, 31),
    (a.UserHash, 33),
    (a.ReservationToken, 7),
    (a.ReservationToken, 9),
    (a.Fingerprint, 3),
    (a.Fingerprint, 8),
    (a.Lifetime, 0),
    (a.Lifetime, 2),
    (a.Lifetime, 5),
    (a.Priority, 8),
    (a.ConnectionId, 2),
    (a.IceControlled, 4),
    (a.IceControlled, 9),
    (a.IceControlling, 7),
    (a.DontFragment, 1),
    (a.DontFragment, 4),
    (a.UseCandidate, 4),
    (a.ChannelNumber, 2),
    (a.ChannelNumber, 8),
    (a.RequestedTransport, 1),
    (a.RequestedTransport, 8),
    (a.RequestedAddressFamily, 0),
    (a.RequestedAddressFamily, 1),
    (a.AdditionalAddressFamily, 8),
    (a.EvenPort, 0),
    (a.EvenPort, 4),
    (a.ChangeRequest, 2),
    (a.ChangeRequest, 8),
    (a.ResponsePort, 2),
    (a.ResponsePort, 3),
    (a.Icmp, 4),
    (a.Icmp, 12),
    (a.UnknownAttributes, 1),
    (a.UnknownAttributes, 3),
    (a.ErrorCode, 0),
    (a.ErrorCode, 3),
    (a.AddressErrorCode, 2),
]


@pytest.mark.parametrize(
    ("cls", "size"), WRONG_SIZES, ids=[f"{c.__name__}-{n}" for c, n in WRONG_SIZES]
)
def test_wrong_length_attributes_raise_decode_error(cls: type[a.Attribute], size: int) -> None:
    """RFC 8489 §14, RFC 8656 §18, RFC 5780 §7: each fixed-size attribute checks its length."""
    with pytest.raises(DecodeError):
        decode_attribute(cls.TYPE, b"\x04" * size, TXID)


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_message_integrity_sha256_accepts_16_to_32_bytes_in_steps_of_4(size: int) -> None:
    """RFC 8489 §14.6: at most 32 bytes, at least 16, and a multiple of 4."""
    value = bytes(range(size))
    assert decode_attribute(0x001C, value, TXID) == a.MessageIntegritySha256(value)


def test_integer_attributes_are_big_endian() -> None:
    """RFC 8489 §5: all fields are in network byte order."""
    assert a.Lifetime(600).encode(TXID) == (600).to_bytes(4, "big")
    assert a.IceControlling(1).encode(TXID) == bytes(7) + b"\x01"
    assert decode_attribute(0x000D, b"\x00\x00\x02\x58", TXID) == a.Lifetime(600)


def test_flag_attributes_are_empty() -> None:
    """RFC 8656 §18.8 DONT-FRAGMENT and RFC 8445 §16.1 USE-CANDIDATE have no value."""
    assert a.DontFragment().encode(TXID) == b""
    assert decode_attribute(0x001A, b"", TXID) == a.DontFragment()
    assert decode_attribute(0x0025, b"", TXID) == a.UseCandidate()


# -- structured attributes ---------------------------------------------------------------


def test_channel_number_ignores_its_reserved_half() -> None:
    """RFC 8656 §18.1: the 16 bits after the channel number are RFFU and ignored."""
    assert decode_attribute(0x000C, b"\x40\x01\xff\xff", TXID) == a.ChannelNumber(0x4001)
    assert a.ChannelNumber(0x4001).encode(TXID) == b"\x40\x01\x00\x00"


def test_requested_transport_is_the_protocol_byte() -> None:
    """RFC 8656 §18.11: the protocol number, then 24 reserved bits."""
    assert a.RequestedTransport(a.TRANSPORT_UDP).encode(TXID) == b"\x11\x00\x00\x00"
    assert decode_attribute(0x0019, b"\x06\x00\x00\x00", TXID) == a.RequestedTransport(6)


def test_even_port_reads_only_the_r_bit() -> None:
    """RFC 8656 §18.10: the R bit is the top bit; the other 7 bits are RFFU."""
    assert decode_attribute(0x0018, b"\x80", TXID) == a.EvenPort(reserve=True)
    assert decode_attribute(0x0018, b"\x7f", TXID) == a.EvenPort(reserve=False)
    assert a.EvenPort(reserve=True).encode(TXID) == b"\x80"


def test_change_request_flags_a_and_b() -> None:
    """RFC 5780 §7.2: A (change IP) is 0x4 and B (change port) is 0x2 of the last byte."""
    assert decode_attribute(0x0003, b"\x00\x00\x00\x06", TXID) == a.ChangeRequest(True, True)
    assert decode_attribute(0x0003, b"\x00\x00\x00\x02", TXID) == a.ChangeRequest(False, True)
    assert a.ChangeRequest(True, False).encode(TXID) == b"\x00\x00\x00\x04"


@pytest.mark.parametrize("code", [300, 399, 401, 420, 438, 508, 699])
def test_error_codes_from_300_to_699_decode(code: int) -> None:
    """RFC 8489 §14.8: class 3-6 in 3 bits, number 0-99 in 8 bits."""
    value = bytes([0, 0, code // 100, code % 100]) + b"Reason"
    assert decode_attribute(0x0009, value, TXID) == a.ErrorCode(code, "Reason")
    assert a.ErrorCode(code, "Reason").encode(TXID) == value


@pytest.mark.parametrize(
    "head",
    [b"\x00\x00\x00\x00", b"\x00\x00\x02\x63", b"\x00\x00\x07\x00", b"\x00\x00\x04\x64"],
    ids=["class-0", "class-2", "class-7", "number-100"],
)
@pytest.mark.parametrize("attr_type", [0x0009, 0x8001], ids=["ERROR-CODE", "ADDRESS-ERROR-CODE"])
def test_error_codes_outside_300_to_699_raise_decode_error(attr_type: int, head: bytes) -> None:
    """RFC 8489 §14.8: the class MUST be between 3 and 6 and the number below 100."""
    with pytest.raises(DecodeError):
        decode_attribute(attr_type, head, TXID)


def test_error_code_reason_must_be_utf8_and_at_most_763_bytes() -> None:
    """RFC 8489 §14.8: the reason phrase is UTF-8, less than 128 characters (763 bytes)."""
    with pytest.raises(DecodeError):
        decode_attribute(0x0009, b"\x00\x00\x04\x01\xff", TXID)
    with pytest.raises(DecodeError):
        decode_attribute(0x0009, b"\x00\x00\x04\x01" + b"x" * 764, TXID)
    assert decode_attribute(0x0009, b"\x00\x00\x04\x01" + b"x" * 763, TXID) == a.ErrorCode(
        401, "x" * 763
    )


def test_error_code_ignores_the_reserved_bits_above_the_class() -> None:
    """RFC 8489 §14.8: the 21 bits before the class are reserved and ignored."""
    assert decode_attribute(0x0009, b"\xff\xff\xfc\x14", TXID) == a.ErrorCode(420)


def test_address_error_code_carries_the_family_first() -> None:
    """RFC 8656 §18.12: family, reserved bits, then class and number as in ERROR-CODE."""
    attr = a.AddressErrorCode(a.FAMILY_IPV6, 440, "Address Family not Supported")
    value = attr.encode(TXID)
    assert value[:4] == b"\x02\x00\x04\x28"
    assert decode_attribute(0x8001, value, TXID) == attr


def test_unknown_attributes_lists_16_bit_types() -> None:
    """RFC 8489 §14.9: UNKNOWN-ATTRIBUTES is a list of 16-bit attribute types."""
    attr = a.UnknownAttributes((0x0030, 0x7FFF, 0x0031))
    assert attr.encode(TXID) == b"\x00\x30\x7f\xff\x00\x31"
    assert decode_attribute(0x000A, b"\x00\x30\x7f\xff\x00\x31", TXID) == attr


def test_icmp_attribute_layout() -> None:
    """RFC 8656 §18.13: 16 reserved bits, ICMP type and code (a byte each), error data.

    (The RFC's figure draws the type as 7 bits and the code as 9; the codec, like most
    implementations, reads them as bytes 2 and 3.)
    """
    attr = a.Icmp(3, 4, 1400)
    assert attr.encode(TXID) == b"\x00\x00\x03\x04" + (1400).to_bytes(4, "big")
    assert decode_attribute(0x8004, attr.encode(TXID), TXID) == attr


def test_password_algorithm_pads_its_parameters() -> None:
    """RFC 8489 §14.12: algorithm, parameters length, parameters padded to 4 bytes."""
    attr = a.PasswordAlgorithm(a.PASSWORD_ALGORITHM_SHA256, b"\x01\x02\x03")
    assert attr.encode(TXID) == b"\x00\x02\x00\x03\x01\x02\x03\x00"
    assert decode_attribute(0x001D, attr.encode(TXID), TXID) == attr


def test_password_algorithms_lists_entries_in_order() -> None:
    """RFC 8489 §14.11: a list of (algorithm, parameters) entries, each padded."""
    attr = a.PasswordAlgorithms(
        ((a.PASSWORD_ALGORITHM_SHA256, b""), (a.PASSWORD_ALGORITHM_MD5, b"\x09"))
    )
    value = attr.encode(TXID)
    assert value == b"\x00\x02\x00\x00" + b"\x00\x01\x00\x01\x09\x00\x00\x00"
    assert decode_attribute(0x8002, value, TXID) == attr


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x01",
        b"\x00\x01\x00\x08\x00\x00\x00\x00",
        b"\x00\x01\x00\x00\x00\x02\x00\x00",
    ],
    ids=["no-entry", "truncated-header", "parameters-past-end", "two-entries"],
)
def test_malformed_password_algorithm_raises_decode_error(value: bytes) -> None:
    """RFC 8489 §14.12: exactly one algorithm whose parameters fit the attribute."""
    with pytest.raises(DecodeError):
        decode_attribute(0x001D, value, TXID)


@pytest.mark.parametrize(
    "value", [b"\x00\x01", b"\x00\x01\x00\x04\x00"], ids=["truncated", "past-end"]
)
def test_malformed_password_algorithms_raise_decode_error(value: bytes) -> None:
    """RFC 8489 §14.11: each entry's header and parameters must fit the attribute."""
    with pytest.raises(DecodeError):
        decode_attribute(0x8002, value, TXID)


# -- unknown attributes in messages ------------------------------------------------------


def _tlv(attr_type: int, value: bytes) -> bytes:
    pad = b"\x00" * (-len(value) % 4)
    return attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + pad


def _message(body: bytes, msg_type: int = 0x0001) -> bytes:
    return msg_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + COOKIE + TXID + body


def test_unknown_attributes_in_a_message_are_kept_raw_and_re_encode_exactly() -> None:
    """RFC 8489 §14: unknown attributes decode as raw bytes, padding included."""
    data = _message(
        _tlv(0x0030, b"abc") + _tlv(0x8FFF, b"optional") + _tlv(0x0006, b"user") + _tlv(0x7FFF, b"")
    )
    m = decode(data)
    assert m.attributes == (
        a.UnknownAttribute(0x0030, b"abc"),
        a.UnknownAttribute(0x8FFF, b"optional"),
        a.Username("user"),
        a.UnknownAttribute(0x7FFF, b""),
    )
    assert encode(m) == data


def test_comprehension_required_lists_only_types_below_0x8000_once_each() -> None:
    """RFC 8489 §6.3.1, §14: types 0x0000-0x7FFF must be understood; list each once."""
    m = decode(
        _message(
            _tlv(0x0030, b"a")
            + _tlv(0x8FFF, b"b")
            + _tlv(0x7FFF, b"c")
            + _tlv(0x0030, b"d")
            + _tlv(0xC001, b"e")
            + _tlv(0x0006, b"user")
            + _tlv(0x7FFF, b"f")
        )
    )
    assert m.unknown_comprehension_required() == (0x0030, 0x7FFF)


def test_a_message_with_only_known_or_optional_attributes_needs_no_420() -> None:
    """RFC 8489 §14: comprehension-optional (0x8000-0xFFFF) unknowns are ignored."""
    m = decode(_message(_tlv(0x8FFF, b"x") + _tlv(0x8022, b"agent")))
    assert m.unknown_comprehension_required() == ()


def test_get_returns_the_first_attribute_of_a_type_and_get_all_every_one() -> None:
    """RFC 8489 §14: only the first of duplicate attributes is processed."""
    m = decode(_message(_tlv(0x0006, b"first") + _tlv(0x0006, b"second")))
    assert m.get(a.Username) == a.Username("first")
    assert m.get_all(a.Username) == [a.Username("first"), a.Username("second")]
    assert m.get(a.Realm) is None


def test_a_malformed_known_attribute_makes_the_whole_message_a_decode_error() -> None:
    """RFC 8489 §6.3: a message whose attributes cannot be parsed is malformed."""
    with pytest.raises(DecodeError):
        decode(_message(_tlv(0x000D, b"\x00\x00\x02")))  # 3-byte LIFETIME
