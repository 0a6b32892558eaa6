"""relay.external_address "auto" on a real server with two workers: learnt at start
from the first STUN server of relay.discover that answers (coturn's turnserver here),
re-learnt every discover_interval seconds, and a start that no server answers fails
saying which it asked."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyturn.probe import ProbeTarget, connect
from pyturn.wire.attributes import XorMappedAddress
from pyturn.wire.errors import DecodeError
from pyturn.wire.message import Message, MessageClass, decode, encode
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerFactory,
    ServerProcess,
    ServerStartError,
)
from tests.interop.test_coturn_migration import Deployment, free_port, running_coturn

pytestmark = pytest.mark.interop


class StunAnswerer:
    """A STUN server standing for the internet's view of the relay: it answers Binding
    requests with the address in `says` (a documentation address: nothing is sent there)."""

    def __init__(self, says: str) -> None:
        self.says = says
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.url = f"stun:{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            try:
                request = decode(data)
            except DecodeError:
                continue
            self.asked += 1
            answer = Message(
                request.method,
                MessageClass.SUCCESS,
                request.transaction_id,
                (XorMappedAddress(self.says, source[1]),),
            )
            self.sock.sendto(encode(answer, fingerprint=True), source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def answerer() -> Iterator[StunAnswerer]:
    stun = StunAnswerer("192.0.2.77")
    yield stun
    stun.close()


def relayed_host(server: ServerProcess) -> str:
    target = ProbeTarget("turn", LOOPBACK, server.udp_port, "udp")
    client = connect(target, server.udp_address, USER, PASSWORD, timeout=3.0)
    try:
        client.challenge()
        return client.allocate()[0][0]
    finally:
        client.close()


def auto(*servers: str, interval: int = 300) -> dict[str, object]:
    return {
        "relay": {
            "external_address": "auto",
            "discover": list(servers),
            "discover_interval": interval,
        },
        "workers": 2,
    }


def test_the_first_server_that_answers_is_believed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    conf = tmp_path / "stun.conf"
    conf.write_text("realm=example.org\nno-auth\nstun-only\n")
    silent = f"stun:{LOOPBACK}:{free_port()}"
    with running_coturn(Deployment("stun-only", conf, []), tmp_path / "coturn") as coturn:
        real = f"stun:{LOOPBACK}:{coturn.port}"
        server = server_factory(auto(silent, real))
    server.wait_for_log(rf"relay.external_address: {LOOPBACK}, as {real} sees this relay")
    assert relayed_host(server) == LOOPBACK


def test_a_new_address_is_used_for_new_allocations(
    server_factory: ServerFactory, answerer: StunAnswerer
) -> None:
    server = server_factory(auto(answerer.url, interval=1))
    assert relayed_host(server) == "192.0.2.77"
    mark = server.log_mark()
    answerer.says = "192.0.2.78"
    server.wait_for_log(
        r"relay.external_address changed from 192\.0\.2\.77 to 192\.0\.2\.78", since=mark
    )
    # Each worker learns it within an interval or two.
    deadline = time.monotonic() + 5
    while server.log_since(mark).count("changed from 192.0.2.77 to 192.0.2.78") < 2:
        assert time.monotonic() < deadline, server.log_since(mark)
        time.sleep(0.1)
    hosts = {relayed_host(server) for _ in range(4)}
    assert hosts == {"192.0.2.78"}


def test_a_start_that_no_server_answers_fails_naming_them(
    server_factory: ServerFactory,
) -> None:
    silent = f"stun:{LOOPBACK}:{free_port()}"
    with pytest.raises(ServerStartError) as failed:
        server_factory(auto(silent, "stun:nonexistent.invalid:3478"))
    text = str(failed.value)
    assert 'relay.external_address is "auto" but no STUN server of relay.discover answered' in text
    assert f"{silent}: no answer within 2.5 s" in text
    assert "stun:nonexistent.invalid:3478: " in text
