"""HTTPS and TURN over TLS on one port: a real nginx `stream` server with `ssl_preread`
routes by ALPN (as Jitsi Meet's does on 443) without ending TLS, and forwards with the
PROXY protocol (v1). Browsers' HTTP ALPNs (h2, http/1.1) go to the web server; anything
else, stun.turn included, goes to pyturn. Python clients and headless Chromium
connect through it."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pyturn.core.auth import mint_rest_credential
from tests.interop.server_process import (
    LOOPBACK,
    REST_SECRET,
    ServerFactory,
    ServerProcess,
    require_tool,
    start_listening,
    stop_process,
)
from tests.interop.test_coturn_migration import free_port
from tests.interop.test_proxy_protocol import mapped_address, proxied
from tests.ops.test_browser import browser  # noqa: F401 (a fixture)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.interop

STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TIMEOUT = 10.0


class Nginx:
    """nginx in the foreground with a config of its own (no system files touched)."""

    def __init__(self, directory: Path, turn_port: int, tls_files: tuple[Path, Path]) -> None:
        self.port = free_port()
        self.web_port = free_port()
        certificate, key = tls_files
        self.directory = directory
        self.config = directory / "nginx.conf"
        self.config.write_text(
            f"""
load_module {STREAM_MODULE};
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 128; }}
stream {{
    map $ssl_preread_alpn_protocols $route {{
        ~\\bh2\\b        web;
        ~\\bhttp/1.1\\b  web;
        default        turn;
    }}
    upstream web  {{ server {LOOPBACK}:{self.web_port}; }}
    upstream turn {{ server {LOOPBACK}:{turn_port}; }}
    server {{
        listen {LOOPBACK}:{self.port};
        ssl_preread on;
        proxy_pass $route;
        proxy_protocol on;
    }}
}}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen {LOOPBACK}:{self.web_port} ssl proxy_protocol;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        location / {{ default_type text/plain; return 200 "web page for $proxy_protocol_addr\\n"; }}
    }}
}}
"""
        )
        self.log = directory / "nginx.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        command = [
            require_tool("nginx"),
            "-c",
            str(self.config),
            "-p",
            str(self.directory),
            "-e",
            "stderr",
            "-g",
            "daemon off; master_process off;",
        ]
        self.process = start_listening(command, (self.port, self.web_port), self.log)
        return self

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def server(server_factory: ServerFactory, tls_files: tuple[Path, Path]) -> ServerProcess:
    return server_factory(
        {
            "listen": [{"transport": "udp", "address": LOOPBACK, "port": 0}, proxied("tls")],
            "tls": {"certificate": str(tls_files[0]), "private_key": str(tls_files[1])},
            "workers": 2,
        }
    )


@pytest.fixture
def nginx(server: ServerProcess, tls_files: tuple[Path, Path], tmp_path: Path) -> Iterator[Nginx]:
    if not STREAM_MODULE.exists() or shutil.which("nginx") is None:
        pytest.skip("nginx with its stream module (scripts/install-system-deps.sh installs it)")
    proxy = Nginx(tmp_path, server.tls_port, tls_files).start()
    yield proxy
    proxy.stop()


def tls_through(nginx: Nginx, alpn: list[str] | None) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection((LOOPBACK, nginx.port), timeout=3.0)
    return context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("alpn", [["stun.turn"], ["stun.nat-discovery"], None])
def test_turn_clients_reach_pyturn_through_the_shared_port(
    nginx: Nginx, alpn: list[str] | None
) -> None:
    with tls_through(nginx, alpn) as tls:
        if alpn is not None:
            assert tls.selected_alpn_protocol() == alpn[0]
        # pyturn sees the client's own address: nginx's PROXY header carries it.
        assert mapped_address(tls) == tls.getsockname()


@pytest.mark.parametrize("alpn", [["h2", "http/1.1"], ["http/1.1"]])
def test_https_clients_reach_the_web_server(nginx: Nginx, alpn: list[str]) -> None:
    with tls_through(nginx, alpn) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"web page for 127.0.0.1" in answer


def test_chromium_loads_the_page_and_relays_over_turns_on_one_port(
    nginx: Nginx,
    server: ServerProcess,
    browser: Browser,  # noqa: F811 (the fixture)
) -> None:
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    try:
        page.goto(f"https://localhost:{nginx.port}/")
        assert "web page for 127.0.0.1" in page.inner_text("body")
        credential = mint_rest_credential(REST_SECRET, int(time.time()) + 600, "nginx-test")
        relays = page.evaluate(
            """async ([url, username, credential]) => {
                const pc = new RTCPeerConnection({
                    iceServers: [{urls: [url], username, credential}],
                    iceTransportPolicy: "relay"});
                const relays = [];
                const done = new Promise((resolve) => {
                    pc.onicecandidate = (e) => {
                        if (!e.candidate) resolve();
                        else if (e.candidate.type === "relay") relays.push(e.candidate.address);
                    };
                    setTimeout(resolve, 10000);
                });
                pc.createDataChannel("x");
                await pc.setLocalDescription(await pc.createOffer());
                await done;
                pc.close();
                return relays;
            }""",
            [
                f"turns:localhost:{nginx.port}?transport=tcp",
                credential["username"],
                credential["credential"],
            ],
        )
    finally:
        context.close()
    assert relays and set(relays) == {LOOPBACK}, json.dumps(relays)
