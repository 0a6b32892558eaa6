"""Run the real `pyturn serve` process for interoperability tests.

`ServerProcess` writes a YAML config into a directory, starts the server with
`subprocess.Popen`, learns the ports it bound from its log (listeners use port 0), and
keeps every log line so tests can check what the server reported. On exit it sends
SIGTERM, waits up to 10 s, then kills.

Everything here talks to loopback only: listeners, relay and peers are 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"

REALM = "example.org"
USER = "alice"
PASSWORD = "alicepw"
REST_SECRET = "rest-secret"

# `key=value` fields of an event line; values with spaces or quotes are JSON strings.
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_LISTENING = re.compile(r"listening on (?P<transport>udp|tcp|tls|auto) (?P<host>\S+):(?P<port>\d+)")

# Relay port blocks of 1000 in 40000-59999, handed out in a random order so that
# servers started by one test session (and parallel sessions) rarely share a block.
_BLOCKS = list(range(40000, 60000, 1000))
random.shuffle(_BLOCKS)
_next_block = itertools.cycle(_BLOCKS)


def next_relay_range() -> tuple[int, int]:
    """A fresh (min_port, max_port) block of 1000 relay ports."""
    start = next(_next_block)
    return start, start + 999


def base_config() -> dict[str, Any]:
    """The test config from the brief: loopback listeners on port 0, peers on 127/8."""
    min_port, max_port = next_relay_range()
    return {
        "realm": REALM,
        "listen": [
            {"transport": "udp", "address": LOOPBACK, "port": 0},
            {"transport": "tcp", "address": LOOPBACK, "port": 0},
        ],
        "relay": {"address": LOOPBACK, "min_port": min_port, "max_port": max_port},
        "auth": {"users": {USER: PASSWORD}, "secrets": [REST_SECRET]},
        "peers": {"allow": ["127.0.0.0/8"]},
        "metrics": {"enabled": False},
        # One process: tests count per-process quotas and read one process's log.
        "workers": 1,
        # coturn's turnutils_uclient picks channel numbers up to 0x7FFF (RFC 5766 range).
        "allocations": {"legacy_channel_numbers": True},
        "shutdown_timeout": 0,
    }


def make_loopback_certificate(directory: Path, *, days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate valid for "localhost", 127.0.0.1 and ::1, and its key.

    Clients that connect by IP address (aioice, aiortc with `turns:127.0.0.1`) check the
    address against the certificate's IP SANs, which `tests.net.certs` does not add.
    Returns the PEM (certificate, private key) paths.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "loopback.crt", directory / "loopback.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_config(certificate: Path | str, private_key: Path | str) -> dict[str, Any]:
    """Overrides for a server with UDP, TCP and TLS listeners on 127.0.0.1."""
    return {
        "listen": [
            {"transport": "udp", "address": LOOPBACK, "port": 0},
            {"transport": "tcp", "address": LOOPBACK, "port": 0},
            {"transport": "tls", "address": LOOPBACK, "port": 0},
        ],
        "tls": {"certificate": str(certificate), "private_key": str(private_key)},
    }


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; a None value removes the key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_events(text: str, event: str) -> list[dict[str, str]]:
    """The fields of every `event` line (e.g. "allocation deleted") in a text log.

    pyturn writes session events as `<event words> key=value ...`.
    """
    marker = f" {event} "
    found: list[dict[str, str]] = []
    for line in text.splitlines():
        at = line.find(marker)
        if at < 0:
            continue
        fields: dict[str, str] = {}
        for match in _FIELD.finditer(line, at + len(marker)):
            value = match[2]
            fields[match[1]] = str(json.loads(value)) if value.startswith('"') else value
        found.append(fields)
    return found


def relayed_packets(fields: Mapping[str, str]) -> tuple[int, int]:
    """(packets to the peer, packets to the client) from an "allocation deleted" line."""
    if "packets_to_peer" in fields:
        return int(fields["packets_to_peer"]), int(fields["packets_to_client"])
    # Older layout: to_peer=<bytes>B/<packets>pkt
    to_peer = re.fullmatch(r"\d+B/(\d+)pkt", fields["to_peer"])
    to_client = re.fullmatch(r"\d+B/(\d+)pkt", fields["to_client"])
    assert to_peer is not None and to_client is not None, fields
    return int(to_peer[1]), int(to_client[1])


def interop_required() -> bool:
    """True when missing third-party tools must fail the run instead of skipping."""
    return (
        os.environ.get("CI", "").lower() == "true"
        or os.environ.get("PYTURN_REQUIRE_INTEROP") == "1"
    )


def require_tool(name: str) -> str:
    """Path of the executable `name`; skip the test if it is missing (fail in CI)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = (
        f"{name} not found on PATH (install coturn's turnutils, e.g. "
        f"`apt-get install coturn`, to run this interoperability test)"
    )
    if interop_required():
        pytest.fail(f"{reason}; CI=true or PYTURN_REQUIRE_INTEROP=1 requires it")
    pytest.skip(reason)


class ServerFactory(Protocol):
    """The `server_factory` fixture: start a server with the base config plus overrides."""

    def __call__(self, overrides: Mapping[str, Any] | None = None) -> ServerProcess: ...


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One `pyturn serve -c FILE` child process with its captured log."""

    def __init__(
        self, config: Mapping[str, Any], workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = dict(config)
        self.env = dict(env or {})
        self.workdir = workdir
        self.config_path = workdir / "pyturn.yaml"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        # Every (transport, host) from the `listening on` lines, IPv6 listeners included.
        self.listening: dict[tuple[str, str], int] = {}
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self._reader: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------------------

    @property
    def udp_port(self) -> int:
        return self.ports["udp"]

    @property
    def tcp_port(self) -> int:
        return self.ports["tcp"]

    @property
    def tls_port(self) -> int:
        return self.ports["tls"]

    @property
    def tls_address(self) -> tuple[str, int]:
        return (LOOPBACK, self.tls_port)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def address(self, transport: str, host: str = LOOPBACK) -> tuple[str, int]:
        """Where the listener for `transport` on `host` (e.g. "::1") listens."""
        return (host, self.listening[(transport, host)])

    @property
    def udp_address(self) -> tuple[str, int]:
        return (LOOPBACK, self.udp_port)

    @property
    def tcp_address(self) -> tuple[str, int]:
        return (LOOPBACK, self.tcp_port)

    # -- log -----------------------------------------------------------------------------

    @property
    def log_text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def log_mark(self) -> int:
        """A position in the log; `log_since(mark)` returns what came after it."""
        with self._lock:
            return len(self._lines)

    def log_since(self, mark: int) -> str:
        with self._lock:
            return "".join(self._lines[mark:])

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """Wait until a log line after `since` matches the regex `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[since:]:
                    match = regex.search(line)
                    if match is not None:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    break
                self._changed.wait(min(remaining, 0.5))
        raise AssertionError(
            f"no log line matching {pattern!r} within {timeout} s; log since mark:\n"
            + self.log_since(since)
        )

    def events(self, event: str, *, since: int = 0) -> list[dict[str, str]]:
        """Fields of the `event` lines logged after `since` (see `parse_events`)."""
        return parse_events(self.log_since(since), event)

    def wait_for_event(
        self, event: str, *, since: int = 0, timeout: float = 5.0, **expected: str
    ) -> dict[str, str]:
        """Wait for an `event` line after `since` whose fields include `expected`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for fields in parse_events("".join(self._lines[since:]), event):
                    if all(fields.get(key) == value for key, value in expected.items()):
                        return fields
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    break
                self._changed.wait(min(remaining, 0.5))
        raise AssertionError(
            f"no {event!r} line with {expected} within {timeout} s; log since mark:\n"
            + self.log_since(since)
        )

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        # Ends at EOF, which the pipe reports once the child has exited.
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace")
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyturn", "serve", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        self._reader = threading.Thread(
            target=self._read_output, name="pyturn-log-reader", daemon=True
        )
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        try:
            self.wait_for_log(r"ready in", timeout=READY_TIMEOUT)
        except AssertionError:
            raise ServerStartError(
                f"pyturn did not report 'ready in' within {READY_TIMEOUT} s "
                f"(exit code {self.process.poll() if self.process else None}); log:\n"
                + self.log_text
            ) from None
        for match in _LISTENING.finditer(self.log_text):
            self.listening.setdefault((match["transport"], match["host"]), int(match["port"]))
            if match["host"] == LOOPBACK:
                self.ports.setdefault(match["transport"], int(match["port"]))
        wanted = {listener["transport"] for listener in self.config.get("listen", [])}
        missing = wanted - {transport for transport, _ in self.listening}
        if missing:
            raise ServerStartError(
                f"no 'listening on' line for {sorted(missing)}:\n{self.log_text}"
            )

    def stop(self) -> int | None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit code."""
        process = self.process
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()
        self.returncode = process.returncode
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_pyturn(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m pyturn ARGS` in a process of its own (as an operator runs a command),
    its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pyturn", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def running_server(config: Mapping[str, Any], workdir: Path) -> Iterator[ServerProcess]:
    """Generator for fixtures: yields a started server, stops it afterwards."""
    with ServerProcess(config, workdir) as server:
        yield server


def start_listening(command: list[str], ports: Iterable[int], log: Path) -> subprocess.Popen[bytes]:
    """Start a third-party server (HAProxy, nginx) in the foreground, its output in `log`,
    and wait until each of `ports` on 127.0.0.1 accepts a TCP connection."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for port in ports:
            while True:
                with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
                    break
                assert process.poll() is None, f"{command[0]} exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, (
                    f"{command[0]} did not listen:\n{log.read_text()}"
                )
                time.sleep(0.05)
    except BaseException:
        stop_process(process)
        raise
    return process


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a process this test started, then SIGKILL if it does not go within 10 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
