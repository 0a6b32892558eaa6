"""Server configuration: a YAML file validated into frozen dataclasses.

The dataclasses below are the schema. Each field's type hint says what kind of
value it takes, and an optional `_rule(...)` in the field metadata adds bounds,
an extra check, or marks it secret. One generic walker (`_build`/`_convert`)
reads hints and rules for every field, so adding an option means adding a field,
not validation code. Rules that relate several fields live in the `_*_problems`
functions registered in `_CROSS_CHECKS`.

Every error is a `ConfigError` whose message starts with the file and the dotted
key path, e.g. ``conf/x.yaml: listen[1].port: must be an integer between 0 and
65535, got 'abc'``, because operators fix configs by reading that line.

A key written with no value (YAML null) means the same as leaving it out, so a
section whose entries are all commented out still gets its defaults.
"""

import ipaddress
import math
import os
import re
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "REDACTED",
    "AllocationsConfig",
    "AuthConfig",
    "BandwidthConfig",
    "Config",
    "ConfigError",
    "Listener",
    "LoggingConfig",
    "MetricsConfig",
    "PeersConfig",
    "QuotasConfig",
    "RelayAddress",
    "RelayConfig",
    "TlsConfig",
    "UserEntry",
    "config_to_dict",
    "default_config",
    "load_config",
    "parse_config",
    "parse_rate",
    "split_host_port",
]

REDACTED = "<redacted>"

# auto: TCP and TLS on one port, told apart by the first byte.
Transport = Literal["udp", "tcp", "tls", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
AddressFamily = Literal["ipv4", "keep"]
# An operator's peers entry, parsed (peers.allow, peers.deny).
PeerNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be read or is invalid.

    `source` is the file (or other origin) and `path` the dotted key path, or ""
    when the problem is not about one key (unreadable file, bad YAML).
    """

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.path = path


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class _Rule:
    """Constraints on a field beyond its type hint (applied to each item of a tuple)."""

    low: int | None = None
    high: int | None = None
    # Returns a phrase such as "must be an IPv4 address" when the value is bad.
    check: Callable[[Any], str | None] | None = None
    # Secret values are never echoed in errors and are redacted by config_to_dict.
    secret: bool = False
    non_empty: bool = False
    # Reads the raw YAML value itself (for values with units); raises ValueError saying
    # what is expected.
    parse: Callable[[object], Any] | None = None


_NO_RULE = _Rule()


def _rule(**kwargs: Any) -> dict[str, _Rule]:
    return {"rule": _Rule(**kwargs)}


def _rule_of(f: Field[Any]) -> _Rule:
    return cast(_Rule, f.metadata.get("rule", _NO_RULE))


def _ip(version: int | None = None, *, specific: bool = False) -> Callable[[str], str | None]:
    kind = {None: "an IP address", 4: "an IPv4 address", 6: "an IPv6 address"}[version]
    if specific:
        # 0.0.0.0 cannot be advertised to clients as a relay address.
        kind = f"{kind} other than the unspecified address"

    def check(text: str) -> str | None:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return f"must be {kind}"
        if (version is not None and addr.version != version) or (specific and addr.is_unspecified):
            return f"must be {kind}"
        return None

    return check


def parse_peers(text: str) -> tuple[PeerNetwork, ...]:
    """The networks an operator's entry names: a network (see `parse_network`) or an
    inclusive range ``"10.0.0.0-10.255.255.255"`` (coturn's spelling), which becomes the
    fewest networks that cover exactly that range.

    Raises ValueError naming the offending text when it is neither.
    """
    first, dash, last = text.strip().partition("-")
    if not dash:
        return (parse_network(text),)
    try:
        start, end = ipaddress.ip_address(first.strip()), ipaddress.ip_address(last.strip())
    except ValueError:
        raise ValueError(
            f"invalid range {text!r}: expected two addresses of one family, such as "
            "'10.0.0.0-10.255.255.255'"
        ) from None
    if start.version != end.version or int(start) > int(end):
        raise ValueError(f"invalid range {text!r}: it must go from a lower to a higher address")
    return tuple(ipaddress.summarize_address_range(start, end))


def parse_network(text: str) -> PeerNetwork:
    """Parse an operator-supplied network such as ``"10.0.0.0/8"``, ``"127.0.0.1"`` or ``"::1"``.

    A bare host becomes a /32 or /128.  Host bits are masked off rather than rejected
    (``strict=False``) because ``"10.1.2.3/8"`` in a config file plainly means 10.0.0.0/8.
    An IPv6 zone id is dropped: an allow or deny entry applies to the address, whatever
    interface it is reached through.

    Raises ValueError naming the offending text when it is not a network.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(
            f"invalid network {text!r}: expected an IPv4/IPv6 address or CIDR "
            f"such as '10.0.0.0/8' or '2001:db8::/32' ({exc})"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id:
        return ipaddress.IPv6Network((int(network.network_address), network.prefixlen))
    return network


def _network(text: str) -> str | None:
    try:
        parse_peers(text)
    except ValueError:
        return (
            "must be an IP address, a CIDR network such as 10.0.0.0/8 or a range such as "
            "10.0.0.0-10.255.255.255"
        )
    return None


def _absolute_path(text: str) -> str | None:
    return None if text.startswith("/") else "must be an absolute path"


def _shorter_than(limit: int) -> Callable[[str], str | None]:
    # RFC 8489 limits REALM and SOFTWARE to fewer than 128 characters.
    def check(text: str) -> str | None:
        return f"must be shorter than {limit} characters" if len(text) >= limit else None

    return check


_RATE = re.compile(
    r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<prefix>[kKMG]i?)?(?P<unit>bit/s|bps|b/s|B/s)\s*"
)
_RATE_PREFIXES = {
    None: 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
}


# 8 Tbit/s: far past any link, and small enough for the limits' 64-bit arithmetic.
_MAX_RATE = 10**12


def parse_rate(value: object) -> int:
    """A bandwidth in bytes per second (coturn's unit): an integer, or a string with a
    unit such as "2 Mbit/s", "500 kB/s" or "1 Gbps" (bits: bit/s, bps, b/s; bytes: B/s;
    k, M, G are powers of 1000, Ki, Mi, Gi of 1024). 0 or null: no limit."""
    if value is None:
        return 0
    rate = -1
    if isinstance(value, int) and not isinstance(value, bool):
        rate = value
    elif isinstance(value, str) and (match := _RATE.fullmatch(value)):
        bits = match["unit"] != "B/s"
        rate = round(float(match["number"]) * _RATE_PREFIXES[match["prefix"]] / (8 if bits else 1))
    if 0 <= rate <= _MAX_RATE:
        return rate
    raise ValueError(
        'must be a rate: bytes per second (an integer >= 0), or a string such as "2 Mbit/s"'
        ' or "500 kB/s"'
    )


SQLITE_PREFIX = "sqlite:///"


REDIS_SCHEMES = ("redis://", "rediss://")


def store_url_problem(url: str) -> str | None:
    """Why `url` cannot name a store (pyturn/store), or None."""
    if url.startswith(SQLITE_PREFIX) and len(url) > len(SQLITE_PREFIX):
        return None
    if url.startswith(REDIS_SCHEMES) and len(url) > len("rediss://"):
        return None
    return (
        "must be a store URL: sqlite:///PATH (such as sqlite:///var/lib/pyturn/users.db),"
        " or redis://HOST:PORT/DB or rediss://... (?password_file=PATH for a password)"
    )


_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<port6>[0-9]+)|(?P<v4>[^:\[\]]+):(?P<port4>[0-9]+)")


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``"192.0.2.1:3478"`` or ``"[2001:db8::1]:3478"`` into (address, port).

    The host must be an IP literal: ALTERNATE-SERVER carries an address, and
    resolving names at startup would make the config depend on DNS.
    Raises ValueError when `text` is not in that form.
    """
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        raise ValueError(f"not HOST:PORT: {text!r}")
    bracketed = match["v6"] is not None
    host = match["v6"] if bracketed else match["v4"]
    port = int(match["port6"] if bracketed else match["port4"])
    address = ipaddress.ip_address(host)
    if (address.version == 6) != bracketed:
        raise ValueError(f"IPv6 addresses must be in brackets, IPv4 ones must not: {text!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range: {text!r}")
    return host, port


def _host_port(text: str) -> str | None:
    try:
        split_host_port(text)
    except ValueError:
        return "must be IP:PORT or [IPv6]:PORT, e.g. 192.0.2.1:3478 or [2001:db8::1]:3478"
    return None


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class Listener:
    transport: Transport
    address: str = field(metadata=_rule(check=_ip()))
    # 0 asks the OS for a free port, which tests rely on.
    port: int = field(metadata=_rule(low=0, high=65535))
    # Every connection starts with a PROXY protocol header (v1 or v2) naming the client;
    # only trusted_proxies may connect (tcp, tls and auto listeners).
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=_rule(check=_network))

    def trusted_networks(self) -> tuple[PeerNetwork, ...] | None:
        """trusted_proxies parsed, or None when the listener takes no PROXY header."""
        if not self.proxy_protocol:
            return None
        return tuple(network for text in self.trusted_proxies for network in parse_peers(text))


def _tls_version(value: object) -> str:
    """1.2 or 1.3, which YAML reads as numbers unless quoted."""
    text = str(value)
    if text in ("1.2", "1.3"):
        return text
    raise ValueError('must be "1.2" (TLS 1.2 and 1.3) or "1.3" (TLS 1.3 only)')


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certificate: str | None = None
    private_key: str | None = None
    # OpenSSL's cipher list for TLS 1.2 (TLS 1.3's suites are OpenSSL's); null: Python's.
    ciphers: str | None = None
    min_version: str = field(default="1.2", metadata=_rule(parse=_tls_version))


# Relay addresses of one family, relay.address(6) included: a RESERVATION-TOKEN names
# one in three bits (pyturn/core/relay_ports.py).
MAX_RELAY_ADDRESSES = 8


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """One more address to relay from (coturn: a second relay-ip, external-ip=PUB/PRIV)."""

    address: str = field(metadata=_rule(check=_ip(specific=True)))
    # What clients are told, when the address is behind a 1:1 NAT; same family.
    external_address: str | None = field(default=None, metadata=_rule(check=_ip(specific=True)))


AUTO = "auto"


def _ip_or_auto(version: int) -> Callable[[str], str | None]:
    check = _ip(version, specific=True)

    def check_or_auto(text: str) -> str | None:
        if text == AUTO:
            return None
        problem = check(text)
        return None if problem is None else f'{problem}, or "auto" (see relay.discover)'

    return check_or_auto


def _stun_url(text: str) -> str | None:
    try:
        parse_stun_url(text)
    except ValueError as exc:
        return str(exc)
    return None


def parse_stun_url(text: str) -> tuple[str, int]:
    """``"stun:HOST[:PORT]"`` (RFC 7064; IPv6 in brackets) -> (host, port), port 3478 by
    default. Raises ValueError saying what is wrong."""
    scheme, colon, rest = text.partition(":")
    if scheme != "stun" or not colon or not rest:
        raise ValueError("must be a STUN URL such as stun:stun.example.org:3478")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("must be stun:[IPv6]:PORT or stun:[IPv6]")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = rest.partition(":")
    if not host:
        raise ValueError("names no host")
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text) if port_text else 3478


@dataclass(frozen=True, slots=True)
class RelayConfig:
    address: str = field(default="0.0.0.0", metadata=_rule(check=_ip(4)))  # noqa: S104
    # "auto": learnt from the STUN servers in `discover`, at start and every
    # discover_interval seconds.
    external_address: str | None = field(default=None, metadata=_rule(check=_ip_or_auto(4)))
    address6: str | None = field(default=None, metadata=_rule(check=_ip(6)))
    external_address6: str | None = field(default=None, metadata=_rule(check=_ip_or_auto(6)))
    min_port: int = field(default=49152, metadata=_rule(low=1, high=65535))
    max_port: int = field(default=65535, metadata=_rule(low=1, high=65535))
    # Allocations take the addresses of their family in turn; a port number is in use on
    # one of them at a time, so min_port..max_port bounds the allocations of a family.
    more_addresses: tuple[RelayAddress, ...] = ()
    # STUN servers asked, in order until one answers, for an external address "auto".
    discover: tuple[str, ...] = field(default=(), metadata=_rule(check=_stun_url))
    discover_interval: int = field(default=300, metadata=_rule(low=1))

    def fixed_external(self, version: int) -> str | None:
        """external_address (or 6) when it is an address, not "auto" or unset."""
        value = self.external_address if version == 4 else self.external_address6
        return None if value == AUTO else value

    def discovered(self) -> tuple[int, ...]:
        """The IP versions whose external address is "auto"."""
        return tuple(
            version
            for version, value in ((4, self.external_address), (6, self.external_address6))
            if value == AUTO
        )

    def more_of(self, version: int) -> tuple[RelayAddress, ...]:
        """The more_addresses of IP `version` (4 or 6), in order."""
        return tuple(
            extra
            for extra in self.more_addresses
            if ipaddress.ip_address(extra.address).version == version
        )

    def bind_addresses(self, version: int) -> tuple[str, ...]:
        """Where relay sockets of IP `version` bind: index 0 is address (address6)."""
        first = self.address if version == 4 else self.address6
        if first is None:
            return ()
        return (first, *(extra.address for extra in self.more_of(version)))


@dataclass(frozen=True, slots=True)
class UserEntry:
    """Long-term credential of one user: a password, or the MD5 key derived from it."""

    password: str | None = field(default=None, metadata=_rule(secret=True))
    key: bytes | None = field(default=None, metadata=_rule(secret=True))


def _separator(text: str) -> str | None:
    if len(text) == 1 and text.isprintable() and not text.isalnum():
        return None
    return "must be one character that is not a letter or digit, such as : or -"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    # Read-only view so a Config can be shared between tasks without copies.
    # Left out of the hash because mappingproxy is unhashable; equality still
    # compares it, and equal configs still hash equal.
    users: Mapping[str, UserEntry] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    secrets: tuple[str, ...] = field(default=(), metadata=_rule(secret=True))
    nonce_lifetime: int = field(default=600, metadata=_rule(low=30))
    # End an allocation when its REST credential expires, not when its lifetime does.
    end_expired_sessions: bool = False
    # Binding requests need credentials too (401 without them), as Allocate does.
    secure_stun: bool = False
    # More REST secrets, read at start and on reload: files holding one per line, and
    # environment variables.
    secret_files: tuple[str, ...] = field(default=(), metadata=_rule(check=_absolute_path))
    secret_env: tuple[str, ...] = ()
    # Between the expiry and the user part of a REST username (`<expiry>:<user>`).
    rest_separator: str = field(default=":", metadata=_rule(check=_separator))

    def __post_init__(self) -> None:
        # Also freeze mappings passed in by code (tests, embedders), not just parsed ones.
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))


@dataclass(frozen=True, slots=True)
class PeersConfig:
    # The original strings are kept so check-config prints what the operator wrote.
    allow: tuple[str, ...] = field(default=(), metadata=_rule(check=_network))
    deny: tuple[str, ...] = field(default=(), metadata=_rule(check=_network))


@dataclass(frozen=True, slots=True)
class AllocationsConfig:
    default_lifetime: int = field(default=600, metadata=_rule(low=1))
    max_lifetime: int = field(default=3600, metadata=_rule(low=1))
    # RFC 8656 binds channels 0x4000-0x4FFF only; RFC 5766 allowed up to 0x7FFF, and some
    # old clients (coturn's own turnutils_uclient among them) still pick numbers there.
    legacy_channel_numbers: bool = False
    # RFC 6062 allocations (REQUESTED-TRANSPORT TCP); false answers them 442.
    tcp_relay: bool = True
    # The relay's address family when the client asks for none: ipv4 (RFC 8656), or
    # keep: the family of the client's own address, when the relay has it.
    default_family: AddressFamily = "ipv4"


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    allocations_per_user: int = field(default=64, metadata=_rule(low=0))
    allocations_total: int = field(default=0, metadata=_rule(low=0))
    permissions_per_allocation: int = field(default=256, metadata=_rule(low=1))
    # RFC 5766 channel numbers span 0x4000-0x7FFF, so more could never be used.
    channels_per_allocation: int = field(default=256, metadata=_rule(low=1, high=0x4000))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Unsigned answers (401, 438) per client IP: a burst, then a steady rate per second.
    # They are what a spoofed-source flood would reflect onto a victim.
    unauthenticated_burst: int = field(default=32, metadata=_rule(low=1))
    unauthenticated_rate: float = field(default=8.0, metadata=_rule(low=0))
    # TCP/TLS connections held open per client IP.
    connections_per_source: int = field(default=64, metadata=_rule(low=1))
    # Seconds a new TCP/TLS connection has to send its first complete message; after
    # as long without one, a connection with no allocation (any more) is closed.
    first_message_timeout: float = field(default=5.0, metadata=_rule(low=0.1))


@dataclass(frozen=True, slots=True)
class BandwidthConfig:
    # Bytes per second each way (see parse_rate), 0: unlimited. per_allocation is one
    # allocation's, per_user all of a user's allocations on the node, total the node's.
    per_allocation: int = field(default=0, metadata=_rule(parse=parse_rate))
    per_user: int = field(default=0, metadata=_rule(parse=parse_rate))
    total: int = field(default=0, metadata=_rule(parse=parse_rate))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    address: str = field(default="127.0.0.1", metadata=_rule(check=_ip()))
    port: int = field(default=9641, metadata=_rule(low=0, high=65535))
    # HTTP basic authentication from a file of `user:password` lines (pyturn/web/
    # basic_auth.py), for when the port is reachable from other hosts; /live and /ready
    # stay open. null: no authentication.
    auth: str | None = field(default=None, metadata=_rule(check=_absolute_path))


@dataclass(frozen=True, slots=True)
class ControlConfig:
    # The UNIX socket that `pyturn sessions|kick|revoke|reload|drain` talk to.
    enabled: bool = True
    socket: str = field(default="/run/pyturn/control.sock", metadata=_rule(check=_absolute_path))
    # Where revocations outlive a restart when no Redis store keeps them.
    state_file: str = field(
        default="/var/lib/pyturn/state.json", metadata=_rule(check=_absolute_path)
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"
    # A file instead of stderr, reopened on reload (for logrotate); null: stderr.
    file: str | None = field(default=None, metadata=_rule(check=_absolute_path))
    # Also to the local syslog (/dev/log), facility daemon.
    syslog: bool = False


_DEFAULT_LISTEN = (
    Listener("udp", "0.0.0.0", 3478),  # noqa: S104
    Listener("tcp", "0.0.0.0", 3478),  # noqa: S104
)


@dataclass(frozen=True, slots=True)
class Config:
    realm: str = field(default="pyturn", metadata=_rule(check=_shorter_than(128)))
    listen: tuple[Listener, ...] = field(default=_DEFAULT_LISTEN, metadata=_rule(non_empty=True))
    tls: TlsConfig = field(default_factory=TlsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    allocations: AllocationsConfig = field(default_factory=AllocationsConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    bandwidth: BandwidthConfig = field(default_factory=BandwidthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    software: str | None = field(default=None, metadata=_rule(check=_shorter_than(128)))
    # 0: one worker process per CPU (see pyturn.net.supervisor).
    workers: int = field(default=0, metadata=_rule(low=0))
    shutdown_timeout: float = field(default=30.0, metadata=_rule(low=0))
    alternate_server: str | None = field(default=None, metadata=_rule(check=_host_port))
    # Answer every Allocate 300 Try Alternate with these servers in turn (load sharing).
    redirect_allocations: tuple[str, ...] = field(default=(), metadata=_rule(check=_host_port))
    # Users and REST secrets besides auth (pyturn/store): sqlite:///PATH; null: none.
    store: str | None = field(default=None, metadata=_rule(check=store_url_problem))


# --------------------------------------------------------------------------- cross-field rules


def config_warnings(config: Config) -> list[str]:
    """What is valid but probably not meant: printed by check-config, logged by serve."""
    warnings: list[str] = []
    relay, quotas = config.relay, config.quotas
    ports = relay.max_port - relay.min_port + 1
    where = f"relay ports {relay.min_port}-{relay.max_port} ({ports})"
    if quotas.allocations_total > ports:
        warnings.append(
            f"{where}: fewer than quotas.allocations_total ({quotas.allocations_total}); "
            "past them, Allocates get 508"
        )
    elif not quotas.allocations_total and ports < quotas.allocations_per_user:
        warnings.append(
            f"{where}: fewer than quotas.allocations_per_user ({quotas.allocations_per_user}),"
            " so one user can take every port; lower it, set quotas.allocations_total "
            "or widen the range"
        )
    rates = config.bandwidth
    scopes = [("per_allocation", rates.per_allocation), ("per_user", rates.per_user)]
    for wider, limit in (("per_user", rates.per_user), ("total", rates.total)):
        for narrower, rate in scopes:
            if narrower != wider and limit and rate > limit:
                warnings.append(
                    f"bandwidth.{narrower} ({rate} B/s) is above bandwidth.{wider} "
                    f"({limit} B/s): it can never be reached"
                )
    return warnings


# Each yields (key path relative to the object, problem); the first one is reported.
_Problems = Iterator[tuple[str, str]]


def _user_problems(user: UserEntry) -> _Problems:
    if (user.password is None) == (user.key is None):
        yield "", "must set exactly one of 'password' and 'key'"


def _relay_problems(relay: RelayConfig) -> _Problems:
    if relay.min_port > relay.max_port:
        yield "min_port", f"must not exceed max_port ({relay.min_port} > {relay.max_port})"
    if relay.external_address6 is not None and relay.address6 is None:
        yield "external_address6", "requires address6 (IPv6 relaying is off without it)"
    if relay.discovered() and not relay.discover:
        yield "discover", 'must list STUN servers (stun:HOST:PORT) for an external address "auto"'
    if relay.discover and not relay.discovered():
        yield "discover", 'has no effect unless external_address or external_address6 is "auto"'
    seen = {relay.address, relay.address6}
    for position, extra in enumerate(relay.more_addresses):
        where = f"more_addresses[{position}]"
        version = ipaddress.ip_address(extra.address).version
        external = extra.external_address
        if external is not None and ipaddress.ip_address(external).version != version:
            yield f"{where}.external_address", f"must be an IPv{version} address like address"
        if version == 6 and relay.address6 is None:
            yield f"{where}.address", "an IPv6 relay address requires address6"
        primary = relay.address if version == 4 else relay.address6
        if primary is not None and ipaddress.ip_address(primary).is_unspecified:
            yield (
                f"{where}.address",
                f"needs a specific {'address' if version == 4 else 'address6'} (not "
                f"{primary}): a wildcard relay socket would take every address's traffic",
            )
        if extra.address in seen:
            yield f"{where}.address", f"{extra.address} is already a relay address"
        seen.add(extra.address)
    for version in (4, 6):
        if len(relay.bind_addresses(version)) > MAX_RELAY_ADDRESSES:
            yield (
                "more_addresses",
                f"at most {MAX_RELAY_ADDRESSES} IPv{version} relay addresses, address"
                f"{'6' if version == 6 else ''} included",
            )


def _allocations_problems(allocations: AllocationsConfig) -> _Problems:
    if allocations.max_lifetime < allocations.default_lifetime:
        yield (
            "max_lifetime",
            f"must be >= default_lifetime ({allocations.max_lifetime} < "
            f"{allocations.default_lifetime})",
        )


# A relay port's owner is one byte in the node's shared state (pyturn/net/node_state.py).
MAX_WORKERS = 254


def _config_problems(config: Config) -> _Problems:
    if config.workers > MAX_WORKERS:
        yield "workers", f"must be at most {MAX_WORKERS}, got {config.workers}"
    tls_users = [
        i for i, listener in enumerate(config.listen) if listener.transport in ("tls", "auto")
    ]
    if tls_users:
        first = config.listen[tls_users[0]].transport
        for name in ("certificate", "private_key"):
            if getattr(config.tls, name) is None:
                yield f"tls.{name}", f"is required by the {first} listener listen[{tls_users[0]}]"
    for i, listener in enumerate(config.listen):
        if listener.proxy_protocol and listener.transport == "udp":
            yield f"listen[{i}].proxy_protocol", "is for tcp, tls and auto listeners only"
        elif listener.proxy_protocol and not listener.trusted_proxies:
            yield (
                f"listen[{i}].trusted_proxies",
                "must name the proxies (addresses or networks) allowed to send PROXY headers",
            )
        elif listener.trusted_proxies and not listener.proxy_protocol:
            yield f"listen[{i}].trusted_proxies", "has no effect without proxy_protocol: true"
    # Two identical sockets would only fail later, at bind time, with a vaguer error.
    # tcp and tls share the TCP port space; port 0 never clashes.
    seen: dict[tuple[bool, ipaddress.IPv4Address | ipaddress.IPv6Address, int], int] = {}
    for i, listener in enumerate(config.listen):
        if listener.port == 0:
            continue
        socket_key = (
            listener.transport == "udp",
            ipaddress.ip_address(listener.address),
            listener.port,
        )
        if socket_key in seen:
            yield f"listen[{i}]", f"uses the same address and port as listen[{seen[socket_key]}]"
        seen.setdefault(socket_key, i)


_CROSS_CHECKS: dict[type[Any], Callable[[Any], _Problems]] = {
    UserEntry: _user_problems,
    RelayConfig: _relay_problems,
    AllocationsConfig: _allocations_problems,
    Config: _config_problems,
}


# --------------------------------------------------------------------------- validation walker


class _Invalid(Exception):
    """Raised inside the walker; parse_config adds the source and re-raises ConfigError."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def _join(path: str, key: str) -> str:
    if not key:
        return path
    if not path or key.startswith("["):
        return path + key
    return f"{path}.{key}"


_KIND_NAMES: dict[type[Any], str] = {dict: "mapping", list: "list", str: "string"}


def _show(value: object, secret: bool = False) -> str:
    if secret or isinstance(value, Mapping | list | tuple):
        kind = _KIND_NAMES.get(type(value), type(value).__name__)
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, value: object, rule: _Rule = _NO_RULE) -> _Invalid:
    return _Invalid(path, f"{expected}, got {_show(value, rule.secret)}")


def _bounds(noun: str, rule: _Rule) -> str:
    if rule.low is not None and rule.high is not None:
        return f"{noun} between {rule.low} and {rule.high}"
    if rule.low is not None:
        return f"{noun} >= {rule.low}"
    if rule.high is not None:
        return f"{noun} <= {rule.high}"
    return noun


def _in_bounds(number: float, rule: _Rule) -> bool:
    return (rule.low is None or number >= rule.low) and (rule.high is None or number <= rule.high)


_HEX_KEY = re.compile(r"(?:0[xX])?([0-9a-fA-F]{32})")


def _scalar(value: object, hint: type[Any], rule: _Rule, path: str) -> object:
    # bool is an int subclass, so `port: true` must be refused explicitly.
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and _in_bounds(value, rule):
            return value
        raise _fail(path, f"must be {_bounds('an integer', rule)}", value, rule)
    if hint is float:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and _in_bounds(value, rule)
        ):
            return float(value)
        raise _fail(path, f"must be {_bounds('a number', rule)}", value, rule)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, "must be true or false", value, rule)
    if hint is str:
        if isinstance(value, str) and value:
            return value
        # YAML turns unquoted 12345, yes or 1.0 into numbers and booleans.
        hint_quote = " (quote it in YAML)" if isinstance(value, int | float) else ""
        raise _fail(path, f"must be a non-empty string{hint_quote}", value, rule)
    if hint is bytes:
        # The only bytes field is an MD5 key; coturn writes those as 0x-prefixed hex.
        if isinstance(value, str) and (match := _HEX_KEY.fullmatch(value)):
            return bytes.fromhex(match[1])
        raise _fail(path, "must be a quoted string of 32 hex digits (an MD5 key)", value, rule)
    raise TypeError(f"unsupported config field type {hint!r} at {path}")


def _convert(value: object, hint: Any, rule: _Rule, path: str) -> object:
    if rule.parse is not None:
        try:
            return rule.parse(value)
        except ValueError as exc:
            raise _fail(path, str(exc), value, rule) from None
    origin = get_origin(hint)
    if origin is UnionType:  # only `X | None` is used in the schema
        (inner,) = (arg for arg in get_args(hint) if arg is not NoneType)
        return None if value is None else _convert(value, inner, rule, path)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, str) and value in choices:
            return value
        raise _fail(path, f"must be one of {', '.join(map(repr, choices))}", value, rule)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _fail(path, "must be a list", value)
        if rule.non_empty and not value:
            raise _Invalid(path, "must not be empty")
        (item_hint, _) = get_args(hint)
        return tuple(
            _convert(item, item_hint, rule, f"{path}[{i}]") for i, item in enumerate(value)
        )
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise _fail(path, "must be a mapping", value)
        _, item_hint = get_args(hint)
        result: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise _fail(path, "keys must be non-empty strings", key)
            result[key] = _convert(item, item_hint, rule, _join(path, key))
        return MappingProxyType(result)
    if isinstance(hint, type) and is_dataclass(hint):
        return _build(hint, value, path)
    result_value = _scalar(value, hint, rule, path)
    if rule.check is not None and (problem := rule.check(result_value)):
        raise _fail(path, problem, value, rule)
    return result_value


def _build(cls: type[Any], data: object, path: str) -> Any:
    if cls is UserEntry and isinstance(data, str):
        data = {"password": data}  # YAML shorthand `alice: password`
    if not isinstance(data, Mapping):
        if cls is UserEntry:
            expected = "must be a password string or a mapping like {key: <32 hex digits>}"
            raise _fail(path, expected, data, _Rule(secret=True))
        raise _fail(path, "must be a mapping", data)
    schema = fields(cls)
    names = [f.name for f in schema]
    for key in data:
        if key not in names:
            expected = ", ".join(names)
            raise _Invalid(_join(path, str(key)), f"unknown key (expected one of: {expected})")
    hints = get_type_hints(cls)
    kwargs: dict[str, object] = {}
    for f in schema:
        value = data.get(f.name)
        if value is None:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _Invalid(_join(path, f.name), "is required")
            continue
        kwargs[f.name] = _convert(value, hints[f.name], _rule_of(f), _join(path, f.name))
    obj = cls(**kwargs)
    for key, problem in _CROSS_CHECKS.get(cls, lambda _: iter(()))(obj):
        raise _Invalid(_join(path, key), problem)
    return obj


# --------------------------------------------------------------------------- YAML loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one.

    A second `relay:` section further down a long file would otherwise quietly
    discard the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; an empty file gives all defaults."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read config file: {exc.strerror or exc}", source=source
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid UTF-8: {exc.reason}", source=source) from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            f"{source}: {where}invalid YAML: {exc.problem or exc}", source=source
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}", source=source) from exc
    return parse_config(data, source)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate already-parsed YAML data (None counts as an empty mapping)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping, got {_show(data)}", source=source
        )
    try:
        config = cast(Config, _build(Config, data, ""))
        return _with_outside_secrets(config)
    except _Invalid as exc:
        raise ConfigError(
            f"{source}: {exc.path}: {exc.problem}", source=source, path=exc.path
        ) from None


def _with_outside_secrets(config: Config) -> Config:
    """auth.secrets plus those in auth.secret_files (one per line, as a Kubernetes
    Secret or a systemd credential holds them) and auth.secret_env, read now: a reload
    reads them again."""
    auth = config.auth
    found = list(auth.secrets)
    for position, name in enumerate(auth.secret_files):
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _Invalid(f"auth.secret_files[{position}]", f"{name}: {reason}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise _Invalid(f"auth.secret_files[{position}]", f"{name} holds no secret")
        found += lines
    for position, variable in enumerate(auth.secret_env):
        value = os.environ.get(variable, "").strip()
        if not value:
            raise _Invalid(f"auth.secret_env[{position}]", f"${variable} is not set or empty")
        found.append(value)
    if len(found) == len(auth.secrets):
        return config
    unique = tuple(dict.fromkeys(found))
    return replace(config, auth=replace(auth, secrets=unique))


def default_config() -> Config:
    return Config()


# --------------------------------------------------------------------------- dumping


def config_to_dict(config: Config, redact: bool = True) -> dict[str, object]:
    """The effective config as plain YAML-serialisable data, in schema order.

    With redact=False the result parses back to an equal Config.
    """
    return cast(dict[str, object], _dump(config, secret=False, redact=redact))


def _dump(value: object, *, secret: bool, redact: bool) -> object:
    if value is None:
        return None
    if isinstance(value, UserEntry):
        # Mirror the YAML shorthand so the output looks like what operators write.
        if value.password is not None:
            return _dump(value.password, secret=True, redact=redact)
        return {"key": _dump(value.key, secret=True, redact=redact)}
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _dump(getattr(value, f.name), secret=_rule_of(f).secret, redact=redact)
            for f in fields(value)
        }
    if isinstance(value, tuple):
        return [_dump(item, secret=secret, redact=redact) for item in value]
    if isinstance(value, Mapping):
        return {key: _dump(item, secret=secret, redact=redact) for key, item in value.items()}
    if secret and redact:
        return REDACTED
    if isinstance(value, bytes):
        return value.hex()
    return value
