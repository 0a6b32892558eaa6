"""MESSAGE-INTEGRITY(-SHA256), FINGERPRINT and long-term credential keys.

RFC 8489 §14.5, §14.6, §14.7 and §9.2.2. Verification hashes the message exactly as
received (`Message.raw`), with the header's length field adjusted to end at the
attribute being checked, so attributes that follow it are left out.
"""

from __future__ import annotations

import hashlib
import hmac
import stringprep
import unicodedata
import zlib
from typing import TYPE_CHECKING, Protocol

from pyturn.wire.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256

if TYPE_CHECKING:
    from pyturn.wire.message import Message

FINGERPRINT_XOR = 0x5354554E


# An HMAC keyed once and copied for each message skips the key set-up (and, with
# OpenSSL 3, the algorithm lookup) that a one-shot HMAC repeats every time. The keys are
# few: the nonce secret and one long-term key per user.
class _MacState(Protocol):
    def copy(self) -> _MacState: ...

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


_templates: dict[tuple[bytes, str], _MacState] = {}
_TEMPLATES = 1024


def forget_templates() -> None:
    """Empty the cache of keyed MAC states (one per key: REST users have one each)."""
    _templates.clear()


def _new_template(key: bytes, algorithm: str) -> _MacState:
    try:
        from _hashlib import hmac_new  # noqa: PLC0415 (absent without OpenSSL)
    except ImportError:
        return hmac.new(key, digestmod=algorithm)
    return hmac_new(key, digestmod=algorithm)


def _hmac(key: bytes, data: bytes, algorithm: str) -> bytes:
    template = _templates.get((key, algorithm))
    if template is None:
        template = _new_template(key, algorithm)
        if len(_templates) >= _TEMPLATES:
            _templates.clear()
        _templates[key, algorithm] = template
    state = template.copy()
    state.update(data)
    return state.digest()


def hmac_sha1(key: bytes, data: bytes) -> bytes:
    return _hmac(key, data, "sha1")


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return _hmac(key, data, "sha256")


def crc(data: bytes) -> int:
    """RFC 8489 §14.7: CRC-32 of the message XOR 0x5354554E."""
    return zlib.crc32(data) ^ FINGERPRINT_XOR


def _adjusted_prefix(raw: bytes, attr_offset: int, attr_size: int) -> bytes:
    """The bytes an integrity attribute at `attr_offset` covers, with the length fixed."""
    length = attr_offset - 20 + attr_size
    return raw[:2] + length.to_bytes(2, "big") + raw[4:attr_offset]


def verify_integrity(message: Message, key: bytes) -> bool:
    """True when MESSAGE-INTEGRITY is present and matches the HMAC-SHA1 under `key`."""
    offset = message.integrity_offset
    if offset is None:
        return False
    raw = message.raw
    expected = hmac_sha1(key, _adjusted_prefix(raw, offset, 24))
    return hmac.compare_digest(expected, raw[offset + 4 : offset + 24])


def verify_integrity_sha256(message: Message, key: bytes) -> bool:
    """True when MESSAGE-INTEGRITY-SHA256 is present and matches (truncation allowed)."""
    offset = message.integrity_sha256_offset
    if offset is None:
        return False
    raw = message.raw
    size = int.from_bytes(raw[offset + 2 : offset + 4], "big")
    expected = hmac_sha256(key, _adjusted_prefix(raw, offset, 4 + size))[:size]
    return hmac.compare_digest(expected, raw[offset + 4 : offset + 4 + size])


def verify_fingerprint(message: Message) -> bool:
    offset = message.fingerprint_offset
    if offset is None:
        return False
    raw = message.raw
    return crc(_adjusted_prefix(raw, offset, 8)) == int.from_bytes(
        raw[offset + 4 : offset + 8], "big"
    )


# -- string preparation ------------------------------------------------------------------


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep (for queries: unassigned code points are let through).

    RFC 5389 prepared passwords this way and the RFC 5769 long-term vector depends on it:
    its password "The<SOFT HYPHEN>M<FEMININE ORDINAL>tr<ROMAN NINE>" becomes "TheMatrIX".
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for ch in normalized:
        if any(check(ch) for check in prohibited):
            raise ValueError(f"SASLprep prohibits U+{ord(ch):04X}")
    # RFC 3454 §6: right-to-left strings may not mix in left-to-right characters and
    # must start and end with a right-to-left character.
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            raise ValueError("SASLprep: mixed bidirectional text")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end RTL")
    return normalized


def opaque_string(text: str) -> str:
    """RFC 8265 §4.2 OpaqueString, as RFC 8489 asks for realms and passwords.

    Non-ASCII spaces map to U+0020, the result is NFC; control, format, surrogate and
    unassigned code points are refused (the FreeformClass disallowed set, approximated
    by Unicode general category).
    """
    mapped = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in text)
    normalized = unicodedata.normalize("NFC", mapped)
    if not normalized:
        raise ValueError("OpaqueString: empty")
    for ch in normalized:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Cn"):
            raise ValueError(f"OpaqueString disallows U+{ord(ch):04X}")
    return normalized


def long_term_key(
    username: str, realm: str, password: str, algorithm: int = PASSWORD_ALGORITHM_MD5
) -> bytes:
    """RFC 8489 §9.2.2: the long-term credential key.

    MD5 keys prepare the password with SASLprep, as RFC 5389 did and as every deployed
    client (and the RFC 5769 vector) computes it; SHA-256 keys exist only in RFC 8489, so
    they use its OpaqueString profile for realm and password.
    """
    if algorithm == PASSWORD_ALGORITHM_MD5:
        material = f"{username}:{realm}:{saslprep(password)}"
        return hashlib.md5(material.encode("utf-8"), usedforsecurity=False).digest()
    if algorithm == PASSWORD_ALGORITHM_SHA256:
        material = f"{username}:{opaque_string(realm)}:{opaque_string(password)}"
        return hashlib.sha256(material.encode("utf-8")).digest()
    raise ValueError(f"unsupported password algorithm {algorithm}")


def userhash(username: str, realm: str) -> bytes:
    """RFC 8489 §14.4: SHA-256(OpaqueString(username) ":" OpaqueString(realm))."""
    material = f"{opaque_string(username)}:{opaque_string(realm)}"
    return hashlib.sha256(material.encode("utf-8")).digest()
