#!/usr/bin/env python3
"""pyturn against coturn on this machine: the "Fast relay" benchmark.

Runs pyturn and coturn (when installed) one after the other, alternating for every figure,
drives both with the same small C load generator (bench/loadgen.c, built here with the
system compiler), and prints each figure with its ratio to coturn:

1. relayed ChannelData packets/s at saturation (100- and 1000-byte payloads, 10
   allocations) and the server's CPU time per packet;
2. the same with Send/Data indications;
3. authenticated Allocates/s (401, then an authenticated Allocate), many in flight;
4. Binding requests/s;
5. RSS per allocation with 5,000 allocations held, and RSS after they are released;
6. round-trip time p50/p99 through the relay at a moderate fixed rate;
7. time from process start to the UDP listener answering a Binding request;
8. ChannelData over TCP (100 and 1000 bytes, 10 allocations, each on its own connection):
   relayed packets/s and server CPU per packet;
9. the same over TLS 1.3 (100 and 1000 bytes) and over TLS 1.2 (100 bytes);
10. Send/Data indications over TCP (100 bytes);
11. TLS connections with an authenticated Allocate per second (a new connection and a
    full handshake each time, as a browser's first connection makes), TLS 1.3 and 1.2;
12. RSS per idle TLS connection (with an allocation and a channel) with 2,000 held, TLS
    1.3 and 1.2.

Over TCP and TLS the clients' connections are streams and the relay leg to the peer is
UDP, as in both servers. Both servers get the same self-signed P-256 certificate, made
for the run with the openssl command. coturn 4.6.1 has no TLS 1.3 (4.6.2 has): when it
refuses a TLS 1.3 handshake, the TLS 1.3 figures are pyturn's and the stub's only.

The generator also drives "stub", a plain C forwarder that speaks just enough TURN for
the generator (`loadgen stub`), to show that the generator is not the bottleneck.

Everything stays on loopback. The server under test is pinned to one core and the
generator to the other with taskset; every measurement is bounded in time.

    .venv/bin/python bench/run.py            # full run, about 12 minutes (5 of them TCP/TLS)
    .venv/bin/python bench/run.py --quick    # about 3 minutes
    .venv/bin/python bench/run.py --only tcp_channel_100,tls_alloc   # some figures
    .venv/bin/python bench/run.py --from-json out.json   # the table again
    .venv/bin/python bench/run.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
BUILD_DIR = BENCH_DIR / "build"
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
LOADGEN = BUILD_DIR / "loadgen"

USER = "bench"
PASSWORD = "bench-password"  # noqa: S105 (a throwaway credential for a loopback benchmark)
REALM = "bench.example"
HOST = "127.0.0.1"

SERVER_CORE = 0
LOAD_CORE = 1

ALLOCS = 10  # allocations carrying traffic in the relay figures
WINDOW = 16  # packets in flight per allocation at saturation
RTT_RATE = 2000  # round trips per second for the latency figure
BINDING_SOCKETS = 8
BINDING_WINDOW = 16
ALLOC_INFLIGHT = 512  # coturn needs about this many to keep its core busy
HOLD_INFLIGHT = 128
TLS_ALLOC_INFLIGHT = 64  # connections handshaking at once in the TLS Allocate figure
TLS_HOLD = 2000  # idle TLS connections held for the memory figure

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

Metrics = dict[str, float]


class BenchError(Exception):
    """A run could not be measured; the message says why."""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    repeats: int
    rtt_repeats: int  # round-trip percentiles scatter more from run to run than rates
    warmup: float
    duration: float
    hold: int
    startup_repeats: int
    attempts: int  # measurements per run while other processes disturb it
    retry_budget: float  # seconds that repeating noisy runs may add in all


FULL = Profile(
    "full",
    3,
    rtt_repeats=6,
    warmup=1.0,
    duration=4.0,
    hold=5000,
    startup_repeats=5,
    attempts=3,
    retry_budget=150,
)
QUICK = Profile(
    "quick",
    1,
    rtt_repeats=1,
    warmup=0.5,
    duration=2.0,
    hold=5000,
    startup_repeats=2,
    attempts=2,
    retry_budget=20,
)


# -- machine -----------------------------------------------------------------------------


@dataclasses.dataclass
class Machine:
    taskset: str | None
    turnserver: str | None
    pyturn: Path
    relay_range: tuple[int, int]
    pinned: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    # The run's certificate and private key (PEM) for both servers' TLS listeners.
    tls_pair: tuple[Path, Path] | None = None
    # "pyturn TLS 1.2" -> "TLSv1.2 ECDHE-ECDSA-AES256-GCM-SHA384": what was negotiated.
    negotiated: dict[str, str] = dataclasses.field(default_factory=dict)
    # Whether coturn completes a TLS 1.3 handshake (4.6.1 does not); None: not asked yet.
    coturn_tls13: bool | None = None

    def pin(self, core: int, argv: list[str]) -> list[str]:
        if self.taskset is None or not self.pinned:
            return argv
        return [self.taskset, "-c", str(core), *argv]


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def pick_relay_range() -> tuple[int, int]:
    """10,000 relay ports that the kernel does not hand out as ephemeral client ports."""
    low, high = ephemeral_range()
    for start in (20000, 10000, 61000):
        end = min(start + 9999, 65535)
        if end < low or start > high:
            return start, end
    return 20000, 29999


def raise_fd_limit() -> int:
    """Children inherit it: 5,000 allocations need 5,000+ sockets on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if hard == resource.RLIM_INFINITY:
        want = 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def build_loadgen() -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc) found; the load generator is built with it")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC), "-lssl", "-lcrypto"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    if done.returncode != 0:
        raise BenchError(f"building the load generator failed:\n{done.stderr}")


def long_term_key() -> str:
    """RFC 8489 §9.2.2 key, MD5(username:realm:password), for the generator's HMACs."""
    material = f"{USER}:{REALM}:{PASSWORD}".encode()
    return hashlib.md5(material, usedforsecurity=False).hexdigest()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port() -> int:
    """A port free for both UDP and TCP (coturn's listening port is both)."""
    for _ in range(50):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        return port
    raise BenchError("no port free for both UDP and TCP")


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost, valid two days, for both servers."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BenchError("no openssl command: the TCP and TLS figures need a certificate")
    argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt"]
    argv += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
    argv += ["-keyout", str(key), "-out", str(cert)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    if done.returncode != 0:
        raise BenchError(f"making the certificate failed:\n{done.stderr}")
    return cert, key


def offers_tls13(port: int) -> bool:
    """Whether HOST:port completes a TLS 1.3 handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the run's self-signed certificate, on loopback
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with (
            socket.create_connection((HOST, port), timeout=5) as sock,
            context.wrap_socket(sock) as tls,
        ):
            return tls.version() == "TLSv1.3"
    except OSError:  # ssl.SSLError is one
        return False


def tcp_accepting(port: int, deadline: float) -> bool:
    """Whether HOST:port accepts a TCP connection before the deadline."""
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.connect((HOST, port))
            except OSError:
                time.sleep(0.01)
                continue
            return True
    return False


BINDING_REQUEST_HEAD = b"\x00\x01\x00\x00\x21\x12\xa4\x42"


def binding_answered(port: int, deadline: float) -> bool:
    """Send Binding requests to HOST:port every 2 ms until one is answered."""
    sent: set[bytes] = set()  # an answer may come after the next probe went out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.002)
        while time.monotonic() < deadline:
            txid = os.urandom(12)
            sent.add(txid)
            with contextlib.suppress(OSError):
                sock.sendto(BINDING_REQUEST_HEAD + txid, (HOST, port))
            try:
                data = sock.recv(2048)
            except OSError:  # timeout, or an ICMP error before the port is bound
                continue
            if len(data) >= 20 and data[0:2] == b"\x01\x01" and data[8:20] in sent:
                return True
    return False


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor and its worker processes)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                out += process_tree(int(child))
    return out


def vm_rss_kb(pids: list[int]) -> int:
    """VmRSS summed over `pids`."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
        else:
            raise BenchError(f"no VmRSS for pid {pid}")
    return total


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- servers under test ------------------------------------------------------------------


class Server:
    """A running server process: pyturn, coturn or the C stub."""

    def __init__(
        self,
        kind: str,
        proc: subprocess.Popen[bytes],
        port: int,
        workdir: Path,
        ports: dict[str, int] | None = None,
    ) -> None:
        self.kind = kind
        self.proc = proc
        self.pid = proc.pid  # taskset execs the server, so this is the server's own pid
        self.port = port
        # Its listeners by transport ("udp", "tcp", "tls"); the stub has one.
        self.ports = ports if ports is not None else {"udp": port}
        self.workdir = workdir
        self.ready_ms: float | None = None

    def address(self, transport: str) -> str:
        if transport not in self.ports:
            raise BenchError(f"{self.kind} has no {transport} listener")
        return f"{HOST}:{self.ports[transport]}"

    def pids(self) -> list[int]:
        """The server's process and any worker processes it started."""
        return process_tree(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; only this process, by its pid.

        pyturn's supervisor stops its own workers on SIGTERM."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# The targets are per server core with one worker; pyturn's default (workers: 0) would
# start one worker per CPU, all on the one core the server is pinned to.
PYTURN_WORKERS = 1


# Limits far above what the benchmark offers (about 100 Mbit/s at most): every packet is
# checked against all three and none is dropped, so the figure is the cost of checking.
BANDWIDTH_LIMITS = (
    'bandwidth: {per_allocation: "10 Gbit/s", per_user: "20 Gbit/s", total: "40 Gbit/s"}\n'
)


def write_pyturn_config(
    path: Path,
    port: int,
    relay: tuple[int, int],
    *,
    limits: bool = False,
    tls_pair: tuple[Path, Path] | None = None,
) -> None:
    """`tls_pair`: also TCP and TLS listeners (any free port), with that certificate."""
    streams = ""
    if tls_pair is not None:
        streams = (
            f"  - {{transport: tcp, address: {HOST}, port: 0}}\n"
            f"  - {{transport: tls, address: {HOST}, port: 0}}\n"
            f'tls: {{certificate: "{tls_pair[0]}", private_key: "{tls_pair[1]}"}}\n'
        )
    path.write_text(
        f"""# written by bench/run.py
realm: {REALM}
listen:
  - {{transport: udp, address: {HOST}, port: {port}}}
{streams}relay: {{address: {HOST}, min_port: {relay[0]}, max_port: {relay[1]}}}
auth:
  users: {{{USER}: "{PASSWORD}"}}
peers: {{allow: ["127.0.0.0/8"]}}
quotas: {{allocations_per_user: 0, allocations_total: 0}}
metrics: {{enabled: false}}
shutdown_timeout: 0
workers: {PYTURN_WORKERS}
"""
        + (BANDWIDTH_LIMITS if limits else "")
    )


_LISTENING = re.compile(rb"listening on (udp|tcp|tls) 127\.0\.0\.1:(\d+)")
_READY = re.compile(rb"ready in (\d+(?:\.\d+)?) ms")


def start_pyturn(
    machine: Machine, workdir: Path, port: int = 0, *, limits: bool = False, streams: bool = False
) -> Server:
    """`streams`: TCP and TLS listeners too, with the run's certificate."""
    config = workdir / "pyturn.yaml"
    tls_pair = stream_certificate(machine) if streams else None
    write_pyturn_config(config, port, machine.relay_range, limits=limits, tls_pair=tls_pair)
    wanted = {"udp", "tcp", "tls"} if streams else {"udp"}
    log_path = workdir / "pyturn.log"
    with log_path.open("wb") as log:
        argv = machine.pin(SERVER_CORE, [str(machine.pyturn), "serve", "-c", str(config)])
        proc = subprocess.Popen(  # noqa: S603
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )
    deadline = time.monotonic() + START_TIMEOUT
    ready: float | None = None
    while time.monotonic() < deadline:
        text = log_path.read_bytes()
        bound = {m.group(1).decode(): int(m.group(2)) for m in _LISTENING.finditer(text)}
        if m := _READY.search(text):
            ready = float(m.group(1))
        if wanted <= bound.keys() and ready is not None:
            server = Server("pyturn", proc, bound["udp"], workdir, ports=bound)
            server.ready_ms = ready
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise BenchError(f"pyturn did not become ready:\n{tail}")


def stream_certificate(machine: Machine) -> tuple[Path, Path]:
    if machine.tls_pair is None:
        raise BenchError("no certificate for the TCP and TLS listeners (see the notes)")
    return machine.tls_pair


def coturn_argv(
    machine: Machine, workdir: Path, port: int, tls_port: int | None = None
) -> list[str]:
    """`tls_port`: TCP listeners on `port` and TLS on `tls_port` too, with the run's
    certificate; otherwise UDP only. DTLS is off either way."""
    assert machine.turnserver is not None
    low, high = machine.relay_range
    if tls_port is None:
        streams = ["--no-tls", "--no-tcp"]
    else:
        cert, key = stream_certificate(machine)
        streams = ["--tls-listening-port", str(tls_port), "--cert", str(cert), "--pkey", str(key)]
    return [
        machine.turnserver,
        "-n",  # no configuration file
        "--lt-cred-mech",
        "--user",
        f"{USER}:{PASSWORD}",
        "--realm",
        REALM,
        "--listening-ip",
        HOST,
        "--relay-ip",
        HOST,
        "-p",
        str(port),
        "--min-port",
        str(low),
        "--max-port",
        str(high),
        "--allow-loopback-peers",
        *streams,
        "--no-dtls",
        "--no-cli",
        "--relay-threads",
        "1",  # one relay thread: the per-core comparison the targets are about
        "--log-file",
        "stdout",
        "--pidfile",
        str(workdir / "turnserver.pid"),
        "--userdb",
        str(workdir / "turndb"),
    ]


def start_coturn(
    machine: Machine, workdir: Path, port: int | None = None, *, streams: bool = False
) -> Server:
    """`streams`: TCP and TLS listeners too, with the run's certificate."""
    port = port or (free_port() if streams else free_udp_port())
    tls_port = free_port() if streams else None
    log_path = workdir / "coturn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603
            machine.pin(SERVER_CORE, coturn_argv(machine, workdir, port, tls_port)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    answered = binding_answered(port, deadline)
    ports = {"udp": port}
    if answered and tls_port is not None:
        ports |= {"tcp": port, "tls": tls_port}
        answered = tcp_accepting(port, deadline) and tcp_accepting(tls_port, deadline)
    if not answered or proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"coturn did not answer a Binding request or accept TCP:\n{tail}")
    return Server("coturn", proc, port, workdir, ports=ports)


def start_stub(machine: Machine, workdir: Path, transport: str = "udp") -> Server:
    """The C stub on one transport; over TLS with the run's certificate."""
    argv = [str(LOADGEN), "stub", "--transport", transport, "--max-time", "120"]
    if transport == "tls":
        cert, key = stream_certificate(machine)
        argv += ["--cert", str(cert), "--pkey", str(key)]
    argv = machine.pin(SERVER_CORE, argv)
    proc = subprocess.Popen(  # noqa: S603
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = read_line(proc.stdout, time.monotonic() + START_TIMEOUT)
    m = re.fullmatch(rb"port (\d+)\s*", line)
    if m is None:
        proc.kill()
        proc.wait()
        raise BenchError(f"stub did not start: {line!r}")
    port = int(m.group(1))
    return Server("stub", proc, port, workdir, ports={transport: port})


def start_server(machine: Machine, kind: str, workdir: Path, transport: str = "udp") -> Server:
    """`transport`: what the experiment's clients use; tcp and tls servers get both."""
    streams = transport != "udp"
    if kind == "pyturn":
        return start_pyturn(machine, workdir, streams=streams)
    if kind == LIMITED:
        return start_pyturn(machine, workdir, limits=True, streams=streams)
    if kind == "coturn":
        return start_coturn(machine, workdir, streams=streams)
    return start_stub(machine, workdir, transport)


@contextlib.contextmanager
def running(machine: Machine, kind: str, transport: str = "udp") -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        server = start_server(machine, kind, Path(tmp), transport)
        try:
            yield server
        finally:
            server.stop()


# -- the load generator ------------------------------------------------------------------


def read_line(stream: IO[bytes], deadline: float) -> bytes:
    """One line from a child's stdout, or BenchError at the deadline."""
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out waiting for output (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            raise BenchError(f"process ended early (got {buf!r})")
        buf += chunk
    return buf


@dataclasses.dataclass(frozen=True)
class Transport:
    """How the generator's clients reach the server: udp, tcp or tls (pinned to one TLS
    version, "1.3" or "1.2")."""

    name: str = "udp"
    tls_version: str | None = None

    def options(self) -> list[str]:
        out = ["--transport", self.name]
        if self.tls_version is not None:
            out += ["--tls-version", self.tls_version]
        return out


UDP = Transport()
TCP = Transport("tcp")
TLS13 = Transport("tls", "1.3")
TLS12 = Transport("tls", "1.2")


def check_tls(machine: Machine, server: Server, transport: Transport, result: Any) -> float:
    """The TLS version the generator negotiated, which must be the one asked for; kept
    with the cipher for the report. 0 for TCP and UDP."""
    if transport.tls_version is None:
        return 0.0
    got = str(result.get("tls_version", ""))
    if got != f"TLSv{transport.tls_version}":
        raise BenchError(f"asked for TLS {transport.tls_version}, negotiated {got!r}")
    machine.negotiated[f"{server.kind} TLS {transport.tls_version}"] = f"{got} {result['cipher']}"
    return float(transport.tls_version)


def loadgen(
    machine: Machine,
    server: Server,
    mode: str,
    *options: str,
    budget: float,
    transport: Transport = UDP,
) -> Any:
    argv = machine.pin(
        LOAD_CORE,
        [
            str(LOADGEN),
            mode,
            *transport.options(),
            "--server",
            server.address(transport.name),
            "--key",
            long_term_key(),
            "--user",
            USER,
            "--server-pid",
            ",".join(map(str, server.pids())),
            "--server-core",
            str(SERVER_CORE),
            "--gen-core",
            str(LOAD_CORE),
            "--max-time",
            str(budget),
            *options,
        ],
    )
    try:
        done = subprocess.run(  # noqa: S603
            argv, capture_output=True, timeout=budget + 10, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"loadgen {mode} overran its {budget:.0f} s budget") from exc
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(
            f"loadgen {mode} failed (exit {done.returncode}): "
            f"{' '.join(lines)} {done.stderr.decode(errors='replace').strip()}"
        )
    result = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(f"loadgen {mode}: {result['error']}")
    return result


# -- experiments -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    run: Callable[[Machine, Server, Profile], Metrics]
    stub: bool = True  # also run against the stub (generator ceiling)
    fresh_start: bool = False  # the experiment starts the server itself
    scatters: bool = False  # its figures scatter run to run: profile.rtt_repeats runs
    # Which servers it compares, when not pyturn and coturn.
    kinds: tuple[str, ...] | None = None
    # The clients' transport: tcp and tls start the servers with TCP and TLS listeners
    # too, and the stub on that transport.
    transport: Transport = UDP


# pyturn with bandwidth limits set well above the load (BANDWIDTH_LIMITS).
LIMITED = "pyturn-limited"


def _common(result: Any) -> Metrics:
    return {
        "server_cpu_util": float(result["server_cpu_util"]),
        "gen_idle": float(result["gen_idle"]),
        "foreign_server_core": float(result["foreign_server_core"]),
        "foreign_gen_core": float(result["foreign_gen_core"]),
    }


def timed_loadgen(
    machine: Machine,
    server: Server,
    profile: Profile,
    mode: str,
    *options: str,
    transport: Transport = UDP,
) -> Any:
    """A measuring loadgen run: the profile's warm-up and duration, a budget past both."""
    return loadgen(
        machine,
        server,
        mode,
        *options,
        "--warmup",
        str(profile.warmup),
        "--duration",
        str(profile.duration),
        budget=profile.warmup + profile.duration + 20,
        transport=transport,
    )


def relay_experiment(
    kind: str, payload: int, transport: Transport = UDP
) -> Callable[[Machine, Server, Profile], Metrics]:
    def run(machine: Machine, server: Server, profile: Profile) -> Metrics:
        r = timed_loadgen(
            machine,
            server,
            profile,
            "relay",
            "--kind",
            kind,
            "--payload",
            str(payload),
            "--allocs",
            str(ALLOCS),
            "--window",
            str(WINDOW),
            transport=transport,
        )
        metrics = {
            "pps": float(r["relayed_pps"]),
            "cpu_us": float(r["cpu_us_per_pkt"]),
            "loss": float(r["loss"]),
            **_common(r),
        }
        if transport != UDP:
            # connections the server closed under the load (each ends an allocation)
            metrics["lost"] = float(r["lost"])
        if tls := check_tls(machine, server, transport, r):
            metrics["tls"] = tls
        return metrics

    return run


def alloc_experiment(
    inflight: int, transport: Transport = UDP
) -> Callable[[Machine, Server, Profile], Metrics]:
    """Allocate cycles; over TCP and TLS each on a new connection (and TLS handshake)."""

    def run(machine: Machine, server: Server, profile: Profile) -> Metrics:
        r = timed_loadgen(
            machine, server, profile, "alloc", "--inflight", str(inflight), transport=transport
        )
        metrics = {
            "allocs_ps": float(r["allocs_ps"]),
            "cpu_us": float(r["cpu_us_per_alloc"]),
            "errors": float(r["errors"]),
            "timeouts": float(r["timeouts"]),
            **_common(r),
        }
        if transport != UDP:
            metrics["connects_ps"] = float(r["connects_ps"])
        if tls := check_tls(machine, server, transport, r):
            metrics["tls"] = tls
        return metrics

    return run


def binding_run(machine: Machine, server: Server, profile: Profile) -> Metrics:
    r = timed_loadgen(
        machine,
        server,
        profile,
        "binding",
        "--sockets",
        str(BINDING_SOCKETS),
        "--window",
        str(BINDING_WINDOW),
    )
    return {"rps": float(r["rps"]), "cpu_us": float(r["cpu_us_per_req"]), **_common(r)}


def rtt_run(machine: Machine, server: Server, profile: Profile) -> Metrics:
    r = timed_loadgen(
        machine,
        server,
        profile,
        "relay",
        "--kind",
        "channel",
        "--payload",
        "100",
        "--allocs",
        str(ALLOCS),
        "--rate",
        str(RTT_RATE),
    )
    return {
        "p50_us": float(r["rtt_p50_us"]),
        "p99_us": float(r["rtt_p99_us"]),
        "p999_us": float(r["rtt_p999_us"]),
        "cpu_us": float(r["cpu_us_per_pkt"]),
        "samples": float(r["rtt_samples"]),
        "loss": float(r["loss"]),
        **_common(r),
    }


def memory_experiment(
    transport: Transport = UDP, count: int | None = None, key: str = "per_alloc_kb"
) -> Callable[[Machine, Server, Profile], Metrics]:
    """Hold `count` (default `profile.hold`) allocations, one channel each and over TCP or
    TLS each on its own connection; `key`: the name of RSS growth per allocation held."""

    def run(machine: Machine, server: Server, profile: Profile) -> Metrics:
        metrics = memory_run(machine, server, count or profile.hold, transport)
        metrics[key] = metrics.pop("per_alloc_kb")
        return metrics

    return run


def memory_run(machine: Machine, server: Server, hold: int, transport: Transport) -> Metrics:
    """Hold `hold` allocations (one channel each), then release them."""
    time.sleep(0.3)
    pids = server.pids()
    base = vm_rss_kb(pids)
    argv = machine.pin(
        LOAD_CORE,
        [
            str(LOADGEN),
            "hold",
            *transport.options(),
            "--server",
            server.address(transport.name),
            "--key",
            long_term_key(),
            "--user",
            USER,
            "--allocs",
            str(hold),
            "--inflight",
            str(HOLD_INFLIGHT),
            "--max-time",
            "90",
        ],
    )
    proc = subprocess.Popen(  # noqa: S603
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        held = json.loads(read_line(proc.stdout, time.monotonic() + 90))
        time.sleep(0.5)
        held_rss = vm_rss_kb(pids)
        proc.stdin.write(b"release\n")
        proc.stdin.flush()
        released = json.loads(read_line(proc.stdout, time.monotonic() + 30))
        time.sleep(1.0)
        after = vm_rss_kb(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    count = int(held["held"])
    if count < hold * 0.95:
        raise BenchError(f"only {count} of {hold} allocations held: {held}")
    tls = check_tls(machine, server, transport, held)
    return {
        **({"tls": tls} if tls else {}),
        "held": float(count),
        "base_kb": float(base),
        "held_kb": float(held_rss),
        "after_kb": float(after),
        "per_alloc_kb": (held_rss - base) / count,
        "retained_kb": float(after - base),
        "retained_share": (after - base) / max(held_rss - base, 1),
        "setup_s": float(held["setup_s"]),
        "released": float(released["released"]),
    }


def startup_run(machine: Machine, kind: str) -> Metrics:
    """Process start (Popen) until a Binding request is answered, same probe for both."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-start-") as tmp:
        workdir = Path(tmp)
        port = free_udp_port()
        if kind == "pyturn":
            config = workdir / "pyturn.yaml"
            write_pyturn_config(config, port, machine.relay_range)
            argv = machine.pin(SERVER_CORE, [str(machine.pyturn), "serve", "-c", str(config)])
        else:
            argv = machine.pin(SERVER_CORE, coturn_argv(machine, workdir, port))
        log_path = workdir / "server.log"
        with log_path.open("wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(  # noqa: S603
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        answered = binding_answered(port, started + START_TIMEOUT)
        elapsed = (time.monotonic() - started) * 1000
        server = Server(kind, proc, port, workdir)
        server.stop()
        if not answered:
            raise BenchError(f"{kind} did not answer within {START_TIMEOUT:.0f} s")
        metrics = {"startup_ms": elapsed}
        if kind == "pyturn" and (m := _READY.search(log_path.read_bytes())):
            metrics["self_reported_ms"] = float(m.group(1))
        return metrics


EXPERIMENTS = [
    Experiment("channel100", "ChannelData, 100 B", relay_experiment("channel", 100)),
    Experiment("channel1000", "ChannelData, 1000 B", relay_experiment("channel", 1000)),
    # The same two with bandwidth limits set, against pyturn without: what checking costs.
    Experiment(
        "channel100limits",
        "ChannelData, 100 B",
        relay_experiment("channel", 100),
        stub=False,
        kinds=("pyturn", LIMITED),
    ),
    Experiment(
        "channel1000limits",
        "ChannelData, 1000 B",
        relay_experiment("channel", 1000),
        stub=False,
        kinds=("pyturn", LIMITED),
    ),
    Experiment("send100", "Send/Data, 100 B", relay_experiment("send", 100)),
    Experiment("send1000", "Send/Data, 1000 B", relay_experiment("send", 1000)),
    Experiment("alloc", "Allocate", alloc_experiment(ALLOC_INFLIGHT)),
    Experiment("binding", "Binding", binding_run),
    Experiment("rtt", "RTT", rtt_run, scatters=True),
    Experiment("memory", "RSS", memory_experiment(), stub=False),
    Experiment("startup", "start-up", lambda m, s, p: {}, stub=False, fresh_start=True),
    # Clients over TCP and TLS: one connection per allocation, the peer leg UDP.
    Experiment(
        "tcp_channel_100",
        "TCP ChannelData, 100 B",
        relay_experiment("channel", 100, TCP),
        transport=TCP,
    ),
    Experiment(
        "tcp_channel_1000",
        "TCP ChannelData, 1000 B",
        relay_experiment("channel", 1000, TCP),
        transport=TCP,
    ),
    Experiment(
        "tls_channel_100",
        "TLS1.3 ChannelData, 100 B",
        relay_experiment("channel", 100, TLS13),
        transport=TLS13,
    ),
    Experiment(
        "tls_channel_1000",
        "TLS1.3 ChannelData, 1000 B",
        relay_experiment("channel", 1000, TLS13),
        transport=TLS13,
    ),
    Experiment(
        "tls12_channel_100",
        "TLS1.2 ChannelData, 100 B",
        relay_experiment("channel", 100, TLS12),
        transport=TLS12,
    ),
    Experiment(
        "tcp_send_100", "TCP Send/Data, 100 B", relay_experiment("send", 100, TCP), transport=TCP
    ),
    Experiment(
        "tls_alloc",
        "TLS1.3 connect+Allocate",
        alloc_experiment(TLS_ALLOC_INFLIGHT, TLS13),
        transport=TLS13,
    ),
    Experiment(
        "tls12_alloc",
        "TLS1.2 connect+Allocate",
        alloc_experiment(TLS_ALLOC_INFLIGHT, TLS12),
        transport=TLS12,
    ),
    Experiment(
        "tls_memory",
        "RSS, TLS1.3 connections",
        memory_experiment(TLS13, TLS_HOLD, "per_conn_kb"),
        stub=False,
        transport=TLS13,
    ),
    Experiment(
        "tls12_memory",
        "RSS, TLS1.2 connections",
        memory_experiment(TLS12, TLS_HOLD, "per_conn_kb"),
        stub=False,
        transport=TLS12,
    ),
]


# -- running and reporting ---------------------------------------------------------------


@dataclasses.dataclass
class Results:
    runs: dict[str, dict[str, list[Metrics]]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, experiment: str, kind: str, metrics: Metrics) -> None:
        self.runs.setdefault(experiment, {}).setdefault(kind, []).append(metrics)

    def values(self, experiment: str, kind: str, key: str) -> list[float]:
        runs = self.runs.get(experiment, {}).get(kind, [])
        return [m[key] for m in runs if key in m and m[key] >= 0]

    def median(self, experiment: str, kind: str, key: str) -> float | None:
        values = self.values(experiment, kind, key)
        return statistics.median(values) if values else None

    def disturbed(self, experiment: str, kind: str, key: str, agg: str) -> bool:
        """Whether the run a best-of ("max"/"min") value comes from was disturbed."""
        value = self.pick(experiment, kind, key, agg)
        if value is None or agg == "median":
            return False
        runs = self.runs.get(experiment, {}).get(kind, [])
        return any(m.get(key) == value and noise(m) >= NOISY for m in runs)

    def pick(self, experiment: str, kind: str, key: str, agg: str) -> float | None:
        """`agg`: "median", or "max"/"min" for the best run (other processes on the
        machine only ever lower a rate or raise a latency)."""
        values = self.values(experiment, kind, key)
        if not values:
            return None
        if agg == "max":
            return max(values)
        if agg == "min":
            return min(values)
        return statistics.median(values)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(experiment: str, metrics: Metrics) -> str:
    if "pps" in metrics:
        text = f"{metrics['pps']:>10,.0f} pkt/s  {metrics['cpu_us']:.2f} us/pkt"
    elif "allocs_ps" in metrics:
        text = (
            f"{metrics['allocs_ps']:>10,.0f} allocs/s  {metrics['cpu_us']:.0f} us/cycle  "
            f"errors={metrics['errors']:.0f} timeouts={metrics['timeouts']:.0f}"
        )
        if "connects_ps" in metrics:
            text += f"  connections {metrics['connects_ps']:,.0f}/s"
    elif "rps" in metrics:
        text = f"{metrics['rps']:>10,.0f} req/s  {metrics['cpu_us']:.2f} us/req"
    elif "p99_us" in metrics:
        text = f"p50 {metrics['p50_us']:.0f} us  p99 {metrics['p99_us']:.0f} us"
    elif "per_alloc_kb" in metrics or "per_conn_kb" in metrics:
        per, what = (
            (metrics["per_conn_kb"], "connection")
            if "per_conn_kb" in metrics
            else (metrics["per_alloc_kb"], "alloc")
        )
        text = (
            f"{per:.1f} KB/{what}  base {metrics['base_kb'] / 1024:.1f} MB "
            f"held {metrics['held_kb'] / 1024:.1f} MB  after {metrics['after_kb'] / 1024:.1f} MB"
        )
    elif "startup_ms" in metrics:
        text = f"{metrics['startup_ms']:.0f} ms"
    else:
        text = json.dumps(metrics)
    if metrics.get("lost"):
        text += f"  connections lost {metrics['lost']:.0f}"
    if "foreign_server_core" in metrics:
        text += (
            f"  [server core {metrics['server_cpu_util']:.0%} busy, "
            f"others {metrics['foreign_server_core']:.0%}; generator idle "
            f"{metrics['gen_idle']:.0%}]"
        )
    return text


NOISY = 0.15  # share of a core taken by other processes that makes a run worth repeating


def noise(metrics: Metrics) -> float:
    return max(metrics.get("foreign_server_core", 0.0), metrics.get("foreign_gen_core", 0.0))


def coturn_tls13(machine: Machine) -> bool:
    """Whether coturn speaks TLS 1.3 here, asked once; when not, the TLS 1.3 figures are
    pyturn's and the stub's only (coturn 4.6.1 refuses the handshake; 4.6.2 has it)."""
    if machine.coturn_tls13 is None:
        try:
            with running(machine, "coturn", "tls") as server:
                machine.coturn_tls13 = offers_tls13(server.ports["tls"])
        except BenchError:
            return True  # the experiment itself will say what is wrong
        if not machine.coturn_tls13:
            machine.notes.append(
                "coturn did not complete a TLS 1.3 handshake: TLS 1.3 figures are pyturn's "
                "and the stub's only; the TLS 1.2 figures compare the two servers"
            )
    return machine.coturn_tls13


def run_all(machine: Machine, profile: Profile, only: set[str] | None) -> Results:
    results = Results()
    servers = ["pyturn"] + (["coturn"] if machine.turnserver else [])
    retried = 0.0  # seconds spent repeating noisy runs
    for experiment in EXPERIMENTS:
        if only and experiment.name not in only:
            continue
        if experiment.fresh_start:
            repeats = profile.startup_repeats
        elif experiment.scatters:
            repeats = profile.rtt_repeats
        else:
            repeats = profile.repeats
        plan: list[str] = []
        kinds = list(experiment.kinds or servers)
        if experiment.transport == TLS13 and "coturn" in kinds and not coturn_tls13(machine):
            kinds.remove("coturn")
        for rep in range(repeats):  # ABBA: alternate, and swap who goes first
            plan += kinds if rep % 2 == 0 else kinds[::-1]
        if experiment.stub:
            plan.append("stub")
        for i, kind in enumerate(plan, 1):
            label = f"{experiment.title:<26} {kind:<6} {i}/{len(plan)}"
            best: Metrics | None = None
            for attempt in range(profile.attempts):
                began = time.monotonic()
                try:
                    if experiment.fresh_start:
                        metrics = startup_run(machine, kind)
                    else:
                        with running(machine, kind, experiment.transport.name) as server:
                            metrics = experiment.run(machine, server, profile)
                except BenchError as exc:
                    results.failures.append(f"{experiment.name}/{kind}: {exc}")
                    log(f"  {label}: FAILED: {exc}")
                    break
                log(f"  {label}: {describe(experiment.name, metrics)}")
                if attempt:
                    retried += time.monotonic() - began
                if best is None or noise(metrics) < noise(best):
                    best = metrics
                # Another process took a share of a core: measure again while time allows.
                if noise(best) < NOISY or retried > profile.retry_budget:
                    break
                if attempt + 1 < profile.attempts:
                    log(f"  {label}: noisy ({noise(metrics):.0%} of a core elsewhere), again")
            if best is not None:
                results.add(experiment.name, kind, best)
    return results


@dataclasses.dataclass
class Row:
    figure: str
    unit: str
    experiment: str
    key: str
    agg: str  # "max"/"min": the best run; "median"
    target: str
    # (pyturn, coturn) -> met?  None when it cannot be judged
    judge: Callable[[float | None, float | None], bool | None]
    stub: bool = True


def ratio_at_least(x: float) -> Callable[[float | None, float | None], bool | None]:
    def judge(p: float | None, c: float | None) -> bool | None:
        return None if p is None or not c else p / c >= x

    return judge


def ratio_at_most(x: float) -> Callable[[float | None, float | None], bool | None]:
    def judge(p: float | None, c: float | None) -> bool | None:
        return None if p is None or not c else p / c <= x

    return judge


def absolute_at_most(x: float) -> Callable[[float | None, float | None], bool | None]:
    def judge(p: float | None, c: float | None) -> bool | None:
        return None if p is None else p <= x

    return judge


def no_target(p: float | None, c: float | None) -> bool | None:
    return None


# fmt: off
# Rates are the best run ("max"): on a shared machine other processes only ever take
# from them. CPU per operation is the median: it hardly moves when another process takes
# turns on the core, so its ratio is the steady "per server core" comparison. The CPU rows
# carry the same targets, inverted (0.9x the rate per core = at most 1/0.9 the CPU).
ROWS = [
    Row("1. ChannelData 100 B relayed", "pkt/s", "channel100", "pps", "max", ">=0.9x",
        ratio_at_least(0.9)),
    Row("   server CPU per packet", "us", "channel100", "cpu_us", "median", "<=1.11x",
        ratio_at_most(1 / 0.9)),
    Row("1. ChannelData 1000 B relayed", "pkt/s", "channel1000", "pps", "max", ">=0.9x",
        ratio_at_least(0.9)),
    Row("   server CPU per packet", "us", "channel1000", "cpu_us", "median", "<=1.11x",
        ratio_at_most(1 / 0.9)),
    Row("2. Send/Data 100 B relayed", "pkt/s", "send100", "pps", "max", ">=0.75x",
        ratio_at_least(0.75)),
    Row("   server CPU per packet", "us", "send100", "cpu_us", "median", "<=1.33x",
        ratio_at_most(1 / 0.75)),
    Row("2. Send/Data 1000 B relayed", "pkt/s", "send1000", "pps", "max", ">=0.75x",
        ratio_at_least(0.75)),
    Row("   server CPU per packet", "us", "send1000", "cpu_us", "median", "<=1.33x",
        ratio_at_most(1 / 0.75)),
    Row("3. authenticated Allocates", "/s", "alloc", "allocs_ps", "max", ">=1.0x",
        ratio_at_least(1.0)),
    Row("   server CPU per Allocate cycle", "us", "alloc", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("4. Binding requests", "/s", "binding", "rps", "max", ">=0.9x", ratio_at_least(0.9)),
    Row("   server CPU per request", "us", "binding", "cpu_us", "median", "<=1.11x",
        ratio_at_most(1 / 0.9)),
    Row("5. RSS per allocation (5000 held)", "KB", "memory", "per_alloc_kb", "median",
        "<=8 KB", absolute_at_most(8.0), stub=False),
    Row("   RSS kept after release", "KB", "memory", "retained_kb", "median", "", no_target,
        stub=False),
    Row("   share of growth kept", "", "memory", "retained_share", "median", "<=20%",
        absolute_at_most(0.2), stub=False),
    Row(f"6. RTT p50 @ {RTT_RATE} rt/s", "us", "rtt", "p50_us", "min", "", no_target),
    Row(f"6. RTT p99 @ {RTT_RATE} rt/s", "us", "rtt", "p99_us", "min", "<=1.0x",
        ratio_at_most(1.0)),
    Row("   RTT p99, median run", "us", "rtt", "p99_us", "median", "", no_target),
    Row("   server CPU per packet", "us", "rtt", "cpu_us", "median", "", no_target),
    Row("7. start to Binding answered", "ms", "startup", "startup_ms", "median", "<1000 ms",
        absolute_at_most(1000.0), stub=False),
    Row("8. TCP ChannelData 100 B relayed", "pkt/s", "tcp_channel_100", "pps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tcp_channel_100", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("8. TCP ChannelData 1000 B relayed", "pkt/s", "tcp_channel_1000", "pps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tcp_channel_1000", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("9. TLS 1.3 ChannelData 100 B relayed", "pkt/s", "tls_channel_100", "pps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tls_channel_100", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("9. TLS 1.3 ChannelData 1000 B relayed", "pkt/s", "tls_channel_1000", "pps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tls_channel_1000", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("9. TLS 1.2 ChannelData 100 B relayed", "pkt/s", "tls12_channel_100", "pps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tls12_channel_100", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("10. TCP Send/Data 100 B relayed", "pkt/s", "tcp_send_100", "pps", "max", ">=1.0x",
        ratio_at_least(1.0)),
    Row("   server CPU per packet", "us", "tcp_send_100", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("11. TLS 1.3 connections + Allocates", "/s", "tls_alloc", "allocs_ps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per connection cycle", "us", "tls_alloc", "cpu_us", "median", "<=1.0x",
        ratio_at_most(1.0)),
    Row("11. TLS 1.2 connections + Allocates", "/s", "tls12_alloc", "allocs_ps", "max",
        ">=1.0x", ratio_at_least(1.0)),
    Row("   server CPU per connection cycle", "us", "tls12_alloc", "cpu_us", "median",
        "<=1.0x", ratio_at_most(1.0)),
    Row(f"12. RSS per idle TLS 1.3 conn. ({TLS_HOLD} held)", "KB", "tls_memory",
        "per_conn_kb", "median", "<=1.0x", ratio_at_most(1.0), stub=False),
    Row("   RSS kept after release", "KB", "tls_memory", "retained_kb", "median", "",
        no_target, stub=False),
    Row(f"12. RSS per idle TLS 1.2 conn. ({TLS_HOLD} held)", "KB", "tls12_memory",
        "per_conn_kb", "median", "<=1.0x", ratio_at_most(1.0), stub=False),
    Row("   RSS kept after release", "KB", "tls12_memory", "retained_kb", "median", "",
        no_target, stub=False),
]
# fmt: on


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "":
        return f"{value:.0%}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}"


def table(results: Results) -> tuple[str, list[dict[str, Any]]]:
    headers = ["figure", "unit", "pyturn", "coturn", "ratio", "target", "met", "stub*"]
    body: list[list[str]] = []
    figures: list[dict[str, Any]] = []
    for row in ROWS:
        if row.experiment not in results.runs:
            continue
        p = results.pick(row.experiment, "pyturn", row.key, row.agg)
        c = results.pick(row.experiment, "coturn", row.key, row.agg)
        s = results.pick(row.experiment, "stub", row.key, row.agg) if row.stub else None
        ratio = p / c if p is not None and c else None
        met = row.judge(p, c)
        # A rate from a run that other processes disturbed cannot pass or fail a target.
        disturbed = [
            k
            for k in ("pyturn", "coturn")
            if results.disturbed(row.experiment, k, row.key, row.agg)
        ]
        verdict = {True: "yes", False: "NO", None: ""}[met]
        if disturbed and met is not None:
            verdict = "?"
        body.append(
            [
                row.figure,
                row.unit,
                fmt(p, row.unit),
                fmt(c, row.unit),
                f"{ratio:.2f}x" if ratio is not None else "-",
                row.target,
                verdict,
                fmt(s, row.unit) if row.stub else "",
            ]
        )
        figures.append(
            {
                "figure": row.figure.strip(),
                "unit": row.unit,
                "experiment": row.experiment,
                "metric": row.key,
                "aggregate": row.agg,
                "pyturn": p,
                "coturn": c,
                "ratio": ratio,
                "stub": s,
                "target": row.target,
                "met": met,
                "disturbed": disturbed,
            }
        )
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    lines = []
    for n, r in enumerate([headers, *body]):
        cells = [
            r[i].ljust(widths[i]) if i in (0, 1, 5) else r[i].rjust(widths[i])
            for i in range(len(r))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines), figures


# At most this much more CPU per packet with limits set well above the load (issue 16).
LIMITS_TARGET = 1.10


def limits_lines(results: Results) -> tuple[list[str], list[dict[str, Any]]]:
    """pyturn with bandwidth limits set against pyturn without, in the same run."""
    lines, figures = [], []
    for name, title in (("channel100limits", "100 B"), ("channel1000limits", "1000 B")):
        plain = results.median(name, "pyturn", "cpu_us")
        limited = results.median(name, LIMITED, "cpu_us")
        plain_pps = results.pick(name, "pyturn", "pps", "max")
        limited_pps = results.pick(name, LIMITED, "pps", "max")
        if plain is None or limited is None:
            continue
        ratio = limited / plain
        met = ratio <= LIMITS_TARGET
        lines.append(
            f"  ChannelData {title:<7} CPU per packet {plain:.2f} us unlimited, "
            f"{limited:.2f} us limited = {ratio:.2f}x (target <={LIMITS_TARGET:.2f}x: "
            f"{'yes' if met else 'NO'}); best rates {plain_pps or 0:,.0f} and "
            f"{limited_pps or 0:,.0f} pkt/s"
        )
        figures.append(
            {
                "figure": f"ChannelData {title} CPU per packet, bandwidth limits set",
                "unit": "us",
                "experiment": name,
                "metric": "cpu_us",
                "aggregate": "median",
                "pyturn": plain,
                "pyturn_limited": limited,
                "ratio": ratio,
                "target": f"<={LIMITS_TARGET:.2f}x",
                "met": met,
            }
        )
    return lines, figures


def headroom_lines(results: Results) -> list[str]:
    """Whether the generator could have limited a figure.

    It did not when, driving that server, it still spent time waiting (idle), or when the
    server's core was busy all the time. The stub's rate is the generator's own ceiling.
    """
    out = []
    for name, key in [
        ("channel100", "pps"),
        ("channel1000", "pps"),
        ("send100", "pps"),
        ("send1000", "pps"),
        ("alloc", "allocs_ps"),
        ("binding", "rps"),
        ("tcp_channel_100", "pps"),
        ("tcp_channel_1000", "pps"),
        ("tls_channel_100", "pps"),
        ("tls_channel_1000", "pps"),
        ("tls12_channel_100", "pps"),
        ("tcp_send_100", "pps"),
        ("tls_alloc", "allocs_ps"),
        ("tls12_alloc", "allocs_ps"),
    ]:
        stub = results.pick(name, "stub", key, "max")
        if name not in results.runs:
            continue
        parts = []
        limited = False
        for kind in ("pyturn", "coturn"):
            idle = results.median(name, kind, "gen_idle")
            busy = results.median(name, kind, "server_cpu_util")
            if idle is None or busy is None:
                continue
            parts.append(f"{kind}: generator idle {idle:.0%}, server core busy {busy:.0%}")
            limited |= idle < 0.05 and busy < 0.9
        best = max(
            (v for k in ("pyturn", "coturn") if (v := results.pick(name, k, key, "max"))),
            default=None,
        )
        ceiling = f"stub {stub:,.0f}" if stub is not None else "stub -"
        if stub is not None and best:
            ceiling += f" = {stub / best:.2f}x the faster server"
        verdict = "the generator may limit this figure" if limited else "ok"
        out.append(f"  {name:<17} {ceiling}; {'; '.join(parts)}: {verdict}")
    return out


def noise_line(results: Results) -> str:
    server, gen = [], []
    for by_kind in results.runs.values():
        for kind, runs in by_kind.items():
            if kind == "stub":
                continue
            for m in runs:
                if "foreign_server_core" in m:
                    server.append(m["foreign_server_core"])
                    gen.append(m["foreign_gen_core"])
    if not server:
        return ""
    text = (
        f"Other processes on the machine took {statistics.mean(server):.0%} of the server core "
        f"(max {max(server):.0%}) and {statistics.mean(gen):.0%} of the generator core during "
        "the runs kept"
    )
    if max(statistics.mean(server), statistics.mean(gen)) > 0.1:
        text += "; rates from a busy machine are low and noisy, CPU per operation much less so"
    return text + "."


def report(
    results: Results,
    profile: Profile,
    pinning: str,
    elapsed: float,
    notes: list[str],
    *,
    negotiated: dict[str, str],
) -> list[dict[str, Any]]:
    """Print the table and what qualifies it; return the figures for --json."""
    text, figures = table(results)
    print()
    print(
        f"pyturn vs coturn, {profile.name} profile ({pinning}); {profile.repeats} alternating "
        f"run(s) per server ({profile.rtt_repeats} for RTT), {profile.duration:g} s each after "
        f"{profile.warmup:g} s warm-up; "
        f"{elapsed:.0f} s in all. Rates and RTT: best run; CPU, memory, start-up: median."
    )
    print()
    print(text)
    print()
    print(
        "* stub: the plain C forwarder (loadgen stub) on the server core, driven by the same "
        "generator."
    )
    print("  pkt/s counts both directions (client->peer and peer->client); the generator echoes.")
    print(
        f"? the best run of pyturn or coturn had other processes on a core (>= {NOISY:.0%}): "
        "the rate is not a verdict; the CPU row below it is steadier."
    )
    limits, limit_figures = limits_lines(results)
    if limits:
        print("Bandwidth limits set far above the load (pyturn against itself, same run):")
        print("\n".join(limits))
        figures += limit_figures
    heads = headroom_lines(results)
    if heads:
        print("Generator headroom (idle while driving a server, or the server's core saturated):")
        print("\n".join(heads))
    if negotiated:
        print(
            "TLS negotiated (generator's view): "
            + "; ".join(f"{who}: {what}" for who, what in sorted(negotiated.items()))
        )
    startup = results.median("startup", "pyturn", "self_reported_ms")
    if startup is not None:
        print(f"pyturn's own `ready in` log line: {startup:.0f} ms after its event loop started.")
    if noise_text := noise_line(results):
        print(noise_text)
    for note in notes:
        print(f"note: {note}")
    for failure in results.failures:
        print(f"FAILED: {failure}")
    return figures


def rerender(path: Path) -> int:
    """Print the table again from a --json file (for instance after changing ROWS)."""
    saved = json.loads(path.read_text())
    results = Results(runs=saved["runs"], failures=saved.get("failures", []))
    # Runs saved before RTT had its own number of runs used the common one.
    profile = Profile(**{"rtt_repeats": saved["profile"]["repeats"], **saved["profile"]})
    report(
        results,
        profile,
        saved.get("pinning", "?"),
        saved.get("seconds", 0),
        saved["notes"],
        negotiated=saved.get("negotiated", {}),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (~3 min)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma list of {','.join(e.name for e in EXPERIMENTS)}"
    )
    parser.add_argument("--no-coturn", action="store_true", help="measure pyturn only")
    parser.add_argument(
        "--from-json", type=Path, metavar="FILE", help="print the table of an earlier --json run"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    profile = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - {e.name for e in EXPERIMENTS}):
        parser.error(f"unknown experiment(s): {', '.join(sorted(unknown))}")

    taskset = shutil.which("taskset")
    cores = len(os.sched_getaffinity(0))
    machine = Machine(
        taskset=taskset,
        turnserver=None if args.no_coturn else shutil.which("turnserver"),
        pyturn=ROOT / ".venv" / "bin" / "pyturn",
        relay_range=pick_relay_range(),
        pinned=taskset is not None and cores >= 2,
    )
    if not machine.pyturn.exists():
        found = shutil.which("pyturn")
        if found is None:
            log("pyturn is not installed: run `make serve` or `pip install -e .` first")
            return 2
        machine.pyturn = Path(found)
    try:
        build_loadgen()
    except BenchError as exc:
        log(str(exc))
        return 2
    nofile = raise_fd_limit()
    if machine.pinned:
        # The driver waits on the generator's core, leaving the server's core alone.
        os.sched_setaffinity(0, {LOAD_CORE})
        pinning = f"server pinned to CPU {SERVER_CORE}, load generator to CPU {LOAD_CORE} (taskset)"
    else:
        pinning = "NOT pinned (taskset missing or fewer than 2 CPUs): figures are less stable"
        machine.notes.append(pinning)
    if machine.turnserver is None:
        why = "--no-coturn" if args.no_coturn else "turnserver not found"
        machine.notes.append(f"coturn not measured ({why}): pyturn figures only")
    started = time.monotonic()
    log(
        f"bench: {profile.name} profile, {pinning}; relay ports {machine.relay_range[0]}-"
        f"{machine.relay_range[1]}; open files {nofile}; load average {load_average()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tls_dir:
        if any(e.transport != UDP for e in EXPERIMENTS if not only or e.name in only):
            try:
                machine.tls_pair = make_certificate(Path(tls_dir))
            except BenchError as exc:
                machine.notes.append(str(exc))
        results = run_all(machine, profile, only)
    elapsed = time.monotonic() - started

    figures = report(
        results, profile, pinning, elapsed, machine.notes, negotiated=machine.negotiated
    )
    if args.json:
        payload = {
            "profile": dataclasses.asdict(profile),
            "pinning": pinning,
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_at_start": load_average(),
                "coturn": machine.turnserver,
                "relay_range": machine.relay_range,
                "settings": {
                    "allocs": ALLOCS,
                    "window": WINDOW,
                    "rtt_rate": RTT_RATE,
                    "binding_sockets": BINDING_SOCKETS,
                    "binding_window": BINDING_WINDOW,
                    "alloc_inflight": ALLOC_INFLIGHT,
                    "tls_alloc_inflight": TLS_ALLOC_INFLIGHT,
                    "tls_hold": TLS_HOLD,
                },
            },
            "figures": figures,
            "negotiated": machine.negotiated,
            "runs": results.runs,
            "failures": results.failures,
            "notes": machine.notes,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
