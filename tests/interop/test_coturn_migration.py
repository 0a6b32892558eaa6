"""Migrating from coturn: each published config, converted by `pyturn import-coturn`, served.

For every deployment config in tests/coturn_configs (Synapse, Nextcloud, Jitsi,
BigBlueButton, matrix-docker-ansible-deploy, Wire, coturn's Docker example), and its
command line (`<name>.args`) where the deployment passes one:

1. `python -m pyturn import-coturn` converts it and exits 0;
2. real coturn (`turnserver`, Debian's coturn package) serves the *published* config, its
   peer lines untouched, with only what a loopback test needs changed (listening and
   relay addresses, ports, no TLS/DTLS listeners, logging to stdout, a pid file and
   SQLite user database in the test's directory, no telnet CLI). The deployment's
   command line is passed too, without `-c FILE`/`-n`: the test names its copy of the
   file, which the importer also read;
3. pyturn serves the converted config with the matching loopback overrides;
4. a table of peer addresses gets CreatePermission on an allocation on both servers,
   with the credentials the deployment's clients use with coturn (a TURN REST API
   credential from its `static-auth-secret`, or else its `user=` lines): pyturn must
   answer as coturn does (200, 403, or 443 for the other address family), except where
   the import warned that pyturn's built-in list refuses a range coturn relays to (coturn
   200, pyturn 403, and the warning names a range holding the peer), or that pyturn
   judges an IPv6 peer by the IPv4 address it carries, which coturn did not;
5. coturn's own client (turnutils_uclient, with `-W secret` or `-u/-w`) and aioice relay
   through pyturn to an echo peer with those credentials, as they do through coturn.

Both servers get an IPv4 relay (127.0.0.1) and an IPv6 relay (::1): IPv4 peers are
asked for on an IPv4 allocation, IPv6 peers on one made with REQUESTED-ADDRESS-FAMILY
IPv6 (RFC 6156), and one peer of the other family on each checks the 443 answer.

Safety: every packet goes to 127.0.0.1 or ::1. The peer table names public, private and
special addresses, but CreatePermission only installs a permission on the server; it
sends nothing to the peer, and no data follows. The relaying steps use an echo peer on
127.0.0.1, which the published configs deny (loopback): for those steps only, both
servers allow exactly that address (see `LOOPBACK_PEER_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioice.turn import TurnClientUdpProtocol

from pyturn.core.auth import rest_password, rest_username
from pyturn.core.policy import embedded_ipv4
from pyturn.coturn_import import Option, read_args, read_file
from pyturn.probe import ProbeError
from pyturn.wire.attributes import (
    FAMILY_IPV6,
    TRANSPORT_UDP,
    Attribute,
    RequestedAddressFamily,
    RequestedTransport,
    XorPeerAddress,
)
from pyturn.wire.message import MessageClass, Method
from tests.interop.server_process import (
    LOOPBACK,
    ServerProcess,
    merge_config,
    next_relay_range,
    require_tool,
    stop_process,
)
from tests.interop.test_turnutils import (
    CLIENTS,
    MESSAGES,
    UclientRun,
    assert_all_echoed,
    turnutils_peer,
    uclient_at,
)
from tests.interop.turn_wire_client import WireClient, error_code, open_client

pytestmark = pytest.mark.interop

CONFIGS = Path(__file__).resolve().parent.parent / "coturn_configs"
DEPLOYMENTS = sorted(path.stem for path in CONFIGS.glob("*.conf"))
LOOPBACK6 = "::1"

READY_TIMEOUT = 15.0
STEP_TIMEOUT = 5.0
IMPORT_TIMEOUT = 30.0
SCENARIO_TIMEOUT = 30.0
PEER_PORT = 3478  # CreatePermission ignores the port (RFC 8656 §9); any will do
AIOICE_MESSAGES = 10

# The peer table. No packet is sent to any of these (see the module docstring).
PEERS_V4 = (
    "8.8.8.8",  # public
    "10.0.0.1",  # RFC 1918 (Synapse allows this one)
    "10.0.0.5",  # RFC 1918 (BigBlueButton's and Nextcloud's own host)
    "172.16.0.1",  # RFC 1918
    "192.168.1.1",  # RFC 1918
    "198.51.100.20",  # TEST-NET-2 (BigBlueButton's public address)
    "100.64.0.1",  # carrier-grade NAT
    "169.254.169.254",  # link-local: the cloud metadata API
    "224.0.0.1",  # multicast
    "192.31.196.1",  # AS112: in pyturn's built-in list, in no published deny list
    "2606:4700::1111",  # IPv6 on an IPv4 allocation: 443 from both
)
PEERS_V6 = (
    "2606:4700::1111",  # public
    "fd00::1",  # unique local
    "fe80::1",  # link-local
    "2001:db8::1",  # documentation
    "::ffff:10.0.0.1",  # IPv4-mapped private address
    "::ffff:8.8.8.8",  # IPv4-mapped public address
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "8.8.8.8",  # IPv4 on an IPv6 allocation: 443 from both
)

# coturn options that a loopback test must replace: addresses, ports, TLS material,
# logging, the pid file and the user database file. Everything else stays as published.
COTURN_REPLACED = frozenset(
    {
        "listening-ip",
        "relay-ip",
        "external-ip",
        "listening-port",
        "tls-listening-port",
        "min-port",
        "max-port",
        "cert",
        "pkey",
        "log-file",
        "syslog",
        "no-stdout-log",
        "simple-log",
        "pidfile",
        "userdb",
        "db",
        "daemon",
        "cli-ip",
        "cli-port",
        "cli-password",
    }
)
# Only for the relaying steps: the echo peer runs on 127.0.0.1, which every published
# config denies (coturn refuses loopback peers by default), so both servers are told to
# allow exactly that address. The CreatePermission table never uses these.
LOOPBACK_PEER_COTURN = ("--allow-loopback-peers", f"--allowed-peer-ip={LOOPBACK}")
LOOPBACK_PEER_PYTURN = LOOPBACK
# "lt-cred-mech # comment": coturn 4.6.1 takes the comment for the flag's value and exits
# ("Unknown boolean value"); the importer, like the deployment's docs, means a comment.
_TRAILING_COMMENT = re.compile(r"\s+#.*$")


# -- the deployment's config and credentials ------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """How a client of the deployment logs in: a static user, or a REST API secret."""

    user: str
    password: str | None = None
    secret: str | None = None

    def username(self) -> str:
        """The STUN USERNAME: the user, or `<expiry>:<user>` for the REST API."""
        if self.secret is None:
            return self.user
        return rest_username(int(time.time()) + 3600, self.user)

    def login(self) -> tuple[str, str]:
        username = self.username()
        if self.secret is not None:
            return username, rest_password(self.secret, username)
        assert self.password is not None
        return username, self.password

    def log_user(self) -> str:
        """A regex for the user pyturn logs for this credential's allocations."""
        if self.secret is None:
            return re.escape(self.user)
        return rf"\d+:{re.escape(self.user)}"

    def __str__(self) -> str:
        return f"REST secret {self.secret!r}" if self.secret else f"user {self.user!r}"


@dataclass(frozen=True)
class Deployment:
    name: str
    conf: Path
    args: list[str]  # coturn's command line, as the deployment passes it ([] if none)

    @classmethod
    def load(cls, name: str) -> Deployment:
        conf = CONFIGS / f"{name}.conf"
        args_file = CONFIGS / f"{name}.args"
        args = shlex.split(args_file.read_text()) if args_file.exists() else []
        return cls(name, conf, args)

    def options(self) -> list[Option]:
        """What coturn reads: the file, then its command line over it."""
        return read_file(self.conf.read_text(), self.conf.name) + read_args(self.args)[0]

    def credentials(self) -> list[Credential]:
        """The ways a client of this coturn logs in: one per REST secret (the TURN REST
        API); without a secret, one per `user=` line. coturn with a static-auth-secret
        refuses its `user=` users (coturn-docker's alice gets 401 from coturn 4.6.1)."""
        secrets: list[Credential] = []
        users: list[Credential] = []
        for option in self.options():
            value = _value(option)
            if option.name == "static-auth-secret" and value:
                secrets.append(Credential("migration", secret=value))
            elif option.name == "user" and value and ":" in value:
                name, _, password = value.partition(":")
                users.append(Credential(name, password=password))
        found = secrets or users
        assert found, f"{self.name}: neither static-auth-secret nor user= in the config"
        return found


def _value(option: Option) -> str:
    value = _TRAILING_COMMENT.sub("", (option.value or "").strip())
    return value.strip().strip('"')


@dataclass(frozen=True)
class Imported:
    config: dict[str, Any]
    report: list[str]

    def warned_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The ranges the import's warnings say pyturn refuses and coturn relays to."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for line in self.report:
            if ": warning: " not in line or "(its built-in list): " not in line:
                continue
            listed = line.partition("(its built-in list): ")[2].partition(". ")[0]
            networks += [ipaddress.ip_network(item.strip()) for item in listed.split(",")]
        return networks


def import_coturn(deployment: Deployment) -> Imported:
    """`python -m pyturn import-coturn FILE [--args ...]`, which must exit 0."""
    extra = ["--args", shlex.join(deployment.args)] if deployment.args else []
    result = subprocess.run(
        [sys.executable, "-m", "pyturn", "import-coturn", str(deployment.conf), *extra],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict), result.stdout
    return Imported(config, result.stderr.splitlines())


# -- real coturn --------------------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (bounded number of tries)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP on 127.0.0.1")


def coturn_file(deployment: Deployment, directory: Path) -> Path:
    """A copy of the published config with the loopback-replaced lines commented out and
    trailing comments removed (see `_TRAILING_COMMENT`)."""
    lines = []
    for raw in deployment.conf.read_text().splitlines():
        match = re.match(r"\s*([^\s=#]+)", raw)
        if match is None or raw.lstrip().startswith("#"):
            lines.append(raw)
        elif match[1] in COTURN_REPLACED:
            lines.append(f"# replaced for the loopback test: {raw}")
        else:
            lines.append(_TRAILING_COMMENT.sub("", raw))
    path = directory / f"{deployment.name}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def coturn_args(deployment: Deployment) -> list[str]:
    """The deployment's command line without -c/-n (the test passes its copy of the file)
    and without the options the loopback test replaces."""
    options, _, _ = read_args(deployment.args)
    kept: list[str] = []
    for option in options:
        if option.name in COTURN_REPLACED:
            continue
        kept.append(f"--{option.name}" + ("" if option.value is None else f"={option.value}"))
    return kept


class Coturn:
    """One `turnserver -c FILE ...` child process; its log goes to a file."""

    def __init__(self, deployment: Deployment, directory: Path, extra: Sequence[str] = ()):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        min_port, max_port = next_relay_range()
        self.command = [
            require_tool("turnserver"),
            "-c",
            str(coturn_file(deployment, directory)),
            *coturn_args(deployment),
            f"--listening-ip={LOOPBACK}",
            f"--relay-ip={LOOPBACK}",
            f"--relay-ip={LOOPBACK6}",
            f"--listening-port={self.port}",
            f"--min-port={min_port}",
            f"--max-port={max_port}",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--log-file=stdout",
            f"--pidfile={directory / 'turnserver.pid'}",
            f"--userdb={directory / 'turndb'}",
            *extra,
        ]
        self.log_path = directory / "turnserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def udp_address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Coturn:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until coturn answers a Binding request over UDP (any answer will do)."""
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        for _ in range(int(READY_TIMEOUT / 0.1) + 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
            client = open_client("udp", self.udp_address, timeout=0.2)
            try:
                client.transact(Method.BINDING, [], sign=False)
                return
            except ProbeError:
                time.sleep(0.1)  # "connection refused" comes back at once: not yet bound
            finally:
                client.close()
        raise AssertionError(
            f"coturn did not answer on {self.udp_address} within {READY_TIMEOUT} s "
            f"(exit code {self.process.poll()}); command: {shlex.join(self.command)}\n"
            f"log:\n{self.log_text}"
        )

    def stop(self) -> None:
        stop_process(self.process)


@contextlib.contextmanager
def running_coturn(
    deployment: Deployment, directory: Path, extra: Sequence[str] = ()
) -> Iterator[Coturn]:
    coturn = Coturn(deployment, directory, extra)
    try:
        yield coturn.start()
    finally:
        coturn.stop()


# -- pyturn with the converted config ---------------------------------------------------------


def pyturn_config(converted: Mapping[str, Any], extra_allow: Sequence[str] = ()) -> dict[str, Any]:
    """The converted config with the loopback overrides."""
    transports = [
        listener["transport"]
        for listener in converted.get("listen", [])
        if listener["transport"] != "tls"
    ]
    transports = list(dict.fromkeys(transports)) or ["udp"]
    min_port, max_port = next_relay_range()
    overrides: dict[str, Any] = {
        "listen": [{"transport": t, "address": LOOPBACK, "port": 0} for t in transports],
        "relay": {
            "address": LOOPBACK,
            "address6": LOOPBACK6,
            "min_port": min_port,
            "max_port": max_port,
            "external_address": None,
            "external_address6": None,
        },
        "tls": None,
        "metrics": {"enabled": False},
        "control": {"enabled": False},
        "logging": {"file": None, "syslog": None},
        "workers": 2,
        "shutdown_timeout": 0,
    }
    store = converted.get("store")
    sqlite = isinstance(store, str) and store.startswith("sqlite://")
    if sqlite and not Path(str(store).removeprefix("sqlite://")).exists():
        overrides["store"] = None
    if extra_allow:
        peers = converted.get("peers", {})
        overrides["peers"] = {"allow": [*peers.get("allow", []), *extra_allow]}
    return merge_config(converted, overrides)


@contextlib.contextmanager
def running_pyturn(config: Mapping[str, Any], directory: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(config, directory)
    try:
        yield server.start()
    finally:
        server.stop()


# -- CreatePermission -----------------------------------------------------------------------


def permission_answers(
    address: tuple[str, int], credential: Credential, ipv6: bool, peers: Sequence[str]
) -> dict[str, int]:
    """CreatePermission for each peer on one allocation: 200, or the error code."""
    username, password = credential.login()
    client: WireClient = open_client(
        "udp", address, username=username, password=password, timeout=STEP_TIMEOUT
    )
    try:
        client.login()
        attributes: list[Attribute] = [RequestedTransport(TRANSPORT_UDP)]
        if ipv6:
            attributes.append(RequestedAddressFamily(FAMILY_IPV6))
        client.allocate_ok(attributes)
        answers: dict[str, int] = {}
        for peer in peers:
            msg = client.request(Method.CREATE_PERMISSION, [XorPeerAddress(peer, PEER_PORT)])
            if msg.msg_class == MessageClass.SUCCESS:
                answers[peer] = 200
            else:
                code = error_code(msg)
                assert code is not None, msg
                answers[peer] = code
        client.refresh(0)
        return answers
    finally:
        client.close()


def covered_by(
    peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> list[str]:
    """The warned networks that hold `peer`, or the IPv4 address an IPv6 peer embeds
    (pyturn judges ::ffff:10.0.0.1 by 10.0.0.1, so a warning about 10.0.0.0/8 is one
    about it too)."""
    address = ipaddress.ip_address(peer)
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += embedded_ipv4(address)
    return [
        str(network)
        for network in networks
        if any(candidate in network for candidate in candidates)
    ]


def table(title: str, rows: Sequence[tuple[str, str, int, int, str]]) -> str:
    lines = [title, f"  {'family':<6}  {'peer':<16}  coturn  pyturn"]
    lines += [
        f"  {family:<6}  {peer:<16}  {coturn:>6}  {pyturn:>6}  {note}".rstrip()
        for family, peer, coturn, pyturn, note in rows
    ]
    return "\n".join(lines)


# What the import says when pyturn judges an IPv6 peer by the IPv4 address it carries
# (coturn matched IPv4 ranges against IPv4 peers only).
EMBEDDED_WARNING = "applies IPv4 entries to the IPv4 address an IPv6 peer carries"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_pyturn_with_the_converted_config_grants_and_refuses_the_peers_coturn_does(
    name: str, tmp_path: Path
) -> None:
    """CreatePermission for each peer of the table on coturn (published config) and
    pyturn (converted config): the same answer, 200, 403 or 443, unless the import warned
    that pyturn's built-in list refuses the range the peer is in (then coturn 200 and
    pyturn 403), or that it judges an IPv6 peer by the IPv4 address it carries."""
    deployment = Deployment.load(name)
    imported = import_coturn(deployment)
    credential = deployment.credentials()[0]
    warned = imported.warned_networks()
    families = (("IPv4", PEERS_V4), ("IPv6", PEERS_V6))
    with (
        running_coturn(deployment, tmp_path / "coturn") as coturn,
        running_pyturn(pyturn_config(imported.config), tmp_path / "pyturn") as pyturn,
    ):
        answers = {
            (family, server): permission_answers(address, credential, family == "IPv6", peers)
            for family, peers in families
            for server, address in (("coturn", coturn.udp_address), ("pyturn", pyturn.udp_address))
        }
    rows: list[tuple[str, str, int, int, str]] = []
    unwarned: set[tuple[str, str]] = set()
    for family, peers in families:
        for peer in peers:
            by_coturn, by_pyturn = answers[family, "coturn"][peer], answers[family, "pyturn"][peer]
            note = ""
            if by_coturn != by_pyturn:
                covering = covered_by(peer, warned)
                embedded = ":" in peer and embedded_ipv4(ipaddress.IPv6Address(peer))
                said = any(EMBEDDED_WARNING in line for line in imported.report)
                if (by_coturn, by_pyturn) == (200, 403) and covering:
                    note = f"import warned: {', '.join(covering)}"
                elif (by_coturn, by_pyturn) == (200, 403) and embedded and said:
                    note = "import warned: IPv4 entries judge the IPv4 address it carries"
                else:
                    note = "NOT WARNED"
                    unwarned.add((family, peer))
            rows.append((family, peer, by_coturn, by_pyturn, note))
    report = table(f"{name}: CreatePermission with {credential}", rows)
    print(report)
    details = report + "\nimport report:\n" + "\n".join(imported.report)
    assert not unwarned, f"differ, and no warning: {sorted(unwarned)}\n{details}"


# -- relaying with the deployment's clients ---------------------------------------------------


def run_uclient_at(port: int, peer_port: int, credential: Credential, *flags: str) -> UclientRun:
    """turnutils_uclient against 127.0.0.1:`port` with the deployment's credential."""
    return uclient_at(
        port,
        peer_port,
        *flags,
        user=credential.user,
        password=credential.password,
        secret=credential.secret,
    )


class EchoCollector(asyncio.DatagramProtocol):
    """What aioice hands to the application: (payload, peer) in arrival order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def aioice_round_trip(
    address: tuple[str, int], credential: Credential, peer: tuple[str, int]
) -> tuple[list[bytes], tuple[str, int]]:
    """aioice allocates, binds a channel to `peer` and gets back what it sends; returns
    the echoes and the relayed address."""
    username, password = credential.login()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(
            address, username=username, password=password, lifetime=600, channel_refresh_time=500
        ),
        remote_addr=address,
    )
    collector = EchoCollector()
    client.receiver = collector
    echoed: list[bytes] = []
    try:
        relayed = await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
        for i in range(AIOICE_MESSAGES):
            await asyncio.wait_for(client.send_data(b"migration-%d" % i, peer), STEP_TIMEOUT)
        for _ in range(AIOICE_MESSAGES):
            data, _source = await asyncio.wait_for(collector.queue.get(), STEP_TIMEOUT)
            echoed.append(data)
    finally:
        await asyncio.wait_for(client.delete(), STEP_TIMEOUT)
    return echoed, relayed


def aioice_echoes(
    address: tuple[str, int], credential: Credential, peer: tuple[str, int]
) -> tuple[list[bytes], tuple[str, int]]:
    async def bounded() -> tuple[list[bytes], tuple[str, int]]:
        return await asyncio.wait_for(
            aioice_round_trip(address, credential, peer), SCENARIO_TIMEOUT
        )

    return asyncio.run(bounded())


def assert_uclient_echoed(run: UclientRun) -> None:
    total = MESSAGES * CLIENTS
    assert run.returncode == 0, run.output
    assert (run.sent, run.received, run.lost) == (total, total, 0), run.output


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_the_deployments_clients_relay_through_pyturn_as_through_coturn(
    name: str, tmp_path: Path
) -> None:
    """With each of the deployment's credentials (`-W secret` for the REST API, `-u/-w`
    for a static user): turnutils_uclient (2 clients x 50 messages) gets every echo back
    through coturn with the published config, and through pyturn with the converted one
    both with Send indications (-s) and with channels; aioice's channels relay through
    both. Both servers allow the loopback echo peer for this test only. uclient picks
    channel numbers anywhere in RFC 5766's 0x4000-0x7FFF, as coturn accepts them: the
    import keeps that (allocations.legacy_channel_numbers).
    """
    deployment = Deployment.load(name)
    imported = import_coturn(deployment)
    expected = [b"migration-%d" % i for i in range(AIOICE_MESSAGES)]
    with (
        turnutils_peer() as peer_port,
        running_coturn(deployment, tmp_path / "coturn", LOOPBACK_PEER_COTURN) as coturn,
        running_pyturn(
            pyturn_config(imported.config, [LOOPBACK_PEER_PYTURN]), tmp_path / "pyturn"
        ) as pyturn,
    ):
        peer = (LOOPBACK, peer_port)
        for credential in deployment.credentials():
            assert_uclient_echoed(run_uclient_at(coturn.port, peer_port, credential))
            mark = pyturn.log_mark()
            run = run_uclient_at(pyturn.udp_port, peer_port, credential, "-s")
            assert_all_echoed(pyturn, mark, run, credential.log_user())
            assert aioice_echoes(coturn.udp_address, credential, peer)[0] == expected, credential
            mark = pyturn.log_mark()
            echoed, (host, port) = aioice_echoes(pyturn.udp_address, credential, peer)
            assert echoed == expected, credential
            # Its deletion is logged before the next run's mark: that one counts packets.
            pyturn.wait_for_event("allocation deleted", since=mark, relayed=f"{host}:{port}")
            mark = pyturn.log_mark()
            run = run_uclient_at(pyturn.udp_port, peer_port, credential)
            assert_all_echoed(pyturn, mark, run, credential.log_user())
