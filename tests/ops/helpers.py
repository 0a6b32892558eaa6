"""Helpers for the operations tests: a pyturn process with its metrics port, HTTP, scraping.

The server process itself is `tests.interop.server_process.ServerProcess`; here it runs
with metrics on (port 0) and `OpsServer` learns the metrics port from the log.
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pyturn.probe import ProbeClient, ProbeTarget, connect
from pyturn.wire.attributes import Address
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerProcess,
    base_config,
    merge_config,
)

_METRICS_LINE = re.compile(r"metrics on http://(?P<host>[^/\s]+):(?P<port>\d+)/metrics")
HTTP_TIMEOUT = 5.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def ops_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The interop test config with metrics on a free loopback port."""
    config = merge_config(
        base_config(), {"metrics": {"enabled": True, "address": LOOPBACK, "port": 0}}
    )
    return merge_config(config, overrides or {})


class OpsServer(ServerProcess):
    """A pyturn process with its metrics endpoint; the port comes from the log."""

    @property
    def metrics_address(self) -> tuple[str, int]:
        # With workers, the supervisor binds it after the workers are ready.
        match = self.wait_for_log(_METRICS_LINE.pattern, timeout=10)
        return match["host"], int(match["port"])

    def target(self, transport: str = "udp") -> ProbeTarget:
        return ProbeTarget("turn", LOOPBACK, self.ports[transport], transport)

    def client(
        self, transport: str = "udp", user: str = USER, password: str = PASSWORD
    ) -> ProbeClient:
        """A TURN client on its own socket, already past the 401 challenge."""
        target = self.target(transport)
        client = connect(target, (LOOPBACK, target.port), user, password, timeout=3.0)
        client.challenge()
        return client

    def get(self, path: str, authorization: str | None = None) -> tuple[int, str]:
        return http_get(self.metrics_address, path, authorization=authorization)

    def scrape(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)


def http_get(
    address: tuple[str, int], path: str, method: str = "GET", *, authorization: str | None = None
) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=HTTP_TIMEOUT)
    try:
        conn.request(
            method, path, headers={"Authorization": authorization} if authorization else {}
        )
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def basic_authorization(user: str, password: str) -> str:
    """An Authorization header value for HTTP basic authentication (metrics.auth)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing series counts as 0, as Prometheus' increase() does."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(condition: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll `condition()` until it is true or `timeout` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


class Peer:
    """A plain UDP socket on loopback playing the remote peer of an allocation."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(3.0)
        self.address: Address = self.sock.getsockname()

    def recv(self) -> tuple[bytes, Address]:
        data, addr = self.sock.recvfrom(65536)
        return data, (addr[0], addr[1])

    def send(self, data: bytes, to: Address) -> None:
        self.sock.sendto(data, to)

    def close(self) -> None:
        self.sock.close()


def relay_round_trip(client: ProbeClient, peer: Peer, payload: bytes) -> None:
    """client -> peer by Send indication, then peer -> client back as a Data indication."""
    assert client.relayed is not None
    client.send_indication(peer.address, payload)
    data, source = peer.recv()
    assert (data, source) == (payload, client.relayed)
    peer.send(payload[::-1], client.relayed)
    got = client.receive(3.0)
    assert got == (peer.address, payload[::-1])


def lines(text: str) -> Iterator[str]:
    return (line for line in text.splitlines() if line.strip())
