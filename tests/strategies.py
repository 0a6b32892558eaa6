"""Hypothesis strategies for the STUN codec (pyturn.wire).

Every attribute type in `ATTRIBUTE_TYPES` has a strategy of valid values in
`ATTRIBUTE_STRATEGIES` (a test checks none is missing), and `messages()` builds whole
`Message`s whose attribute order obeys RFC 8489 §14.5-§14.7, so that
`decode(encode(m)) == m` holds for every one of them. `mutated_encodings()`,
`stun_shaped_bytes()` and `channel_data_frames()` feed the fuzz invariant: any bytes
either decode or raise `DecodeError`.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from pyturn.wire import attributes as a
from pyturn.wire.message import HEADER_SIZE, Message, MessageClass, Method, encode

VECTOR_DIR = Path(__file__).parent / "wire" / "vectors"

MAGIC_COOKIE_BYTES = a.MAGIC_COOKIE.to_bytes(4, "big")

# -- scalars -----------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
uint8 = st.integers(0, 0xFF)
uint16 = st.integers(0, 0xFFFF)
uint32 = st.integers(0, 0xFFFF_FFFF)
uint64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
hosts = st.one_of(ipv4_hosts, ipv6_hosts)
transaction_ids = st.binary(min_size=12, max_size=12)
# RFC 8489 §5: the method is 12 bits.
methods: st.SearchStrategy[int] = st.one_of(st.sampled_from(Method), st.integers(0, 0xFFF))
msg_classes = st.sampled_from(MessageClass)
error_codes = st.integers(300, 699)
keys = st.binary(min_size=1, max_size=64)


def text_within(limit: int) -> st.SearchStrategy[str]:
    """UTF-8 text of at most `limit` encoded bytes (RFC 8489 §14.3, §14.8-§14.10, §14.14).

    Mostly arbitrary Unicode (4 bytes a character at worst, so at most limit // 4
    characters), sometimes ASCII right up to the limit.
    """
    unicode = st.text(st.characters(codec="utf-8"), max_size=limit // 4)
    ascii_to_limit = st.text(st.characters(codec="ascii"), max_size=limit)
    return st.one_of(unicode, ascii_to_limit).filter(lambda s: len(s.encode()) <= limit)


def _sized(*sizes: int) -> st.SearchStrategy[bytes]:
    return st.sampled_from(sizes).flatmap(lambda n: st.binary(min_size=n, max_size=n))


_TEXT = text_within(763)
_USERNAME = text_within(512)

# -- one strategy per attribute type -----------------------------------------------------

ATTRIBUTE_STRATEGIES: dict[type[a.Attribute], st.SearchStrategy[a.Attribute]] = {
    # RFC 8489 §14.1, §14.2; RFC 8656 §18.3, §18.5; RFC 5780 §7.3, §7.4, §7.6
    a.MappedAddress: st.builds(a.MappedAddress, hosts, ports),
    a.XorMappedAddress: st.builds(a.XorMappedAddress, hosts, ports),
    a.XorPeerAddress: st.builds(a.XorPeerAddress, hosts, ports),
    a.XorRelayedAddress: st.builds(a.XorRelayedAddress, hosts, ports),
    a.AlternateServer: st.builds(a.AlternateServer, hosts, ports),
    a.ResponseOrigin: st.builds(a.ResponseOrigin, hosts, ports),
    a.OtherAddress: st.builds(a.OtherAddress, hosts, ports),
    # RFC 8489 §14.3, §14.9, §14.10, §14.14, §14.16 (limits in bytes)
    a.Username: st.builds(a.Username, _USERNAME),
    a.Realm: st.builds(a.Realm, _TEXT),
    a.Nonce: st.builds(a.Nonce, _TEXT),
    a.Software: st.builds(a.Software, _TEXT),
    a.AlternateDomain: st.builds(a.AlternateDomain, _TEXT),
    # RFC 8489 §14.4-§14.7; RFC 8656 §18.4, §18.9; RFC 5780 §7.7
    a.MessageIntegrity: st.builds(a.MessageIntegrity, _sized(20)),
    a.MessageIntegritySha256: st.builds(a.MessageIntegritySha256, _sized(16, 20, 24, 28, 32)),
    a.UserHash: st.builds(a.UserHash, _sized(32)),
    a.ReservationToken: st.builds(a.ReservationToken, _sized(8)),
    a.Data: st.builds(a.Data, st.binary(max_size=300)),
    a.Padding: st.builds(a.Padding, st.binary(max_size=64)),
    a.Fingerprint: st.builds(a.Fingerprint, uint32),
    # RFC 8656 §18.2; RFC 8445 §16.1; RFC 6062 §6.2.1
    a.Lifetime: st.builds(a.Lifetime, uint32),
    a.Priority: st.builds(a.Priority, uint32),
    a.ConnectionId: st.builds(a.ConnectionId, uint32),
    a.IceControlled: st.builds(a.IceControlled, uint64),
    a.IceControlling: st.builds(a.IceControlling, uint64),
    a.DontFragment: st.just(a.DontFragment()),
    a.UseCandidate: st.just(a.UseCandidate()),
    # The codec carries any 16-bit number; the 0x4000-0x4FFF check is the server's.
    a.ChannelNumber: st.builds(a.ChannelNumber, uint16),
    a.RequestedTransport: st.builds(
        a.RequestedTransport, st.one_of(st.sampled_from([17, 6]), uint8)
    ),
    a.RequestedAddressFamily: st.builds(
        a.RequestedAddressFamily, st.one_of(st.sampled_from([1, 2]), uint8)
    ),
    a.AdditionalAddressFamily: st.builds(
        a.AdditionalAddressFamily, st.one_of(st.sampled_from([1, 2]), uint8)
    ),
    a.EvenPort: st.builds(a.EvenPort, st.booleans()),
    a.ChangeRequest: st.builds(a.ChangeRequest, st.booleans(), st.booleans()),
    a.ResponsePort: st.builds(a.ResponsePort, ports),
    # RFC 8489 §14.8, §14.13; RFC 8656 §18.12, §18.13
    a.ErrorCode: st.builds(a.ErrorCode, error_codes, _TEXT),
    a.AddressErrorCode: st.builds(a.AddressErrorCode, uint8, error_codes, _TEXT),
    a.UnknownAttributes: st.builds(a.UnknownAttributes, st.lists(uint16, max_size=12).map(tuple)),
    a.Icmp: st.builds(a.Icmp, uint8, uint8, uint32),
    # RFC 8489 §14.11, §14.12
    a.PasswordAlgorithm: st.builds(a.PasswordAlgorithm, uint16, st.binary(max_size=24)),
    a.PasswordAlgorithms: st.builds(
        a.PasswordAlgorithms,
        st.lists(st.tuples(uint16, st.binary(max_size=24)), max_size=4).map(tuple),
    ),
}

unknown_attribute_types = uint16.filter(lambda t: t not in a.ATTRIBUTE_TYPES)
unknown_attributes = st.builds(a.UnknownAttribute, unknown_attribute_types, st.binary(max_size=40))

# Attributes that must come last, in this order (RFC 8489 §14.5-§14.7).
TRAILER_TYPES = (a.MessageIntegrity, a.MessageIntegritySha256, a.Fingerprint)

body_attributes: st.SearchStrategy[a.Attribute] = st.one_of(
    *(s for cls, s in ATTRIBUTE_STRATEGIES.items() if cls not in TRAILER_TYPES),
    unknown_attributes,
)
any_attribute: st.SearchStrategy[a.Attribute] = st.one_of(
    *ATTRIBUTE_STRATEGIES.values(), unknown_attributes
)


@st.composite
def messages(draw: st.DrawFn, *, trailer: bool = True, max_attributes: int = 8) -> Message:
    """A `Message` that survives `decode(encode(m)) == m`.

    With `trailer`, it may end in MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and
    FINGERPRINT (random values, not valid MACs), each optional, in RFC 8489 order.
    """
    body = draw(st.lists(body_attributes, max_size=max_attributes))
    if trailer:
        for cls in TRAILER_TYPES:
            if draw(st.booleans()):
                body.append(draw(ATTRIBUTE_STRATEGIES[cls]))
    return Message(
        method=draw(methods),
        msg_class=draw(msg_classes),
        transaction_id=draw(transaction_ids),
        attributes=tuple(body),
    )


# -- inputs for the fuzz invariant -------------------------------------------------------


def load_vector(name: str) -> bytes:
    """One RFC 5769 vector from tests/wire/vectors/ (hex, whitespace allowed)."""
    return bytes.fromhex((VECTOR_DIR / name).read_text())


VECTOR_NAMES = (
    "rfc5769_2_1_request.hex",
    "rfc5769_2_2_ipv4_response.hex",
    "rfc5769_2_3_ipv6_response.hex",
    "rfc5769_2_4_long_term_request.hex",
)

valid_encodings: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(VECTOR_NAMES).map(load_vector),
    messages().map(encode),
)


@st.composite
def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "length"]))
        if kind in ("flip", "set") and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = buf[i] ^ draw(st.integers(1, 255)) if kind == "flip" else draw(uint8)
        elif kind == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif kind == "extend":
            buf += draw(st.binary(min_size=1, max_size=24))
        elif kind == "insert":
            i = draw(st.integers(0, len(buf)))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "length" and len(buf) >= 4:
            # Rewrite a 16-bit length-looking field (the header's or an attribute's)
            # at a 4-byte boundary + 2, usually to something larger.
            i = draw(st.integers(0, (len(buf) - 4) // 4)) * 4 + 2
            old = int.from_bytes(buf[i : i + 2], "big")
            new = draw(st.one_of(st.integers(old, min(old + 64, 0xFFFF)), uint16))
            buf[i : i + 2] = new.to_bytes(2, "big")
    return bytes(buf)


mutated_encodings: st.SearchStrategy[bytes] = valid_encodings.flatmap(_mutate)


def _tlv(attr_type: int, value: bytes) -> bytes:
    return (
        attr_type.to_bytes(2, "big")
        + len(value).to_bytes(2, "big")
        + value
        + b"\x00" * (-len(value) % 4)
    )


@st.composite
def stun_shaped_bytes(draw: st.DrawFn) -> bytes:
    """A well-formed header and TLV framing around random attribute values.

    Reaches every attribute decoder with arbitrary bytes, which plain st.binary()
    almost never does (it rarely gets past the magic cookie).
    """
    types = st.one_of(st.sampled_from(sorted(a.ATTRIBUTE_TYPES)), uint16)
    body = b"".join(
        _tlv(t, v) for t, v in draw(st.lists(st.tuples(types, st.binary(max_size=40)), max_size=6))
    )
    msg_type = draw(st.integers(0, 0x3FFF))
    header = (
        msg_type.to_bytes(2, "big")
        + len(body).to_bytes(2, "big")
        + MAGIC_COOKIE_BYTES
        + draw(transaction_ids)
    )
    assert len(header) == HEADER_SIZE
    return header + body


channel_numbers = st.integers(0x4000, 0x4FFF)


@st.composite
def channel_data_frames(draw: st.DrawFn) -> tuple[int, bytes]:
    """(channel, data) for a valid ChannelData message (RFC 8656 §12.4)."""
    return draw(channel_numbers), draw(st.binary(max_size=200))
