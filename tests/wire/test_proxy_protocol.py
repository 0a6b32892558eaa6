"""The PROXY protocol header, versions 1 and 2: HAProxy's examples, limits, properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyturn.wire.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

REST = b"\x00\x01\x00\x00\x21\x12\xa4\x42"  # what the client sent after the header


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
            ProxyHeader(45, 1, ("192.0.2.7", 56324), ("198.51.100.1", 443)),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 3478\r\n",
            ProxyHeader(47, 1, ("2001:db8::7", 65535), ("2001:db8::1", 3478)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(15, 1)),
        (b"PROXY UNKNOWN ffff:f...f:ffff 1 2 3\r\n", ProxyHeader(37, 1)),
        (
            encode_v2(("192.0.2.7", 56324), ("198.51.100.1", 443)),
            ProxyHeader(28, 2, ("192.0.2.7", 56324), ("198.51.100.1", 443)),
        ),
        (
            encode_v2(("2001:db8::7", 1), ("2001:db8::1", 2), tlvs=b"\x05\x00\x02id"),
            ProxyHeader(57, 2, ("2001:db8::7", 1), ("2001:db8::1", 2)),
        ),
        (encode_v2(None, None), ProxyHeader(16, 2)),  # LOCAL: the proxy's health check
        # UNSPEC family with PROXY: no addresses, the connection's own stand.
        (V2_SIGNATURE + b"\x21\x00\x00\x00", ProxyHeader(16, 2)),
    ],
)
def test_headers_name_the_client_and_end_where_its_bytes_begin(
    header: bytes, expected: ProxyHeader
) -> None:
    assert parse_proxy_header(header + REST) == expected
    assert expected.length == len(header)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no PROXY header"),
        (REST, "no PROXY header"),
        (b"\x16\x03\x01\x02\x00\x01", "no PROXY header"),  # TLS without the header
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "field count"),
        (b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n", "bad protocol"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n", "is not IPv4"),
        (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "port out of range"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 007 2\r\n", "not a port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n", "not a port"),
        (b"PROXY " + b"A" * 120, "longer than 107"),
        (b"PROXY TCP4 \xff\r\n", "not ASCII"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "unknown version 3"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family 4"),
        (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "cut short"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "not a stream"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", "no PROXY header"),
    ],
)
def test_anything_else_is_refused_with_a_reason(data: bytes, problem: str) -> None:
    with pytest.raises(ProxyHeaderError, match=problem):
        parse_proxy_header(data)


addresses4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
addresses6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
pairs = st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6))


@given(pairs, st.booleans(), st.binary(max_size=64))
def test_a_header_parses_back_to_its_addresses_whatever_follows(
    pair: tuple[tuple[str, int], tuple[str, int]], v2: bool, rest: bytes
) -> None:
    source, destination = pair
    header = encode_v2(source, destination) if v2 else encode_v1(source, destination)
    parsed = parse_proxy_header(header + rest)
    assert parsed == ProxyHeader(len(header), 2 if v2 else 1, source, destination)


@given(pairs, st.booleans(), st.data())
def test_every_cut_short_header_asks_for_more(
    pair: tuple[tuple[str, int], tuple[str, int]], v2: bool, data: st.DataObject
) -> None:
    header = encode_v2(*pair) if v2 else encode_v1(*pair)
    cut = data.draw(st.integers(0, len(header) - 1))
    assert parse_proxy_header(header[:cut]) is None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_please_or_a_refusal(data: bytes) -> None:
    try:
        parsed = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert parsed is None or 0 < parsed.length <= len(data)
