"""`pyturn import-coturn`: a coturn configuration, as a pyturn one.

coturn reads `turnserver.conf` lines (`key=value`, `key value` or a bare flag) and the
same options on its command line (`--key=value`, `-n`, ...), the file first and the
command line over it. `read_file` and `read_args` turn either into `Option`s with where
each came from; `convert` maps them to a pyturn config (a dict for YAML) and says, for
each option, what became of it:

- mapped: to which pyturn key;
- dropped: it has no effect in pyturn, and why (pyturn already behaves so, or the
  feature is obsolete);
- unsupported: pyturn cannot do what it asks; the operator must decide.

The peer policy keeps coturn's meaning: in coturn an allowed-peer-ip wins over a
denied-peer-ip that covers it, which pyturn's rule (the most specific range wins)
gives as long as the allowed range is the narrower one; where it is not, the
importer says so.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyturn.config import MAX_RELAY_ADDRESSES, default_config, parse_peers
from pyturn.core.policy import DEFAULT_DENY, IPNetwork, PeerPolicy

MAPPED = "mapped"
DROPPED = "dropped"
UNSUPPORTED = "unsupported"
# Not an option: something the operator should know (it does not fail the import).
WARNING = "warning"
# coturn's short options that deployments use, by their long names.
_SHORT = {
    "-a": "lt-cred-mech",
    "-f": "fingerprint",
    "-n": "no-config-file",
    "-o": "daemon",
    "-v": "verbose",
    "-V": "Verbose",
    "-z": "no-auth",
    "-c": "config",
    "-p": "listening-port",
    "-L": "listening-ip",
    "-E": "relay-ip",
    "-X": "external-ip",
    "-r": "realm",
    "-u": "user",
    "-b": "userdb",
    "-m": "relay-threads",
    "-l": "log-file",
    "-q": "user-quota",
    "-Q": "total-quota",
    "-s": "max-bps",
}
# Unfilled template placeholders: $(cmd), ${VAR}, __VAR__, {{ var }}, <var>, [text], {var}.
_PLACEHOLDER = re.compile(
    r"\$\(|\$\{|__[A-Z0-9_]+__|\{\{|^<.*>$|^\[.*\]$|^\{.*\}$|^\.\.\.$|<[a-zA-Z_ -]+>"
)
_TRAILING_COMMENT = re.compile(r"(^|\s+)#.*$")
_TRUE = {"1", "yes", "true", "on", "t", "y"}
_FALSE = {"0", "no", "false", "off", "f", "n"}


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    value: str | None  # None: a bare flag
    where: str  # "FILE:LINE" or "command line"


@dataclass(frozen=True, slots=True)
class Outcome:
    option: Option
    kind: str  # MAPPED, DROPPED or UNSUPPORTED
    detail: str

    def line(self) -> str:
        return f"{self.option.where}: {self.option.name}: {self.kind}: {self.detail}"


def read_file(text: str, source: str) -> list[Option]:
    """The options of a turnserver.conf, as coturn reads them."""
    options: list[Option] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([^\s=]+)[\s=]*(.*)$", line)
        assert match is not None
        name, value = match[1], match[2]
        options.append(Option(name, value if value != "" else None, f"{source}:{number}"))
    return options


def read_args(argv: Sequence[str]) -> tuple[list[Option], str | None, bool]:
    """The options of coturn's command line, the config file it names (`-c`), and
    whether it said `-n` (no config file)."""
    options: list[Option] = []
    config: str | None = None
    no_file = False
    items = list(argv)
    if items and items[0] in ("turnserver", "/usr/bin/turnserver", "/usr/local/bin/turnserver"):
        items = items[1:]
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        where = f"command line ({item.split('=', 1)[0]})"
        if item.startswith("--"):
            name, equals, value = item[2:].partition("=")
            if not equals and name in _VALUED and index < len(items):
                value = items[index]
                equals = "="
                index += 1
            option = Option(name, value if equals else None, where)
        elif item.startswith("-") and len(item) >= 2:
            name = _SHORT.get(item[:2], item)
            attached: str | None = item[2:] or None
            if attached is None and name in _VALUED and index < len(items):
                attached = items[index]
                index += 1
            option = Option(name, attached, where)
        else:
            options.append(Option(item, None, "command line"))
            continue
        if option.name == "config":
            config = option.value
        elif option.name == "no-config-file":
            no_file = True
        else:
            options.append(option)
    return options, config, no_file


def split_args(text: str) -> list[str]:
    return shlex.split(text)


# -- the mapping --------------------------------------------------------------------------


@dataclass
class _State:
    """What the options say, gathered before the pyturn config is written."""

    config: dict[str, Any] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    listening_port: int = 3478
    tls_port: int = 5349
    listening_ips: list[str] = field(default_factory=list)
    transports: set[str] = field(default_factory=lambda: {"udp", "tcp", "tls"})
    relay_ips: list[str] = field(default_factory=list)
    external: list[tuple[str, str | None]] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    use_auth_secret: bool = False
    users: dict[str, Any] = field(default_factory=dict)
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    seen: dict[str, Option] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        found = self.config.setdefault(name, {})
        assert isinstance(found, dict)
        return found


Handler = Callable[[_State, Option], Outcome]


def _int(option: Option, low: int = 0, high: int | None = None) -> int:
    value = (option.value or "").strip().strip('"')
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"{option.value!r} is not a whole number")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ValueError(f"{number} is out of range ({low}-{high})")
    return number


def _flag(option: Option) -> bool:
    if option.value is None:
        return True
    value = option.value.strip().strip('"').lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{option.value!r} is not yes or no")


def _text(option: Option) -> str:
    value = (option.value or "").strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value:
        raise ValueError("needs a value")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (pyturn takes no host names here)"
        ) from None


def _setter(section: str | None, key: str, parse: Callable[[Option], object]) -> Handler:
    def handle(state: _State, option: Option) -> Outcome:
        value = parse(option)
        target = state.config if section is None else state.section(section)
        target[key] = value
        shown = str(value).lower() if isinstance(value, bool) else value
        return Outcome(option, MAPPED, f"{section + '.' if section else ''}{key}: {shown}")

    return handle


def _family(text: str) -> str:
    if text == "ipv4":
        return "ipv4"
    if text == "keep":
        return "keep"
    raise ValueError(f"{text!r}: pyturn's default family is ipv4 or keep (ask for ipv6 per client)")


def _listening_port(state: _State, option: Option) -> Outcome:
    state.listening_port = _int(option, 1, 65535)
    return Outcome(option, MAPPED, f"listen: udp and tcp on port {state.listening_port}")


def _tls_port(state: _State, option: Option) -> Outcome:
    state.tls_port = _int(option, 1, 65535)
    return Outcome(option, MAPPED, f"listen: tls on port {state.tls_port}")


def _listening_ip(state: _State, option: Option) -> Outcome:
    state.listening_ips.append(_ip(_text(option)))
    return Outcome(option, MAPPED, f"listen: address {state.listening_ips[-1]}")


def _no_transport(transport: str) -> Handler:
    def handle(state: _State, option: Option) -> Outcome:
        if _flag(option):
            state.transports.discard(transport)
        return Outcome(option, MAPPED, f"listen: no {transport} listener")

    return handle


def _relay_ip(state: _State, option: Option) -> Outcome:
    ip = _ip(_text(option))
    first = not any((":" in seen) == (":" in ip) for seen in state.relay_ips)
    state.relay_ips.append(ip)
    key = ("relay.address6" if ":" in ip else "relay.address") if first else "relay.more_addresses"
    return Outcome(option, MAPPED, f"{key}: {ip}")


def _external_ip(state: _State, option: Option) -> Outcome:
    public, _, private = _text(option).partition("/")
    pair = (_ip(public), _ip(private) if private else None)
    state.external.append(pair)
    key = "relay.external_address6" if ":" in pair[0] else "relay.external_address"
    if pair[1] is None:
        return Outcome(option, MAPPED, f"{key}: {pair[0]}")
    return Outcome(
        option,
        MAPPED,
        f"relay address {pair[1]}, told to clients as {pair[0]} (relay.address and "
        "external_address, or an entry of relay.more_addresses; as in coturn, "
        f"{pair[1]} is allowed as a peer)",
    )


def _secret(state: _State, option: Option) -> Outcome:
    state.secrets.append(_text(option))
    return Outcome(option, MAPPED, "auth.secrets")


def _use_auth_secret(state: _State, option: Option) -> Outcome:
    state.use_auth_secret = _flag(option)
    return Outcome(option, MAPPED, "auth.secrets (TURN REST API credentials)")


def _user(state: _State, option: Option) -> Outcome:
    name, colon, password = _text(option).partition(":")
    if not colon or not name or not password:
        raise ValueError("must be NAME:PASSWORD or NAME:0xKEY")
    if password.lower().startswith("0x"):
        state.users[name] = {"key": password}
    else:
        state.users[name] = password
    return Outcome(option, MAPPED, f"auth.users: {name}")


def _userdb(state: _State, option: Option) -> Outcome:
    path = _text(option)
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: give the SQLite file's absolute path")
    state.config["store"] = f"sqlite://{path}"
    return Outcome(option, MAPPED, f"store: sqlite://{path} (coturn's SQLite schema, as it is)")


def _redis_userdb(state: _State, option: Option) -> Outcome:
    fields = dict(part.partition("=")[::2] for part in _text(option).split())
    if "password" in fields:
        return Outcome(
            option,
            UNSUPPORTED,
            "Redis with a password: put it in a file readable by pyturn only and set "
            "store: redis://HOST:PORT/DB?password_file=PATH",
        )
    host = fields.get("ip") or fields.get("host") or "127.0.0.1"
    url = f"redis://{host}:{fields.get('port', '6379')}/{fields.get('dbname', '0')}"
    state.config["store"] = url
    return Outcome(option, MAPPED, f"store: {url} (coturn's Redis keys, as they are)")


def _peer_range(text: str) -> str:
    """A coturn peer range (`IP` or `IP-IP`; not CIDR, which coturn refuses), checked."""
    if "/" in text:
        raise ValueError(f"{text!r}: coturn takes IP or IP-IP here, not CIDR")
    parse_peers(text)
    return "-".join(part.strip() for part in text.split("-"))


def _peers(kind: str) -> Handler:
    def handle(state: _State, option: Option) -> Outcome:
        entry = _peer_range(_text(option))
        target = state.allow if kind == "allow" else state.deny
        if entry in target:
            return Outcome(option, DROPPED, f"the same range as an earlier {option.name} line")
        target.append(entry)
        return Outcome(option, MAPPED, f"peers.{kind}: {entry}")

    return handle


def _allow_loopback(state: _State, option: Option) -> Outcome:
    if _flag(option):
        state.allow += ["127.0.0.0/8", "::1"]
    return Outcome(option, MAPPED, "peers.allow: 127.0.0.0/8, ::1")


def _verbose(level: str) -> Handler:
    def handle(state: _State, option: Option) -> Outcome:
        state.section("logging")["level"] = level
        return Outcome(option, MAPPED, f"logging.level: {level}")

    return handle


def _log_file(state: _State, option: Option) -> Outcome:
    target = _text(option)
    if target in ("stdout", "-", "stderr"):
        return Outcome(option, DROPPED, "pyturn logs to stderr (journald, docker logs)")
    if target == "syslog":
        return _syslog(state, option)
    if not target.startswith("/"):
        raise ValueError(f"{target!r}: give the log file's absolute path")
    state.section("logging")["file"] = target
    return Outcome(option, MAPPED, f"logging.file: {target} (reopened on reload)")


def _syslog(state: _State, option: Option) -> Outcome:
    state.section("logging")["syslog"] = _flag(option)
    return Outcome(option, MAPPED, "logging.syslog")


def _prometheus(state: _State, option: Option) -> Outcome:
    state.section("metrics")["enabled"] = _flag(option)
    return Outcome(option, MAPPED, "metrics.enabled (/metrics, /live, /ready)")


def _stale_nonce(state: _State, option: Option) -> Outcome:
    seconds = 600 if option.value is None else _int(option, 30)
    state.section("auth")["nonce_lifetime"] = seconds
    return Outcome(option, MAPPED, f"auth.nonce_lifetime: {seconds}")


def _alternate(state: _State, option: Option) -> Outcome:
    text = _text(option)
    host, _, port = text.rpartition(":") if text.count(":") == 1 or "]" in text else (text, "", "")
    address = _ip(host.strip("[]") if host else text)
    spelled = f"[{address}]" if ":" in address else address
    value = f"{spelled}:{port or 3478}"
    state.config.setdefault("redirect_allocations", []).append(value)
    return Outcome(
        option, MAPPED, f"redirect_allocations: {value} (every Allocate, in turn, as coturn)"
    )


def _obsolete(detail: str) -> Handler:
    def handle(state: _State, option: Option) -> Outcome:
        if option.name not in _VALUED:
            _flag(option)  # coturn stops at a flag whose value is not yes or no
        return Outcome(option, DROPPED, detail)

    return handle


_DEFAULT_ON = "pyturn does this by default"
_HANDLERS: dict[str, Handler] = {
    # listeners and relay
    "listening-port": _listening_port,
    "tls-listening-port": _tls_port,
    "listening-ip": _listening_ip,
    "no-udp": _no_transport("udp"),
    "no-tcp": _no_transport("tcp"),
    "no-tls": _no_transport("tls"),
    "no-dtls": _obsolete("pyturn has no DTLS listener (browsers do not use TURN over DTLS)"),
    "relay-ip": _relay_ip,
    "external-ip": _external_ip,
    "min-port": _setter("relay", "min_port", lambda o: _int(o, 1, 65535)),
    "max-port": _setter("relay", "max_port", lambda o: _int(o, 1, 65535)),
    "relay-threads": _setter(None, "workers", lambda o: _int(o, 0, 254)),
    # credentials
    "realm": _setter(None, "realm", _text),
    "lt-cred-mech": _obsolete("pyturn always uses long-term credentials"),
    "use-auth-secret": _use_auth_secret,
    "static-auth-secret": _secret,
    "user": _user,
    "userdb": _userdb,
    "db": _userdb,
    "redis-userdb": _redis_userdb,
    "stale-nonce": _stale_nonce,
    "secure-stun": _setter("auth", "secure_stun", _flag),
    "rest-api-separator": _setter("auth", "rest_separator", _text),
    # quotas and limits
    "user-quota": _setter("quotas", "allocations_per_user", _int),
    "total-quota": _setter("quotas", "allocations_total", _int),
    "max-bps": _setter("bandwidth", "per_allocation", _int),
    "bps-capacity": _setter("bandwidth", "total", _int),
    "max-allocate-lifetime": _setter("allocations", "max_lifetime", lambda o: _int(o, 1)),
    "channel-lifetime": _obsolete("pyturn keeps RFC 8656's fixed 600 s"),
    "permission-lifetime": _obsolete("pyturn keeps RFC 8656's fixed 300 s"),
    # peers
    "allowed-peer-ip": _peers("allow"),
    "denied-peer-ip": _peers("deny"),
    "no-multicast-peers": _obsolete(_DEFAULT_ON + " (multicast peers are refused)"),
    "no-loopback-peers": _obsolete(_DEFAULT_ON + " (loopback peers are refused)"),
    "allow-loopback-peers": _allow_loopback,
    # TLS
    "cert": _setter("tls", "certificate", _text),
    "cipher-list": _setter("tls", "ciphers", _text),
    "no-tlsv1_2": _setter("tls", "min_version", lambda o: "1.3" if _flag(o) else "1.2"),
    "pkey": _setter("tls", "private_key", _text),
    "no-tlsv1": _obsolete("pyturn accepts TLS 1.2 and newer only"),
    "no-tlsv1_1": _obsolete("pyturn accepts TLS 1.2 and newer only"),
    "no-sslv2": _obsolete("pyturn accepts TLS 1.2 and newer only"),
    "no-sslv3": _obsolete("pyturn accepts TLS 1.2 and newer only"),
    "dh2066": _obsolete("pyturn uses ECDHE key exchange; no DH parameters"),
    "dh566": _obsolete("pyturn uses ECDHE key exchange; no DH parameters"),
    "dh1066": _obsolete("pyturn uses ECDHE key exchange; no DH parameters"),
    "dh-file": _obsolete("pyturn uses ECDHE key exchange; no DH parameters"),
    "ec-curve-name": _obsolete("pyturn leaves the curves to OpenSSL's defaults"),
    # STUN behaviour
    "fingerprint": _obsolete("pyturn adds FINGERPRINT whenever the request has one"),
    "no-rfc5780": _obsolete("pyturn does not implement RFC 5780 NAT behaviour discovery"),
    "response-origin-only-with-rfc5780": _obsolete("pyturn sends no RESPONSE-ORIGIN"),
    "no-stun-backward-compatibility": _obsolete("pyturn speaks RFC 8489 STUN only"),
    "prod": _obsolete("pyturn sends no SOFTWARE attribute unless `software` is set"),
    "no-software-attribute": _obsolete(
        "pyturn sends no SOFTWARE attribute unless `software` is set"
    ),
    "alternate-server": _alternate,
    "no-tcp-relay": _setter("allocations", "tcp_relay", lambda o: not _flag(o)),
    "keep-address-family": _setter("allocations", "default_family", lambda o: "keep"),
    "allocation-default-address-family": _setter(
        "allocations", "default_family", lambda o: _family(_text(o))
    ),
    # logging and process
    "verbose": _verbose("info"),
    "Verbose": _verbose("debug"),
    "log-file": _log_file,
    "syslog": _syslog,
    "no-stdout-log": _obsolete("pyturn logs to stderr only"),
    "simple-log": _obsolete("pyturn writes one log stream"),
    "new-log-timestamp": _obsolete("pyturn's log lines carry a timestamp"),
    "pidfile": _obsolete("systemd and Docker track pyturn's process themselves"),
    "daemon": _obsolete("pyturn runs in the foreground, under systemd or Docker"),
    "proc-user": _obsolete("systemd's User= or Docker's USER runs pyturn unprivileged"),
    "proc-group": _obsolete("systemd's Group= runs pyturn unprivileged"),
    "no-cli": _obsolete("pyturn has no telnet CLI (its control socket is local: control)"),
    "cli-ip": _obsolete("pyturn has no telnet CLI (its control socket is local: control)"),
    "cli-port": _obsolete("pyturn has no telnet CLI (its control socket is local: control)"),
    "cli-password": _obsolete("pyturn has no telnet CLI (its control socket is local: control)"),
    "prometheus": _prometheus,
    "prometheus-port": _setter("metrics", "port", lambda o: _int(o, 1, 65535)),
    "prometheus-address": _setter("metrics", "address", lambda o: _ip(_text(o))),
}
_UNSUPPORTED = {
    "tlsv1": "TLS 1.0: pyturn accepts TLS 1.2 and newer only",
    "tlsv1_1": "TLS 1.1: pyturn accepts TLS 1.2 and newer only",
    "pkey-pwd": "an encrypted private key: give pyturn an unencrypted one (mode 0600)",
    "CA-file": "client certificate checks: pyturn does not ask clients for certificates",
    "mysql-userdb": "pyturn's stores are SQLite and Redis",
    "psql-userdb": "pyturn's stores are SQLite and Redis",
    "sql-userdb": "pyturn's stores are SQLite and Redis",
    "mongo-userdb": "pyturn's stores are SQLite and Redis",
    "redis-statsdb": "pyturn publishes sessions for `pyturn sessions --fleet` in its Redis store",
    "no-auth": "a relay without credentials: pyturn always asks for them",
    "stun-only": "a STUN-only server: pyturn always relays too",
    "no-stun": "pyturn always answers Binding",
    "mobility": "pyturn does not implement TURN mobility (RFC 8016)",
    "server-relay": "pyturn does not relay to itself",
    "aux-server": "pyturn has no auxiliary STUN servers",
    "udp-self-balance": "pyturn's workers share the ports (SO_REUSEPORT)",
    "listening-device": "pyturn binds addresses, not devices",
    "relay-device": "pyturn binds addresses, not devices",
    "no-udp-relay": "refusing UDP relaying: pyturn relays UDP",
    "secret-key-file": "pyturn keeps no encrypted keys in its store",
    "oauth": "pyturn does not implement third-party authorization (RFC 7635)",
    "max-allocate-timeout": "pyturn has no such timeout",
    "web-admin": "pyturn has no web admin (see control and metrics)",
    "stateless-nonce-secret": "pyturn's nonce secret is made at start (shared by its workers)",
}
# Wire's coturn fork.
for _name in (
    "zrest",
    "401-req-limit",
    "401-window",
    "401-allowlist",
    "prometheus-ip",
    "federation-listening-ip",
    "federation-listening-port",
    "federation-no-dtls",
    "federation-cert",
    "federation-pkey",
    "federation-pkey-pwd",
    "federation-remote-whitelist",
):
    _UNSUPPORTED[_name] = "an option of Wire's coturn fork, which pyturn does not have"
# Options that take a value: on the command line `--name value` is `--name=value`; the
# others are flags, whose value can only follow an "=".
_VALUED = {
    "listening-port", "tls-listening-port", "listening-ip", "relay-ip", "external-ip",
    "min-port", "max-port", "relay-threads", "realm", "static-auth-secret", "user",
    "userdb", "db", "redis-userdb", "user-quota", "total-quota", "max-bps", "bps-capacity",
    "max-allocate-lifetime", "channel-lifetime", "permission-lifetime", "allowed-peer-ip",
    "denied-peer-ip", "cert", "pkey", "dh-file", "ec-curve-name", "alternate-server",
    "log-file", "pidfile", "proc-user", "proc-group", "cli-ip", "cli-port", "cli-password",
    "prometheus-port", "prometheus-address", "cipher-list", "rest-api-separator",
    "pkey-pwd", "CA-file", "mysql-userdb", "psql-userdb", "sql-userdb", "mongo-userdb",
    "redis-statsdb", "aux-server", "listening-device", "relay-device", "secret-key-file",
    "max-allocate-timeout", "stateless-nonce-secret", "config",
    "allocation-default-address-family",
}  # fmt: skip
# Options that may appear once: a second one is reported.
_LISTS = {
    "listening-ip",
    "relay-ip",
    "external-ip",
    "static-auth-secret",
    "user",
    "allowed-peer-ip",
    "denied-peer-ip",
    "alternate-server",
}


def convert(options: Iterable[Option]) -> tuple[dict[str, Any], list[Outcome]]:
    """The pyturn config (for YAML) and what became of each option, in their order."""
    state = _State()
    for option in options:
        state.outcomes.append(_one(state, option))
    _finish(state)
    return state.config, state.outcomes


def _one(state: _State, option: Option) -> Outcome:
    name = option.name
    value = option.value
    note = ""
    if value is not None and (comment := _TRAILING_COMMENT.search(value)):
        # coturn keeps a trailing " # ..." as part of the value; deployments' docs put
        # comments there all the same, and mean them as comments.
        value = value[: comment.start()] or None
        option = Option(name, value, option.where)
        if name not in _VALUED:
            note = " (coturn itself stops at this line: the comment is a bad flag value to it)"
    if value is not None and _PLACEHOLDER.search(value.strip().strip("'\"")):
        return Outcome(option, UNSUPPORTED, f"{value!r} is a placeholder: fill it in first")
    if name not in _LISTS and name in state.seen:
        note += f" (given twice: this one wins over {state.seen[name].where})"
    state.seen[name] = option
    outcome = _apply(state, option)
    return Outcome(outcome.option, outcome.kind, outcome.detail + note) if note else outcome


def _apply(state: _State, option: Option) -> Outcome:
    handler = _HANDLERS.get(option.name)
    if handler is not None:
        try:
            return handler(state, option)
        except ValueError as exc:
            return Outcome(option, UNSUPPORTED, f"bad value: {exc}")
    why = _UNSUPPORTED.get(option.name)
    if why is not None:
        return Outcome(option, UNSUPPORTED, why)
    close = difflib.get_close_matches(option.name, [*_HANDLERS, *_UNSUPPORTED], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return Outcome(option, UNSUPPORTED, f"not a coturn option{hint}")


def _finish(state: _State) -> None:
    config = state.config
    addresses = state.listening_ips or ["0.0.0.0"]  # noqa: S104 (coturn listens on all)
    has_tls = "tls" in config and {"certificate", "private_key"} <= set(config["tls"])
    listen = []
    for address in addresses:
        for transport in ("udp", "tcp"):
            if transport in state.transports:
                listen.append(
                    {"transport": transport, "address": address, "port": state.listening_port}
                )
        if has_tls and "tls" in state.transports:
            listen.append({"transport": "tls", "address": address, "port": state.tls_port})
    config["listen"] = listen
    if not state.listening_ips:
        state.outcomes.append(
            Outcome(
                Option("listen", None, "listeners"),
                WARNING,
                "coturn listened on every IPv6 address too; to serve IPv6 clients, add "
                "listen entries with address '::'",
            )
        )
    relay = state.section("relay")
    _relay_addresses(state, relay)
    if not relay:
        del config["relay"]
    # coturn binds channels 0x4000-0x7FFF (RFC 5766), and its own turnutils_uclient,
    # among other old clients, picks numbers above 0x4FFF.
    state.section("allocations")["legacy_channel_numbers"] = True
    state.outcomes.append(
        Outcome(
            Option("channel numbers", None, "coturn's defaults"),
            MAPPED,
            "allocations.legacy_channel_numbers: true (coturn accepts 0x5000-0x7FFF too)",
        )
    )
    auth: dict[str, Any] = state.section("auth")
    secret_mode = state.use_auth_secret or bool(state.secrets)
    if state.users and secret_mode:
        # "Shared secret overrides username/password based auth method" (coturn).
        state.outcomes.append(
            Outcome(
                state.seen["user"],
                DROPPED,
                "coturn ignores user= lines when REST API secrets are on, so pyturn gets none",
            )
        )
    elif state.users:
        auth["users"] = state.users
    if state.secrets:
        auth["secrets"] = state.secrets
    elif state.use_auth_secret and "store" not in config:
        state.outcomes.append(
            Outcome(
                state.seen["use-auth-secret"],
                UNSUPPORTED,
                "REST API credentials without a static-auth-secret: give the secret in "
                "auth.secrets, auth.secret_files or auth.secret_env",
            )
        )
    if not auth:
        del config["auth"]
    _peer_policy(state)


# Peers every coturn refuses whatever its allowed-peer-ip says (loopback only without
# allow-loopback-peers). coturn 4.13.1 and newer also refuse link-local, unique-local
# and site-local peers; older ones (Debian's 4.6, say) relay to them, which is what
# the import compares with: pyturn refuses them, and the import says so.
_COTURN_REFUSES = tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/32", "::/128"))
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _relay_addresses(state: _State, relay: dict[str, Any]) -> None:
    """relay-ip (each one) and external-ip (PUBLIC, or PUBLIC/PRIVATE for each relay
    address behind a 1:1 NAT): the first address of a family is relay.address(6), the
    others relay.more_addresses, which allocations take in turn as coturn's do."""
    ordered: dict[int, list[str]] = {4: [], 6: []}
    for ip in state.relay_ips:
        version = 6 if ":" in ip else 4
        if ip not in ordered[version]:
            ordered[version].append(ip)
    public_of: dict[str, str] = {}
    bare: dict[int, str] = {}
    for public, private in state.external:
        version = 6 if ":" in public else 4
        if private is None:
            if bare.setdefault(version, public) != public:
                _refuse_relay_address(
                    state,
                    "external-ip",
                    public,
                    f"a second external-ip without /PRIVATE; {bare[version]} is kept for the "
                    "first relay address: give each relay address its own PUBLIC/PRIVATE pair",
                )
            continue
        if private not in ordered[version]:
            ordered[version].append(private)
        public_of[private] = public
        if private not in state.allow:
            state.allow.append(private)
    more: list[dict[str, str]] = []
    for version, key, external_key in (
        (4, "address", "external_address"),
        (6, "address6", "external_address6"),
    ):
        found = ordered[version]
        if version in bare:
            relay[external_key] = bare[version]
        if not found:
            if version == 6 and version in bare:
                # coturn relays IPv6 from the addresses it listens on, every one by default.
                relay[key] = "::"
            continue
        relay[key] = found[0]
        if found[0] in public_of:
            relay[external_key] = public_of[found[0]]
        for position, ip in enumerate(found[1:], start=1):
            if position >= MAX_RELAY_ADDRESSES:
                _refuse_relay_address(
                    state,
                    "relay-ip",
                    ip,
                    f"pyturn relays from at most {MAX_RELAY_ADDRESSES} IPv{version} addresses "
                    "per node: run another node for the rest",
                )
                continue
            entry = {"address": ip}
            if ip in public_of:
                entry["external_address"] = public_of[ip]
            more.append(entry)
    if more:
        relay["more_addresses"] = more
        state.outcomes.append(
            Outcome(
                Option("relay-ip", None, "relay addresses"),
                WARNING,
                "relay.more_addresses: allocations take the relay addresses in turn, as in "
                "coturn, but they share one port range (min_port..max_port) where coturn "
                "gives each address its own: widen the range if it held many allocations",
            )
        )


def _refuse_relay_address(state: _State, name: str, ignored: str, why: str) -> None:
    state.outcomes.append(Outcome(Option(name, ignored, "relay addresses"), UNSUPPORTED, why))


def _peer_policy(state: _State) -> None:
    """peers.allow and peers.deny with coturn's meaning, where it differs from pyturn's:

    - in coturn an allowed-peer-ip wins over any denied-peer-ip; pyturn's most specific
      range wins, which agrees except for a denied range inside an allowed one: that
      part of the deny list is left out;
    - coturn refuses loopback peers (without allow-loopback-peers) even when allowed:
      such allow entries are left out.

    Then say where pyturn's built-in list refuses peers coturn would have relayed to.
    """
    loopback_allowed = "allow-loopback-peers" in state.seen
    allow_networks: list[IPNetwork] = []
    kept_allow = []
    for entry in state.allow:
        networks = parse_peers(entry)
        hard = _COTURN_REFUSES + (() if loopback_allowed else _LOOPBACK)
        if all(any(_inside(n, h) for h in hard) for n in networks):
            state.outcomes.append(
                _note(entry, DROPPED, "coturn refuses these peers even when allowed")
            )
            continue
        kept_allow.append(entry)
        allow_networks += networks
    kept_deny = []
    for entry in state.deny:
        pieces = parse_peers(entry)
        inside = [p for p in pieces if any(_inside(p, a) for a in allow_networks)]
        if not inside:
            kept_deny.append(entry)
            continue
        kept = [str(p) for p in pieces if p not in inside]
        kept_deny += kept
        state.outcomes.append(
            _note(
                entry,
                MAPPED,
                "part of it is allowed (allowed-peer-ip wins in coturn): peers.deny keeps "
                + (", ".join(kept) if kept else "none of it"),
            )
        )
    if kept_allow or kept_deny:
        peers = state.section("peers")
        if kept_allow:
            peers["allow"] = kept_allow
        if kept_deny:
            peers["deny"] = kept_deny
    if any(":" not in entry for entry in kept_deny):
        state.outcomes.append(
            Outcome(
                Option("peers", None, "peer policy"),
                WARNING,
                "pyturn applies IPv4 entries to the IPv4 address an IPv6 peer carries "
                "(::ffff:a.b.c.d, 64:ff9b::/96, 2002::/16, Teredo) and coturn did not: "
                "those spellings of denied IPv4 peers are refused here",
            )
        )
    policy = PeerPolicy(kept_allow, kept_deny)
    stricter = [
        str(network)
        for network in DEFAULT_DENY
        if any(
            _coturn_relays(sample, allow_networks, kept_deny, state)
            and not policy.is_allowed(sample)
            for sample in _samples(network)
        )
    ]
    if stricter:
        state.outcomes.append(
            Outcome(
                Option("peers", None, "peer policy"),
                WARNING,
                "coturn would relay to these peers and pyturn refuses them (its built-in "
                "list): " + ", ".join(stricter) + ". To keep coturn's behaviour, add the "
                "ones your deployment needs (such as a LAN's private range) to peers.allow.",
            )
        )


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _samples(network: IPNetwork) -> list[str]:
    """Addresses that stand for `network`: near its start, middle and end (not its very
    first: 0.0.0.0 is special), so a deny list that covers part of it shows."""
    size = network.num_addresses
    offsets = {1, size // 2, size - 2} if size > 2 else {0}
    return [str(network.network_address + offset) for offset in sorted(offsets)]


def _coturn_relays(address: str, allow: list[IPNetwork], deny: list[str], state: _State) -> bool:
    ip = ipaddress.ip_address(address)
    hard = _COTURN_REFUSES + (() if "allow-loopback-peers" in state.seen else _LOOPBACK)
    if any(ip in network for network in hard):
        return False
    if ip.is_multicast and "no-multicast-peers" in state.seen:
        return False
    if any(ip in network for network in allow):
        return True
    return not any(ip in network for entry in deny for network in parse_peers(entry))


def _note(entry: str, kind: str, detail: str) -> Outcome:
    return Outcome(Option(entry, None, "peer policy"), kind, detail)


def to_yaml(config: dict[str, Any], source: str) -> str:
    """The config as YAML, in pyturn's key order, with a header saying where it came from."""
    import yaml  # noqa: PLC0415

    order = list(default_config().__dataclass_fields__)
    ordered = {key: config[key] for key in order if key in config}
    header = f"# Converted from {source} by `pyturn import-coturn`; check it with\n"
    header += "# `pyturn check-config`. Keys not written here keep pyturn's defaults.\n"
    return header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
