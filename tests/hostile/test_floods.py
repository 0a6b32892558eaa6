"""Bounded floods on loopback: the server keeps serving honest clients and its memory.

Each flood is at most `FLOOD_PACKETS` datagrams in at most `FLOOD_SECONDS`, sent from
127.0.0.1 on a thread, while an honest client (from 127.0.0.2, a source address of its
own for the per-IP budgets) allocates, relays both ways through a loopback echo peer
and deletes its allocation. The server's VmRSS is read before the flood and after it;
both, the reply counts and the honest client's time are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from pyturn.wire.attributes import (
    MAGIC_COOKIE,
    Nonce,
    Realm,
    RequestedTransport,
    Software,
    Username,
)
from pyturn.wire.channel_data import channel_header
from pyturn.wire.message import Message, MessageClass, Method, encode
from tests.hostile.client import (
    HONEST_IP,
    LOOPBACK,
    EchoPeer,
    FloodResult,
    TurnClient,
    code_of,
    flood_udp,
    honest_session,
    open_fds,
    pid_of,
    relay_round_trip,
    rss_kib,
    run,
)
from tests.interop.server_process import ServerFactory, ServerProcess

FLOOD_PACKETS = 20_000
FLOOD_SECONDS = 2.0
# VmRSS moves by ~150 KiB of allocator noise here; 200 bytes kept per datagram would
# add 4 MB over a flood.
RSS_TOLERANCE_KIB = 4 * 1024
BURST, RATE = 32, 8.0


def _txid(i: int) -> bytes:
    return i.to_bytes(12, "big")


def binding(i: int) -> bytes:
    return encode(Message(Method.BINDING, MessageClass.REQUEST, _txid(i)))


def bare_allocate(i: int) -> bytes:
    return encode(Message(Method.ALLOCATE, MessageClass.REQUEST, _txid(i)))


def made_up_nonce(i: int) -> bytes:
    attrs = (Username("alice"), Realm("example.org"), Nonce("made-up"), RequestedTransport(17))
    return encode(
        Message(Method.ALLOCATE, MessageClass.REQUEST, _txid(i), attrs), integrity_key=b"k" * 16
    )


_GARBAGE = [os.urandom(n) for n in (1, 3, 19, 20, 48, 200, 1200)]


def _lying_length(i: int) -> bytes:
    """A Binding header whose length field claims 8 bytes that are not there: 400."""
    return struct.pack("!HHI", Method.BINDING, 8, MAGIC_COOKIE) + _txid(i)


def _fingerprint_mismatch(i: int) -> bytes:
    good = encode(
        Message(Method.BINDING, MessageClass.REQUEST, _txid(i), (Software("x"),)),
        fingerprint=True,
    )
    return good[:-1] + bytes((good[-1] ^ 1,))


_INVALID_KINDS: list[Callable[[int], bytes]] = [
    lambda i: _GARBAGE[i % len(_GARBAGE)],
    _lying_length,
    _fingerprint_mismatch,
    # ChannelData for a channel nobody bound: dropped.
    lambda i: channel_header(0x4000 + i % 0x1000, 8) + b"12345678",
    # Responses and indications nobody asked for: dropped.
    lambda i: encode(Message(Method.BINDING, MessageClass.SUCCESS, _txid(i))),
    lambda i: encode(Message(Method.SEND, MessageClass.INDICATION, _txid(i))),
]


def invalid(i: int) -> bytes:
    return _INVALID_KINDS[i % len(_INVALID_KINDS)](i)


async def flood_while_honest(
    server: ServerProcess,
    echo: EchoPeer,
    packet: Callable[[int], bytes],
    *,
    sockets: int = 4,
    honest: Callable[[], Awaitable[float]] | None = None,
) -> tuple[FloodResult, float]:
    """Run the flood on a thread and an honest session meanwhile; return both results."""
    flood = asyncio.create_task(
        asyncio.to_thread(
            flood_udp,
            server.udp_address,
            packet,
            count=FLOOD_PACKETS,
            seconds=FLOOD_SECONDS + 1.0,
            pace=FLOOD_SECONDS,
            sockets=sockets,
        )
    )
    await asyncio.sleep(0.3)  # well inside the flood
    session = honest or (lambda: honest_session(server.udp_address, echo))
    honest_seconds = await session()
    assert not flood.done() or flood.result().seconds >= FLOOD_SECONDS * 0.9
    return await flood, honest_seconds


def record(
    figures: dict[str, object],
    result: FloodResult,
    honest_seconds: float,
    rss: tuple[int, int],
) -> None:
    figures["sent"] = f"{result.sent} datagrams in {result.seconds:.2f} s ({result.rate:.0f}/s)"
    figures["replies"] = (
        f"{result.replies} ({result.reply_bytes} bytes), by code {dict(result.codes)}"
    )
    figures["honest client (allocate, relay both ways, delete)"] = f"{honest_seconds:.3f} s"
    figures["server VmRSS before -> after"] = f"{rss[0]} -> {rss[1]} KiB ({rss[1] - rss[0]:+d})"


@pytest.fixture
def flood_server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(
        {"limits": {"unauthenticated_burst": BURST, "unauthenticated_rate": RATE}}
    )


def test_an_invalid_packet_flood_is_dropped_and_honest_clients_get_through(
    flood_server: ServerProcess, echo_peer: EchoPeer, figures: dict[str, object]
) -> None:
    pid = pid_of(flood_server)
    before = rss_kib(pid)
    result, honest = run(flood_while_honest(flood_server, echo_peer, invalid))
    after = rss_kib(pid)
    record(figures, result, honest, (before, after))
    assert result.sent >= FLOOD_PACKETS * 0.9
    # Only the STUN-looking requests with a lying length may be answered (400).
    assert set(result.codes) <= {400}
    assert result.codes[400] <= result.sent // len(_INVALID_KINDS) + 1
    assert after - before < RSS_TOLERANCE_KIB


def test_a_binding_flood_is_answered_without_starving_honest_clients(
    flood_server: ServerProcess, echo_peer: EchoPeer, figures: dict[str, object]
) -> None:
    pid = pid_of(flood_server)
    before = rss_kib(pid)
    result, honest = run(flood_while_honest(flood_server, echo_peer, binding))
    after = rss_kib(pid)
    record(figures, result, honest, (before, after))
    assert set(result.codes) <= {0}
    assert result.reply_bytes == 32 * result.replies  # XOR-MAPPED-ADDRESS only
    assert after - before < RSS_TOLERANCE_KIB


@pytest.mark.parametrize("kind", [401, 438])
def test_unsigned_answers_are_budgeted_per_source_ip_during_a_flood(
    flood_server: ServerProcess, echo_peer: EchoPeer, figures: dict[str, object], kind: int
) -> None:
    """limits.unauthenticated_burst, then unauthenticated_rate per second, per source IP:
    a spoofed flood reflects a bounded trickle. A client on the flooded IP that already
    holds a nonce still allocates (signed requests are not budgeted), and a client on
    another IP has a budget of its own."""
    pid = pid_of(flood_server)
    packet = bare_allocate if kind == 401 else made_up_nonce

    async def scenario() -> tuple[FloodResult, float, float]:
        same_ip = await TurnClient.open(flood_server.udp_address, local_ip=LOOPBACK)
        first_401 = time.perf_counter()
        challenge = await same_ip.transact(
            same_ip.codec.encode_request(Method.ALLOCATE, auth=False)
        )
        assert code_of(challenge) == 401 and challenge is not None
        nonce = challenge.get(Nonce)
        assert nonce is not None
        same_ip.codec.nonce = nonce.value

        async def honest() -> float:
            started = time.perf_counter()
            # A client on the flooded IP without a nonce: its challenge is budgeted too.
            newcomer = await TurnClient.open(flood_server.udp_address, local_ip=LOOPBACK)
            request = newcomer.codec.encode_request(Method.ALLOCATE, auth=False)
            answer = await newcomer.transact(request, tries=3)
            newcomer.close()
            figures["newcomer on the flooded IP (no nonce yet), 3 tries in 1.75 s"] = (
                "got its 401"
                if code_of(answer) == kind or code_of(answer) == 401
                else "no answer (locked out while the flood lasts)"
            )
            try:
                assert code_of(await same_ip.allocate()) == 0
                await relay_round_trip(same_ip, echo_peer)
                assert code_of(await same_ip.refresh(0)) == 0
            finally:
                same_ip.close()
            await honest_session(flood_server.udp_address, echo_peer, local_ip=HONEST_IP)
            return time.perf_counter() - started

        result, seconds = await flood_while_honest(flood_server, echo_peer, packet, honest=honest)
        return result, seconds, time.perf_counter() - first_401

    before = rss_kib(pid)
    result, honest, window = run(scenario())
    after = rss_kib(pid)
    record(figures, result, honest, (before, after))
    answered = result.codes[kind]
    allowed = BURST - 1 + RATE * window  # the honest client spent one token
    figures["budget"] = (
        f"{answered} answered of {result.sent} (burst {BURST} + {RATE:g}/s over "
        f"{window:.2f} s allows {allowed:.1f})"
    )
    assert set(result.codes) <= {kind}
    assert BURST - 1 <= answered <= allowed + 1
    assert after - before < RSS_TOLERANCE_KIB


def settle(measure: Callable[[], int], expected: int, within: float = 1.5) -> int:
    """Poll `measure` until it gives `expected` or `within` seconds pass; its last value."""
    deadline = time.monotonic() + within
    value = measure()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = measure()
    return value


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed (or reset) the connection; does not wait."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_tcp_connection_flood_is_capped_per_source_and_idle_connections_are_closed(
    server_factory: ServerFactory, echo_peer: EchoPeer, figures: dict[str, object]
) -> None:
    """limits.connections_per_source and limits.first_message_timeout (slowloris)."""
    cap, timeout, attempts = 16, 2.0, 40
    server = server_factory(
        {"limits": {"connections_per_source": cap, "first_message_timeout": timeout}}
    )
    pid = pid_of(server)
    fds_before = open_fds(pid)
    socks = []
    try:
        for _ in range(attempts):
            sock = socket.create_connection(server.tcp_address, timeout=2.0)
            sock.settimeout(None)  # blocking, so MSG_DONTWAIT answers at once
            socks.append(sock)
        refused = settle(lambda: sum(_closed(sock) for sock in socks), attempts - cap)
        fds_during = open_fds(pid)
        run(honest_session(server.tcp_address, echo_peer, transport="tcp"))
        still_open = settle(lambda: sum(not _closed(sock) for sock in socks), 0, timeout + 3)
    finally:
        for sock in socks:
            sock.close()
    fds_after = settle(lambda: open_fds(pid), fds_before)
    figures["connections"] = f"{attempts} opened, {refused} refused at once, cap {cap}"
    figures["server fds before / during / after"] = f"{fds_before} / {fds_during} / {fds_after}"
    figures["open after the first-message timeout"] = still_open
    assert refused == attempts - cap
    assert fds_during <= fds_before + cap + 2
    assert still_open == 0
    assert fds_after == fds_before


def test_a_tcp_client_that_never_reads_costs_a_bounded_write_buffer(
    flood_server: ServerProcess, echo_peer: EchoPeer, figures: dict[str, object]
) -> None:
    """50,000 pipelined Binding requests and no reads: pyturn keeps at most its write
    buffer cap (1 MiB) of replies for the connection and drops the rest."""
    pid = pid_of(flood_server)
    before = rss_kib(pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(flood_server.tcp_address)
    try:
        blob = b"".join(binding(i) for i in range(50_000))
        sock.settimeout(10.0)
        sock.sendall(blob)
        time.sleep(1.0)
        during = rss_kib(pid)
        run(honest_session(flood_server.udp_address, echo_peer))
        run(honest_session(flood_server.tcp_address, echo_peer, transport="tcp"))
    finally:
        sock.close()
    time.sleep(0.3)
    after = rss_kib(pid)
    figures["requests"] = f"50000 Binding requests ({len(blob)} bytes), replies never read"
    figures["server VmRSS before / while connected / after close"] = (
        f"{before} / {during} / {after} KiB"
    )
    assert during - before < 4 * 1024 + 1024  # the 1 MiB cap, plus allocator slack
    assert after - before < RSS_TOLERANCE_KIB


def test_a_tcp_client_gets_its_401_when_its_ip_has_spent_the_udp_budget(
    flood_server: ServerProcess,
) -> None:
    async def scenario() -> int | None:
        flood = asyncio.create_task(
            asyncio.to_thread(
                flood_udp,
                flood_server.udp_address,
                bare_allocate,
                count=10_000,
                seconds=2.0,
                pace=1.5,
                source_ip=LOOPBACK,
            )
        )
        await asyncio.sleep(0.5)  # the burst is spent by now
        client = await TurnClient.open(flood_server.tcp_address, transport="tcp")
        try:
            request = client.codec.encode_request(Method.ALLOCATE, auth=False)
            return code_of(await asyncio.wait_for(client.transact(request), 1.0))
        except TimeoutError:
            return None
        finally:
            client.close()
            assert (await flood).codes[401] >= BURST

    assert run(scenario()) == 401
