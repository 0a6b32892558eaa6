"""Which peer addresses a TURN relay may send to.

A TURN server relays datagrams to whatever peer a client names in
CreatePermission / ChannelBind, from inside the operator's network.  Without a
filter that is a server-side request forgery primitive: a client could reach
loopback services, the cloud metadata endpoint, or hosts on the private LAN
(RFC 8656 section 21.2.1 asks servers to restrict this).  This module is the
filter.  It is pure: no sockets, no clock, stdlib ``ipaddress`` only.

IPv6 has several ways of spelling an IPv4 destination (mapped, compatible,
NAT64, 6to4, Teredo).  Checking only the IPv6 address would let
``::ffff:127.0.0.1`` or ``64:ff9b::a9fe:a9fe`` slip past an IPv4 deny entry,
so every embedded IPv4 address is checked as well.
"""

import ipaddress
from collections.abc import Iterable

from pyturn.config import parse_peers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Built from the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890).
# Blocks whose only special meaning is "carries an IPv4 address" (::ffff:0:0/96,
# 64:ff9b::/96, 2002::/16, 2001::/32) are deliberately absent: the embedded IPv4
# address decides those, so ::ffff:8.8.8.8 stays usable while ::ffff:127.0.0.1 does not.
DEFAULT_DENY: tuple[IPNetwork, ...] = (
    # --- IPv4 ---
    _V4("0.0.0.0/8"),  # RFC 791 / RFC 1122: "this network"; 0.0.0.0 reaches the local host
    _V4("10.0.0.0/8"),  # RFC 1918 private
    _V4("100.64.0.0/10"),  # RFC 6598 carrier-grade NAT shared space
    _V4("127.0.0.0/8"),  # RFC 1122 loopback
    _V4("169.254.0.0/16"),  # RFC 3927 link-local; holds the 169.254.169.254 cloud metadata API
    _V4("172.16.0.0/12"),  # RFC 1918 private
    _V4("192.0.0.0/24"),  # RFC 6890 IETF protocol assignments (DS-Lite, NAT64 discovery, ...)
    _V4("192.0.2.0/24"),  # RFC 5737 TEST-NET-1 documentation
    _V4("192.31.196.0/24"),  # RFC 7535 AS112-v4: DNS sink, never a media peer
    _V4("192.52.193.0/24"),  # RFC 7450 AMT relay anycast
    _V4("192.88.99.0/24"),  # RFC 7526 deprecated 6to4 relay anycast
    _V4("192.168.0.0/16"),  # RFC 1918 private
    _V4("192.175.48.0/24"),  # RFC 7534 AS112 direct delegation: DNS sink
    _V4("198.18.0.0/15"),  # RFC 2544 benchmarking; often used for lab/internal networks
    _V4("198.51.100.0/24"),  # RFC 5737 TEST-NET-2 documentation
    _V4("203.0.113.0/24"),  # RFC 5737 TEST-NET-3 documentation
    _V4("224.0.0.0/4"),  # RFC 5771 multicast: would fan relayed traffic out to many hosts
    _V4("240.0.0.0/4"),  # RFC 1112 reserved, includes 255.255.255.255 limited broadcast (RFC 919)
    # --- IPv6 ---
    _V6("::/128"),  # RFC 4291 unspecified; like 0.0.0.0 it can land on the local host
    _V6("::1/128"),  # RFC 4291 loopback
    _V6("64:ff9b:1::/48"),  # RFC 8215 local-use NAT64: operator-defined mapping, can't be decoded
    _V6("100::/64"),  # RFC 6666 discard-only prefix
    _V6("2001:1::1/128"),  # RFC 7723 Port Control Protocol anycast
    _V6("2001:1::2/128"),  # RFC 8155 TURN anycast: don't let a relay bounce into another relay
    _V6("2001:1::3/128"),  # RFC 9665 DNS-SD Service Registration Protocol anycast
    _V6("2001:2::/48"),  # RFC 5180 benchmarking
    _V6("2001:3::/32"),  # RFC 7450 AMT, the IPv6 twin of 192.52.193.0/24
    _V6("2001:4:112::/48"),  # RFC 7535 AS112-v6, the IPv6 twin of 192.31.196.0/24
    _V6("2001:10::/28"),  # RFC 4843 deprecated ORCHID
    _V6("2001:20::/28"),  # RFC 7343 ORCHIDv2: identifiers, not routable locators
    _V6("2001:db8::/32"),  # RFC 3849 documentation
    _V6("2620:4f:8000::/48"),  # RFC 7534 AS112 direct delegation, twin of 192.175.48.0/24
    _V6("3fff::/20"),  # RFC 9637 documentation
    _V6("5f00::/16"),  # RFC 9602 SRv6 segment identifiers: steer packets inside the operator net
    _V6("fc00::/7"),  # RFC 4193 unique local addresses (the IPv6 "private" space)
    # Already inside fc00::/7; listed on its own so the AWS IPv6 metadata endpoint stays
    # denied even if someone narrows the ULA entry, and so a reviewer can see it is covered.
    _V6("fd00:ec2::254/128"),
    _V6("fe80::/10"),  # RFC 4291 link-local
    _V6("fec0::/10"),  # RFC 3879 deprecated site-local; some stacks still route it locally
    _V6("ff00::/8"),  # RFC 4291 multicast
)

_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 section 2.5.5.1 (deprecated)
_LOW32 = 0xFFFF_FFFF

_V4Nets = tuple[ipaddress.IPv4Network, ...]
_V6Nets = tuple[ipaddress.IPv6Network, ...]


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """Return the IPv4 addresses that traffic to ``address`` would reach or expose.

    Covers IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``, except
    ``::`` and ``::1``), the RFC 6052 NAT64 well-known prefix ``64:ff9b::/96``, 6to4
    (``2002::/16``, RFC 3056) and Teredo (``2001::/32``, RFC 4380: both the server and
    the de-obfuscated client address).  Empty when the address embeds none.
    """
    mapped = address.ipv4_mapped
    if mapped is not None:
        return (mapped,)
    value = int(address)
    if address in _IPV4_COMPATIBLE:
        # :: and ::1 are the IPv6 unspecified and loopback addresses, not 0.0.0.0/0.0.0.1.
        if value <= 1:
            return ()
        return (ipaddress.IPv4Address(value),)
    if address in _NAT64_WKP:
        return (ipaddress.IPv4Address(value & _LOW32),)
    sixtofour = address.sixtofour
    if sixtofour is not None:
        return (sixtofour,)
    teredo = address.teredo
    if teredo is not None:
        server, client = teredo
        return (server,) if server == client else (server, client)
    return ()


def _split(networks: Iterable[IPNetwork | str]) -> tuple[_V4Nets, _V6Nets]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for item in networks:
        for network in parse_peers(item) if isinstance(item, str) else (item,):
            if isinstance(network, ipaddress.IPv4Network):
                v4.append(network)
            else:
                v6.append(network)
    return tuple(v4), tuple(v6)


def _longest(address: IPAddress, v4: _V4Nets, v6: _V6Nets) -> int:
    """The prefix length of the most specific network holding `address`; -1: none."""
    networks: _V4Nets | _V6Nets = v4 if isinstance(address, ipaddress.IPv4Address) else v6
    return max((n.prefixlen for n in networks if address in n), default=-1)


def _contains(address: IPAddress, v4: _V4Nets, v6: _V6Nets) -> bool:
    if isinstance(address, ipaddress.IPv4Address):
        return any(address in network for network in v4)
    return any(address in network for network in v6)


def _parse_address(address: IPAddress | str) -> IPAddress:
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # The zone only says which link to use; it doesn't change where the packet lands.
        return ipaddress.IPv6Address(int(address))
    return address


_DEFAULT_DENY_V4, _DEFAULT_DENY_V6 = _split(DEFAULT_DENY)


class PeerPolicy:
    """Decide whether the relay may send to a peer address.

    ``is_allowed`` works in this order:

    1. Build the candidate set: the address itself (with any IPv6 zone id such as
       ``%eth0`` removed) plus, for IPv6, every address from :func:`embedded_ipv4`.
    2. Each candidate is judged by the most specific of the operator's entries that
       holds it, as routers pick a route (the longest prefix): ``allow`` or ``deny``,
       and ``deny`` when an allowed and a denied network of the same length both hold
       it. Without such an entry, :data:`DEFAULT_DENY` judges it: the built-in list is
       the least specific layer, below every operator entry.
    3. Every candidate must be allowed.

    So ``allow=["10.0.0.0/8"], deny=["10.9.0.0/16"]`` opens the private network but
    one subnet, ``deny=["0.0.0.0/0"], allow=["192.0.2.7"]`` relays to one host only
    (BigBlueButton's setup), and an allow entry opens a built-in denied range.
    Because IPv4 entries are also matched against embedded IPv4 addresses,
    ``allow=["127.0.0.0/8"]`` opens both ``127.0.0.1`` and ``::ffff:127.0.0.1``, and
    ``deny=["198.51.100.0/24"]`` closes both spellings too.

    Entries may be ``ipaddress`` networks or strings accepted by :func:`parse_peers`
    (networks, and ranges such as ``"10.0.0.0-10.255.255.255"``), which raises
    ValueError on bad input.
    """

    __slots__ = ("_allow_v4", "_allow_v6", "_deny_v4", "_deny_v6")

    def __init__(
        self,
        allow: Iterable[IPNetwork | str] = (),
        deny: Iterable[IPNetwork | str] = (),
    ) -> None:
        self._allow_v4, self._allow_v6 = _split(allow)
        self._deny_v4, self._deny_v6 = _split(deny)

    def __repr__(self) -> str:
        allow = [str(n) for n in (*self._allow_v4, *self._allow_v6)]
        deny = [str(n) for n in (*self._deny_v4, *self._deny_v6)]
        return f"PeerPolicy(allow={allow!r}, deny={deny!r})"

    def is_allowed(self, address: IPAddress | str) -> bool:
        """Return True if the relay may send to ``address``.

        Raises ValueError if ``address`` is a string that is not an IP address.
        """
        parsed = _parse_address(address)
        candidates: tuple[IPAddress, ...]
        if isinstance(parsed, ipaddress.IPv6Address):
            candidates = (parsed, *embedded_ipv4(parsed))
        else:
            candidates = (parsed,)
        return all(self._judge(candidate) for candidate in candidates)

    def _judge(self, address: IPAddress) -> bool:
        denied = _longest(address, self._deny_v4, self._deny_v6)
        allowed = _longest(address, self._allow_v4, self._allow_v6)
        if denied >= 0 or allowed >= 0:
            return allowed > denied
        return not _contains(address, _DEFAULT_DENY_V4, _DEFAULT_DENY_V6)
