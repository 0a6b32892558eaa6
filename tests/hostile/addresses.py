"""Peer addresses an attacker names to reach the server's own network.

Every IPv4 target (loopback, private, carrier-grade NAT, link-local/cloud metadata,
"this network") is also spelled in each IPv6 form that embeds an IPv4 address:
IPv4-mapped (RFC 4291 §2.5.5.2), IPv4-compatible (§2.5.5.1), the NAT64 well-known
prefix (RFC 6052), 6to4 (RFC 3056) and Teredo (RFC 4380, the server and the obfuscated
client field). pyturn's peer policy must refuse all of them.

These are values inside requests only: no test sends a datagram or a SYN to any of
them except the loopback ones (see tests/hostile/test_peer_policy.py).
"""

from __future__ import annotations

import ipaddress

IPV4_TARGETS: dict[str, str] = {
    "loopback": "127.0.0.1",
    "this-network": "0.0.0.0",
    "rfc1918-10": "10.0.0.1",
    "rfc1918-172": "172.16.0.1",
    "rfc1918-192": "192.168.1.1",
    "cgnat": "100.64.0.1",
    "metadata": "169.254.169.254",
}

# A public address, used as the other half of a Teredo address.
PUBLIC_V4 = "8.8.8.8"

NATIVE_V6_TARGETS: dict[str, str] = {
    "v6-loopback": "::1",
    "v6-unspecified": "::",
    "v6-link-local": "fe80::1",
    "v6-ula": "fc00::1",
    "v6-aws-metadata": "fd00:ec2::254",
    "v6-site-local": "fec0::1",
    "v6-multicast": "ff02::1",
}


def embedded_forms(v4: str) -> dict[str, str]:
    """Each IPv6 spelling of `v4`, by form name."""
    value = int(ipaddress.IPv4Address(v4))
    public = int(ipaddress.IPv4Address(PUBLIC_V4))
    teredo_prefix = 0x2001_0000 << 96
    forms = {
        "ipv4-mapped": ipaddress.IPv6Address((0xFFFF << 32) | value),
        "ipv4-compatible": ipaddress.IPv6Address(value),
        "nat64": ipaddress.IPv6Address((0x0064_FF9B << 96) | value),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1),
        # Teredo: 2001:0:<server>:<flags>:<~port>:<~client>
        "teredo-server": ipaddress.IPv6Address(
            teredo_prefix | (value << 64) | (0xFFFF ^ 3478) << 32 | (public ^ 0xFFFF_FFFF)
        ),
        "teredo-client": ipaddress.IPv6Address(
            teredo_prefix | (public << 64) | (0xFFFF ^ 3478) << 32 | (value ^ 0xFFFF_FFFF)
        ),
    }
    return {name: str(address) for name, address in forms.items()}


def all_denied_peers() -> dict[str, str]:
    """Every address above, keyed `<target>` or `<target>/<form>`."""
    out: dict[str, str] = dict(IPV4_TARGETS)
    for target, v4 in IPV4_TARGETS.items():
        for form, v6 in embedded_forms(v4).items():
            out[f"{target}/{form}"] = v6
    out.update(NATIVE_V6_TARGETS)
    return out


def is_loopback_destination(host: str) -> bool:
    """True when a datagram to `host` cannot leave this machine (127/8, ::1, mapped 127/8)."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
