"""TURN over TLS (RFC 8656 §3.1, `turns:` of RFC 7065) against the real server.

Clients: aioice's TURN client with an SSLContext that trusts only the test certificate,
coturn's turnutils_uclient with -t -S relaying to turnutils_peer, plain `ssl` sockets
pinned to one TLS version, and aiortc given a `turns:127.0.0.1:PORT?transport=tcp` ICE
server. The certificate is self-signed, made for the session, and names localhost,
127.0.0.1 and ::1, so every client here verifies it (chain and name) like a browser.

Everything is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from aioice.turn import create_turn_endpoint

from pyturn.wire.attributes import XorMappedAddress
from pyturn.wire.channel_data import StreamFramer
from pyturn.wire.message import Message, MessageClass, Method, decode, encode, new_transaction_id
from tests.interop.server_process import (
    LOOPBACK,
    PASSWORD,
    USER,
    ServerProcess,
    ServerStartError,
    base_config,
    merge_config,
    require_tool,
    tls_config,
)
from tests.interop.test_aioice_turn import Collector, start_echo_peer
from tests.interop.test_aiortc import data_channel_through_relays
from tests.interop.test_turnutils import UclientRun, assert_all_echoed, turnutils_peer
from tests.net.certs import make_certificate

pytestmark = pytest.mark.interop

T = TypeVar("T")

SCENARIO_TIMEOUT = 30.0
STEP_TIMEOUT = 10.0
TOOL_TIMEOUT = 30.0
MESSAGES = 50
CLIENTS = 2


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, SCENARIO_TIMEOUT)

    return asyncio.run(bounded())


def trusting(certificate: Path) -> ssl.SSLContext:
    """A client context that trusts only the test certificate, and checks the name."""
    context = ssl.create_default_context(cafile=str(certificate))
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    return context


# -- aioice ------------------------------------------------------------------------------


def test_aioice_allocates_over_tls_and_relays_to_a_udp_peer(
    tls_server: ServerProcess, tls_files: tuple[Path, Path]
) -> None:
    """RFC 8656 §3.1 with TLS: aioice's `create_turn_endpoint(transport="tcp", ssl=...)`
    verifies the server's certificate, allocates, binds a channel and gets 20 datagrams
    echoed by a UDP peer, in order; the server logs the allocation with transport tls."""
    mark = tls_server.log_mark()
    count = 20

    async def scenario() -> tuple[str, int]:
        peer_transport, peer, peer_addr = await start_echo_peer()
        turn, collector = await create_turn_endpoint(
            Collector,
            server_addr=tls_server.tls_address,
            username=USER,
            password=PASSWORD,
            lifetime=600,
            ssl=trusting(tls_files[0]),
            transport="tcp",
        )
        try:
            relayed: tuple[str, int] = turn.get_extra_info("sockname")
            for i in range(count):
                turn.sendto(b"over tls %d" % i, peer_addr)
            for i in range(count):
                data, source = await asyncio.wait_for(collector.queue.get(), STEP_TIMEOUT)
                assert (data, source) == (b"over tls %d" % i, peer_addr)
            assert {source for _, source in peer.received} == {relayed}
        finally:
            turn.close()
            peer_transport.close()
            await asyncio.wait_for(collector.closed.wait(), STEP_TIMEOUT)
        return relayed

    relayed = run(scenario())
    created = tls_server.wait_for_event(
        "allocation created", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert (created["user"], created["transport"]) == (USER, "tls")
    deleted = tls_server.wait_for_event(
        "allocation deleted", since=mark, relayed=f"{LOOPBACK}:{relayed[1]}"
    )
    assert (int(deleted["packets_to_peer"]), int(deleted["packets_to_client"])) == (count, count)


# -- coturn's client ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def udp_echo_peer() -> Iterator[int]:
    """turnutils_peer (coturn's UDP echo server) on 127.0.0.1; yields its port."""
    with turnutils_peer() as port:
        yield port


def test_uclient_over_tls_relays_every_message_to_the_peer_and_back(
    tls_server: ServerProcess, udp_echo_peer: int
) -> None:
    """RFC 8656 §3.1 over TLS with coturn's client (-t -S): 50 messages from each of 2
    clients through channels to turnutils_peer and back, none lost; the server's
    deletion lines count all 100 each way."""
    tool = require_tool("turnutils_uclient")
    mark = tls_server.log_mark()
    command = [
        tool,
        "-t",
        "-S",
        "-p",
        str(tls_server.tls_port),
        "-e",
        LOOPBACK,
        "-r",
        str(udp_echo_peer),
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        str(MESSAGES),
        "-m",
        str(CLIENTS),
        "-l",
        "170",
        LOOPBACK,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    uclient = UclientRun(result.returncode, result.stdout + result.stderr)
    assert_all_echoed(tls_server, mark, uclient, USER)
    created = tls_server.events("allocation created", since=mark)
    assert {fields["transport"] for fields in created} == {"tls"}, tls_server.log_since(mark)


# -- TLS versions ------------------------------------------------------------------------


def binding_over_tls(
    address: tuple[str, int], context: ssl.SSLContext, timeout: float = 5.0
) -> tuple[str, tuple[str, int]]:
    """Handshake, send a STUN Binding request, return (TLS version, XOR-MAPPED-ADDRESS)."""
    with (
        socket.create_connection(address, timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        txid = new_transaction_id()
        tls.sendall(encode(Message(Method.BINDING, MessageClass.REQUEST, txid)))
        framer = StreamFramer()
        for _ in range(100):  # bounded: each pass reads at least one byte or fails
            frames = framer.frames()
            if frames:
                response = decode(frames[0])
                assert response.transaction_id == txid
                mapped = response.get(XorMappedAddress)
                assert mapped is not None
                version = tls.version()
                assert version is not None
                return version, mapped.address
            chunk = tls.recv(4096)
            assert chunk, "the server closed the TLS connection without answering"
            framer.feed(chunk)
    raise AssertionError("no Binding response over TLS")


def pinned(certificate: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A verifying client context that speaks exactly `version`.

    For TLS 1.1 and older the security level is lowered so that this client really
    offers them (OpenSSL 3 refuses them by default): the refusal must come from pyturn.
    """
    context = trusting(certificate)
    context.minimum_version = version
    context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize(
    ("version", "name"),
    [
        pytest.param(ssl.TLSVersion.TLSv1_2, "TLSv1.2", id="1.2"),
        pytest.param(ssl.TLSVersion.TLSv1_3, "TLSv1.3", id="1.3"),
    ],
)
def test_tls_1_2_and_1_3_clients_are_served(
    tls_server: ServerProcess, tls_files: tuple[Path, Path], version: ssl.TLSVersion, name: str
) -> None:
    """RFC 8656 §3.1 (TLS 1.2 or later, per RFC 7525/9325): a client limited to TLS 1.2,
    or to 1.3, completes the handshake and gets its Binding answered."""
    negotiated, mapped = binding_over_tls(tls_server.tls_address, pinned(tls_files[0], version))
    assert negotiated == name
    assert mapped[0] == LOOPBACK


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version",
    [pytest.param(ssl.TLSVersion.TLSv1, id="1.0"), pytest.param(ssl.TLSVersion.TLSv1_1, id="1.1")],
)
def test_tls_1_1_and_older_clients_are_refused(
    tls_server: ServerProcess, tls_files: tuple[Path, Path], version: ssl.TLSVersion
) -> None:
    """RFC 8996 (TLS 1.0 and 1.1 deprecated; RFC 9325 §3.1.1): the handshake of a client
    that offers nothing newer fails. A local control server that allows the old version
    first proves this client can speak it, so the refusal is pyturn's."""
    context = pinned(tls_files[0], version)
    assert control_handshake(context, tls_files) is not None
    with pytest.raises(ssl.SSLError):
        binding_over_tls(tls_server.tls_address, context)


def control_handshake(client: ssl.SSLContext, files: tuple[Path, Path]) -> str | None:
    """Handshake `client` with an in-process TLS server that accepts every version."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    server.load_cert_chain(*files)
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listener.settimeout(5.0)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(5.0)
            try:
                with server.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5.0) as raw,
                client.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                return tls.version()
        finally:
            thread.join(timeout=5.0)


# -- start-up checks ---------------------------------------------------------------------


def test_a_key_that_does_not_match_the_certificate_stops_start_up(tmp_path: Path) -> None:
    """The certificate pair is checked before binding: a private key from another
    certificate makes `pyturn serve` exit non-zero with a message naming
    tls.private_key (eturnal-style config errors that name the key)."""
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    certificate, _ = make_certificate(first)
    _, other_key = make_certificate(second)
    config = merge_config(base_config(), tls_config(certificate, other_key))
    server = ServerProcess(config, tmp_path / "server")
    with pytest.raises(ServerStartError):
        server.start()
    assert server.returncode is not None and server.returncode != 0, server.log_text
    assert "tls.private_key" in server.log_text, server.log_text
    assert "does not match" in server.log_text, server.log_text
    assert "listening on" not in server.log_text, server.log_text


# -- aiortc with turns: --------------------------------------------------------------------


def test_aiortc_data_channel_over_turns_uses_relays_only(
    tls_server: ServerProcess, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 7065 `turns:` URI with ?transport=tcp: aiortc (through aioice) opens TLS to the
    server, verifying it against the default trust store, which here is the test
    certificate (SSL_CERT_FILE); with iceTransportPolicy relay the data channel carries
    messages both ways through two TLS allocations."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    mark = tls_server.log_mark()
    url = f"turns:{LOOPBACK}:{tls_server.tls_port}?transport=tcp"
    run(data_channel_through_relays(url, messages=20, step_timeout=STEP_TIMEOUT))
    created = [
        fields
        for fields in tls_server.events("allocation created", since=mark)
        if fields["user"] == USER
    ]
    assert len(created) >= 2, tls_server.log_since(mark)
    assert {fields["transport"] for fields in created} == {"tls"}
