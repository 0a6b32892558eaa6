"""Tests for the relay peer-address policy (SSRF defence, RFC 8656 section 21.2.1)."""

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyturn.config import parse_network, parse_peers
from pyturn.core.policy import (
    DEFAULT_DENY,
    IPNetwork,
    PeerPolicy,
    embedded_ipv4,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# Encoders for each way IPv6 can carry an IPv4 address, written from the RFC bit
# layouts rather than via ipaddress so the tests don't share the code under test's view.


def mapped(a: V4) -> V6:
    """RFC 4291 section 2.5.5.2: ::ffff:a.b.c.d."""
    return V6((0xFFFF << 32) | int(a))


def compatible(a: V4) -> V6:
    """RFC 4291 section 2.5.5.1 (deprecated): ::a.b.c.d."""
    return V6(int(a))


def nat64(a: V4) -> V6:
    """RFC 6052 section 2.1: the well-known prefix 64:ff9b::/96 with a /96 layout."""
    return V6((0x0064_FF9B << 96) | int(a))


def six_to_four(a: V4) -> V6:
    """RFC 3056 section 2: 2002:AABB:CCDD::/48, here with subnet 0 and interface id 1."""
    return V6((0x2002 << 112) | (int(a) << 80) | 1)


def teredo(server: V4, client: V4, port: int = 40000) -> V6:
    """RFC 4380 section 4: 2001:0:server:flags:~port:~client."""
    flags = 0x8000
    return V6(
        (0x2001_0000 << 96)
        | (int(server) << 64)
        | (flags << 48)
        | ((port ^ 0xFFFF) << 32)
        | (int(client) ^ 0xFFFF_FFFF)
    )


PUBLIC_V4 = V4("8.8.8.8")
OTHER_PUBLIC_V4 = V4("1.1.1.1")


def teredo_client(a: V4) -> V6:
    return teredo(OTHER_PUBLIC_V4, a)


def teredo_server(a: V4) -> V6:
    return teredo(a, OTHER_PUBLIC_V4)


EMBEDDINGS: dict[str, Callable[[V4], V6]] = {
    "mapped": mapped,
    "compatible": compatible,
    "nat64": nat64,
    "6to4": six_to_four,
    "teredo-client": teredo_client,
    "teredo-server": teredo_server,
}

# One concrete address per default-denied range, with where the range is defined.  Kept
# independent of DEFAULT_DENY so that dropping an entry from the module fails a test.
DENIED_EXAMPLES: list[tuple[str, str]] = [
    ("0.0.0.0", "RFC 1122 this host"),
    ("0.1.2.3", "RFC 1122 this network"),
    ("10.0.0.1", "RFC 1918"),
    ("10.255.255.255", "RFC 1918"),
    ("100.64.0.1", "RFC 6598 shared CGN space"),
    ("100.127.255.254", "RFC 6598 shared CGN space"),
    ("127.0.0.1", "RFC 1122 loopback"),
    ("127.255.255.254", "RFC 1122 loopback"),
    ("169.254.169.254", "RFC 3927 link-local, cloud metadata"),
    ("169.254.0.1", "RFC 3927 link-local"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.254", "RFC 1918"),
    ("192.0.0.8", "RFC 7600 IPv4 dummy address, in RFC 6890 192.0.0.0/24"),
    ("192.0.0.170", "RFC 7050 NAT64 discovery, in RFC 6890 192.0.0.0/24"),
    ("192.0.2.1", "RFC 5737 TEST-NET-1"),
    ("192.31.196.1", "RFC 7535 AS112-v4"),
    ("192.52.193.1", "RFC 7450 AMT"),
    ("192.88.99.1", "RFC 7526 deprecated 6to4 relay anycast"),
    ("192.168.1.1", "RFC 1918"),
    ("192.175.48.1", "RFC 7534 AS112 direct delegation"),
    ("198.18.0.1", "RFC 2544 benchmarking"),
    ("198.19.255.254", "RFC 2544 benchmarking"),
    ("198.51.100.1", "RFC 5737 TEST-NET-2"),
    ("203.0.113.1", "RFC 5737 TEST-NET-3"),
    ("224.0.0.1", "RFC 5771 multicast"),
    ("239.255.255.250", "RFC 5771 multicast (SSDP)"),
    ("240.0.0.1", "RFC 1112 reserved"),
    ("255.255.255.255", "RFC 919 limited broadcast"),
    ("::", "RFC 4291 unspecified"),
    ("::1", "RFC 4291 loopback"),
    ("64:ff9b:1::a00:1", "RFC 8215 local-use NAT64"),
    ("100::1", "RFC 6666 discard-only"),
    ("2001:1::1", "RFC 7723 PCP anycast"),
    ("2001:1::2", "RFC 8155 TURN anycast"),
    ("2001:1::3", "RFC 9665 DNS-SD SRP anycast"),
    ("2001:2::1", "RFC 5180 benchmarking"),
    ("2001:3::1", "RFC 7450 AMT"),
    ("2001:4:112::1", "RFC 7535 AS112-v6"),
    ("2001:10::1", "RFC 4843 ORCHID"),
    ("2001:20::1", "RFC 7343 ORCHIDv2"),
    ("2001:db8::1", "RFC 3849 documentation"),
    ("2620:4f:8000::1", "RFC 7534 AS112 direct delegation"),
    ("3fff::1", "RFC 9637 documentation"),
    ("5f00::1", "RFC 9602 SRv6 SIDs"),
    ("fc00::1", "RFC 4193 unique local"),
    ("fd12:3456:789a::1", "RFC 4193 unique local"),
    ("fd00:ec2::254", "AWS IPv6 instance metadata endpoint"),
    ("fe80::1", "RFC 4291 link-local"),
    ("febf:ffff::1", "RFC 4291 link-local"),
    ("fec0::1", "RFC 3879 deprecated site-local"),
    ("ff02::1", "RFC 4291 multicast all-nodes"),
    ("ff0e::1", "RFC 4291 multicast global scope"),
]

PUBLIC_ADDRESSES = [
    "8.8.8.8",
    "1.1.1.1",
    "9.9.9.9",
    "2606:4700::1111",
    "2001:4860:4860::8888",
]

INTERNAL_V4 = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.1.1"]


@pytest.mark.parametrize(("address", "why"), DENIED_EXAMPLES)
def test_default_policy_refuses_an_address_from_each_special_purpose_range(
    address: str, why: str
) -> None:
    """IANA IPv4/IPv6 Special-Purpose Address Registries (RFC 6890)."""
    assert not PeerPolicy().is_allowed(address), why


@pytest.mark.parametrize("network", DEFAULT_DENY, ids=str)
def test_every_default_deny_network_refuses_its_first_and_last_address(
    network: IPNetwork,
) -> None:
    policy = PeerPolicy()
    assert not policy.is_allowed(network.network_address)
    assert not policy.is_allowed(network.broadcast_address)


@pytest.mark.parametrize("prefix", ["::ffff:0:0/96", "64:ff9b::/96", "2002::/16", "2001::/32"])
def test_default_deny_leaves_prefixes_that_only_carry_ipv4_to_the_embedded_address(
    prefix: str,
) -> None:
    """Listing these would refuse ::ffff:8.8.8.8 etc. regardless of the IPv4 inside."""
    carrier = ipaddress.IPv6Network(prefix)
    assert not any(
        isinstance(network, ipaddress.IPv6Network) and network.overlaps(carrier)
        for network in DEFAULT_DENY
    )


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_default_policy_allows_public_addresses(address: str) -> None:
    assert PeerPolicy().is_allowed(address)


@pytest.mark.parametrize("form", EMBEDDINGS)
@pytest.mark.parametrize("internal", INTERNAL_V4)
def test_default_policy_refuses_every_ipv6_spelling_of_an_internal_ipv4_address(
    internal: str, form: str
) -> None:
    """RFC 4291 (mapped, compatible), RFC 6052 (NAT64), RFC 3056 (6to4), RFC 4380 (Teredo)."""
    address = EMBEDDINGS[form](V4(internal))
    assert not PeerPolicy().is_allowed(address)
    assert not PeerPolicy().is_allowed(str(address))


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:8.8.8.8",
        "::8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        str(teredo(PUBLIC_V4, OTHER_PUBLIC_V4)),
    ],
)
def test_default_policy_allows_ipv6_spellings_of_a_public_ipv4_address(address: str) -> None:
    assert PeerPolicy().is_allowed(address)


@pytest.mark.parametrize("form", EMBEDDINGS)
def test_embedded_ipv4_decodes_each_form(form: str) -> None:
    target = V4("192.168.1.1")
    found = embedded_ipv4(EMBEDDINGS[form](target))
    assert target in found
    if form.startswith("teredo"):
        assert OTHER_PUBLIC_V4 in found
        assert len(found) == 2
    else:
        assert found == (target,)


def test_embedded_ipv4_decodes_the_rfc_4380_teredo_example() -> None:
    """RFC 4380 section 4 / RFC 5991 example: server 65.54.227.120, client 192.0.2.45."""
    address = V6("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert embedded_ipv4(address) == (V4("65.54.227.120"), V4("192.0.2.45"))
    assert not PeerPolicy().is_allowed(address)


def test_embedded_ipv4_reports_a_teredo_address_once_when_server_equals_client() -> None:
    assert embedded_ipv4(teredo(PUBLIC_V4, PUBLIC_V4)) == (PUBLIC_V4,)


@pytest.mark.parametrize(
    "address",
    ["::", "::1", "2606:4700::1111", "fe80::1", "64:ff9b:1::a00:1", "2003::1", "2001:1::2"],
)
def test_embedded_ipv4_is_empty_for_addresses_that_carry_no_ipv4(address: str) -> None:
    """:: and ::1 are IPv6 unspecified/loopback (RFC 4291), not IPv4-compatible 0.0.0.x."""
    assert embedded_ipv4(V6(address)) == ()


def test_ipv4_compatible_zero_two_is_still_decoded() -> None:
    """Only :: and ::1 are exempt; ::2 means 0.0.0.2, which is in 0.0.0.0/8."""
    assert embedded_ipv4(V6("::2")) == (V4("0.0.0.2"),)
    assert not PeerPolicy().is_allowed("::2")


def test_allow_opens_loopback_for_ipv4_and_its_mapped_spelling() -> None:
    policy = PeerPolicy(allow=["127.0.0.0/8"])
    assert policy.is_allowed("127.0.0.1")
    assert policy.is_allowed("127.1.2.3")
    assert policy.is_allowed("::ffff:127.0.0.1")
    assert policy.is_allowed("64:ff9b::7f00:1")


def test_allow_does_not_open_other_default_denied_ranges() -> None:
    policy = PeerPolicy(allow=["127.0.0.0/8"])
    assert not policy.is_allowed("10.0.0.1")
    assert not policy.is_allowed("::1")
    assert not policy.is_allowed("::ffff:169.254.169.254")


def test_every_embedded_address_must_be_acceptable_not_just_one() -> None:
    """A Teredo address exposes two IPv4 addresses (RFC 4380); opening one isn't enough."""
    policy = PeerPolicy(allow=["127.0.0.0/8"])
    assert not policy.is_allowed(teredo(V4("127.0.0.1"), V4("10.0.0.1")))
    assert policy.is_allowed(teredo(V4("127.0.0.1"), PUBLIC_V4))


def test_allow_opens_ipv6_networks_too() -> None:
    policy = PeerPolicy(allow=["::1", "fd00::/8"])
    assert policy.is_allowed("::1")
    assert policy.is_allowed("fd12::1")
    assert policy.is_allowed("fd00:ec2::254")
    assert not policy.is_allowed("::")
    assert not policy.is_allowed("fc00::1")


def test_deny_adds_a_public_range_in_every_spelling() -> None:
    policy = PeerPolicy(deny=["8.8.8.0/24", "2606:4700::/32"])
    assert not policy.is_allowed("8.8.8.8")
    assert not policy.is_allowed("::ffff:8.8.8.8")
    assert not policy.is_allowed("64:ff9b::808:808")
    assert not policy.is_allowed("2002:808:808::1")
    assert not policy.is_allowed(teredo(OTHER_PUBLIC_V4, PUBLIC_V4))
    assert not policy.is_allowed("2606:4700::1111")
    assert policy.is_allowed("8.8.4.4")
    assert policy.is_allowed("1.1.1.1")


def test_a_narrower_deny_beats_a_wider_allow_and_deny_wins_a_tie() -> None:
    policy = PeerPolicy(allow=["127.0.0.0/8", "8.8.8.0/24"], deny=["127.0.0.53", "8.8.8.0/24"])
    assert not policy.is_allowed("127.0.0.53")
    assert not policy.is_allowed("::ffff:127.0.0.53")
    assert not policy.is_allowed("8.8.8.8")
    assert policy.is_allowed("127.0.0.1")


def test_a_narrower_allow_beats_a_wider_deny() -> None:
    """coturn lets allowed-peer-ip win over denied-peer-ip; deployments rely on it."""
    policy = PeerPolicy(allow=["10.1.0.0/16"], deny=["10.0.0.0/8"])
    assert policy.is_allowed("10.1.2.3")
    assert not policy.is_allowed("10.2.0.1")
    # Operator entries are all more specific than the built-in list: 10.1/16 is open
    # although 10/8 is built-in denied, and a public /8 can be denied but one host.
    policy = PeerPolicy(allow=["8.8.8.8"], deny=["8.0.0.0/8"])
    assert policy.is_allowed("8.8.8.8")
    assert not policy.is_allowed("8.8.4.4")


def test_deny_everything_but_one_host_as_bigbluebutton_does() -> None:
    policy = PeerPolicy(
        allow=["198.51.100.20", "10.0.0.5"],
        deny=["0.0.0.0-255.255.255.255", "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
    )
    assert policy.is_allowed("198.51.100.20")
    assert policy.is_allowed("10.0.0.5")
    assert policy.is_allowed("::ffff:10.0.0.5") is False  # the IPv6 spelling is denied itself
    for other in ("8.8.8.8", "10.0.0.6", "127.0.0.1", "2606:4700::1111"):
        assert not policy.is_allowed(other), other


def test_an_allow_entry_does_not_open_another_built_in_denied_range() -> None:
    policy = PeerPolicy(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert policy.is_allowed("10.1.1.1")
    assert not policy.is_allowed("10.9.1.1")
    assert not policy.is_allowed("192.168.1.1")


@pytest.mark.parametrize(
    ("text", "networks"),
    [
        ("10.0.0.0-10.255.255.255", ["10.0.0.0/8"]),
        ("192.168.1.10-192.168.1.13", ["192.168.1.10/31", "192.168.1.12/31"]),
        ("0.0.0.0-255.255.255.255", ["0.0.0.0/0"]),
        ("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ["::/0"]),
        ("fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ["fc00::/7"]),
        ("8.8.8.8", ["8.8.8.8/32"]),
        (" 10.0.0.1 - 10.0.0.1 ", ["10.0.0.1/32"]),
    ],
)
def test_ranges_become_the_networks_that_cover_exactly_them(text: str, networks: list[str]) -> None:
    assert [str(n) for n in parse_peers(text)] == networks


@pytest.mark.parametrize(
    "text", ["10.0.0.9-10.0.0.1", "10.0.0.1-::1", "10.0.0.1-", "a-b", "10.0.0.0/8-10.1.0.0"]
)
def test_bad_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_peers(text)


def test_deny_can_close_an_ipv6_carrier_prefix_outright() -> None:
    policy = PeerPolicy(deny=["2001::/32", "2002::/16"])
    assert not policy.is_allowed(teredo(PUBLIC_V4, OTHER_PUBLIC_V4))
    assert not policy.is_allowed("2002:808:808::1")
    assert policy.is_allowed("8.8.8.8")


def test_policy_accepts_network_objects_and_strings_mixed() -> None:
    policy = PeerPolicy(
        allow=[ipaddress.IPv4Network("10.0.0.0/8"), "::1"],
        deny=[ipaddress.IPv6Network("2606:4700::/32"), "9.9.9.9"],
    )
    assert policy.is_allowed(V4("10.1.2.3"))
    assert policy.is_allowed(V6("::1"))
    assert not policy.is_allowed("2606:4700::1111")
    assert not policy.is_allowed("9.9.9.9")


def test_policy_accepts_one_shot_iterables() -> None:
    policy = PeerPolicy(allow=(n for n in ["127.0.0.0/8"]), deny=iter(["8.8.8.8"]))
    assert policy.is_allowed("127.0.0.1")
    assert not policy.is_allowed("8.8.8.8")


def test_policy_construction_rejects_a_bad_network_string() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        PeerPolicy(deny=["not-a-net"])


def test_zone_ids_are_stripped_from_strings() -> None:
    assert not PeerPolicy().is_allowed("fe80::1%eth0")
    assert not PeerPolicy().is_allowed("::ffff:127.0.0.1%eth0")
    assert PeerPolicy().is_allowed("2606:4700::1111%eth0")
    assert PeerPolicy(allow=["fe80::/10"]).is_allowed("fe80::1%eth0")
    assert PeerPolicy(deny=["2606:4700::1111"]).is_allowed("2606:4700::1111%eth0") is False


def test_zone_ids_are_stripped_from_address_objects() -> None:
    scoped = V6("fe80::1%3")
    assert scoped.scope_id == "3"
    assert not PeerPolicy().is_allowed(scoped)
    assert PeerPolicy(allow=["fe80::1"]).is_allowed(scoped)


@pytest.mark.parametrize("garbage", ["", "localhost", "1.2.3", "10.0.0.1/8", "fe80::1%", "::g"])
def test_is_allowed_raises_value_error_on_garbage(garbage: str) -> None:
    with pytest.raises(ValueError):
        PeerPolicy().is_allowed(garbage)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", ipaddress.IPv4Network("10.0.0.0/8")),
        ("127.0.0.1", ipaddress.IPv4Network("127.0.0.1/32")),
        ("::1", ipaddress.IPv6Network("::1/128")),
        ("2001:db8::/32", ipaddress.IPv6Network("2001:db8::/32")),
        ("10.1.2.3/8", ipaddress.IPv4Network("10.0.0.0/8")),
        ("  192.168.0.0/16\n", ipaddress.IPv4Network("192.168.0.0/16")),
        ("10.0.0.0/255.0.0.0", ipaddress.IPv4Network("10.0.0.0/8")),
        ("fe80::%eth0/64", ipaddress.IPv6Network("fe80::/64")),
    ],
)
def test_parse_network_accepts_cidrs_and_bare_hosts(text: str, expected: IPNetwork) -> None:
    result = parse_network(text)
    assert result == expected
    assert type(result) is type(expected)


def test_parse_network_drops_the_zone_id() -> None:
    result = parse_network("fe80::1%eth0")
    assert isinstance(result, ipaddress.IPv6Network)
    assert result.network_address.scope_id is None
    assert str(result) == "fe80::1/128"


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "garbage", "10.0.0.0/33", "1.2.3", "256.0.0.0", "::g", "10.0.0.0/8/8", "::/129"],
)
def test_parse_network_raises_a_clear_value_error_on_garbage(garbage: str) -> None:
    with pytest.raises(ValueError, match="invalid network") as info:
        parse_network(garbage)
    assert repr(garbage) in str(info.value)


def test_repr_lists_the_operator_networks() -> None:
    policy = PeerPolicy(allow=["127.0.0.0/8"], deny=["2606:4700::/32"])
    assert repr(policy) == "PeerPolicy(allow=['127.0.0.0/8'], deny=['2606:4700::/32'])"


LOOPBACK_OPEN = PeerPolicy(allow=["127.0.0.0/8"])
DEFAULT = PeerPolicy()


@given(st.ip_addresses(v=4))
def test_ipv4_and_its_mapped_form_get_the_same_verdict(address: V4) -> None:
    """RFC 4291 section 2.5.5.2: ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket."""
    for policy in (DEFAULT, LOOPBACK_OPEN):
        assert policy.is_allowed(address) == policy.is_allowed(mapped(address))


@given(st.ip_addresses(v=4), st.sampled_from(["mapped", "compatible", "nat64", "6to4"]))
def test_single_ipv4_embeddings_never_change_the_verdict(address: V4, form: str) -> None:
    ipv6 = EMBEDDINGS[form](address)
    for policy in (DEFAULT, LOOPBACK_OPEN):
        assert policy.is_allowed(address) == policy.is_allowed(ipv6)
