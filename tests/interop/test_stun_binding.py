"""STUN Binding (RFC 8489) against the real server, checked by decoders we did not write.

coturn's turnutils_stunclient covers UDP. It has no TCP mode, so the other checks build
and parse messages with aioice's STUN code (`aioice.stun.Message`,
`aioice.stun.parse_message`, which also verifies FINGERPRINT).
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess

import pytest
from aioice import stun

from tests.interop.server_process import LOOPBACK, ServerProcess, require_tool

pytestmark = pytest.mark.interop

IO_TIMEOUT = 5.0
HEADER = 20
XOR_MAPPED_ADDRESS_IPV4 = 4 + 8  # attribute header + family, port, IPv4 address
FINGERPRINT = 4 + 4


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(size):  # each recv returns at least one byte or raises
        if len(data) == size:
            break
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection mid-message")
        data += chunk
    assert len(data) == size
    return data


def binding_over(
    transport: str, server: ServerProcess, request: stun.Message
) -> tuple[bytes, tuple[str, int]]:
    """Send one Binding request; return the raw reply and our own socket address."""
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.bind((LOOPBACK, 0))
            sock.sendto(bytes(request), server.udp_address)
            reply, source = sock.recvfrom(2048)
            assert source == server.udp_address
            return reply, sock.getsockname()
    with socket.create_connection(server.tcp_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(bytes(request))
        header = _recv_exactly(sock, HEADER)
        (length,) = struct.unpack("!H", header[2:4])
        return header + _recv_exactly(sock, length), sock.getsockname()


def test_turnutils_stunclient_reports_its_loopback_address_as_udp_reflexive_address(
    turn_server: ServerProcess,
) -> None:
    """RFC 8489 §14.2: XOR-MAPPED-ADDRESS is the request's source, as coturn decodes it.

    The tool picks its own port and does not print it, so only the address and the
    consistency of the port across its report lines are checked.
    """
    tool = require_tool("turnutils_stunclient")
    result = subprocess.run(
        [tool, "-p", str(turn_server.udp_port), LOOPBACK],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = re.findall(r"UDP reflexive addr: ([0-9.]+):(\d+)", output)
    assert found, output
    # The tool prints the address once per report line; every report must agree.
    assert {host for host, _ in found} == {LOOPBACK}, output
    assert len({port for _, port in found}) == 1, output
    assert 1024 <= int(found[0][1]) <= 65535, output


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_binding_reply_maps_the_clients_socket_address(
    turn_server: ServerProcess, transport: str
) -> None:
    """RFC 8489 §14.2: the success response carries the client's transport address.

    Over TCP the source is the connection's local address (RFC 8489 §6.2.2 framing).
    """
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    raw, local = binding_over(transport, turn_server, request)
    reply = stun.parse_message(raw)
    assert reply.message_method == stun.Method.BINDING
    assert reply.message_class == stun.Class.RESPONSE
    assert reply.transaction_id == request.transaction_id
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == local


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("with_fingerprint", [True, False], ids=["fingerprint", "plain"])
def test_binding_reply_has_fingerprint_only_when_the_request_had_one_and_nothing_extra(
    turn_server: ServerProcess, transport: str, with_fingerprint: bool
) -> None:
    """RFC 8489 §7 and §14.7: answer FINGERPRINT with FINGERPRINT, else leave it out.

    The reply is no larger than the header, an IPv4 XOR-MAPPED-ADDRESS and, when asked
    for, FINGERPRINT (no SOFTWARE by default). aioice's parser checks the CRC.
    """
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    if with_fingerprint:
        request.add_fingerprint()
    raw, local = binding_over(transport, turn_server, request)
    reply = stun.parse_message(raw)  # raises ValueError on a wrong FINGERPRINT
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == local
    assert ("FINGERPRINT" in reply.attributes) is with_fingerprint
    if with_fingerprint:
        # The CRC covers everything before it, so it must be the last attribute.
        assert list(reply.attributes)[-1] == "FINGERPRINT"
    limit = HEADER + XOR_MAPPED_ADDRESS_IPV4 + (FINGERPRINT if with_fingerprint else 0)
    assert len(raw) <= limit, f"{len(raw)}-byte reply: {reply}"


def with_raw_attribute(request: stun.Message, attr_type: int, value: bytes) -> bytes:
    """`request` encoded by aioice plus one attribute aioice cannot name, length fixed."""
    raw = bytes(request) + struct.pack("!HH", attr_type, len(value)) + value
    raw += bytes(-len(value) % 4)
    return raw[:2] + struct.pack("!H", len(raw) - HEADER) + raw[4:]


def raw_attributes(raw: bytes) -> dict[int, bytes]:
    """Every attribute of an encoded STUN message by type, including unknown ones."""
    found: dict[int, bytes] = {}
    pos = HEADER
    for _ in range(len(raw) // 4):  # at most one attribute per 4 bytes
        if pos + 4 > len(raw):
            break
        attr_type, length = struct.unpack("!HH", raw[pos : pos + 4])
        found[attr_type] = raw[pos + 4 : pos + 4 + length]
        pos += 4 + length + (-length % 4)
    return found


def udp_exchange(server: ServerProcess, raw: bytes, wait: float = IO_TIMEOUT) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.bind((LOOPBACK, 0))
        sock.sendto(raw, server.udp_address)
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def test_binding_with_an_unknown_comprehension_required_attribute_gets_420(
    turn_server: ServerProcess,
) -> None:
    """RFC 8489 §6.3.1: unknown comprehension-required attributes (type < 0x8000) get
    420 Unknown Attribute with UNKNOWN-ATTRIBUTES (0x000A) listing them."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    raw = udp_exchange(turn_server, with_raw_attribute(request, 0x0777, b"abcd"))
    assert raw is not None
    reply = stun.parse_message(raw)
    assert reply.message_class == stun.Class.ERROR
    assert reply.transaction_id == request.transaction_id
    assert reply.error_code == 420
    assert raw_attributes(raw)[0x000A] == struct.pack("!H", 0x0777)


def test_binding_ignores_an_unknown_comprehension_optional_attribute(
    turn_server: ServerProcess,
) -> None:
    """RFC 8489 §6.3.1 and §15: unknown attributes >= 0x8000 are ignored: plain success."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    raw = udp_exchange(turn_server, with_raw_attribute(request, 0x8777, b"abcd"))
    assert raw is not None
    reply = stun.parse_message(raw)
    assert reply.message_class == stun.Class.RESPONSE
    assert "XOR-MAPPED-ADDRESS" in reply.attributes


def test_binding_with_a_wrong_fingerprint_is_silently_discarded(
    turn_server: ServerProcess,
) -> None:
    """RFC 8489 §6.3 and §7: a message whose FINGERPRINT is wrong is silently discarded."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.add_fingerprint()
    raw = bytearray(bytes(request))
    raw[-1] ^= 0x01
    assert udp_exchange(turn_server, bytes(raw), wait=0.5) is None
    # The same request with its FINGERPRINT intact is answered.
    assert udp_exchange(turn_server, bytes(request)) is not None


def test_tcp_binding_requests_pipelined_or_split_byte_by_byte_are_all_answered(
    turn_server: ServerProcess,
) -> None:
    """RFC 8489 §6.2.2: over TCP, STUN messages are delimited by their length field
    alone, whatever the segmentation: two requests in one write get two replies, and a
    request sent one byte per write gets one."""
    first = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    second = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    third = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    with socket.create_connection(turn_server.tcp_address, timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = sock.getsockname()
        sock.sendall(bytes(first) + bytes(second))
        for byte in bytes(third):
            sock.sendall(bytes([byte]))
        replies = []
        for _ in range(3):
            header = _recv_exactly(sock, HEADER)
            (length,) = struct.unpack("!H", header[2:4])
            replies.append(stun.parse_message(header + _recv_exactly(sock, length)))
    assert [r.transaction_id for r in replies] == [m.transaction_id for m in (first, second, third)]
    assert {r.attributes["XOR-MAPPED-ADDRESS"] for r in replies} == {local}
