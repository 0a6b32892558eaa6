"""pyturn.net.batch: the native recvmmsg/sendmmsg module and its pure-Python fallback
must behave the same on real loopback sockets."""

from __future__ import annotations

import os
import select
import shutil
import socket
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyturn.net import batch, fastpath


@dataclass(frozen=True)
class Impl:
    recv_batch: batch.RecvBatch
    send_batch: batch.SendBatch
    send_many_to: batch.SendManyTo


def _implementations() -> list[object]:
    fallback = Impl(batch._recv_batch, batch._send_batch, batch._send_many_to)
    params: list[object] = [pytest.param(fallback, id="python")]
    try:
        from pyturn.net import _batch
    except ImportError:
        params.append(pytest.param(None, id="native", marks=pytest.mark.skip("not built")))
    else:
        native = Impl(_batch.recv_batch, _batch.send_batch, _batch.send_many_to)
        params.append(pytest.param(native, id="native"))
    return params


@pytest.fixture(params=_implementations())
def impl(request: pytest.FixtureRequest) -> Impl:
    value = request.param
    assert isinstance(value, Impl)
    return value


def _udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = _udp(), _udp()
    yield a, b
    a.close()
    b.close()


def _drain(sock: socket.socket, count: int) -> list[tuple[bytes, tuple[str, int]]]:
    sock.settimeout(2.0)
    got = []
    for _ in range(count):
        data, addr = sock.recvfrom(70000)
        got.append((data, (addr[0], addr[1])))
    sock.setblocking(False)
    return got


def test_an_empty_queue_gives_an_empty_list(
    impl: Impl, pair: tuple[socket.socket, socket.socket]
) -> None:
    assert impl.recv_batch(pair[0], 64) == []


def test_queued_datagrams_come_in_order_with_their_source_and_the_limit_holds(
    impl: Impl, pair: tuple[socket.socket, socket.socket]
) -> None:
    receiver, sender = pair
    source = sender.getsockname()[:2]
    # 51 datagrams, more than one recvmmsg of 32, the last one the largest UDP payload.
    sizes = [0, 1, 100, 1500, 7] * 10 + [65507]
    for i, size in enumerate(sizes):
        sender.sendto(bytes([i]) * size, receiver.getsockname())
    got = impl.recv_batch(receiver, 40)
    got += impl.recv_batch(receiver, 40)
    assert [data for data, _ in got] == [bytes([i]) * n for i, n in enumerate(sizes)]
    assert {addr for _, addr in got} == {source}
    assert all(type(addr) is tuple and len(addr) == 2 for _, addr in got)
    assert impl.recv_batch(receiver, 50) == []


def test_the_limit_leaves_the_rest_queued(
    impl: Impl, pair: tuple[socket.socket, socket.socket]
) -> None:
    receiver, sender = pair
    for i in range(10):
        sender.sendto(b"%d" % i, receiver.getsockname())
    first = impl.recv_batch(receiver, 3)
    rest = impl.recv_batch(receiver, 64)
    assert [d for d, _ in first] == [b"0", b"1", b"2"]
    assert [d for d, _ in rest] == [b"%d" % i for i in range(3, 10)]


def test_send_batch_reaches_each_address(impl: Impl) -> None:
    sender = _udp()
    receivers = [_udp() for _ in range(3)]
    try:
        items = [
            (b"m%d" % i, receivers[i % 3].getsockname()[:2]) for i in range(100)
        ]  # more than one sendmmsg of 32
        assert impl.send_batch(sender, items) == 100
        for r, receiver in enumerate(receivers):
            got = _drain(receiver, len(range(r, 100, 3)))
            assert [d for d, _ in got] == [b"m%d" % i for i in range(r, 100, 3)]
            assert {a for _, a in got} == {sender.getsockname()[:2]}
    finally:
        for sock in (sender, *receivers):
            sock.close()


def test_send_many_to_sends_every_frame_to_one_address_in_order(
    impl: Impl, pair: tuple[socket.socket, socket.socket]
) -> None:
    receiver, sender = pair
    frames = [b"f%03d" % i * (i + 1) for i in range(40)]
    assert impl.send_many_to(sender, receiver.getsockname()[:2], frames) == 40
    assert [d for d, _ in _drain(receiver, 40)] == frames


def test_ipv6_addresses_are_host_and_port_only(impl: Impl) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        receiver, sender = _udp("::1"), _udp("::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    try:
        impl.send_batch(sender, [(b"six", ("::1", receiver.getsockname()[1]))])
        select.select([receiver], [], [], 2.0)
        got = impl.recv_batch(receiver, 8)
        assert got == [(b"six", ("::1", sender.getsockname()[1]))]
    finally:
        receiver.close()
        sender.close()


def test_a_closed_socket_raises(impl: Impl) -> None:
    sock = _udp()
    sock.close()
    with pytest.raises((OSError, ValueError)):
        impl.recv_batch(sock, 8)


def test_the_native_module_is_built_where_a_compiler_is() -> None:
    """The install builds it (hatch_build.py); if this fails, the fast path is not in use."""
    if os.environ.get("PYTURN_NO_NATIVE"):
        pytest.skip("PYTURN_NO_NATIVE is set")
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("no Python headers for this interpreter")
    assert batch.NATIVE, "pyturn/net/_batch.c was not compiled: reinstall (make test)"
    assert "recvmmsg" in batch.describe()


def test_runs_of_equal_frames_arrive_as_separate_datagrams_in_order(
    impl: Impl, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The native module sends such runs with UDP GSO; the receiver must not notice."""
    receiver, sender = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    frames = (
        [b"a%03d" % i + bytes(96) for i in range(70)]  # 100 bytes each: 64 + 6 segments
        + [b"short"]  # the shorter last segment of a run
        + [b"b%03d" % i + bytes(8996) for i in range(9)]  # 9000 bytes: 65000-byte runs
        + [b"", b"c" * 100, b"d" * 100]  # an empty datagram breaks nothing
    )
    assert impl.send_many_to(sender, receiver.getsockname()[:2], frames) == len(frames)
    assert [d for d, _ in _drain(receiver, len(frames))] == frames
    if impl.send_many_to is not batch._send_many_to:
        from pyturn.net import _batch

        assert _batch.gso(), "the kernel refused UDP_SEGMENT on loopback"


def test_forgetting_addresses_keeps_recv_batch_working(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    receiver, sender = pair
    sender.sendto(b"before", receiver.getsockname())
    select.select([receiver], [], [], 2.0)
    first = batch.recv_batch(receiver, 8)
    batch.forget_addresses()
    sender.sendto(b"after", receiver.getsockname())
    select.select([receiver], [], [], 2.0)
    second = batch.recv_batch(receiver, 8)
    assert first == [(b"before", sender.getsockname()[:2])]
    assert second == [(b"after", sender.getsockname()[:2])]


def _listener_readies() -> list[object]:
    params: list[object] = [pytest.param("python", id="python")]
    try:
        from pyturn.net import _batch  # noqa: F401
    except ImportError:
        params.append(pytest.param("native", id="native", marks=pytest.mark.skip("not built")))
    else:
        params.append(pytest.param("native", id="native"))
    return params


@pytest.mark.parametrize("which", _listener_readies())
def test_listener_ready_hands_over_what_it_does_not_relay_and_reports_read_errors(
    monkeypatch: pytest.MonkeyPatch, which: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    ready: Callable[..., None]
    if which == "python":
        monkeypatch.setattr(fastpath, "forward_channel_data", fastpath._forward_channel_data)
        ready = fastpath._listener_ready
    else:
        from pyturn.net import _batch

        ready = _batch.listener_ready
    receiver, sender = pair
    handed: list[tuple[int, list[tuple[bytes, tuple[str, int]]]]] = []
    failures: list[OSError] = []
    local = receiver.getsockname()[:2]

    def handle(received: int, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        handed.append((received, datagrams))

    ready(receiver, 64, {}, local, handle, failures.append)
    assert (handed, failures) == ([], [])  # nothing queued: nothing to hand over
    # ChannelData of no route (an empty table) is Python's to drop; STUN is Python's to
    # answer.
    sender.sendto(b"\x40\x00\x00\x01x", local)
    sender.sendto(b"\x00\x01\x00\x00stun", local)
    select.select([receiver], [], [], 2.0)
    time_left = 200
    while len(handed) == 0 and time_left:
        ready(receiver, 64, {}, local, handle, failures.append)
        time_left -= 1
    client = sender.getsockname()[:2]
    assert handed == [(2, [(b"\x40\x00\x00\x01x", client), (b"\x00\x01\x00\x00stun", client)])]
    # A socket that cannot be read (a TCP socket never connected): failed(exc), no raise.
    stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stream.setblocking(False)
    try:
        ready(stream, 64, {}, local, handle, failures.append)
    finally:
        stream.close()
    assert len(failures) == 1 and isinstance(failures[0], OSError)
