"""One server process: binds the listeners, feeds the core, runs its timer, shuts down.

startup -> serve -> drain -> shutdown, as uvicorn does it:

- startup: the metrics/health endpoint first (so /live answers while we bind), then
  every listener. Only when all are bound does /ready say 200, systemd get READY=1,
  and the log say `ready in`.
- serve: core events feed the metrics counters and the session log lines.
- SIGHUP: read the config file again. A config that fails validation (or whose TLS
  certificate cannot be used) is refused with a log line and the old one stays; a good
  one replaces users, secrets, peer policy, quotas, lifetimes, logging and the TLS
  certificate at once, and running allocations keep going.
- SIGTERM or SIGINT: drain. /ready turns 503 and new Allocate requests are answered
  300 Try Alternate (with `alternate_server`) or 508; existing allocations keep relaying
  until they have all ended or `shutdown_timeout` passes. A second SIGTERM or SIGINT
  stops at once. Either way the listeners close, every relay is released and the
  process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from pyturn.config import Config, ConfigError, Listener, load_config, parse_config
from pyturn.core.allocation import Allocation, FiveTuple
from pyturn.core.auth import AuthFailure
from pyturn.core.forwarding import ForwardingTable
from pyturn.core.randomness import SystemRandom
from pyturn.core.server import (
    Action,
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    ClosePeerConnection,
    ConnectToPeer,
    Event,
    PeerDenied,
    QuotaRejected,
    Reply,
    ReplySuppressed,
    RequestHandled,
    SendToClient,
    SendToPeer,
    StartRelaying,
    StopRelaying,
    TurnServer,
)
from pyturn.logs import (
    FieldValue,
    LogThrottle,
    configure_logging,
    forget_plain_values,
    format_address,
    log_event,
)
from pyturn.metrics import Stats, TurnCollector, make_registry, render
from pyturn.net import batch
from pyturn.net.clients import Clients
from pyturn.net.control import LINE_LIMIT, read_message, write_message
from pyturn.net.errors import StartupError
from pyturn.net.http import OpsApp, start_ops_server
from pyturn.net.relay import UdpRelayBinder
from pyturn.net.sdnotify import SystemdNotifier
from pyturn.net.sockets import bound_socket
from pyturn.net.stream import ConnectionCounter, StreamConnection, TlsAcceptor
from pyturn.net.tcp_relay import TcpRelay
from pyturn.net.tls import TlsContext, TlsError
from pyturn.net.udp import UdpListener

log = logging.getLogger(__name__)

_MAX_TIMER_SLEEP = 1.0
# Memory is handed back once at least this many allocations (and at least as many as are
# still running) have ended: the work is O(running allocations), so it stays amortised.
_COMPACT_AFTER = 256
# A full collection walks what was made since start-up: only with few allocations left.
_COLLECT_BELOW = 256
# Auth failures that are part of the normal flow (the first challenge, an expired nonce)
# are logged at DEBUG; the others at INFO, for fail2ban.
_ROUTINE_AUTH = (AuthFailure.NO_CREDENTIALS, AuthFailure.STALE_NONCE)
# Sections a reload cannot change in a running process: they name sockets.
_RESTART_ONLY = ("listen", "relay", "metrics", "workers")
# Every Event but RequestHandled, which handle_actions counts itself.
_EVENT_TYPES = (
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    PeerDenied,
    QuotaRejected,
    ReplySuppressed,
)


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
    # Wildcard everywhere: the first address of the host's own interfaces.
    for address in interface_ipv4_addresses():
        if not address.startswith(("127.", "169.254.")):
            return address
    log.warning(
        "no non-loopback IPv4 address found: clients will be told 127.0.0.1 as their "
        "relayed address; set relay.external_address"
    )
    return "127.0.0.1"


def interface_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the host's interfaces (Linux SIOCGIFADDR; no packet is sent)."""
    try:
        import fcntl  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return []
    siocgifaddr = 0x8915
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                answer = fcntl.ioctl(probe.fileno(), siocgifaddr, request)
                found.append(socket.inet_ntoa(answer[20:24]))
    return found


def load_for_reload(path: Path, notifier: SystemdNotifier) -> Config | None:
    """SIGHUP's first step, for a worker and the supervisor alike: the new config, or None
    (logged, and systemd told) when the file is invalid and the running config stays."""
    notifier.reloading()
    try:
        return load_config(path)
    except ConfigError as exc:
        log.error("config reload refused, keeping the running config: %s", exc)
        notifier.ready("config reload refused; running on the previous config")
        return None


def default_relay_ipv6(config: Config) -> str | None:
    """The IPv6 address to advertise for IPv6 relaying, if `relay.address6` is set."""
    relay = config.relay
    if relay.external_address6:
        return relay.external_address6
    if relay.address6 is None:
        return None
    if relay.address6 != "::":
        return relay.address6
    for listener in config.listen:
        if ":" in listener.address and listener.address != "::":
            return listener.address
    log.warning(
        "relay.address6 is '::' and no IPv6 listener names an address: set "
        "relay.external_address6 so clients learn a reachable IPv6 relay address"
    )
    return "::1"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        import ctypes  # noqa: PLC0415 (only once memory is to be given back)

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def _os_reason(exc: OSError) -> str:
    """The OS words ("Address already in use"), not asyncio's longer wrapping of them."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _session(allocation: Allocation) -> dict[str, FieldValue]:
    """The fields every allocation log line starts with."""
    transport, client, _ = allocation.five_tuple
    fields: dict[str, FieldValue] = {
        "client": format_address(client),
        "transport": transport,
        "user": allocation.username,
        "relayed": format_address(allocation.relayed_address),
    }
    if allocation.relayed_address6 is not None:  # dual-stack (ADDITIONAL-ADDRESS-FAMILY)
        fields["relayed6"] = format_address(allocation.relayed_address6)
    return fields


def _traffic(allocation: Allocation) -> dict[str, FieldValue]:
    return {
        "bytes_to_peer": allocation.bytes_to_peer,
        "packets_to_peer": allocation.packets_to_peer,
        "bytes_to_client": allocation.bytes_to_client,
        "packets_to_client": allocation.packets_to_client,
    }


class Worker:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        notifier: SystemdNotifier | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or SystemdNotifier()
        self.loop = asyncio.get_running_loop()
        self._wall_at_start = time.time()
        self._loop_at_start = self.loop.time()
        random = SystemRandom()
        table = ForwardingTable(random)
        # Listeners register here; relayed data finds its client by 5-tuple.
        self.clients = Clients()
        self.binder = UdpRelayBinder(
            self.loop, table, self.clients, config.relay.address, config.relay.address6
        )
        self.server = TurnServer(
            config,
            self.binder,
            relay_ipv4=default_relay_ipv4(config),
            relay_ipv6=default_relay_ipv6(config),
            nonce_secret=secret,
            random=random,
            table=table,
        )
        self.tcp_relay = TcpRelay(self.server, self.now, self._deliver_tcp)
        self.connections = ConnectionCounter(config.limits.connections_per_source)
        self.stats = Stats()
        self.registry = make_registry(
            TurnCollector(self.server, self.stats, lambda: self.state == "draining")
        )
        self.throttle = LogThrottle(log)
        # starting -> serving -> draining -> stopping
        self.state = "starting"
        self.bound: list[tuple[str, str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        self.tls: TlsContext | None = None
        self._closers: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        # Most allocations at once since memory was last handed back (_return_memory).
        self._peak_allocations = 0

    def now(self) -> float:
        """Monotonic time in Unix seconds, so REST expiry stamps compare directly."""
        return self._wall_at_start + (self.loop.time() - self._loop_at_start)

    def readiness(self) -> str | None:
        """None when ready for new clients, else the state that keeps us from it."""
        return None if self.state == "serving" else self.state

    # -- actions and events from the core ------------------------------------------------

    def handle_actions(
        self, actions: list[Action], five_tuple: FiveTuple, reply: Callable[[bytes], None]
    ) -> None:
        # Dispatch on the exact type: every request passes here, and isinstance against
        # the Event union tests each of its members in turn.
        for action in actions:
            if type(action) is Reply:
                reply(action.data)
            elif type(action) is RequestHandled:
                self.stats.record(action)
            elif type(action) is SendToPeer:
                action.relay.sendto(action.data, action.peer)
            elif isinstance(action, _EVENT_TYPES):
                self._event(action)
            else:
                self._wire(action)

    def _wire(self, action: Action) -> None:
        """The core's wiring and RFC 6062 actions; JoinPeerConnection is the stream
        connection's own business."""
        if isinstance(action, StartRelaying):
            self.tcp_relay.attach(action.allocation)
            self._arm_timer_for(action.allocation)
        elif isinstance(action, StopRelaying):
            self.tcp_relay.close_allocation(action.allocation)
        elif isinstance(action, SendToClient):
            self.clients.send(action.allocation.five_tuple, action.data)
        elif isinstance(action, ConnectToPeer):
            self.tcp_relay.connect(action.connection)
        elif isinstance(action, ClosePeerConnection):
            self.tcp_relay.close(action.connection)

    def _deliver_tcp(self, actions: list[Action], allocation: Allocation) -> None:
        five_tuple = allocation.five_tuple
        self.handle_actions(actions, five_tuple, lambda data: self.clients.send(five_tuple, data))

    def _event(self, event: Event) -> None:
        """Count one core event for the metrics and write its log line, if it has one."""
        self.stats.record(event)
        if type(event) is RequestHandled:
            return
        if type(event) is AllocationCreated:
            allocation = event.allocation
            running = len(self.server.allocations)
            self._peak_allocations = max(self._peak_allocations, running)
            lifetime = round(allocation.expires_at - allocation.created_at)
            log_event(
                log,
                logging.INFO,
                "allocation_created",
                {**_session(allocation), "lifetime": lifetime},
            )
        elif type(event) is AllocationDeleted:
            a = event.allocation
            log_event(
                log,
                logging.INFO,
                "allocation_deleted",
                {
                    **_session(a),
                    "reason": event.reason.replace(" ", "_"),
                    "duration": event.now - a.created_at,
                    **_traffic(a),
                },
            )
            if not self.server.allocations:
                if self.state == "draining":
                    log.info("drained: every allocation has ended")
                    self._stopped.set()
                else:
                    # Now rather than at the next tick: nothing is left to relay.
                    self.loop.call_soon(self._return_memory)
        elif type(event) is AllocationRefreshed:
            a = event.allocation
            duration = a.expires_at - event.lifetime - a.created_at
            log_event(
                log,
                logging.INFO,
                "allocation_refreshed",
                {**_session(a), "lifetime": event.lifetime, "duration": duration, **_traffic(a)},
            )
        elif isinstance(event, AuthFailed | PeerDenied | QuotaRejected):
            self._log_refusal(event)

    def _log_refusal(self, event: AuthFailed | PeerDenied | QuotaRejected) -> None:
        """One line per refusal, for fail2ban; throttled, as clients can cause them at will."""
        level = logging.INFO
        if isinstance(event, AuthFailed):
            name = "auth_failed"
            if event.reason in _ROUTINE_AUTH:
                level = logging.DEBUG  # the normal challenge, not worth a line at INFO
        elif isinstance(event, PeerDenied):
            name = "peer_denied"
        else:
            name = "quota_rejected"
        # Checked first: the first challenge of every session comes here, mostly unlogged.
        if not log.isEnabledFor(level):
            return
        if level > logging.DEBUG and not self.throttle.allow(event.client[0], name, self.now()):
            return
        fields: dict[str, FieldValue] = {
            "client": format_address(event.client),
            "user": event.username,
        }
        if isinstance(event, AuthFailed):
            fields["reason"] = event.reason.value
        elif isinstance(event, PeerDenied):
            fields["peer"] = event.peer[0]
        log_event(log, level, name, fields)

    # -- timer -----------------------------------------------------------------------------

    def _arm_timer_for(self, allocation: Allocation) -> None:
        """Re-arm the timer only if it would fire after the new allocation's first deadline
        (it never sleeps more than a second, so under churn it rarely needs to)."""
        timer = self._timer
        if timer is not None:
            due = allocation.next_deadline()
            if timer.when() <= self.loop.time() + (due - self.now()):
                return
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.server.next_deadline()
        delay = _MAX_TIMER_SLEEP if deadline is None else deadline - self.now()
        delay = min(max(delay, 0.0), _MAX_TIMER_SLEEP)
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.now()
        for action in self.server.expire(now):
            if isinstance(action, Event):
                self._event(action)
            else:
                self._wire(action)
        self.throttle.flush(now)
        self._return_memory()
        self._rearm_timer()

    def _return_memory(self) -> None:
        """Once many allocations have ended, drop what they left behind; once the running
        allocations fell to half their peak, also give the freed heap pages back to the OS.
        A few ms at most, from the timer or when the last allocation ends, never per packet.
        """
        server = self.server
        ended = server.ended_since_compact
        if ended < _COMPACT_AFTER or ended < len(server.allocations):
            return
        server.compact(self.now())
        batch.forget_addresses()  # caches: a miss only formats the address again
        forget_plain_values()
        running = len(server.allocations)
        if running * 2 > self._peak_allocations:
            # Churn, not the end of a wave: what was freed is about to be used again,
            # and a full collection and a trim every few hundred allocations would cost
            # more than the compaction itself.
            return
        self._peak_allocations = running
        if running <= _COLLECT_BELOW:
            # A full collection also empties the interpreter's free lists (thousands of
            # tuples of gone clients); it walks every object made since start-up (the
            # rest is frozen), so it runs only when few allocations are left.
            gc.collect()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        self.notifier.watchdog()
        self._watchdog = self.loop.call_later(interval, self._ping_watchdog)

    # -- startup ---------------------------------------------------------------------------

    async def start(self) -> None:
        # Handlers first: a signal sent as soon as we log `ready in` must find them.
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._on_stop_signal, signum)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.notifier.enabled and self.notifier.watchdog_interval is not None:
            self._ping_watchdog()
        if self.config.metrics.enabled:
            await self._start_ops_endpoint()
        if any(listener.transport == "tls" for listener in self.config.listen):
            try:
                self._load_tls(self.config)
            except TlsError as exc:
                raise StartupError(str(exc)) from exc
        for listener in self.config.listen:
            await self._bind(listener)
        self._rearm_timer()

    async def _start_ops_endpoint(self) -> None:
        metrics = self.config.metrics
        registry = self.registry
        app = OpsApp(lambda: render(registry), self.readiness)
        ops_server, self.metrics_address = await start_ops_server(
            app, metrics.address, metrics.port
        )
        self._closers.append(ops_server.close)
        log.info(
            "metrics on http://%s/metrics, health checks on /live and /ready",
            format_address(self.metrics_address),
        )

    async def _bind(self, listener: Listener) -> None:
        family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
        try:
            if listener.transport == "udp":
                udp = UdpListener.open(
                    self.loop,
                    self.server,
                    self.now,
                    self.handle_actions,
                    (listener.address, listener.port),
                    clients=self.clients,
                    reuse_port=self.config.workers > 1,
                )
                port = udp.local[1]
                self._closers.append(udp.close)
            else:  # tcp, or tls: the same framing over TLS (RFC 8656 §3.1)
                transport_name = listener.transport

                def make_stream() -> StreamConnection:
                    return StreamConnection(
                        self.server,
                        self.now,
                        self.handle_actions,
                        transport_name,
                        counter=self.connections,
                        first_frame_timeout=self.config.limits.first_message_timeout,
                        clients=self.clients,
                    )

                if transport_name == "tls":
                    assert self.tls is not None
                    sock = bound_socket(
                        socket.SOCK_STREAM,
                        listener.address,
                        listener.port,
                        reuse_port=self.config.workers > 1,
                        backlog=1024,
                    )
                    acceptor = TlsAcceptor(
                        sock,
                        self.tls.context,
                        self.connections,
                        self.config.limits.first_message_timeout,
                        make_stream,
                    )
                    port = sock.getsockname()[1]
                    self._closers.append(acceptor.close)
                else:
                    tcp_server = await self.loop.create_server(
                        make_stream,
                        host=listener.address,
                        port=listener.port,
                        family=family,
                        reuse_port=self.config.workers > 1,
                        backlog=1024,
                    )
                    port = tcp_server.sockets[0].getsockname()[1]
                    self._closers.append(tcp_server.close)
        except OSError as exc:
            where = format_address((listener.address, listener.port))
            raise StartupError(
                f"cannot listen on {listener.transport} {where}: {_os_reason(exc)}"
            ) from exc
        self.bound.append((listener.transport, listener.address, port))
        log.info("listening on %s %s:%d", listener.transport, listener.address, port)

    def _load_tls(self, config: Config) -> None:
        """Load (or, on reload, replace) the certificate pair of the TLS listeners."""
        certificate, private_key = config.tls.certificate, config.tls.private_key
        assert certificate is not None and private_key is not None  # the config checks it
        if self.tls is None:
            self.tls = TlsContext(certificate, private_key)
        else:
            self.tls.load(certificate, private_key)
        for warning in self.tls.warnings:
            log.warning("%s", warning)

    def mark_ready(self, started: float) -> None:
        """Every listener is bound: say so in /ready, to systemd and in the log."""
        self.state = "serving"
        _malloc_trim()  # loads ctypes now: made during a wave of allocations, it would pin
        # What start-up made (modules, config, sockets) lives as long as the process:
        # kept out of the collector's sight, a full collection under allocation churn
        # scans only what serving made, not every object the process ever loaded. Before
        # the first client, so that no allocation is ever frozen with it.
        gc.freeze()
        log.info(
            "ready in %.0f ms: realm=%s relay=%s ports %d-%d",
            (time.perf_counter() - started) * 1000,
            self.config.realm,
            self.server.relay_ips,
            self.config.relay.min_port,
            self.config.relay.max_port,
        )
        listening = ", ".join(f"{t} {a}:{p}" for t, a, p in self.bound)
        self.notifier.ready(f"serving on {listening}")

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: take the config file again, or keep the running one if it is invalid."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: no config file to reload (embedded default config)")
            return
        new = load_for_reload(self.config_path, self.notifier)
        if new is None:
            self.stats.config_reloads["failure"] += 1
            return
        if self.apply_config(new, source=str(self.config_path)):
            self.notifier.ready(f"config reloaded from {self.config_path}")
        else:
            self.notifier.ready("config reload refused; running on the previous config")

    def apply_config(self, new: Config, *, source: str) -> bool:
        """Take a validated config; sockets (listen, relay, metrics, workers) stay as they are."""
        if self.tls is not None:
            try:
                # Always re-read: a renewed certificate usually keeps its file names.
                self._load_tls(new)
            except TlsError as exc:
                self.stats.config_reloads["failure"] += 1
                log.error("config reload refused, keeping the running config: %s", exc)
                return False
        old = self.config
        changed = [name for name in _RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        new = dataclasses.replace(
            new, listen=old.listen, relay=old.relay, metrics=old.metrics, workers=old.workers
        )
        self.config = new
        self.server.reconfigure(new)
        self.connections.limit = new.limits.connections_per_source
        configure_logging(new.logging.level, new.logging.format)
        self.stats.config_reloads["success"] += 1
        log_event(
            log,
            logging.INFO,
            "config_reloaded",
            {
                "file": source,
                "users": len(new.auth.users),
                "secrets": len(new.auth.secrets),
                "allocations": len(self.server.allocations),
            },
        )
        if changed:
            log.warning(
                "config reload: %s changed in %s but take effect only after a restart",
                ", ".join(changed),
                source,
            )
        return True

    # -- drain and shutdown ----------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.state in ("draining", "stopping"):
            log.warning("%s again: stopping at once", name)
            self._stopped.set()
            return
        self.drain(name)

    def drain(self, cause: str = "drain") -> None:
        """Refuse new allocations, keep relaying for the running ones, then stop."""
        count = len(self.server.allocations)
        timeout = self.config.shutdown_timeout
        if count == 0 or timeout <= 0:
            self.notifier.stopping("stopping")
            log.info("%s: stopping (%d allocations to close)", cause, count)
            self.state = "stopping"
            self._stopped.set()
            return
        self.state = "draining"
        self.server.draining = True
        alternate = self.config.alternate_server
        answer = f"300 Try Alternate {alternate}" if alternate else "508 Insufficient Capacity"
        self.notifier.stopping(f"draining {count} allocations")
        log_event(
            log,
            logging.INFO,
            "draining",
            {"signal": cause, "allocations": count, "timeout": timeout, "new_allocations": answer},
        )
        self._drain_timer = self.loop.call_later(timeout, self._drain_timeout)

    def _drain_timeout(self) -> None:
        self._drain_timer = None
        log.info(
            "shutdown_timeout (%.0f s) passed: closing %d allocations",
            self.config.shutdown_timeout,
            len(self.server.allocations),
        )
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()
        self.shutdown()

    def stop(self) -> None:
        """Stop at once, without draining (for embedders and tests)."""
        self._stopped.set()

    def shutdown(self) -> None:
        self.state = "stopping"
        for close in self._closers:
            close()
        self._closers.clear()
        for handle in (self._timer, self._watchdog, self._drain_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._watchdog = self._drain_timer = None
        for action in self.server.close_all(self.now()):
            if isinstance(action, Event):
                self._event(action)
            else:
                self._wire(action)
        self.binder.close()
        self.notifier.close()
        log.info("stopped")


async def serve(
    config: Config,
    on_ready: Callable[[Worker], None] | None = None,
    *,
    config_path: Path | None = None,
    notifier: SystemdNotifier | None = None,
) -> None:
    started = time.perf_counter()
    worker = Worker(config, config_path=config_path, notifier=notifier)
    try:
        await worker.start()
    except BaseException:
        worker.shutdown()
        raise
    worker.mark_ready(started)
    if on_ready is not None:
        on_ready(worker)
    await worker.serve_until_stopped()


def run(
    config: Config,
    on_ready: Callable[[Worker], None] | None = None,
    *,
    config_path: Path | None = None,
) -> None:
    loop_name = install_event_loop_policy()
    log.debug("event loop: %s", loop_name)
    log.info(batch.describe())
    asyncio.run(serve(config, on_ready, config_path=config_path))


async def serve_as_worker(control_fd: int) -> None:
    """One of several worker processes: config, metrics and orders come from the supervisor.

    SIGINT and SIGHUP belong to the supervisor (a terminal's Ctrl-C reaches the whole
    process group); SIGTERM still drains, as systemd may send it to every process.
    """
    started = time.perf_counter()
    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
    first = await read_message(reader)
    if first is None or first.get("op") != "start":
        raise StartupError("worker: no start message from the supervisor")
    config = parse_config(first["config"], source=f"supervisor (worker {first['index']})")
    configure_logging(config.logging.level, config.logging.format)
    # Workers share the nonce and reservation-token secret: a client's next 5-tuple
    # may hash to another worker.
    secret = bytes.fromhex(first["secret"])
    worker = Worker(config, notifier=SystemdNotifier({}), secret=secret)
    try:
        await worker.start()
    except StartupError as exc:
        write_message(writer, {"op": "failed", "error": str(exc)})
        await writer.drain()
        raise
    for signum in (signal.SIGINT, signal.SIGHUP):
        worker.loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    worker.mark_ready(started)
    write_message(writer, {"op": "ready", "pid": os.getpid(), "bound": worker.bound})
    orders = worker.loop.create_task(_obey(worker, reader, writer))
    try:
        await worker.serve_until_stopped()
    finally:
        orders.cancel()
        writer.close()


async def _obey(worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (message := await read_message(reader)) is not None:
        op = message.get("op")
        if op == "metrics":
            text = render(worker.registry).decode()
            write_message(writer, {"op": "metrics", "id": message.get("id"), "text": text})
        elif op == "reload":
            new = parse_config(message["config"], source="supervisor")
            ok = worker.apply_config(new, source=str(message.get("source", "supervisor")))
            write_message(writer, {"op": "reloaded", "ok": ok})
        elif op == "drain":
            if worker.state == "serving":
                worker.drain("supervisor")
        elif op == "stop":
            worker.stop()
    # The supervisor is gone: nobody can stop or reload this process any more.
    log.error("supervisor gone: stopping")
    worker.stop()


def run_worker(control_fd: int) -> None:
    install_event_loop_policy()
    asyncio.run(serve_as_worker(control_fd))
