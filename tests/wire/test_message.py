"""STUN message header, type layout, attribute ordering and integrity."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
import zlib

import pytest

from pyturn.wire import attributes as a
from pyturn.wire.errors import DecodeError
from pyturn.wire.integrity import (
    crc,
    long_term_key,
    opaque_string,
    saslprep,
    userhash,
    verify_fingerprint,
    verify_integrity,
    verify_integrity_sha256,
)
from pyturn.wire.message import (
    HEADER_SIZE,
    Message,
    MessageClass,
    Method,
    build,
    decode,
    encode,
    finish,
    is_stun,
    message_type,
    new_transaction_id,
    split_message_type,
)

TXID = bytes.fromhex("0102030405060708090a0b0c")
COOKIE = a.MAGIC_COOKIE.to_bytes(4, "big")
KEY = b"short-term-key"


def _tlv(attr_type: int, value: bytes) -> bytes:
    pad = b"\x00" * (-len(value) % 4)
    return attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + pad


def _message(body: bytes, msg_type: int = 0x0001, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return msg_type.to_bytes(2, "big") + size.to_bytes(2, "big") + COOKIE + TXID + body


def _append(data: bytes, tlv: bytes) -> bytes:
    """Append an attribute to an encoded message and fix the header's length."""
    body = data[HEADER_SIZE:] + tlv
    return data[:2] + len(body).to_bytes(2, "big") + data[4:HEADER_SIZE] + body


def _reference_type(method: int, msg_class: int) -> int:
    """RFC 8489 §5 figure 3, bit by bit: M11..M7 C1 M6..M4 C0 M3..M0 (MSB first)."""
    layout = ["M11", "M10", "M9", "M8", "M7", "C1", "M6", "M5", "M4", "C0", "M3", "M2", "M1", "M0"]
    value = 0
    for name in layout:
        source = method if name[0] == "M" else msg_class
        value = (value << 1) | ((source >> int(name[1:])) & 1)
    return value


# -- message type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "msg_class"),
    list(itertools.product(Method, MessageClass)),
    ids=[f"{m.name}-{c.name}" for m, c in itertools.product(Method, MessageClass)],
)
def test_message_type_bit_layout_matches_rfc_8489_for_every_method_and_class(
    method: Method, msg_class: MessageClass
) -> None:
    """RFC 8489 §5: the class bits C1 and C0 are interleaved with the 12 method bits."""
    value = message_type(method, msg_class)
    assert value == _reference_type(method, msg_class)
    assert split_message_type(value) == (method, msg_class)


@pytest.mark.parametrize(
    ("method", "msg_class", "expected"),
    [
        (Method.BINDING, MessageClass.REQUEST, 0x0001),
        (Method.BINDING, MessageClass.INDICATION, 0x0011),
        (Method.BINDING, MessageClass.SUCCESS, 0x0101),
        (Method.BINDING, MessageClass.ERROR, 0x0111),
        (Method.ALLOCATE, MessageClass.REQUEST, 0x0003),
        (Method.ALLOCATE, MessageClass.SUCCESS, 0x0103),
        (Method.ALLOCATE, MessageClass.ERROR, 0x0113),
        (Method.REFRESH, MessageClass.REQUEST, 0x0004),
        (Method.REFRESH, MessageClass.SUCCESS, 0x0104),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, MessageClass.REQUEST, 0x0008),
        (Method.CREATE_PERMISSION, MessageClass.SUCCESS, 0x0108),
        (Method.CHANNEL_BIND, MessageClass.REQUEST, 0x0009),
        (Method.CHANNEL_BIND, MessageClass.SUCCESS, 0x0109),
        (Method.CHANNEL_BIND, MessageClass.ERROR, 0x0119),
        (Method.CONNECT, MessageClass.REQUEST, 0x000A),
        (Method.CONNECTION_BIND, MessageClass.REQUEST, 0x000B),
        (Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, 0x001C),
    ],
)
def test_well_known_message_types_have_their_documented_values(
    method: Method, msg_class: MessageClass, expected: int
) -> None:
    """RFC 8489 §5, RFC 8656 §13-§14, RFC 6062 §4: e.g. Allocate request 0x0003."""
    assert message_type(method, msg_class) == expected
    assert split_message_type(expected) == (method, msg_class)


def test_method_values_match_the_iana_registry() -> None:
    """RFC 8489 §18.2, RFC 8656 §17, RFC 6062 §6.1: STUN method numbers."""
    assert {m.name: m.value for m in Method} == {
        "BINDING": 0x001,
        "ALLOCATE": 0x003,
        "REFRESH": 0x004,
        "SEND": 0x006,
        "DATA": 0x007,
        "CREATE_PERMISSION": 0x008,
        "CHANNEL_BIND": 0x009,
        "CONNECT": 0x00A,
        "CONNECTION_BIND": 0x00B,
        "CONNECTION_ATTEMPT": 0x00C,
    }


def test_every_14_bit_type_splits_and_rejoins_to_itself() -> None:
    """RFC 8489 §5: the 14-bit type is exactly a 12-bit method and a 2-bit class."""
    for value in range(0x4000):
        method, msg_class = split_message_type(value)
        assert 0 <= method <= 0xFFF
        assert 0 <= msg_class <= 3
        assert message_type(method, msg_class) == value
    for method in (0x000, 0x07F, 0x080, 0xFFF):
        for msg_class in range(4):
            assert message_type(method, msg_class) == _reference_type(method, msg_class)


def test_a_message_with_an_unknown_method_still_decodes() -> None:
    """RFC 8489 §6.3.1: an unknown method is answered 400, so it must decode first."""
    m = decode(_message(b"", msg_type=message_type(0xABC, MessageClass.REQUEST)))
    assert (m.method, m.msg_class) == (0xABC, MessageClass.REQUEST)


# -- header errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter"),
        (_message(b"")[:19], "shorter"),
        (_message(b"")[:4] + b"\x21\x12\xa4\x43" + TXID, "cookie"),
        (b"\x00\x01\x00\x00" + b"\x00\x00\x00\x00" + TXID, "cookie"),
        (b"\x80" + _message(b"")[1:], "top two bits"),
        (b"\x40" + _message(b"")[1:], "top two bits"),
        (b"\xc0" + _message(b"")[1:], "top two bits"),
        (_message(b"\x00\x00", length=2), "multiple of 4"),
        (_message(b"\x00\x00\x00\x00\x00\x00\x00", length=7), "multiple of 4"),
        (_message(b"", length=4), "length field"),
        (_message(_tlv(0x8022, b"abcd"), length=4), "length field"),
        (_message(_tlv(0x8022, b"abcd"))[:-4], "length field"),
        (_message(_tlv(0x8022, b"abcd")) + b"\x00\x00\x00\x00", "length field"),
    ],
    ids=[
        "empty",
        "19-bytes",
        "cookie-off-by-one",
        "cookie-zero",
        "top-bit-0x80",
        "top-bit-0x40",
        "top-bits-0xc0",
        "length-2",
        "length-7",
        "length-4-but-nothing-follows",
        "length-short-of-the-data",
        "truncated",
        "trailing-bytes",
    ],
)
def test_malformed_headers_raise_decode_error(data: bytes, why: str) -> None:
    """RFC 8489 §5, §6.3: header length, cookie, top bits and length field are checked."""
    with pytest.raises(DecodeError, match=why):
        decode(data)


def test_an_attribute_running_past_the_end_raises_decode_error() -> None:
    """RFC 8489 §14: an attribute's value (and its padding) must fit in the message."""
    with pytest.raises(DecodeError, match="past the end"):
        decode(_message(b"\x80\x22\x00\x08abcd"))
    with pytest.raises(DecodeError, match="past the end"):
        decode(_message(b"\x80\x22\x00\x05abcd"))  # the padding after 5 bytes is missing


def test_the_smallest_message_is_a_bare_header() -> None:
    """RFC 8489 §5: a message may carry no attributes at all."""
    m = decode(_message(b""))
    assert m == Message(Method.BINDING, MessageClass.REQUEST, TXID)
    assert encode(m) == _message(b"")


def test_message_equality_ignores_raw_bytes_offsets_and_padding() -> None:
    """Message.raw/offsets/padding describe the received bytes, not the message."""
    m = decode(_message(_tlv(0x0006, b"abc")))
    assert m == build(Method.BINDING, MessageClass.REQUEST, TXID, [a.Username("abc")])
    assert m.raw == _message(_tlv(0x0006, b"abc"))


def test_new_transaction_ids_are_96_random_bits() -> None:
    """RFC 8489 §5: the transaction id is 96 bits, chosen uniformly at random."""
    ids = {new_transaction_id() for _ in range(64)}
    assert len(ids) == 64
    assert all(len(t) == 12 for t in ids)


# -- is_stun -----------------------------------------------------------------------------


def test_is_stun_accepts_a_header_with_the_magic_cookie() -> None:
    """RFC 7983 §7: first byte 0-3 (top two bits zero); RFC 8489 §5: the magic cookie."""
    assert is_stun(_message(b""))
    assert is_stun(_message(b"", msg_type=0x3FFF))
    assert is_stun(_message(b"", msg_type=0x0113) + b"trailing")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _message(b"")[:19],
        b"\x40" + _message(b"")[1:],
        b"\x80" + _message(b"")[1:],
        _message(b"")[:4] + b"\x00\x00\x00\x00" + TXID,
        b"\x40\x00\x00\x10" + bytes(16),
    ],
    ids=["empty", "short", "channel-data-byte", "rtp-byte", "no-cookie", "channel-data"],
)
def test_is_stun_rejects_what_is_not_stun(data: bytes) -> None:
    """RFC 7983 §7: bytes 64-79 are ChannelData and 128-191 RTP/RTCP, not STUN."""
    assert not is_stun(data)


# -- attribute ordering ------------------------------------------------------------------


def test_attributes_after_message_integrity_are_ignored() -> None:
    """RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY (except -SHA256, FINGERPRINT)."""
    mi = a.MessageIntegrity(bytes(20))
    body = (
        _tlv(0x8022, b"client")
        + _tlv(0x0008, bytes(20))
        + _tlv(0x0014, b"ignored.example")
        + _tlv(0x0030, b"unknown")  # comprehension-required, yet ignored: no 420
        + _tlv(0x000D, b"\x01")  # malformed LIFETIME: ignored, so no error
    )
    m = decode(_message(body))
    assert m.attributes == (a.Software("client"), mi)
    assert m.unknown_comprehension_required() == ()
    assert m.integrity_offset == HEADER_SIZE + 12


def test_message_integrity_sha256_and_fingerprint_after_message_integrity_are_kept() -> None:
    """RFC 8489 §14.5: MESSAGE-INTEGRITY-SHA256 and FINGERPRINT may follow MESSAGE-INTEGRITY."""
    body = (
        _tlv(0x0008, bytes(20))
        + _tlv(0x0006, b"ignored")
        + _tlv(0x001C, bytes(32))
        + _tlv(0x8028, b"\x00\x00\x00\x01")
    )
    m = decode(_message(body))
    assert m.attributes == (
        a.MessageIntegrity(bytes(20)),
        a.MessageIntegritySha256(bytes(32)),
        a.Fingerprint(1),
    )
    assert (m.integrity_offset, m.integrity_sha256_offset, m.fingerprint_offset) == (
        20,
        20 + 24 + 12,
        20 + 24 + 12 + 36,
    )


def test_only_fingerprint_is_kept_after_message_integrity_sha256() -> None:
    """RFC 8489 §14.6: after MESSAGE-INTEGRITY-SHA256 everything but FINGERPRINT is ignored."""
    body = (
        _tlv(0x001C, bytes(16))
        + _tlv(0x0008, bytes(20))  # a MESSAGE-INTEGRITY after -SHA256 is ignored too
        + _tlv(0x001C, b"\x01" * 32)  # so is a second -SHA256
        + _tlv(0x0006, b"ignored")
        + _tlv(0x8028, b"\x00\x00\x00\x02")
    )
    m = decode(_message(body))
    assert m.attributes == (a.MessageIntegritySha256(bytes(16)), a.Fingerprint(2))
    assert m.integrity_offset is None


def test_a_second_message_integrity_is_ignored() -> None:
    """RFC 8489 §14.5: only the first MESSAGE-INTEGRITY counts."""
    body = _tlv(0x0008, bytes(20)) + _tlv(0x0008, b"\x01" * 20)
    m = decode(_message(body))
    assert m.attributes == (a.MessageIntegrity(bytes(20)),)
    assert m.integrity_offset == HEADER_SIZE


@pytest.mark.parametrize(
    "after",
    [
        _tlv(0x8022, b"late"),
        _tlv(0x8FFF, b""),
        _tlv(0x0008, bytes(20)),
        _tlv(0x001C, bytes(32)),
        _tlv(0x8028, bytes(4)),
    ],
    ids=["software", "optional-unknown", "message-integrity", "mi-sha256", "fingerprint"],
)
def test_any_attribute_after_fingerprint_is_a_decode_error(after: bytes) -> None:
    """RFC 8489 §14.7: FINGERPRINT MUST be the last attribute."""
    with pytest.raises(DecodeError, match="FINGERPRINT"):
        decode(_message(_tlv(0x8028, bytes(4)) + after))
    with pytest.raises(DecodeError, match="FINGERPRINT"):
        decode(_message(_tlv(0x0008, bytes(20)) + _tlv(0x8028, bytes(4)) + after))


# -- MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT ----------------------------

REQUEST = Message(
    Method.ALLOCATE,
    MessageClass.REQUEST,
    TXID,
    (a.RequestedTransport(a.TRANSPORT_UDP), a.Username("alice"), a.Software("pyturn test")),
)


def test_message_integrity_is_hmac_sha1_over_the_message_with_its_length_adjusted() -> None:
    """RFC 8489 §14.5: the length covers MESSAGE-INTEGRITY itself but not what follows."""
    data = encode(REQUEST, integrity_key=KEY)
    body = data[HEADER_SIZE:-24]
    head = struct.pack("!HH", 0x0003, len(body) + 24) + COOKIE + TXID
    assert data[-24:] == _tlv(0x0008, hmac.digest(KEY, head + body, "sha1"))
    m = decode(data)
    assert verify_integrity(m, KEY)
    assert not verify_integrity(m, KEY + b"!")


def test_message_integrity_still_verifies_when_fingerprint_follows() -> None:
    """RFC 8489 §14.5, §14.7: FINGERPRINT is outside the MESSAGE-INTEGRITY hash."""
    m = decode(encode(REQUEST, integrity_key=KEY, fingerprint=True))
    assert verify_integrity(m, KEY)
    assert verify_fingerprint(m)


def test_message_integrity_still_verifies_when_ignored_attributes_follow() -> None:
    """RFC 8489 §14.5: the receiver adjusts the length to end at MESSAGE-INTEGRITY."""
    data = _append(encode(REQUEST, integrity_key=KEY), _tlv(0x8022, b"appended"))
    m = decode(data)
    assert m.attributes[-1] == m.get(a.MessageIntegrity)
    assert verify_integrity(m, KEY)


def test_a_message_without_message_integrity_never_verifies() -> None:
    """RFC 8489 §9.1.3: a request without MESSAGE-INTEGRITY is not authenticated."""
    m = decode(encode(REQUEST))
    assert not verify_integrity(m, KEY)
    assert not verify_integrity_sha256(m, KEY)
    assert not verify_fingerprint(m)
    # Nor does a Message that was built, not decoded.
    assert not verify_integrity(REQUEST, KEY)


def test_message_integrity_sha256_round_trips_through_encode_and_verify() -> None:
    """RFC 8489 §14.6: HMAC-SHA256 over the message, length adjusted to end at it."""
    data = encode(REQUEST, integrity_key=KEY, integrity_sha256=True, fingerprint=True)
    m = decode(data)
    assert [type(x) for x in m.attributes[-3:]] == [
        a.MessageIntegrity,
        a.MessageIntegritySha256,
        a.Fingerprint,
    ]
    assert verify_integrity(m, KEY)
    assert verify_integrity_sha256(m, KEY)
    assert verify_fingerprint(m)
    assert not verify_integrity_sha256(m, b"wrong")


def test_message_integrity_sha256_alone_when_sha1_is_turned_off() -> None:
    """RFC 8489 §9.2.4: a server may send only MESSAGE-INTEGRITY-SHA256."""
    data = encode(REQUEST, integrity_key=KEY, integrity_sha256=True, integrity_sha1=False)
    m = decode(data)
    assert m.get(a.MessageIntegrity) is None
    assert m.get(a.MessageIntegritySha256) is not None
    assert not verify_integrity(m, KEY)
    assert verify_integrity_sha256(m, KEY)
    body = data[HEADER_SIZE:-36]
    head = struct.pack("!HH", 0x0003, len(body) + 36) + COOKIE + TXID
    assert data[-32:] == hmac.digest(KEY, head + body, "sha256")


def test_a_truncated_message_integrity_sha256_verifies() -> None:
    """RFC 8489 §14.6: the HMAC may be truncated to 16 bytes (a multiple of 4)."""
    unsigned = encode(REQUEST)
    body = unsigned[HEADER_SIZE:]
    head = struct.pack("!HH", 0x0003, len(body) + 20) + COOKIE + TXID
    mac = hmac.digest(KEY, head + body, "sha256")[:16]
    m = decode(_append(unsigned, _tlv(0x001C, mac)))
    assert verify_integrity_sha256(m, KEY)
    assert not verify_integrity_sha256(m, KEY + b"?")


def test_message_integrity_sha256_fails_after_a_flipped_byte() -> None:
    """RFC 8489 §14.6: any change before the attribute breaks the HMAC."""
    data = encode(REQUEST, integrity_key=KEY, integrity_sha256=True, integrity_sha1=False)
    for index in range(len(data)):
        flipped = data[:index] + bytes([data[index] ^ 0x80]) + data[index + 1 :]
        try:
            m = decode(flipped)
        except DecodeError:
            continue
        assert not verify_integrity_sha256(m, KEY), f"flipped byte {index} went unnoticed"


def test_fingerprint_is_crc32_xor_0x5354554e() -> None:
    """RFC 8489 §14.7: CRC-32 (as in ISO 3309) of the message up to FINGERPRINT, XOR STUN."""
    data = encode(REQUEST, fingerprint=True)
    body = data[HEADER_SIZE:-8]
    head = struct.pack("!HH", 0x0003, len(body) + 8) + COOKIE + TXID
    assert int.from_bytes(data[-4:], "big") == zlib.crc32(head + body) ^ 0x5354554E
    assert crc(head + body) == zlib.crc32(head + body) ^ 0x5354554E
    assert verify_fingerprint(decode(data))


def test_finish_appends_integrity_to_already_encoded_attributes() -> None:
    """RFC 8489 §14.5: finish() is encode() for a pre-built attribute body."""
    body = b"".join(_tlv(x.attr_type, x.encode(TXID)) for x in REQUEST.attributes)
    assert finish(0x0003, TXID, body, integrity_key=KEY, fingerprint=True) == encode(
        REQUEST, integrity_key=KEY, fingerprint=True
    )


def test_padding_of_the_wrong_size_is_replaced_by_zeros() -> None:
    """RFC 8489 §14: padding fills the value to a 4-byte boundary; bad hints are dropped."""
    m = Message(
        Method.BINDING, MessageClass.REQUEST, TXID, (a.Username("abc"),), padding=(b"\x01\x02",)
    )
    assert encode(m) == _message(_tlv(0x0006, b"abc"))
    mismatched = Message(
        Method.BINDING, MessageClass.REQUEST, TXID, (a.Username("abc"),), padding=(b"!", b"!")
    )
    assert encode(mismatched) == _message(_tlv(0x0006, b"abc"))


# -- long-term credentials ---------------------------------------------------------------


def test_long_term_key_md5_is_md5_of_username_realm_saslprep_password() -> None:
    """RFC 8489 §9.2.2 (MD5): key = MD5(username ":" realm ":" SASLprep(password))."""
    key = long_term_key("user", "realm", "pass\u00adword")
    assert key == hashlib.md5(b"user:realm:password", usedforsecurity=False).digest()
    assert len(key) == 16
    assert (
        long_term_key("user", "realm", "pw", a.PASSWORD_ALGORITHM_MD5)
        == hashlib.md5(b"user:realm:pw", usedforsecurity=False).digest()
    )


def test_long_term_key_sha256_is_sha256_with_opaque_string_realm_and_password() -> None:
    """RFC 8489 §9.2.2 (SHA-256): key = SHA-256(username ":" OpaqueString(realm) ":" ...)."""
    key = long_term_key("user", "realm", "pass\u00a0word", a.PASSWORD_ALGORITHM_SHA256)
    assert key == hashlib.sha256(b"user:realm:pass word").digest()
    assert len(key) == 32
    assert key[:16] != long_term_key("user", "realm", "pass\u00a0word")


def test_long_term_key_with_an_unknown_algorithm_is_refused() -> None:
    """RFC 8489 §18.5: only MD5 (0x0001) and SHA-256 (0x0002) are defined."""
    with pytest.raises(ValueError, match="unsupported"):
        long_term_key("user", "realm", "pw", 0x0003)


def test_userhash_is_sha256_of_username_and_realm() -> None:
    """RFC 8489 §14.4: USERHASH is a 32-byte SHA-256 of "username:realm"."""
    assert userhash("user", "realm") == hashlib.sha256(b"user:realm").digest()


def test_userhash_prepares_username_and_realm_with_opaque_string() -> None:
    """RFC 8489 §14.4: both inputs are OpaqueString-processed before hashing."""
    expected = hashlib.sha256("Jos\u00e9:example org".encode()).digest()
    assert userhash("Jose\u0301", "example\u00a0org") == expected


# -- SASLprep and OpaqueString -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        ("I\u00adX", "IX"),
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),
        ("\u2168", "IX"),
        ("The\u00adM\u00aatr\u2168", "TheMatrIX"),
        ("a\u00a0b", "a b"),
        ("a\u200bb", "ab"),
        ("\u0627\u0628", "\u0627\u0628"),
    ],
    ids=[
        "soft-hyphen",
        "user",
        "USER",
        "ordinal-a",
        "roman-nine",
        "rfc5769-password",
        "nbsp",
        "zero-width-space",
        "rtl",
    ],
)
def test_saslprep_maps_and_normalizes_as_rfc_4013_shows(text: str, prepared: str) -> None:
    """RFC 4013 §3 examples: mapping (B.1 to nothing, C.1.2 to space), then NFKC."""
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    "text",
    ["\u0007", "a\u0000b", "\ue000", "\u0627\u0031", "\u0627a\u0628", "\ufffe"],
    ids=["bell", "nul", "private-use", "rtl-then-digit", "rtl-mixed-with-ltr", "non-char"],
)
def test_saslprep_refuses_prohibited_characters_and_bad_bidi(text: str) -> None:
    """RFC 4013 §2.3-§2.4 (and its §3 examples 6 and 7): prohibited output and bidi rules."""
    with pytest.raises(ValueError, match="SASLprep"):
        saslprep(text)


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        ("correct horse", "correct horse"),
        ("a\u00a0b", "a b"),
        ("a\u3000b", "a b"),
        ("e\u0301", "\u00e9"),
        ("\u2168", "\u2168"),  # NFC, not NFKC: compatibility forms are kept
        ("Example.ORG", "Example.ORG"),  # no case mapping
    ],
)
def test_opaque_string_maps_spaces_and_normalizes_to_nfc(text: str, prepared: str) -> None:
    """RFC 8265 §4.2.2: non-ASCII spaces to U+0020, no case mapping, NFC."""
    assert opaque_string(text) == prepared


@pytest.mark.parametrize(
    "text",
    ["", "\u0007", "a\u00adb", "\u200d", "x\U000e0001", "\U0010ffff"],
    ids=["empty", "control", "soft-hyphen", "zwj", "tag", "unassigned"],
)
def test_opaque_string_refuses_empty_and_disallowed_code_points(text: str) -> None:
    """RFC 8265 §4.2.2 / RFC 8264 §9.11: controls, ignorables and unassigned are refused."""
    with pytest.raises(ValueError, match="OpaqueString"):
        opaque_string(text)
