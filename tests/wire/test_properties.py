"""Property tests: round trips, integrity, and the fuzz invariant.

The fuzz invariant (RFC 8489 §6.3 and RFC 8656 §12.5 leave a server two choices for a
malformed message, answer 400 or drop it, and both need the codec to say "malformed"
rather than crash): for any bytes, `decode` returns a `Message` or raises `DecodeError`,
and the same holds for `decode_channel_data` and `StreamFramer`.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pyturn.wire.attributes import Fingerprint, MessageIntegrity, MessageIntegritySha256
from pyturn.wire.channel_data import StreamFramer, decode_channel_data
from pyturn.wire.errors import DecodeError
from pyturn.wire.integrity import (
    verify_fingerprint,
    verify_integrity,
    verify_integrity_sha256,
)
from pyturn.wire.message import Message, decode, encode
from tests.strategies import (
    VECTOR_NAMES,
    keys,
    load_vector,
    messages,
    mutated_encodings,
    stun_shaped_bytes,
)

PROPERTY = settings(max_examples=300, deadline=None)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VECTOR_BYTES = [load_vector(name) for name in VECTOR_NAMES]


def _decode_or_decode_error(data: bytes) -> Message | None:
    """Only `DecodeError` may escape; anything else fails the test with its traceback."""
    try:
        m = decode(data)
    except DecodeError as exc:
        event(f"DecodeError: {str(exc).split()[0]}")
        return None
    event("decoded")
    return m


def _check_decoded(data: bytes) -> None:
    """The fuzz invariant for `decode`, plus: what decodes re-encodes and decodes again."""
    m = _decode_or_decode_error(data)
    if m is None:
        return
    assert isinstance(m, Message)
    assert m.raw == data
    # Verification of arbitrary input is a yes/no answer, never an exception.
    verify_integrity(m, b"key")
    verify_integrity_sha256(m, b"key")
    verify_fingerprint(m)
    m.unknown_comprehension_required()
    again = encode(m)
    assert decode(again) == m


def _check_channel_data(data: bytes) -> None:
    try:
        channel, payload = decode_channel_data(data)
    except DecodeError:
        return
    assert 0x4000 <= channel <= 0x7FFF
    assert payload == data[4 : 4 + len(payload)]


def _check_framer(data: bytes, cuts: list[int]) -> None:
    framer = StreamFramer()
    start = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            framer.feed(data[start:cut])
            start = cut
            for frame in framer.frames():
                assert frame
                assert frame[0] < 0x80
    except DecodeError:
        return
    assert framer.pending < len(data) + 1


# -- round trips -------------------------------------------------------------------------


@PROPERTY
@given(m=messages())
def test_any_generated_message_survives_encode_then_decode(m: Message) -> None:
    """RFC 8489 §5, §14: encoding then decoding gives back an equal message."""
    data = encode(m)
    assert len(data) % 4 == 0
    assert int.from_bytes(data[2:4], "big") == len(data) - 20
    decoded = decode(data)
    assert decoded == m
    assert encode(decoded) == data


@PROPERTY
@given(m=messages(trailer=False), key=keys, sha256=st.booleans(), sha1=st.booleans())
def test_integrity_and_fingerprint_verify_after_a_round_trip(
    m: Message, key: bytes, sha256: bool, sha1: bool
) -> None:
    """RFC 8489 §14.5-§14.7: MACs and FINGERPRINT computed by encode verify after decode."""
    data = encode(
        m, integrity_key=key, integrity_sha256=sha256, integrity_sha1=sha1, fingerprint=True
    )
    decoded = decode(data)
    assert decoded.attributes[: len(m.attributes)] == m.attributes
    assert verify_fingerprint(decoded)
    assert verify_integrity(decoded, key) is sha1
    assert verify_integrity_sha256(decoded, key) is sha256
    # (Not key + b"\0": HMAC zero-pads short keys, so those two are the same key.)
    wrong = bytes([key[0] ^ 1]) + key[1:]
    assert not verify_integrity(decoded, wrong)
    assert not verify_integrity_sha256(decoded, wrong)
    trailer = [type(x) for x in decoded.attributes[len(m.attributes) :]]
    expected = [MessageIntegrity] * sha1 + [MessageIntegritySha256] * sha256 + [Fingerprint]
    assert trailer == expected


@PROPERTY
@given(m=messages(trailer=False), key=keys, index=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_a_single_flipped_bit_never_verifies(m: Message, key: bytes, index: int, bit: int) -> None:
    """RFC 8489 §14.5-§14.7: any change to a protected message breaks MAC and FINGERPRINT."""
    data = bytearray(encode(m, integrity_key=key, integrity_sha256=True, fingerprint=True))
    data[index % len(data)] ^= 1 << bit
    decoded = _decode_or_decode_error(bytes(data))
    if decoded is None:
        return
    assert not verify_fingerprint(decoded)
    if index % len(data) < len(data) - 8 - 36:  # before MESSAGE-INTEGRITY-SHA256
        assert not verify_integrity_sha256(decoded, key)


# -- the fuzz invariant ------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b"")
@example(data=bytes(20))
@example(data=VECTOR_BYTES[0][:21])
def test_decode_of_any_bytes_returns_a_message_or_raises_decode_error(data: bytes) -> None:
    """RFC 8489 §6.3: malformed input is a DecodeError, never another exception."""
    _check_decoded(data)


@FUZZ
@given(data=stun_shaped_bytes())
def test_decode_of_random_attribute_values_returns_a_message_or_raises_decode_error(
    data: bytes,
) -> None:
    """RFC 8489 §14: every attribute decoder turns bad values into DecodeError."""
    _check_decoded(data)


@FUZZ
@given(data=mutated_encodings)
def test_decode_of_mutated_valid_messages_returns_a_message_or_raises_decode_error(
    data: bytes,
) -> None:
    """Flipped bytes, truncations, insertions and rewritten lengths of valid encodings."""
    _check_decoded(data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=80), st.binary(max_size=80).map(lambda b: b"\x40" + b)))
def test_decode_channel_data_of_any_bytes_returns_a_frame_or_raises_decode_error(
    data: bytes,
) -> None:
    """RFC 8656 §12.5: a malformed ChannelData datagram is a DecodeError."""
    _check_channel_data(data)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(st.one_of(mutated_encodings, st.binary(max_size=12)), max_size=4).map(b"".join),
    ),
    cuts=st.lists(st.integers(0, 300), max_size=8),
)
def test_the_stream_framer_of_any_bytes_yields_frames_or_raises_decode_error(
    data: bytes, cuts: list[int]
) -> None:
    """RFC 8656 §12.5: a stream either frames or is unrecoverable (DecodeError)."""
    _check_framer(data, [c for c in cuts if c <= len(data)])
