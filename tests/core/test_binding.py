"""Binding requests: the plain STUN service a TURN server also offers (RFC 8489 §3, §6)."""

from __future__ import annotations

from pyturn.core.server import RequestHandled, TurnServer
from pyturn.wire import integrity
from pyturn.wire.attributes import Fingerprint, XorMappedAddress
from pyturn.wire.message import Method
from tests.core.turn_client import CLIENT, OTHER_CLIENT, MakeServer, TurnTestClient


def test_binding_request_gets_the_client_address_in_xor_mapped_address(
    client: TurnTestClient,
) -> None:
    """RFC 8489 §7.3.1: the success response carries XOR-MAPPED-ADDRESS of the source."""
    result = client.binding()
    assert result.code == 0
    assert result.need(XorMappedAddress).address == CLIENT


def test_binding_request_needs_no_credentials(server: TurnServer) -> None:
    """RFC 8489 §6 and §9: Binding is served without authentication by a TURN server."""
    other = TurnTestClient(server, "nobody", "nothing", client=OTHER_CLIENT)
    result = other.binding()
    assert result.code == 0
    assert result.need(XorMappedAddress).address == OTHER_CLIENT


def test_binding_reply_has_fingerprint_only_when_the_request_had_one(
    client: TurnTestClient,
) -> None:
    """RFC 8489 §7.3: FINGERPRINT in a response only if the request carried one."""
    plain = client.binding()
    assert not plain.has(Fingerprint)
    with_fp = client.binding(fingerprint=True)
    assert with_fp.has(Fingerprint)
    assert with_fp.message is not None
    assert integrity.verify_fingerprint(with_fp.message)


def test_binding_keeps_no_state(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8489 §6.3.1: a Binding success changes nothing on the server."""
    client.binding()
    client.binding(fingerprint=True)
    assert server.allocations == {}
    assert server.next_deadline() is None


def test_binding_emits_request_handled_with_code_zero(client: TurnTestClient) -> None:
    """RFC 8489 §6.3.1: one success response, reported as RequestHandled(code=0)."""
    result = client.binding()
    assert result.events == [RequestHandled(Method.BINDING, 0, CLIENT)]


def test_secure_stun_answers_binding_only_with_credentials(make_server: MakeServer) -> None:
    """coturn's secure-stun, as auth.secure_stun."""
    server = make_server({"auth": {"secure_stun": True}})
    client = TurnTestClient(server)
    assert client.binding().code == 401
    assert client.binding(fingerprint=True).code == 401
    result = client.request(Method.BINDING)
    assert result.code == 0
    assert result.need(XorMappedAddress).address == CLIENT
    assert (
        TurnTestClient(server, password="wrong", client=OTHER_CLIENT).request(Method.BINDING).code
        == 401
    )


def test_without_secure_stun_binding_needs_no_credentials(server: TurnServer) -> None:
    assert TurnTestClient(server).binding().code == 0
