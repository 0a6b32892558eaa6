"""Amplification: bytes pyturn sends back for each byte a stranger sends it.

A UDP request can carry a forged source address, so every answer a stranger can provoke
is a possible reflection onto a victim (RFC 8489 §16.1.1, RFC 8656 §21.1). The Binding
reply must carry only XOR-MAPPED-ADDRESS (and FINGERPRINT when asked), 401 and 438
answers are limited per source IP (tests/hostile/test_floods.py), and every other
answer to an unauthenticated request should be no larger than it has to be.

Measured over real UDP sockets against `pyturn serve`; the factor of each reply kind
(response bytes / request bytes) is printed at the end of the run.
"""

from __future__ import annotations

import pytest

from pyturn.wire.attributes import (
    TRANSPORT_UDP,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    UnknownAttribute,
    Username,
)
from pyturn.wire.message import Message, MessageClass, Method, encode, new_transaction_id
from tests.hostile.client import TurnClient, code_of, run
from tests.interop.server_process import ServerProcess

# Sources of their own, so other modules' floods do not spend this module's 401 budget.
SOURCE = "127.0.0.4"
BINDING_REPLY_MAX = 32  # header + XOR-MAPPED-ADDRESS (IPv4)
BINDING_FP_REPLY_MAX = 40  # ... + FINGERPRINT
# A 401 carries ERROR-CODE, REALM, NONCE and PASSWORD-ALGORITHMS: bounded, not minimal.
UNSIGNED_REPLY_MAX = 128
MALFORMED_400 = 40  # header + ERROR-CODE 400 "Bad Request"


async def measure(client: TurnClient, request: bytes) -> tuple[int, int, int | None]:
    """(request bytes, reply bytes or 0, reply code) for one exchange."""
    reply = await client.transact(request, tries=2)
    return len(request), len(reply.raw) if reply is not None else 0, code_of(reply)


def unauthenticated_requests(client: TurnClient) -> dict[str, bytes]:
    codec = client.codec
    binding = codec.encode_request(Method.BINDING, auth=False)
    bare_allocate = codec.encode_request(Method.ALLOCATE, auth=False)
    mi_only = encode(
        Message(Method.ALLOCATE, MessageClass.REQUEST, new_transaction_id(), ()),
        integrity_key=b"any key",
    )
    return {
        "Binding": binding,
        "Binding + FINGERPRINT": codec.encode_request(Method.BINDING, auth=False, fingerprint=True),
        "401 (Allocate, no attributes)": bare_allocate,
        "401 (Allocate + FINGERPRINT)": codec.encode_request(
            Method.ALLOCATE, auth=False, fingerprint=True
        ),
        "400 (length field lies)": binding[:2] + b"\x00\x04" + binding[4:20],
        "400 (unknown method)": codec.encode_request(0x0FF, auth=False),
        "400 (MESSAGE-INTEGRITY without USERNAME)": mi_only,
        "420 (Binding + unknown attribute)": codec.encode_request(
            Method.BINDING, [UnknownAttribute(0x0033, b"")], auth=False
        ),
    }


def stale_nonce_request(client: TurnClient) -> bytes:
    """The smallest request that draws a 438: signed, one-letter name, made-up nonce."""
    message = Message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        new_transaction_id(),
        (Username("a"), Realm("example.org"), Nonce("x")),
    )
    return encode(message, integrity_key=client.codec.key)


@pytest.fixture(scope="module")
def factors(module_server: ServerProcess) -> dict[str, tuple[int, int, int | None]]:
    """Every reply kind measured once against the module's server."""

    async def scenario() -> dict[str, tuple[int, int, int | None]]:
        client = await TurnClient.open(module_server.udp_address, local_ip=SOURCE)
        try:
            out = {
                name: await measure(client, request)
                for name, request in unauthenticated_requests(client).items()
            }
            out["438 (made-up nonce)"] = await measure(client, stale_nonce_request(client))
            # Authenticated answers, for comparison: the client holds a nonce now.
            challenge = await client.transact(
                client.codec.encode_request(Method.ALLOCATE, auth=False)
            )
            assert challenge is not None
            nonce = challenge.get(Nonce)
            assert nonce is not None
            client.codec.nonce = nonce.value
            allocate = client.codec.encode_request(
                Method.ALLOCATE, [RequestedTransport(TRANSPORT_UDP)]
            )
            out["Allocate success (signed)"] = await measure(client, allocate)
            out["Refresh 0 success (signed)"] = await measure(
                client, client.codec.encode_request(Method.REFRESH, [Lifetime(0)])
            )
            return out
        finally:
            client.close()

    return run(scenario())


def test_every_reply_kind_is_measured_and_answered_as_expected(
    factors: dict[str, tuple[int, int, int | None]], figures: dict[str, object]
) -> None:
    """The table in SECURITY.md: request bytes -> reply bytes (factor) per reply kind."""
    for name, (sent, got, code) in factors.items():
        factor = got / sent
        figures[name] = f"{sent} -> {got} bytes (x{factor:.2f}), code {code}"
    codes = {name: code for name, (_, _, code) in factors.items()}
    assert codes["Binding"] == codes["Binding + FINGERPRINT"] == 0
    assert codes["401 (Allocate, no attributes)"] == 401
    assert codes["438 (made-up nonce)"] == 438
    assert codes["400 (length field lies)"] == codes["400 (unknown method)"] == 400
    assert codes["420 (Binding + unknown attribute)"] == 420
    assert codes["Allocate success (signed)"] == 0


def test_the_binding_reply_carries_nothing_but_the_mapped_address(
    factors: dict[str, tuple[int, int, int | None]],
) -> None:
    """RFC 8489 §6.3.1 and §16.1.1: 20 bytes in, at most 32 out (40 with FINGERPRINT)."""
    sent, got, _ = factors["Binding"]
    assert (sent, got) == (20, BINDING_REPLY_MAX)
    sent, got, _ = factors["Binding + FINGERPRINT"]
    assert sent == 28 and got <= BINDING_FP_REPLY_MAX


def test_unsigned_challenges_are_bounded_whatever_the_request(
    factors: dict[str, tuple[int, int, int | None]],
) -> None:
    """401 and 438 have a fixed size (no echo of the request) and stay under 128 bytes;
    the per-source budget (test_floods.py) bounds how many a source gets."""
    for name in ("401 (Allocate, no attributes)", "401 (Allocate + FINGERPRINT)"):
        _, got, _ = factors[name]
        assert 0 < got <= UNSIGNED_REPLY_MAX
    assert factors["401 (Allocate, no attributes)"][1] / 20 <= 6.5
    sent, got, _ = factors["438 (made-up nonce)"]
    assert got <= UNSIGNED_REPLY_MAX and got / sent < 2.0


def test_a_malformed_request_gets_a_bare_400(
    factors: dict[str, tuple[int, int, int | None]],
) -> None:
    """RFC 8489 §6.3: 400 with ERROR-CODE only, twice the 20-byte request at most."""
    sent, got, _ = factors["400 (length field lies)"]
    assert (sent, got) == (20, MALFORMED_400)


@pytest.mark.parametrize(
    "kind", ["400 (unknown method)", "400 (MESSAGE-INTEGRITY without USERNAME)"]
)
def test_an_unauthenticated_400_is_no_larger_than_the_malformed_request_400(
    factors: dict[str, tuple[int, int, int | None]], kind: str
) -> None:
    _, got, code = factors[kind]
    assert code == 400
    assert got <= MALFORMED_400
