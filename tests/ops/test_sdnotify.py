"""sd_notify: READY, RELOADING, STOPPING and WATCHDOG reach a socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyturn.net.sdnotify import SystemdNotifier, socket_address, watchdog_interval
from tests.ops.conftest import StartServer


class NotifySocket:
    """The systemd side: an AF_UNIX datagram socket collecting what pyturn sends."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 5.0) -> dict[str, str]:
        """The first message (in order, consumed) that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.messages):
                if key in message and (value is None or message[key] == value):
                    del self.messages[: i + 1]
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout} s: {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to about 100 bytes: keep it short.
    directory = Path(tempfile.mkdtemp(prefix="pyturn-sd-", dir="/tmp"))
    path = directory / "notify"
    receiver = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield receiver
    receiver.close()
    path.unlink()
    directory.rmdir()


def test_ready_reloading_and_stopping_reach_systemd(
    start_server: StartServer, notify_socket: NotifySocket
) -> None:
    server = start_server({"shutdown_timeout": 5})
    ready = notify_socket.wait_for("READY", "1")
    assert "serving on udp 127.0.0.1:" in ready["STATUS"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    server.signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", "1")
    assert before <= int(reloading["MONOTONIC_USEC"])
    assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify_socket.wait_for("READY", "1")["STATUS"].startswith("config reloaded")

    server.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING", "1")
    assert server.wait_exit(timeout=5) == 0


def test_a_refused_reload_still_returns_to_ready(
    start_server: StartServer, notify_socket: NotifySocket
) -> None:
    server = start_server()
    notify_socket.wait_for("READY", "1")
    server.config_path.write_text("workers: -1\n")
    server.signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING", "1")
    assert "refused" in notify_socket.wait_for("READY", "1")["STATUS"]


def test_watchdog_pings_come_at_half_the_interval(
    start_server: StartServer, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    start_server()
    notify_socket.wait_for("READY", "1")
    started = time.monotonic()
    for _ in range(3):
        notify_socket.wait_for("WATCHDOG", "1", timeout=1.0)
    assert time.monotonic() - started < 1.0


def test_abstract_socket_names_work(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"pyturn-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        start_server()
        receiver.wait_for("READY", "1")
    finally:
        receiver.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval is None


def test_a_missing_socket_is_reported_once_and_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract", "\0abstract"),
        ("", None),
        (None, None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_socket_addresses(value: str | None, expected: str | None) -> None:
    assert socket_address(value) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=42) == expected
