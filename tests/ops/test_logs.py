"""Session log lines: one per event, text or JSON, and floods summed up, not repeated."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from pyturn import logs
from pyturn.logs import (
    FieldValue,
    JsonFormatter,
    LogThrottle,
    LoopBatchingHandler,
    TextFormatter,
    configure_logging,
    format_address,
    log_event,
)
from pyturn.probe import ProbeClient
from pyturn.wire.attributes import RequestedTransport
from pyturn.wire.message import Method
from tests.ops.conftest import StartServer
from tests.ops.helpers import Peer, lines, relay_round_trip, wait_until


def local_address(client: ProbeClient) -> tuple[str, int]:
    host, port = client.link.sock.getsockname()[:2]
    return str(host), int(port)


def test_json_log_lines_parse_and_carry_the_session_fields(start_server: StartServer) -> None:
    server = start_server({"logging": {"format": "json"}})
    peer = Peer()
    alice = server.client()
    local = local_address(alice)
    try:
        relayed, _ = alice.allocate()
        alice.create_permission(peer.address)
        relay_round_trip(alice, peer, b"12345")
        alice.refresh(0)
        wrong = server.client(password="wrong")
        wrong.request(Method.ALLOCATE, [RequestedTransport(17)])
        wrong.close()
        server.wait_for_log('"event": "auth_failed"')
    finally:
        alice.close()
        peer.close()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=5) == 0
    entries = [json.loads(line) for line in lines(server.log_text)]  # every line parses
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    by_event = {entry.get("event"): entry for entry in entries}
    created = by_event["allocation_created"]
    assert created["client"] == format_address(local)
    assert created["user"] == "alice"
    assert created["transport"] == "udp"
    assert created["relayed"] == format_address(relayed)
    deleted = by_event["allocation_deleted"]
    assert deleted["reason"] == "refresh"
    assert (deleted["bytes_to_peer"], deleted["packets_to_peer"]) == (5, 1)
    assert (deleted["bytes_to_client"], deleted["packets_to_client"]) == (5, 1)
    assert 0 <= deleted["duration"] < 60
    failed = by_event["auth_failed"]
    assert failed["reason"] == "bad_password"
    assert failed["client"].startswith("127.0.0.1:")
    assert failed["level"] == "info"
    assert any(e["message"].startswith("ready in ") for e in entries)


def test_text_log_lines_have_one_line_per_session_event(start_server: StartServer) -> None:
    server = start_server()
    alice = server.client()
    local = local_address(alice)
    try:
        alice.allocate()
        alice.refresh(1200)
        alice.refresh(0)
    finally:
        alice.close()
    created = server.wait_for_log(r"INFO pyturn\.net\.worker: allocation created (.*)")[1]
    assert created.startswith(f"client={format_address(local)} transport=udp")
    assert "user=alice relayed=127.0.0.1:" in created
    refreshed = server.wait_for_log(r"allocation refreshed (.*)")[1]
    assert "lifetime=1200 duration=" in refreshed
    deleted = server.wait_for_log(r"allocation deleted (.*)")[1]
    assert "reason=refresh duration=" in deleted
    assert (
        "bytes_to_peer=0 packets_to_peer=0 bytes_to_client=0 packets_to_client=0"
        " dropped_to_peer=0 dropped_to_client=0"
    ) in deleted
    # The first, unauthenticated Allocate is the normal challenge: not logged at INFO.
    assert "reason=no_credentials" not in server.log_text


def test_an_auth_failure_flood_from_one_client_is_not_logged_line_by_line(
    start_server: StartServer,
) -> None:
    server = start_server()
    wrong = server.client(password="wrong")
    try:
        for _ in range(20):
            wrong.request(Method.ALLOCATE, [RequestedTransport(17)])
    finally:
        wrong.close()
    server.wait_for_log("auth failed")
    assert server.log_text.count("auth failed") == 5  # LogThrottle's per-client allowance


def test_a_reload_switches_the_log_format_and_level(start_server: StartServer) -> None:
    server = start_server()
    config = dict(server.config, logging={"format": "json", "level": "debug"})
    server.config_path.write_text(yaml.safe_dump(config))
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log('"event": "config_reloaded"', since=mark)
    alice = server.client()  # its challenge is logged at DEBUG now
    alice.close()
    server.wait_for_log('"reason": "no_credentials"', since=mark)
    after = list(lines(server.log_since(mark)))
    assert [json.loads(line)["level"] for line in after if line.startswith("{")]
    assert all(line.startswith("{") for line in after[1:])


# -- the pieces, without a server -------------------------------------------------------


def test_log_event_writes_key_value_text_and_quotes_what_would_break_it() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("pyturn.test.text")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(
            logger,
            logging.INFO,
            "auth_failed",
            {"client": "[2001:db8::1]:5000", "user": 'evil user="x"', "n": 3, "d": 1.5, "u": None},
        )
        log_event(logger, logging.DEBUG, "hidden", {"x": 1})
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == (
        'auth failed client=[2001:db8::1]:5000 user="evil user=\\"x\\"" n=3 d=1.5 u=-\n'
    )


def test_json_formatter_puts_event_fields_beside_the_message() -> None:
    record = logging.makeLogRecord(
        {
            "name": "pyturn.x",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "%s %s",
            "args": ("allocation created", "client=1.2.3.4:5"),
            "event": "allocation_created",
            "fields": {"client": "1.2.3.4:5", "bytes": 12},
        }
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "allocation created client=1.2.3.4:5"
    assert entry["event"] == "allocation_created"
    assert (entry["client"], entry["bytes"]) == ("1.2.3.4:5", 12)
    assert "fields" not in entry
    assert entry["time"].endswith("Z")


def test_the_throttle_allows_a_few_lines_per_client_and_sums_up_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("pyturn.test.throttle")
    throttle = LogThrottle(logger, window=10.0, per_key=2, total=3)
    with caplog.at_level(logging.INFO, logger="pyturn.test.throttle"):
        allowed = [throttle.allow("10.0.0.1", "auth_failed", now=100.0 + i) for i in range(4)]
        allowed.append(throttle.allow("10.0.0.2", "peer_denied", now=104.0))
        allowed.append(throttle.allow("10.0.0.3", "auth_failed", now=105.0))
        throttle.flush(now=109.9)
        assert caplog.records == []
        throttle.flush(now=110.0)
        # A new window starts fresh.
        allowed.append(throttle.allow("10.0.0.1", "auth_failed", now=111.0))
        throttle.flush(now=200.0)
    assert allowed == [True, True, False, False, True, False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "log flood suppressed=3 auth_failed=3 clients=2 window=10"
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_configure_logging_can_be_called_again_on_reload() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("debug", "json")
        configure_logging("warning", "text")
        assert len(root.handlers) == 1
        assert root.level == logging.WARNING
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_the_text_formatter_writes_what_logging_formatter_writes() -> None:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = TextFormatter()
    for created in (1_800_000_000.0, 1_800_000_000.999, 1_800_000_001.5, 1_800_000_000.25):
        record = logging.makeLogRecord(
            {"name": "pyturn.x", "levelno": 20, "levelname": "INFO", "msg": "a %s", "args": (1,)}
        )
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert ours.format(record) == plain.format(record)


def test_lines_logged_in_a_loop_turn_are_written_together_at_its_end() -> None:
    stream = io.StringIO()
    handler = LoopBatchingHandler(stream)
    logger = logging.getLogger("pyturn.test.batching")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def turn() -> list[str]:
        logger.info("one")
        logger.info("two")
        seen = [stream.getvalue()]
        await asyncio.sleep(0)  # the end of the turn
        seen.append(stream.getvalue())
        return seen

    try:
        assert asyncio.run(turn()) == ["", "one\ntwo\n"]
        logger.info("three")  # no loop running: written at once
        assert stream.getvalue() == "one\ntwo\nthree\n"

        async def last_words() -> None:
            logger.info("four")  # the loop ends before its turn does

        asyncio.run(last_words())
        handler.flush()  # what logging.shutdown does at exit
        assert stream.getvalue().endswith("three\nfour\n")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_session_lines_without_a_record_are_what_the_formatter_writes(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """log_event skips the LogRecord when only pyturn's handler would see it; the line
    must be the one the record would have become."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.987654)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("info", fmt)  # ours becomes the only handler (pytest's go)
        handler = root.handlers[0]
        logger = logging.getLogger("pyturn.tests.direct")
        fields: dict[str, FieldValue] = {
            "client": "[2001:db8::1]:3478",
            "user": 'mallory "x"=y é',
            "lifetime": 600,
            "duration": 12.5,
            "dual": True,
            "peer": None,
        }
        assert logs._only_handler(logger, logging.INFO) is handler
        log_event(logger, logging.INFO, "allocation_created", fields)
        # Another handler anywhere on the way sends the call through a LogRecord.
        other = logging.NullHandler()
        logger.addHandler(other)
        assert logs._only_handler(logger, logging.INFO) is None
        log_event(logger, logging.INFO, "allocation_created", fields)
        logger.removeHandler(other)
        handler.flush()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    direct, via_record = stream.getvalue().splitlines()
    assert direct == via_record
    assert "allocation created" in direct


# -- logging.file and logging.syslog -----------------------------------------------------


def test_a_reload_reopens_the_log_file_after_logrotate_moved_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    """coturn's log-file, as logging.file: `systemctl reload` in logrotate's postrotate."""
    path = tmp_path / "pyturn.log"
    server = start_server({"workers": 2})
    server.wait_for_log(r"ready in \d+ ms: 2 workers", timeout=15)
    # A reload moves the log to the file (the test harness reads stderr until then).
    config = dict(server.config, logging={"file": str(path)})
    server.config_path.write_text(yaml.safe_dump(config))
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    wait_until(lambda: path.exists() and "config reload" in path.read_text(), timeout=10)
    assert "config reload" not in server.log_since(mark)
    rotated = tmp_path / "pyturn.log.1"
    path.rename(rotated)
    server.signal(signal.SIGHUP)
    wait_until(lambda: path.exists() and path.read_text().count("config reload") >= 3, 10)
    server.client().allocate()  # a session line, in the new file
    wait_until(lambda: "allocation created" in path.read_text(), timeout=5)
    assert "allocation created" not in rotated.read_text()
    assert rotated.read_text().count("config reloaded file=") == 2  # one per worker


def test_syslog_gets_every_line_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """coturn's syslog, as logging.syslog: to the local syslog socket, facility daemon."""
    address = str(tmp_path / "log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", address)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        configure_logging("info", "text", syslog=True)
        logging.getLogger("pyturn.test").info("hello %s", "syslog")
        datagram = listener.recv(4096).decode()
        # <priority>: daemon (3) * 8 + info (6) = 30.
        assert datagram.startswith("<30>pyturn[")
        assert datagram.rstrip("\x00").endswith("pyturn.test: hello syslog")
        assert "hello syslog" in stderr.getvalue()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        listener.close()


def test_without_a_syslog_socket_configure_logging_fails_and_keeps_its_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "no-such-socket"))
    root = logging.getLogger()
    before = root.handlers[:]
    with pytest.raises(OSError):
        configure_logging("info", "text", syslog=True)
    assert root.handlers == before
