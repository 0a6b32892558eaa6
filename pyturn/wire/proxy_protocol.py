"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a load balancer puts
before a forwarded TCP connection's own bytes, naming the client it came from.

Sans-IO: `parse_proxy_header` takes the bytes read so far and says how many the header
took and what it names, or that more are needed. It never looks past the header, so the
bytes after it (TURN frames, or a TLS ClientHello) stay for whoever reads on.

- Version 1 is one text line: `PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n` (TCP6 for
  IPv6), or `PROXY UNKNOWN ...\\r\\n`; at most 107 bytes.
- Version 2 is binary: a 12-byte signature, version/command, family/protocol, a 16-bit
  length, the addresses, then TLVs (skipped here).

A LOCAL command (the proxy's own health check) and UNKNOWN or UNSPEC addresses name no
client: the connection's own address stands.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyturn.wire.attributes import Address

V1_PREFIX = b"PROXY "
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# TLVs (HAProxy's unique-id, TLS details) are allowed, but a header stays small.
V2_MAX = V2_FIXED + 2048
# Bytes that tell the version apart: enough of either prefix to know it is one.
_SNIFF = min(len(V1_PREFIX), len(V2_SIGNATURE))

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_STREAM = 0x1
_V2_ADDRESS_SIZES = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this server accepts."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    # How many bytes the header took: what follows is the client's.
    length: int
    version: int
    # The client and the address it connected to; None when the header names none.
    source: Address | None = None
    destination: Address | None = None


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of `data`, or None when more bytes are needed to tell.

    Raises ProxyHeaderError when `data` does not start with a valid header."""
    head = bytes(data[:_SNIFF])
    if V2_SIGNATURE.startswith(head) and len(head) > 0:
        return _parse_v2(data)
    if V1_PREFIX.startswith(head) and len(head) > 0:
        return _parse_v1(data)
    if not data:
        return None
    raise ProxyHeaderError("no PROXY header")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = bytes(data[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if not bytes(data).startswith(V1_PREFIX[: len(data)]):
            raise ProxyHeaderError("no PROXY header")
        return None
    try:
        line = bytes(data[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = line.split(" ")
    length = end + 2
    if fields[0] != "PROXY" or len(fields) < 2:
        raise ProxyHeaderError("no PROXY header")
    if fields[1] == "UNKNOWN":
        return ProxyHeader(length, 1)
    if fields[1] not in ("TCP4", "TCP6") or len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1: bad protocol or field count in {line[:60]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    source_ip = _v1_ip(fields[2], version)
    destination_ip = _v1_ip(fields[3], version)
    return ProxyHeader(
        length,
        1,
        (source_ip, _v1_port(fields[4])),
        (destination_ip, _v1_port(fields[5])),
    )


def _v1_ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: not an IP address: {text[:45]!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not IPv{version}")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or (text[0] == "0" and text != "0"):
        raise ProxyHeaderError(f"PROXY v1: not a port: {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1: port out of range: {port}")
    return port


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        if not V2_SIGNATURE.startswith(bytes(data[: len(V2_SIGNATURE)])):
            raise ProxyHeaderError("no PROXY header")
        return None
    if bytes(data[:12]) != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY header")
    version_command, family_protocol = data[12], data[13]
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: unknown version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"PROXY v2: unknown command {command}")
    size = int.from_bytes(data[14:16], "big")
    length = V2_FIXED + size
    if length > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (at most {V2_MAX})")
    if len(data) < length:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(length, 2)
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if family not in (_V2_UNSPEC, *_V2_ADDRESS_SIZES):
        raise ProxyHeaderError(f"PROXY v2: unknown address family {family}")
    if family in _V2_ADDRESS_SIZES and size < _V2_ADDRESS_SIZES[family]:
        raise ProxyHeaderError("PROXY v2: addresses cut short")
    if family in (_V2_UNSPEC, _V2_UNIX):
        return ProxyHeader(length, 2)
    if protocol != _V2_STREAM:
        raise ProxyHeaderError("PROXY v2: not a stream connection")
    body = bytes(data[V2_FIXED:length])
    width = 4 if family == _V2_INET else 16
    source_ip = str(ipaddress.ip_address(body[:width]))
    destination_ip = str(ipaddress.ip_address(body[width : 2 * width]))
    ports = body[2 * width : 2 * width + 4]
    return ProxyHeader(
        length,
        2,
        (source_ip, int.from_bytes(ports[:2], "big")),
        (destination_ip, int.from_bytes(ports[2:], "big")),
    )


def encode_v1(source: Address, destination: Address) -> bytes:
    """A version 1 header (for tests and tools)."""
    version = "TCP6" if ":" in source[0] else "TCP4"
    return (
        f"PROXY {version} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def encode_v2(source: Address | None, destination: Address | None, tlvs: bytes = b"") -> bytes:
    """A version 2 header: PROXY with the addresses, or LOCAL when `source` is None."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    six = ":" in source[0]
    body = (
        ipaddress.ip_address(source[0]).packed
        + ipaddress.ip_address(destination[0]).packed
        + source[1].to_bytes(2, "big")
        + destination[1].to_bytes(2, "big")
        + tlvs
    )
    family = (_V2_INET6 if six else _V2_INET) << 4 | _V2_STREAM
    return V2_SIGNATURE + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body
