"""Atheris (libFuzzer) target for the STUN/TURN codec in pyturn.wire.

The invariant, for any input bytes:

* `decode` returns a `Message` or raises `DecodeError`; a decoded message can be
  verified (MESSAGE-INTEGRITY, -SHA256, FINGERPRINT) without raising, re-encodes, and
  the re-encoding decodes to an equal message;
* `decode_channel_data` returns (channel, data) or raises `DecodeError`;
* `StreamFramer` fed the input in two chunks yields frames or raises `DecodeError`;
* `parse_proxy_header` returns None (more bytes needed), a header no longer than the
  input, or raises `ProxyHeaderError`.

`DecodeError` is the codec saying "malformed" and is fine; any other exception
propagates and libFuzzer reports it as a crash, saving the input as crash-<sha1>.

    pip install atheris
    python fuzz/fuzz_wire.py -max_total_time=60 [CORPUS_DIR ...]

See fuzz/README.md for seeding a corpus from the RFC 5769 vectors.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as `python fuzz/fuzz_wire.py` puts fuzz/ first on sys.path, not the project root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from pyturn.wire.channel_data import StreamFramer, decode_channel_data
        from pyturn.wire.errors import DecodeError
        from pyturn.wire.integrity import (
            verify_fingerprint,
            verify_integrity,
            verify_integrity_sha256,
        )
        from pyturn.wire.message import decode, encode
        from pyturn.wire.proxy_protocol import ProxyHeaderError, parse_proxy_header
else:
    from pyturn.wire.channel_data import StreamFramer, decode_channel_data
    from pyturn.wire.errors import DecodeError
    from pyturn.wire.integrity import (
        verify_fingerprint,
        verify_integrity,
        verify_integrity_sha256,
    )
    from pyturn.wire.message import decode, encode
    from pyturn.wire.proxy_protocol import ProxyHeaderError, parse_proxy_header

KEY = b"fuzz-key"


class InvariantBroken(AssertionError):
    """The codec accepted input but then misbehaved on what it produced."""


def _check_message(data: bytes) -> None:
    try:
        message = decode(data)
    except DecodeError:
        return
    verify_integrity(message, KEY)
    verify_integrity_sha256(message, KEY)
    verify_fingerprint(message)
    message.unknown_comprehension_required()
    again = encode(message)
    if decode(again) != message:
        raise InvariantBroken(f"re-encoding changed the message: {data.hex()}")


def _check_channel_data(data: bytes) -> None:
    try:
        channel, payload = decode_channel_data(data)
    except DecodeError:
        return
    if not 0x4000 <= channel <= 0x7FFF or payload != data[4 : 4 + len(payload)]:
        raise InvariantBroken(f"bad ChannelData split: {data.hex()}")


def _check_framer(data: bytes) -> None:
    # The first byte picks where to cut the rest, so libFuzzer explores chunkings too.
    cut = data[0] % (len(data) + 1) if data else 0
    framer = StreamFramer()
    try:
        for chunk in (data[:cut], data[cut:]):
            framer.feed(chunk)
            for frame in framer.frames():
                if not frame or frame[0] >= 0x80:
                    raise InvariantBroken(f"framer yielded a bad frame: {data.hex()}")
    except DecodeError:
        return


def _check_proxy_header(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if header is not None and not 0 < header.length <= len(data):
        raise InvariantBroken(f"PROXY header length outside the input: {data.hex()}")


def TestOneInput(data: bytes) -> None:
    _check_message(data)
    _check_channel_data(data)
    _check_framer(data)
    _check_proxy_header(data)


def main() -> None:
    if atheris is None:
        print(
            "fuzz_wire.py needs atheris (libFuzzer for Python): pip install atheris",
            file=sys.stderr,
        )
        sys.exit(2)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
