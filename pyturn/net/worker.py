"""One server process: binds the listeners, feeds the core, runs its timer, shuts down.

startup -> serve -> shutdown, as uvicorn does it: every listener is bound before the
process says it is ready; SIGTERM/SIGINT close the listeners and release every relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable

from pyturn.config import Config, Listener
from pyturn.core.allocation import FiveTuple
from pyturn.core.server import (
    Action,
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    PeerDenied,
    QuotaRejected,
    Reply,
    SendToPeer,
    TurnServer,
)
from pyturn.net.relay import RelayEndpoint, UdpRelayBinder
from pyturn.net.stream import StreamConnection
from pyturn.net.udp import UdpListener

log = logging.getLogger(__name__)

_MAX_TIMER_SLEEP = 1.0


def install_event_loop_policy() -> str:
    """Use uvloop when it is installed; it is several times faster on the relay path."""
    try:
        import uvloop  # noqa: PLC0415 (optional at run time)
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def default_relay_ipv4(config: Config) -> str:
    """The IPv4 address to advertise in XOR-RELAYED-ADDRESS when none is configured."""
    relay = config.relay
    if relay.external_address:
        return relay.external_address
    if relay.address != "0.0.0.0":  # noqa: S104 (comparing, not binding)
        return relay.address
    for listener in config.listen:
        if ":" not in listener.address and listener.address != "0.0.0.0":  # noqa: S104
            return listener.address
    # Wildcard everywhere: take the host's own address from its name, as a hint only.
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = str(info[4][0])
            if not address.startswith("127."):
                return address
    return "127.0.0.1"


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self._wall_at_start = time.time()
        self._loop_at_start = self.loop.time()
        self.binder = UdpRelayBinder(self.loop, config.relay.address, config.relay.address6)
        self.server = TurnServer(
            config,
            self.binder,
            relay_ipv4=default_relay_ipv4(config),
            relay_ipv6=config.relay.external_address6 or config.relay.address6,
        )
        self.bound: list[tuple[str, str, int]] = []
        self._closers: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()

    def now(self) -> float:
        """Monotonic time in Unix seconds, so REST expiry stamps compare directly."""
        return self._wall_at_start + (self.loop.time() - self._loop_at_start)

    # -- actions from the core -------------------------------------------------------------

    def handle_actions(
        self, actions: list[Action], five_tuple: FiveTuple, reply: Callable[[bytes], None]
    ) -> None:
        for action in actions:
            if isinstance(action, Reply):
                reply(action.data)
            elif isinstance(action, SendToPeer):
                action.relay.sendto(action.data, action.peer)
            elif isinstance(action, AllocationCreated):
                allocation = action.allocation
                relay = allocation.relay
                if isinstance(relay, RelayEndpoint):
                    relay.attach(allocation, reply)
                allocation.client_sink = reply
                log.info(
                    "allocation created client=%s:%d transport=%s user=%s relayed=%s:%d",
                    *five_tuple[1],
                    five_tuple[0],
                    allocation.username,
                    *allocation.relayed_address,
                )
                self._rearm_timer()
            elif isinstance(action, AllocationRefreshed):
                log.debug(
                    "allocation refreshed client=%s:%d user=%s lifetime=%d",
                    *action.allocation.five_tuple[1],
                    action.allocation.username,
                    action.lifetime,
                )
            elif isinstance(action, AllocationDeleted):
                self._log_deleted(action)
            elif isinstance(action, AuthFailed):
                log.info(
                    "auth failed client=%s:%d user=%s reason=%s",
                    *action.client,
                    action.username,
                    action.reason.value,
                )
            elif isinstance(action, PeerDenied):
                log.info(
                    "peer denied client=%s:%d user=%s peer=%s",
                    *action.client,
                    action.username,
                    action.peer[0],
                )
            elif isinstance(action, QuotaRejected):
                log.info("quota reached client=%s:%d user=%s", *action.client, action.username)

    def _log_deleted(self, event: AllocationDeleted) -> None:
        a = event.allocation
        log.info(
            "allocation deleted client=%s:%d user=%s relayed=%s:%d reason=%s duration=%.0fs "
            "to_peer=%dB/%dpkt to_client=%dB/%dpkt",
            *a.five_tuple[1],
            a.username,
            *a.relayed_address,
            event.reason,
            event.now - a.created_at,
            a.bytes_to_peer,
            a.packets_to_peer,
            a.bytes_to_client,
            a.packets_to_client,
        )

    # -- timer -----------------------------------------------------------------------------

    def _rearm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.server.next_deadline()
        delay = _MAX_TIMER_SLEEP if deadline is None else deadline - self.now()
        delay = min(max(delay, 0.0), _MAX_TIMER_SLEEP)
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for action in self.server.expire(self.now()):
            if isinstance(action, AllocationDeleted):
                self._log_deleted(action)
        self._rearm_timer()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for listener in self.config.listen:
            await self._bind(listener)
        self._rearm_timer()

    async def _bind(self, listener: Listener) -> None:
        family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
        if listener.transport == "udp":
            _, protocol = await self.loop.create_datagram_endpoint(
                lambda: UdpListener(self.server, self.now, self.handle_actions),
                local_addr=(listener.address, listener.port),
                family=family,
                reuse_port=self.config.workers > 1,
            )
            assert protocol.transport is not None
            port = protocol.local[1]
            self._closers.append(protocol.transport.close)
        elif listener.transport == "tcp":
            tcp_server = await self.loop.create_server(
                lambda: StreamConnection(self.server, self.now, self.handle_actions, "tcp"),
                host=listener.address,
                port=listener.port,
                family=family,
                reuse_port=self.config.workers > 1,
                backlog=1024,
            )
            port = tcp_server.sockets[0].getsockname()[1]
            self._closers.append(tcp_server.close)
        else:
            log.warning(
                "listener %s %s:%d skipped: TLS is not available yet",
                listener.transport,
                listener.address,
                listener.port,
            )
            return
        self.bound.append((listener.transport, listener.address, port))
        log.info("listening on %s %s:%d", listener.transport, listener.address, port)

    def stop(self) -> None:
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop)
        await self._stopped.wait()
        self.shutdown()

    def shutdown(self) -> None:
        for close in self._closers:
            close()
        if self._timer is not None:
            self._timer.cancel()
        for action in self.server.close_all(self.now()):
            if isinstance(action, AllocationDeleted):
                self._log_deleted(action)
        log.info("stopped")


async def serve(config: Config, on_ready: Callable[[Worker], None] | None = None) -> None:
    started = time.perf_counter()
    worker = Worker(config)
    await worker.start()
    log.info(
        "ready in %.0f ms: realm=%s relay=%s ports %d-%d",
        (time.perf_counter() - started) * 1000,
        config.realm,
        worker.server.relay_ips,
        config.relay.min_port,
        config.relay.max_port,
    )
    if on_ready is not None:
        on_ready(worker)
    await worker.serve_until_stopped()


def run(config: Config, on_ready: Callable[[Worker], None] | None = None) -> None:
    loop_name = install_event_loop_policy()
    log.debug("event loop: %s", loop_name)
    asyncio.run(serve(config, on_ready))
