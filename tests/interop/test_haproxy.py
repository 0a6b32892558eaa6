"""A real HAProxy (Debian's package) in front of pyturn, forwarding with the PROXY
protocol: TCP with v2 and v1, and TLS passed through with v2. Clients connect from
127.0.0.2 and 127.0.0.3; pyturn sees those addresses, not HAProxy's 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.server_process import (
    LOOPBACK,
    ServerFactory,
    ServerProcess,
    require_tool,
    start_listening,
    stop_process,
)
from tests.interop.test_coturn_migration import free_port
from tests.interop.test_proxy_protocol import closed_by_server, mapped_address, proxied
from tests.interop.test_turnutils import (  # echo_peer: a fixture
    assert_all_echoed,
    echo_peer,  # noqa: F401
    uclient_at,
)

pytestmark = pytest.mark.interop

CLIENT_A, CLIENT_B = "127.0.0.2", "127.0.0.3"
START_TIMEOUT = 10.0


class HAProxy:
    """`haproxy -f FILE -db` in the foreground, with frontends named by `routes`:
    frontend name -> (pyturn port, send-proxy option)."""

    def __init__(self, directory: Path, routes: dict[str, tuple[int, str]]) -> None:
        self.ports = {name: free_port() for name in routes}
        lines = [
            "global",
            "    maxconn 512",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
        ]
        for name, (target, option) in routes.items():
            lines += [
                f"frontend {name}",
                f"    bind {LOOPBACK}:{self.ports[name]}",
                f"    default_backend {name}_pyturn",
                f"backend {name}_pyturn",
                f"    server pyturn {LOOPBACK}:{target} {option}",
            ]
        self.config = directory / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        command = [require_tool("haproxy"), "-f", str(self.config), "-db"]
        self.process = start_listening(command, self.ports.values(), self.log)
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def address(self, name: str) -> tuple[str, int]:
        return (LOOPBACK, self.ports[name])


@pytest.fixture
def server(server_factory: ServerFactory, tls_files: tuple[Path, Path]) -> ServerProcess:
    return server_factory(
        {
            "listen": [
                {"transport": "udp", "address": LOOPBACK, "port": 0},
                proxied("tcp"),
                proxied("tls"),
            ],
            "tls": {"certificate": str(tls_files[0]), "private_key": str(tls_files[1])},
            # One worker: connections_per_source counts per worker process.
            "workers": 1,
            "limits": {"connections_per_source": 2},
        }
    )


@pytest.fixture
def haproxy(server: ServerProcess, tmp_path: Path) -> Iterator[HAProxy]:
    routes = {
        "tcp_v2": (server.tcp_port, "send-proxy-v2"),
        "tcp_v1": (server.tcp_port, "send-proxy"),
        "tls_v2": (server.tls_port, "send-proxy-v2"),
    }
    proxy = HAProxy(tmp_path, routes).start()
    yield proxy
    proxy.stop()


def through(
    haproxy: HAProxy, frontend: str, source: str, sockets: list[socket.socket]
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.bind((source, 0))
    sock.settimeout(3.0)
    sock.connect(haproxy.address(frontend))
    return sock


@pytest.mark.parametrize("frontend", ["tcp_v2", "tcp_v1"])
def test_the_server_sees_the_clients_own_address_and_port(
    haproxy: HAProxy, sockets: list[socket.socket], frontend: str
) -> None:
    for source in (CLIENT_A, CLIENT_B):
        sock = through(haproxy, frontend, source, sockets)
        assert mapped_address(sock) == sock.getsockname()


def test_tls_passed_through_with_the_header(haproxy: HAProxy, sockets: list[socket.socket]) -> None:
    raw = through(haproxy, "tls_v2", CLIENT_A, sockets)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(raw, server_hostname="localhost")
    sockets.append(tls)
    assert mapped_address(tls) == tls.getsockname()


def test_two_clients_behind_the_proxy_have_budgets_of_their_own(
    haproxy: HAProxy, sockets: list[socket.socket]
) -> None:
    """connections_per_source: 2. Without the header all of them would be HAProxy's."""
    three = [through(haproxy, "tcp_v2", CLIENT_A, sockets) for _ in range(3)]
    # HAProxy connects them in its own order: whichever came third is the one refused.
    refused = [sock for sock in three if closed_by_server(sock, within=1.0)]
    assert len(refused) == 1
    for sock in three:
        if sock not in refused:
            assert mapped_address(sock) == sock.getsockname()
    other = through(haproxy, "tcp_v2", CLIENT_B, sockets)
    assert mapped_address(other) == other.getsockname()


def test_uclient_relays_through_haproxy_into_pyturn(
    server_factory: ServerFactory,
    tmp_path: Path,
    echo_peer: int,  # noqa: F811 (the fixture)
) -> None:
    server = server_factory({"listen": [proxied("tcp")], "workers": 2})
    haproxy = HAProxy(tmp_path, {"tcp_v2": (server.tcp_port, "send-proxy-v2")}).start()
    try:
        mark = server.log_mark()
        run = uclient_at(haproxy.ports["tcp_v2"], echo_peer, "-t")
        assert_all_echoed(server, mark, run, "alice")
    finally:
        haproxy.stop()
