"""The RFC 5769 test vectors, decoded, verified and re-encoded byte for byte."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import pytest

from pyturn.wire.attributes import (
    Fingerprint,
    IceControlled,
    MessageIntegrity,
    Nonce,
    Priority,
    Realm,
    Software,
    Username,
    XorMappedAddress,
)
from pyturn.wire.errors import DecodeError
from pyturn.wire.integrity import long_term_key, verify_fingerprint, verify_integrity
from pyturn.wire.message import Message, MessageClass, Method, decode, encode
from tests.strategies import load_vector

# RFC 5769 §2: the short-term password of vectors 2.1-2.3, used as the key as it is.
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
SHORT_TERM_KEY = SHORT_TERM_PASSWORD.encode()
# RFC 5769 §2.4: long-term credentials; SASLprep turns the password into "TheMatrIX".
LT_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LT_PASSWORD = "The\u00adM\u00aatr\u2168"
LT_REALM = "example.org"
LT_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
LT_KEY = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


@dataclass(frozen=True)
class Vector:
    name: str
    key: bytes
    has_fingerprint: bool

    @property
    def data(self) -> bytes:
        return load_vector(self.name)


VECTORS = [
    Vector("rfc5769_2_1_request.hex", SHORT_TERM_KEY, True),
    Vector("rfc5769_2_2_ipv4_response.hex", SHORT_TERM_KEY, True),
    Vector("rfc5769_2_3_ipv6_response.hex", SHORT_TERM_KEY, True),
    Vector("rfc5769_2_4_long_term_request.hex", LT_KEY, False),
]


def _vector_id(vector: Vector) -> str:
    return vector.name.removesuffix(".hex")


vectors = pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
fingerprinted_vectors = pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v.has_fingerprint], ids=_vector_id
)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _trailer_count(message: Message) -> int:
    return sum(isinstance(attr, MessageIntegrity | Fingerprint) for attr in message.attributes)


def test_the_sample_request_decodes_to_its_documented_attributes() -> None:
    """RFC 5769 §2.1: SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MI, FINGERPRINT."""
    m = decode(load_vector("rfc5769_2_1_request.hex"))
    assert (m.method, m.msg_class, m.transaction_id) == (Method.BINDING, MessageClass.REQUEST, TXID)
    assert m.attributes[:4] == (
        Software("STUN test client"),
        Priority(0x6E0001FF),
        IceControlled(0x932FF9B151263B36),
        Username("evtj:h6vY"),
    )
    assert [type(attr) for attr in m.attributes[4:]] == [MessageIntegrity, Fingerprint]
    # The USERNAME is padded with spaces, not zeros, and the MI depends on them.
    assert m.padding is not None
    assert m.padding[3] == b"   "


def test_the_sample_ipv4_response_carries_xor_mapped_address_192_0_2_1_port_32853() -> None:
    """RFC 5769 §2.2: SOFTWARE "test vector", XOR-MAPPED-ADDRESS 192.0.2.1:32853."""
    m = decode(load_vector("rfc5769_2_2_ipv4_response.hex"))
    assert (m.method, m.msg_class, m.transaction_id) == (Method.BINDING, MessageClass.SUCCESS, TXID)
    assert m.attributes[:2] == (Software("test vector"), XorMappedAddress("192.0.2.1", 32853))
    assert m.get(XorMappedAddress) == XorMappedAddress("192.0.2.1", 32853)
    assert [type(attr) for attr in m.attributes[2:]] == [MessageIntegrity, Fingerprint]


def test_the_sample_ipv6_response_carries_xor_mapped_address_2001_db8_port_32853() -> None:
    """RFC 5769 §2.3: XOR-MAPPED-ADDRESS 2001:db8:1234:5678:11:2233:4455:6677 port 32853."""
    m = decode(load_vector("rfc5769_2_3_ipv6_response.hex"))
    assert (m.method, m.msg_class, m.transaction_id) == (Method.BINDING, MessageClass.SUCCESS, TXID)
    assert m.attributes[:2] == (
        Software("test vector"),
        XorMappedAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853),
    )
    assert [type(attr) for attr in m.attributes[2:]] == [MessageIntegrity, Fingerprint]


def test_the_long_term_request_carries_a_katakana_username_nonce_and_realm() -> None:
    """RFC 5769 §2.4: USERNAME (6 katakana), NONCE, REALM example.org, MI, no FINGERPRINT."""
    m = decode(load_vector("rfc5769_2_4_long_term_request.hex"))
    assert (m.method, m.msg_class) == (Method.BINDING, MessageClass.REQUEST)
    assert m.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert m.attributes[:3] == (Username(LT_USERNAME), Nonce(LT_NONCE), Realm(LT_REALM))
    assert [type(attr) for attr in m.attributes[3:]] == [MessageIntegrity]
    assert m.fingerprint_offset is None


def test_the_long_term_key_is_md5_of_username_realm_and_saslprepped_password() -> None:
    """RFC 5769 §2.4 with RFC 5389 §15.4: key = MD5(username ":" realm ":" SASLprep(password))."""
    expected = hashlib.md5(
        f"{LT_USERNAME}:{LT_REALM}:TheMatrIX".encode(), usedforsecurity=False
    ).digest()
    assert expected == LT_KEY


@vectors
def test_message_integrity_verifies_with_the_documented_key(vector: Vector) -> None:
    """RFC 5769 §2.1-§2.4: MESSAGE-INTEGRITY (RFC 8489 §14.5) matches the credentials."""
    assert verify_integrity(decode(vector.data), vector.key)


@vectors
def test_message_integrity_fails_with_a_wrong_key(vector: Vector) -> None:
    """RFC 8489 §14.5: an HMAC under any other key does not match."""
    m = decode(vector.data)
    assert not verify_integrity(m, vector.key + b"x")
    assert not verify_integrity(m, b"")
    assert not verify_integrity(m, long_term_key(LT_USERNAME, LT_REALM, "TheMatrix"))


@vectors
def test_message_integrity_fails_after_any_single_flipped_byte_before_it(vector: Vector) -> None:
    """RFC 8489 §14.5: the HMAC covers every byte before MESSAGE-INTEGRITY, padding included."""
    mi_offset = decode(vector.data).integrity_offset
    assert mi_offset is not None
    for index in range(mi_offset + 24):
        try:
            m = decode(_flip(vector.data, index))
        except DecodeError:
            continue  # e.g. the length field or the magic cookie: not a message at all
        assert not verify_integrity(m, vector.key), f"flipped byte {index} went unnoticed"


@vectors
def test_fingerprint_verifies_where_present(vector: Vector) -> None:
    """RFC 8489 §14.7: CRC-32 of the message XOR 0x5354554E (only 2.1-2.3 carry one)."""
    m = decode(vector.data)
    assert verify_fingerprint(m) is vector.has_fingerprint


@fingerprinted_vectors
def test_fingerprint_fails_after_any_single_flipped_byte(vector: Vector) -> None:
    """RFC 8489 §14.7: CRC-32 detects every single-byte error (RFC 5769 §2.1-§2.3)."""
    for index in range(len(vector.data)):
        try:
            m = decode(_flip(vector.data, index))
        except DecodeError:
            continue
        assert not verify_fingerprint(m), f"flipped byte {index} went unnoticed"


@vectors
def test_decoding_then_encoding_reproduces_the_vector_byte_for_byte(vector: Vector) -> None:
    """RFC 5769 §2: a decoded message re-encodes exactly, received padding included."""
    assert encode(decode(vector.data)) == vector.data


@vectors
def test_recomputing_integrity_and_fingerprint_reproduces_the_vector(vector: Vector) -> None:
    """RFC 8489 §14.5, §14.7: encode(..., integrity_key, fingerprint) computes the same MACs."""
    m = decode(vector.data)
    n = _trailer_count(m)
    assert m.padding is not None
    stripped = replace(m, attributes=m.attributes[:-n], padding=m.padding[:-n])
    again = encode(stripped, integrity_key=vector.key, fingerprint=vector.has_fingerprint)
    assert again == vector.data


def test_a_flipped_mac_byte_still_decodes_but_no_longer_verifies() -> None:
    """RFC 8489 §14.5: a wrong MAC is an authentication failure, not a malformed message."""
    data = load_vector("rfc5769_2_1_request.hex")
    m = decode(data)
    assert m.integrity_offset is not None
    broken = decode(_flip(data, m.integrity_offset + 4))
    assert not verify_integrity(broken, SHORT_TERM_KEY)
    assert not verify_fingerprint(broken)
