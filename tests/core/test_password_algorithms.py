"""RFC 8489 §9.2: PASSWORD-ALGORITHMS negotiation, SHA-256 keys and USERHASH."""

from __future__ import annotations

from pyturn.config import parse_config
from pyturn.core.auth import NONCE_COOKIE
from pyturn.core.server import Action, Reply, TurnServer
from pyturn.wire.attributes import (
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attribute,
    ErrorCode,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedTransport,
    UserHash,
    Username,
    XorRelayedAddress,
)
from pyturn.wire.integrity import long_term_key, userhash, verify_integrity, verify_integrity_sha256
from pyturn.wire.message import Message, MessageClass, Method, build, decode, encode
from pyturn.wire.message import new_transaction_id as txid
from tests.core.turn_client import FakeBinder

REALM = "example.org"
NOW = 1_800_000_000.0
CLIENT = ("udp", ("203.0.113.5", 4000), ("192.0.2.1", 3478))
OFFERED = ((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b""))


def _server() -> TurnServer:
    config = parse_config(
        {
            "realm": REALM,
            "auth": {"users": {"alice": "pw", "keyed": {"key": "00" * 16}}},
            "relay": {"min_port": 50000, "max_port": 50010},
        }
    )
    return TurnServer(config, FakeBinder(), relay_ipv4="192.0.2.1")


def _reply(actions: list[Action]) -> Message:
    return decode(next(a for a in actions if isinstance(a, Reply)).data)


def _nonce(server: TurnServer) -> Message:
    request = build(Method.ALLOCATE, MessageClass.REQUEST, txid(), [RequestedTransport(17)])
    return _reply(server.receive(encode(request), CLIENT, NOW))


def _allocate(server: TurnServer, attrs: list[Attribute], key: bytes, sha256: bool) -> Message:
    nonce = _nonce(server).get(Nonce)
    assert nonce is not None
    request = build(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        txid(),
        [RequestedTransport(17), Realm(REALM), Nonce(nonce.value), *attrs],
    )
    data = encode(request, integrity_key=key, integrity_sha256=sha256, integrity_sha1=not sha256)
    return _reply(server.receive(data, CLIENT, NOW + 1))


def test_a_401_offers_md5_and_sha256_and_its_nonce_carries_the_feature_cookie() -> None:
    """RFC 8489 §9.2.1: the nonce cookie announces password algorithms and USERHASH."""
    reply = _nonce(_server())
    nonce = reply.get(Nonce)
    assert nonce is not None and nonce.value.startswith("obMatJos2")
    assert nonce.value.startswith(NONCE_COOKIE)
    offered = reply.get(PasswordAlgorithms)
    assert offered is not None and offered.algorithms == OFFERED


def test_a_client_choosing_sha256_keys_is_authenticated_and_answered_with_sha256() -> None:
    key = long_term_key("alice", REALM, "pw", PASSWORD_ALGORITHM_SHA256)
    attrs: list[Attribute] = [
        Username("alice"),
        PasswordAlgorithms(OFFERED),
        PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
    ]
    reply = _allocate(_server(), attrs, key, sha256=True)
    assert reply.msg_class == MessageClass.SUCCESS
    assert reply.get(XorRelayedAddress) is not None
    assert verify_integrity_sha256(reply, key)


def test_userhash_stands_in_for_the_username() -> None:
    """RFC 8489 §14.4: USERHASH = SHA-256(username ":" realm)."""
    key = long_term_key("alice", REALM, "pw")
    reply = _allocate(_server(), [UserHash(userhash("alice", REALM))], key, sha256=False)
    assert reply.msg_class == MessageClass.SUCCESS
    assert verify_integrity(reply, key)


def test_a_legacy_sha1_client_without_algorithm_attributes_still_uses_md5_keys() -> None:
    key = long_term_key("alice", REALM, "pw")
    reply = _allocate(_server(), [Username("alice")], key, sha256=False)
    assert reply.msg_class == MessageClass.SUCCESS


def test_an_algorithm_list_that_differs_from_the_offer_is_a_bad_request() -> None:
    """RFC 8489 §9.2.4: a changed PASSWORD-ALGORITHMS list means a downgrade attempt."""
    key = long_term_key("alice", REALM, "pw")
    attrs: list[Attribute] = [
        Username("alice"),
        PasswordAlgorithms(((PASSWORD_ALGORITHM_MD5, b""),)),
        PasswordAlgorithm(PASSWORD_ALGORITHM_MD5),
    ]
    error = _allocate(_server(), attrs, key, sha256=False).get(ErrorCode)
    assert error is not None and error.code == 400


def test_a_user_with_only_a_precomputed_md5_key_cannot_use_sha256() -> None:
    key = long_term_key("keyed", REALM, "whatever", PASSWORD_ALGORITHM_SHA256)
    attrs: list[Attribute] = [
        Username("keyed"),
        PasswordAlgorithms(OFFERED),
        PasswordAlgorithm(PASSWORD_ALGORITHM_SHA256),
    ]
    error = _allocate(_server(), attrs, key, sha256=True).get(ErrorCode)
    assert error is not None and error.code == 401


def test_an_unknown_userhash_is_unauthorized() -> None:
    key = long_term_key("mallory", REALM, "pw")
    error = _allocate(_server(), [UserHash(userhash("mallory", REALM))], key, False).get(ErrorCode)
    assert error is not None and error.code == 401
