"""The long-term credential mechanism and TURN REST credentials (RFC 8489 §9.2, RFC 8656 §5).

Nonces are stateless HMACs bound to the client IP and an expiry; REST usernames are
`<unix-expiry>[:<user>]` with password base64(HMAC-SHA1(secret, username)).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import pytest

from pyturn.core.auth import NONCE_COOKIE, AuthFailure, rest_password, rest_username
from pyturn.core.server import AuthFailed, RequestHandled, TurnServer
from pyturn.wire import integrity
from pyturn.wire.attributes import (
    FAMILY_IPV4,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attribute,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    Realm,
    RequestedTransport,
    Username,
    XorRelayedAddress,
)
from pyturn.wire.message import Message, MessageClass, Method, encode, new_transaction_id
from tests.core.turn_client import (
    CLIENT,
    OTHER_CLIENT,
    REALM,
    T0,
    FakeBinder,
    MakeServer,
    TurnTestClient,
)

FUTURE = int(T0) + 3600


def rest_client(
    server: TurnServer,
    name: str,
    secret: str = "s3cret",  # noqa: S107 (the test config's REST secret)
    *,
    client: tuple[str, int] = CLIENT,
) -> TurnTestClient:
    return TurnTestClient(server, name, rest_password(secret, name), client=client)


def auth_failures(result_actions: Sequence[object]) -> list[AuthFailure]:
    return [a.reason for a in result_actions if isinstance(a, AuthFailed)]


# -- the 401 challenge ---------------------------------------------------------------------


def test_allocate_without_message_integrity_gets_401_with_realm_and_nonce(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §9.2.4: no MESSAGE-INTEGRITY -> 401 with REALM and NONCE, itself unsigned."""
    data = client.encode_request(Method.ALLOCATE, [RequestedTransport(17)], auth=False)
    result = client.exchange(data)
    assert result.code == 401
    assert result.need(Realm).value == REALM
    assert result.need(Nonce).value
    assert not result.has(MessageIntegrity)
    assert not result.has(MessageIntegritySha256)
    assert server.allocations == {}
    assert auth_failures(result.actions) == [AuthFailure.NO_CREDENTIALS]
    assert RequestHandled(Method.ALLOCATE, 401, CLIENT) in result.actions


def test_allocate_with_wrong_password_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a MESSAGE-INTEGRITY that does not verify -> 401."""
    wrong = TurnTestClient(server, "alice", "not-alicepw")
    result = wrong.allocate()
    assert result.code == 401
    assert result.has(Realm)
    assert result.has(Nonce)
    assert not result.has(MessageIntegrity)
    assert server.allocations == {}
    assert auth_failures(result.actions) == [AuthFailure.BAD_PASSWORD]


def test_allocate_from_unknown_user_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a USERNAME the server does not know -> 401."""
    mallory = TurnTestClient(server, "mallory", "whatever")
    result = mallory.allocate()
    assert result.code == 401
    assert result.has(Nonce)
    assert server.allocations == {}
    assert auth_failures(result.actions) == [AuthFailure.UNKNOWN_USER]


def test_allocate_with_another_realm_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: the key is bound to the server's realm; another realm fails."""
    other = TurnTestClient(server, "alice", "alicepw", realm="elsewhere.example")
    other.nonce = server.auth.make_nonce(CLIENT[0], T0)
    result = other.exchange(other.encode_request(Method.ALLOCATE, [RequestedTransport(17)]))
    assert result.code == 401
    assert server.allocations == {}


def test_message_altered_after_signing_gets_401(server: TurnServer, client: TurnTestClient) -> None:
    """RFC 8489 §14.5: the HMAC covers the whole message up to MESSAGE-INTEGRITY."""
    client.fetch_nonce()
    data = bytearray(client.encode_request(Method.ALLOCATE, [RequestedTransport(17)]))
    # The USERNAME value starts right after the header and the USERNAME TLV header.
    data[24] ^= 0x20  # "alice" -> "Alice"
    result = client.exchange(bytes(data))
    assert result.code == 401
    assert server.allocations == {}


@pytest.mark.parametrize("missing", [Username, Realm, Nonce])
def test_message_integrity_without_username_realm_or_nonce_gets_400(
    server: TurnServer, client: TurnTestClient, missing: type[Attribute]
) -> None:
    """RFC 8489 §9.2.4: MESSAGE-INTEGRITY but no USERNAME, REALM or NONCE -> 400,
    and the response SHOULD NOT carry USERNAME, NONCE or REALM."""
    client.fetch_nonce()
    assert client.nonce is not None
    present: list[Attribute] = [Username("alice"), Realm(REALM), Nonce(client.nonce)]
    attrs = [a for a in present if type(a) is not missing]
    message = Message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        new_transaction_id(),
        (*attrs, RequestedTransport(17)),
    )
    result = client.exchange(encode(message, integrity_key=client.key))
    assert result.code == 400
    assert not result.has(Username)
    assert not result.has(Realm)
    assert not result.has(Nonce)
    assert server.allocations == {}


# -- nonces --------------------------------------------------------------------------------


def test_forged_nonce_gets_438_with_a_fresh_nonce(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §9.2.4: a NONCE the server did not issue (or no longer accepts) -> 438,
    with REALM and a new NONCE, after which the request succeeds."""
    client.nonce = "deadbeef00-000000000000000000000000"
    data = client.encode_request(Method.ALLOCATE, [RequestedTransport(17)])
    stale = client.exchange(data)
    assert stale.code == 438
    assert stale.need(Realm).value == REALM
    fresh = stale.need(Nonce).value
    assert fresh != client.nonce
    assert not stale.has(MessageIntegrity)
    assert auth_failures(stale.actions) == [AuthFailure.STALE_NONCE]
    assert server.allocations == {}
    client.nonce = fresh
    assert client.allocate().code == 0


def test_nonce_issued_to_another_client_ip_gets_438(server: TurnServer) -> None:
    """RFC 8489 §9.2.2: a nonce is tied to the client's IP address, so a captured one is
    useless from elsewhere."""
    first = TurnTestClient(server, client=CLIENT)
    first.fetch_nonce()
    thief = TurnTestClient(server, client=OTHER_CLIENT)
    thief.nonce = first.nonce
    result = thief.exchange(thief.encode_request(Method.ALLOCATE, [RequestedTransport(17)]))
    assert result.code == 438
    assert result.need(Nonce).value != first.nonce


def test_nonce_expires_after_the_configured_nonce_lifetime(make_server: MakeServer) -> None:
    """RFC 8489 §9.2.2: nonces have a limited lifetime (auth.nonce_lifetime), then 438."""
    server = make_server({"auth": {"nonce_lifetime": 60}})
    client = TurnTestClient(server)
    client.fetch_nonce(now=T0)
    data = client.encode_request(Method.REFRESH)
    assert client.exchange(data, now=T0 + 59).code == 437  # authenticated, no allocation
    data = client.encode_request(Method.REFRESH)
    assert client.exchange(data, now=T0 + 60).code == 438


def test_default_nonce_lifetime_is_600_seconds(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.2 (and the config default): a nonce from T0 is stale at T0 + 600."""
    client.fetch_nonce(now=T0)
    assert client.exchange(client.encode_request(Method.REFRESH), now=T0 + 599).code == 437
    assert client.exchange(client.encode_request(Method.REFRESH), now=T0 + 600).code == 438


def test_nonce_from_a_401_authenticates_later_requests(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.3: the client reuses REALM and NONCE from the 401 on later requests."""
    client.fetch_nonce()
    nonce = client.nonce
    assert client.allocate().code == 0
    assert client.refresh(now=T0 + 10).code == 0
    assert client.nonce == nonce


def test_nonce_without_our_cookie_gets_438(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: a NONCE not in the form we issue -> 438 (here non-ASCII, too)."""
    client.nonce = "1-\u00e9"
    data = client.encode_request(Method.ALLOCATE, [RequestedTransport(17)])
    assert client.exchange(data).code == 438


def test_nonce_with_non_ascii_characters_gets_438_instead_of_raising(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §9.2.4: an unrecognised NONCE earns 438; receive() never raises."""
    client.nonce = NONCE_COOKIE + "1-\u00e9"
    data = client.encode_request(Method.ALLOCATE, [RequestedTransport(17)])
    result = client.exchange(data)
    assert result.code == 438


# -- success -------------------------------------------------------------------------------


def test_success_response_is_signed_with_the_users_key(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: responses to an authenticated request carry MESSAGE-INTEGRITY
    computed with the same key."""
    result = client.allocate()
    assert result.code == 0
    assert result.message is not None
    assert integrity.verify_integrity(result.message, client.key)
    assert not integrity.verify_integrity(
        result.message, integrity.long_term_key("bob", REALM, "bobpw")
    )


def test_error_response_after_authentication_is_signed(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: once a request is authenticated, every response to it, error or
    not, is signed (here a 437 to a Refresh with no allocation)."""
    result = client.refresh()
    assert result.code == 437
    assert result.message is not None
    assert integrity.verify_integrity(result.message, client.key)


def test_message_integrity_sha256_request_gets_sha256_signed_reply(
    client: TurnTestClient,
) -> None:
    """RFC 8489 §9.2.4: a request with MESSAGE-INTEGRITY-SHA256 is answered with it."""
    result = client.allocate(sha256=True)
    assert result.code == 0
    assert result.message is not None
    assert result.has(MessageIntegritySha256)
    assert not result.has(MessageIntegrity)
    assert integrity.verify_integrity_sha256(result.message, client.key)
    refreshed = client.refresh(sha256=True)
    assert refreshed.code == 0
    assert refreshed.message is not None
    assert integrity.verify_integrity_sha256(refreshed.message, client.key)


def test_wrong_password_with_sha256_integrity_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a MESSAGE-INTEGRITY-SHA256 that does not verify -> 401."""
    wrong = TurnTestClient(server, "alice", "nope")
    assert wrong.allocate(sha256=True).code == 401


# -- REST API credentials ------------------------------------------------------------------


def test_rest_credential_with_user_part_is_accepted(server: TurnServer) -> None:
    """TURN REST API: `<expiry>:<user>` with base64(HMAC-SHA1(secret, username))."""
    name = rest_username(FUTURE, "carol")
    assert name == f"{FUTURE}:carol"
    carol = rest_client(server, name)
    result = carol.allocate()
    assert result.code == 0
    assert result.message is not None
    assert integrity.verify_integrity(result.message, carol.key)
    assert server.allocations[carol.five_tuple].username == name
    assert server.allocations[carol.five_tuple].quota_user == "carol"


def test_rest_credential_signed_with_an_older_secret_is_accepted(server: TurnServer) -> None:
    """TURN REST API: every configured secret is tried, so secrets rotate without a flag day."""
    carol = rest_client(server, rest_username(FUTURE, "carol"), "old-secret")
    assert carol.allocate().code == 0


def test_rest_credential_with_an_unknown_secret_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a key from no configured secret does not verify -> 401."""
    carol = rest_client(server, rest_username(FUTURE, "carol"), "not-a-secret")
    result = carol.allocate()
    assert result.code == 401
    assert auth_failures(result.actions) == [AuthFailure.BAD_PASSWORD]


def test_bare_expiry_rest_username_is_accepted(server: TurnServer) -> None:
    """TURN REST API: the username may be just the expiry timestamp."""
    name = rest_username(FUTURE)
    assert name == str(FUTURE)
    anon = rest_client(server, name)
    assert anon.allocate().code == 0
    assert server.allocations[anon.five_tuple].quota_user == name


def test_expired_rest_credential_gets_401(server: TurnServer) -> None:
    """TURN REST API: a username whose timestamp has passed is refused with 401."""
    carol = rest_client(server, rest_username(int(T0) - 1, "carol"))
    result = carol.allocate()
    assert result.code == 401
    assert result.has(Nonce)
    assert server.allocations == {}
    assert auth_failures(result.actions) == [AuthFailure.EXPIRED_REST_CREDENTIAL]


def test_rest_credential_expires_at_its_timestamp(server: TurnServer) -> None:
    """TURN REST API: valid strictly before the timestamp, refused from it on."""
    name = rest_username(int(T0) + 100, "carol")
    carol = rest_client(server, name)
    assert carol.allocate(now=T0 + 99).code == 0
    late = rest_client(server, name, client=OTHER_CLIENT)
    assert late.allocate(now=T0 + 100).code == 401


def test_static_and_rest_users_work_side_by_side(server: TurnServer) -> None:
    """RFC 8656 §7.2 step 1: any long-term credential the server knows is accepted."""
    alice = TurnTestClient(server, client=CLIENT)
    carol = rest_client(server, rest_username(FUTURE, "carol"), client=OTHER_CLIENT)
    assert alice.allocate().code == 0
    assert carol.allocate().code == 0
    assert len(server.allocations) == 2


def test_non_rest_unknown_username_is_unknown_user_even_with_secrets(server: TurnServer) -> None:
    """A name that is neither a static user nor `<expiry>[:<user>]` is unknown -> 401."""
    carol = TurnTestClient(server, "carol", rest_password("s3cret", "carol"))
    result = carol.allocate()
    assert result.code == 401
    assert auth_failures(result.actions) == [AuthFailure.UNKNOWN_USER]


# -- one username per allocation -----------------------------------------------------------


def test_refresh_with_another_users_credentials_gets_441(server: TurnServer) -> None:
    """RFC 8656 §5: a non-Allocate request authenticated as a different user on an existing
    allocation's 5-tuple -> 441, and the allocation is untouched."""
    alice = TurnTestClient(server)
    assert alice.allocate().code == 0
    bob = TurnTestClient(server, "bob", "bobpw")  # same 5-tuple
    result = bob.refresh(0)
    assert result.code == 441
    assert alice.five_tuple in server.allocations


def test_rest_credential_with_another_timestamp_on_refresh_gets_441(server: TurnServer) -> None:
    """RFC 8656 §5: "the same username" is the whole USERNAME, timestamp included."""
    carol = rest_client(server, rest_username(FUTURE, "carol"))
    assert carol.allocate().code == 0
    renewed = rest_client(server, rest_username(FUTURE + 60, "carol"))
    assert renewed.refresh().code == 441


def test_441_response_is_signed_with_the_requesters_key(server: TurnServer) -> None:
    """RFC 8489 §9.2.4/§9.2.5: the request passed authentication, so the 441 must be
    signed; an unsigned error to an authenticated request is discarded by a client over UDP."""
    assert TurnTestClient(server).allocate().code == 0
    bob = TurnTestClient(server, "bob", "bobpw")
    result = bob.refresh()
    assert result.code == 441
    assert result.message is not None
    assert integrity.verify_integrity(result.message, bob.key)


def test_allocate_with_another_users_credentials_on_a_used_5_tuple_gets_437(
    server: TurnServer,
) -> None:
    """RFC 8656 §7.2 step 2: a 5-tuple already in use -> 437; §5's 441 rule covers only
    non-Allocate requests."""
    assert TurnTestClient(server).allocate().code == 0
    bob = TurnTestClient(server, "bob", "bobpw")
    assert bob.allocate().code == 437


def test_auth_failure_binds_no_relay_port(server: TurnServer, binder: FakeBinder) -> None:
    """RFC 8656 §7.2: nothing is allocated before authentication succeeds."""
    wrong = TurnTestClient(server, "alice", "bad")
    result = wrong.allocate()
    assert result.code == 401
    assert not result.has(XorRelayedAddress)
    assert len(server.pools[FAMILY_IPV4]) == 10
    assert binder.attempts == []


# -- RFC 8489 security features: nonce cookie, PASSWORD-ALGORITHMS, USERHASH ---------------


def test_nonce_starts_with_the_cookie_announcing_security_features(
    client: TurnTestClient,
) -> None:
    """RFC 8489 §9.2: the NONCE starts with "obMatJos2" and 24 bits of features in base64;
    bit 0 is "Password algorithms", bit 1 "Username anonymity"."""
    result = client.fetch_nonce()
    nonce = result.need(Nonce).value
    assert nonce.startswith("obMatJos2")
    features = base64.b64decode(nonce[9:13])
    assert features[0] & 0x80  # password algorithms
    assert features[0] & 0x40  # username anonymity


def test_401_offers_md5_and_sha256_password_algorithms(client: TurnTestClient) -> None:
    """RFC 8489 §9.2.4: with the password-algorithms feature, the 401 (and 438) carry
    PASSWORD-ALGORITHMS."""
    offered = client.fetch_nonce().need(PasswordAlgorithms).algorithms
    assert (PASSWORD_ALGORITHM_MD5, b"") in offered
    assert (PASSWORD_ALGORITHM_SHA256, b"") in offered


def test_sha256_password_algorithm_authenticates_and_signs_with_the_sha256_key(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §9.2.2 and §9.2.4: with PASSWORD-ALGORITHM SHA-256 the key is
    SHA-256(username:realm:password), and the response is signed with it."""
    client.fetch_nonce()
    client.use_password_algorithm(PASSWORD_ALGORITHM_SHA256)
    result = client.allocate(sha256=True)
    assert result.code == 0
    assert result.message is not None
    assert integrity.verify_integrity_sha256(result.message, client.signing_key)
    assert client.signing_key != client.key
    refreshed = client.refresh(sha256=True)
    assert refreshed.code == 0


def test_sha256_password_algorithm_works_with_rest_credentials(server: TurnServer) -> None:
    """RFC 8489 §9.2.2: the SHA-256 key is derived from the REST password just the same."""
    carol = rest_client(server, rest_username(FUTURE, "carol"))
    carol.fetch_nonce()
    carol.use_password_algorithm(PASSWORD_ALGORITHM_SHA256)
    assert carol.allocate().code == 0


def test_sha256_password_algorithm_for_a_user_with_only_an_md5_key_gets_401(
    make_server: MakeServer,
) -> None:
    """RFC 8489 §9.2.2: a SHA-256 key needs the password; a user configured with a
    precomputed MD5 key cannot use it."""
    md5 = integrity.long_term_key("dave", REALM, "davepw")
    server = make_server({"auth": {"users": {"dave": {"key": md5.hex()}}}})
    dave = TurnTestClient(server, "dave", "davepw")
    assert dave.allocate().code == 0  # MD5 works
    other = TurnTestClient(server, "dave", "davepw", client=OTHER_CLIENT)
    other.fetch_nonce()
    other.use_password_algorithm(PASSWORD_ALGORITHM_SHA256)
    assert other.allocate().code == 401


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (None, PASSWORD_ALGORITHM_SHA256),  # PASSWORD-ALGORITHM alone
        (((PASSWORD_ALGORITHM_SHA256, b""),), PASSWORD_ALGORITHM_SHA256),  # not what we sent
        (((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b"")), 0x0003),
    ],
)
def test_password_algorithm_attributes_that_do_not_match_get_400(
    client: TurnTestClient,
    offered: tuple[tuple[int, bytes], ...] | None,
    chosen: int,
) -> None:
    """RFC 8489 §9.2.4: unless PASSWORD-ALGORITHMS echoes the server's list and
    PASSWORD-ALGORITHM is one of its entries -> 400."""
    client.fetch_nonce()
    assert client.nonce is not None
    attrs: list[Attribute] = [Username("alice"), Realm(REALM), Nonce(client.nonce)]
    if offered is not None:
        attrs.append(PasswordAlgorithms(offered))
    attrs.append(PasswordAlgorithm(chosen))
    attrs.append(RequestedTransport(17))
    message = Message(Method.ALLOCATE, MessageClass.REQUEST, new_transaction_id(), tuple(attrs))
    assert client.exchange(encode(message, integrity_key=client.key)).code == 400


def test_userhash_instead_of_username_authenticates_a_static_user(
    server: TurnServer, client: TurnTestClient
) -> None:
    """RFC 8489 §9.2.4 and §14.4: USERHASH = SHA-256(username:realm) stands in for USERNAME."""
    client.use_userhash = True
    result = client.allocate()
    assert result.code == 0
    assert not result.has(Username)
    assert server.allocations[client.five_tuple].username == "alice"


def test_unknown_userhash_gets_401(server: TurnServer) -> None:
    """RFC 8489 §9.2.4: a USERHASH matching no user -> 401."""
    ghost = TurnTestClient(server, "ghost", "x")
    ghost.use_userhash = True
    result = ghost.allocate()
    assert result.code == 401
    assert auth_failures(result.actions) == [AuthFailure.UNKNOWN_USER]


def test_userhash_cannot_name_a_rest_user(server: TurnServer) -> None:
    """TURN REST API: a REST name cannot be recovered from its hash -> 401."""
    carol = rest_client(server, rest_username(FUTURE, "carol"))
    carol.use_userhash = True
    assert carol.allocate().code == 401


def test_another_rest_separator_splits_the_user_part(make_server: MakeServer) -> None:
    """coturn's rest-api-separator, as auth.rest_separator."""
    server = make_server({"auth": {"rest_separator": "-"}})
    name = rest_username(FUTURE, "carol", separator="-")
    assert name == f"{FUTURE}-carol"
    assert rest_client(server, name).allocate().ok
    assert next(iter(server.allocations.values())).quota_user == "carol"
    # With "-", a ":" name is no REST username at all.
    assert (
        rest_client(server, rest_username(FUTURE, "dave"), client=OTHER_CLIENT).allocate().code
        == 401
    )
