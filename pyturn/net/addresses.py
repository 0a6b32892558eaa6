"""Which relay address a worker advertises to clients in XOR-RELAYED-ADDRESS.

A relay socket bound to a wildcard address cannot be told to a client as it is: the
client needs an address it can send to. When the config names none, the listeners and
then the host's own interfaces are asked, and the guess is logged if it is a poor one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct

from pyturn.config import Config

# The worker's logger: these lines have always carried its name, and log filters match it.
log = logging.getLogger("pyturn.net.worker")


def default_relay_ipv4(config: Config) -> str:
    """The IPv4 address to advertise in XOR-RELAYED-ADDRESS when none is configured."""
    relay = config.relay
    if relay.fixed_external(4):
        return str(relay.fixed_external(4))
    if relay.address != "0.0.0.0":  # noqa: S104 (comparing, not binding)
        return relay.address
    for listener in config.listen:
        if ":" not in listener.address and listener.address != "0.0.0.0":  # noqa: S104
            return listener.address
    # Wildcard everywhere: the first address of the host's own interfaces.
    for address in interface_ipv4_addresses():
        if not address.startswith(("127.", "169.254.")):
            return address
    log.warning(
        "no non-loopback IPv4 address found: clients will be told 127.0.0.1 as their "
        "relayed address; set relay.external_address"
    )
    return "127.0.0.1"


def interface_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the host's interfaces (Linux SIOCGIFADDR; no packet is sent)."""
    try:
        import fcntl  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return []
    siocgifaddr = 0x8915
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                answer = fcntl.ioctl(probe.fileno(), siocgifaddr, request)
                found.append(socket.inet_ntoa(answer[20:24]))
    return found


def default_relay_ipv6(config: Config) -> str | None:
    """The IPv6 address to advertise for IPv6 relaying, if `relay.address6` is set."""
    relay = config.relay
    if relay.fixed_external(6):
        return relay.fixed_external(6)
    if relay.address6 is None:
        return None
    if relay.address6 != "::":
        return relay.address6
    for listener in config.listen:
        if ":" in listener.address and listener.address != "::":
            return listener.address
    log.warning(
        "relay.address6 is '::' and no IPv6 listener names an address: set "
        "relay.external_address6 so clients learn a reachable IPv6 relay address"
    )
    return "::1"
