"""Live sessions as an operator sees them: what `pyturn sessions` lists, which
allocations `pyturn kick` ends, and which users `pyturn revoke` keeps out.

Pure data, no I/O: the control socket (pyturn/net/control_socket.py) turns requests into
these and the server (TurnServer.kick, TurnServer.set_revocations) acts on them.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyturn.core.allocation import Allocation
from pyturn.wire.attributes import Address

# What a revocation "for ever" ends at; JSON has no infinity, so it travels as null.
FOREVER = math.inf
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_MAX_NAME = 513  # RFC 8489 §14.3: USERNAME is under 513 bytes


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `10m`, `2h`, `1d` or a bare number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"not a duration: {text!r} (write it like 90s, 10m, 2h or 1d)")
    return float(match[1]) * _UNITS[match[2]]


def _address(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` (an IPv6 address alone needs no brackets)."""
    host, port = text, None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"not an address: {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not an address: {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
        number = None if port is None else int(port)
    except ValueError:
        raise ValueError(f"not an address: {text!r}") from None
    if number is not None and not 0 < number < 65536:
        raise ValueError(f"port out of range in {text!r}")
    if port_required and number is None:
        raise ValueError(f"{text!r} needs a port (IP:PORT)")
    return str(ip), number


@dataclass(frozen=True, slots=True)
class SessionMatch:
    """Which allocations a kick (or a listing) is about; every given field must match."""

    user: str | None = None
    client_ip: str | None = None
    client_port: int | None = None
    relayed: Address | None = None

    @classmethod
    def parse(
        cls, *, user: str | None = None, client: str | None = None, relayed: str | None = None
    ) -> SessionMatch:
        """From the command line's words; ValueError names what is wrong."""
        if user is not None and not 0 < len(user) < _MAX_NAME:
            raise ValueError("a user name is 1 to 512 characters")
        client_ip = client_port = None
        if client is not None:
            client_ip, client_port = _address(client, port_required=False)
        relayed_address = None
        if relayed is not None:
            ip, port = _address(relayed, port_required=True)
            assert port is not None
            relayed_address = (ip, port)
        return cls(user, client_ip, client_port, relayed_address)

    @property
    def empty(self) -> bool:
        return self.user is None and self.client_ip is None and self.relayed is None

    def matches(self, allocation: Allocation) -> bool:
        if self.user is not None and not names_user(allocation, self.user):
            return False
        _, client, _ = allocation.five_tuple
        if self.client_ip is not None and client[0] != self.client_ip:
            return False
        if self.client_port is not None and client[1] != self.client_port:
            return False
        return self.relayed is None or self.relayed in (
            allocation.relayed_address,
            allocation.relayed_address6,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.user is not None:
            out["user"] = self.user
        if self.client_ip is not None:
            out["client"] = format_host(self.client_ip, self.client_port)
        if self.relayed is not None:
            out["relayed"] = format_host(*self.relayed)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionMatch:
        for key in ("user", "client", "relayed"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string")
        return cls.parse(
            user=data.get("user"), client=data.get("client"), relayed=data.get("relayed")
        )

    @classmethod
    def of_request(cls, request: Mapping[str, Any]) -> SessionMatch:
        """The "match" of a control request or order (none: every session)."""
        match = request.get("match") or {}
        if not isinstance(match, Mapping):
            raise ValueError("match must be an object")
        return cls.from_dict(match)


def names_user(allocation: Allocation, user: str) -> bool:
    """`user` is the allocation's username, or the user part of its REST username (what
    quotas count it as)."""
    return user in (allocation.username, allocation.quota_user)


def format_host(ip: str, port: int | None) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def describe(allocation: Allocation, now: float, worker: int) -> dict[str, Any]:
    """One row of `pyturn sessions`: JSON types only."""
    transport, client, _ = allocation.five_tuple
    relayed = [format_host(*allocation.relayed_address)]
    if allocation.relayed_address6 is not None:
        relayed.append(format_host(*allocation.relayed_address6))
    return {
        "user": allocation.username,
        "quota_user": allocation.quota_user,
        "client": format_host(*client),
        "transport": transport,
        "relayed": relayed,
        "tcp_relay": allocation.is_tcp,
        "age": round(now - allocation.created_at, 3),
        "lifetime_left": round(max(allocation.expires_at - now, 0.0), 3),
        "permissions": sorted(allocation.permissions),
        "channels": {
            f"0x{number:04X}": format_host(*peer)
            for number, peer in sorted(allocation.channel_peers.items())
        },
        "peer_connections": len(allocation.peer_connections or ()),
        "bytes_to_peer": allocation.bytes_to_peer,
        "packets_to_peer": allocation.packets_to_peer,
        "bytes_to_client": allocation.bytes_to_client,
        "packets_to_client": allocation.packets_to_client,
        "worker": worker,
    }


def active_revocations(revoked: Mapping[str, float], now: float) -> dict[str, float]:
    """The revocations that have not ended by `now`."""
    return {user: until for user, until in revoked.items() if until > now}


def revocations_to_json(revoked: Mapping[str, float]) -> dict[str, float | None]:
    return {user: None if until == FOREVER else until for user, until in revoked.items()}


def revocations_from_json(data: object) -> dict[str, float]:
    """The inverse of revocations_to_json; ValueError for anything else."""
    if not isinstance(data, dict):
        raise ValueError("revocations must be an object of user: end time (or null)")
    out: dict[str, float] = {}
    for user, until in data.items():
        if not isinstance(user, str) or not 0 < len(user) < _MAX_NAME:
            raise ValueError("a revoked user name is 1 to 512 characters")
        if until is None:
            out[user] = FOREVER
        elif type(until) in (int, float) and abs(until) < 1e300:
            out[user] = float(until)
        elif until == math.inf:
            out[user] = FOREVER
        else:
            raise ValueError(f"the end of {user!r}'s revocation is not a time")
    return out
