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

Beside it: addresses.py picks the relay address to advertise, session_log.py writes the
log lines of the core's events, memory.py gives memory back after a wave of allocations,
and worker_process.py talks to the supervisor when there are several worker processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pyturn.config import Config, ConfigError, Listener, load_config
from pyturn.core.allocation import Allocation, FiveTuple
from pyturn.core.auth import mint_rest_credential
from pyturn.core.forwarding import ForwardingTable
from pyturn.core.node import NodeState
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
from pyturn.core.sessions import SessionMatch, revocations_from_json, revocations_to_json
from pyturn.logs import format_address, log_event, use_logging_config
from pyturn.metrics import Stats, TurnCollector, make_registry, relayed_totals, render
from pyturn.net import batch, fastpath
from pyturn.net.addresses import default_relay_ipv4, default_relay_ipv6
from pyturn.net.clients import Clients
from pyturn.net.control_socket import Message
from pyturn.net.discover import DiscoveryError, discover
from pyturn.net.errors import StartupError
from pyturn.net.handover import Handover
from pyturn.net.http import OpsApp, log_ops_endpoint, start_ops_server
from pyturn.net.memory import MemoryReturner
from pyturn.net.node_control import NodeControl
from pyturn.net.relay import UdpRelayBinder
from pyturn.net.sdnotify import SystemdNotifier
from pyturn.net.session_log import SessionLog
from pyturn.net.sockets import LISTEN_BACKLOG, listener_sockets
from pyturn.net.store_follow import StoreFollower
from pyturn.net.stream import ConnectionCounter, StreamAcceptor, StreamConnection
from pyturn.net.tcp_relay import TcpRelay
from pyturn.net.tls import TlsContext, TlsError
from pyturn.net.udp import UdpListener
from pyturn.store import StoreError
from pyturn.web.basic_auth import AuthFileError, BasicAuth
from pyturn.web.status import listener_facts, relay_facts
from pyturn.wire.attributes import FAMILY_IPV4, FAMILY_IPV6

log = logging.getLogger(__name__)

_MAX_TIMER_SLEEP = 1.0
# Sections a reload cannot change in a running process: they name sockets.
_RESTART_ONLY = ("listen", "relay", "metrics", "control", "workers", "store")
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


def load_for_reload(path: Path, notifier: SystemdNotifier) -> Config | str:
    """A reload's first step, for a worker and the supervisor alike: the new config, or
    why not (logged, and systemd told) when the file is invalid and the running config
    stays."""
    notifier.reloading()
    try:
        return load_config(path)
    except ConfigError as exc:
        log.error("config reload refused, keeping the running config: %s", exc)
        notifier.ready("config reload refused; running on the previous config")
        return str(exc)


def _os_reason(exc: OSError) -> str:
    """The OS words ("Address already in use"), not asyncio's longer wrapping of them."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class Worker:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        notifier: SystemdNotifier | None = None,
        secret: bytes | None = None,
        sockets: Mapping[int, socket.socket] | None = None,
        worker_index: int = 0,
        node: NodeState | None = None,
        supervised: bool = False,
    ) -> None:
        """`sockets`: listening sockets bound by the supervisor, by their position in
        `config.listen`; a listener without one is bound here. A `supervised` worker
        leaves the control socket and the fleet's messages to its supervisor."""
        self.config = config
        self.config_path = config_path
        self.sockets: Mapping[int, socket.socket] = sockets or {}
        self.notifier = notifier or SystemdNotifier()
        self.loop = asyncio.get_running_loop()
        self._wall_at_start = time.time()
        self._loop_at_start = self.loop.time()
        random = SystemRandom()
        table = ForwardingTable(random)
        # Listeners register here; relayed data finds its client by 5-tuple.
        self.clients = Clients()
        self.binder = UdpRelayBinder(
            self.loop,
            table,
            self.clients,
            config.relay.bind_addresses(4),
            config.relay.bind_addresses(6),
        )
        self.server = TurnServer(
            config,
            self.binder,
            relay_ipv4=default_relay_ipv4(config),
            relay_ipv6=default_relay_ipv6(config),
            nonce_secret=secret,
            random=random,
            table=table,
            worker_index=worker_index,
            node=node,
        )
        fastpath.use_table(table)
        table.clock_offset = round((self._wall_at_start - self._loop_at_start) * 1e9)
        # With several workers: where RFC 6062 data connections go to their owner.
        self.handover: Handover | None = None
        self.tcp_relay = TcpRelay(self.server, self.now, self._deliver_tcp)
        self.connections = ConnectionCounter(config.limits.connections_per_source)
        self.stats = Stats()
        # The node is the supervisor with its workers, or this process alone.
        self.node_name = node_name(os.getppid() if supervised else os.getpid())
        # Users and secrets from `store:`, followed from start() on.
        self.store: StoreFollower | None = None
        if config.store:
            self.store = StoreFollower(
                self.loop, self.server, config.store, node=self.node_name, worker=worker_index
            )
        # `pyturn sessions|kick|revoke|reload|drain` (a single process serves them).
        self.control: NodeControl | None = None
        self._supervised = supervised
        self.registry = make_registry(
            TurnCollector(
                self.server,
                self.stats,
                lambda: self.state == "draining",
                lambda: self.store.up if self.store is not None else None,
            )
        )
        self.session_log = SessionLog(log, self.now)
        self.memory = MemoryReturner(self.server, self.now, self.connections)
        # starting -> serving -> draining -> stopping
        self.state = "starting"
        self.bound: list[tuple[str, str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        self.ops_app: OpsApp | None = None
        self._rediscovery: asyncio.Task[None] | None = None
        self.tls: TlsContext | None = None
        self._closers: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()

    def now(self) -> float:
        """Monotonic time in Unix seconds, so REST expiry stamps compare directly."""
        return self._wall_at_start + (self.loop.time() - self._loop_at_start)

    def readiness(self) -> str | None:
        """None when ready for new clients, else the state that keeps us from it."""
        return None if self.state == "serving" else self.state

    # -- what the ops endpoint reads (a single process; see http.NodeView) ---------------

    async def exposition(self) -> bytes:
        return render(self.registry)

    async def relayed_bytes(self) -> dict[str, int]:
        return relayed_totals(self.server, self.stats)

    def facts(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "workers": [{"index": 0, "pid": os.getpid(), "ready": self.state == "serving"}],
            "listeners": listener_facts(self.bound),
            "relay": relay_facts(self.config.relay),
        }

    async def test_credential(self, ttl: int, user: str) -> dict[str, Any] | None:
        return self.mint_credential(ttl, user)

    def mint_credential(self, ttl: int, user: str) -> dict[str, str] | None:
        """A REST credential from the first secret in use (config, files or store)."""
        secrets = self.server.auth.secrets
        if not secrets:
            return None
        expires_at = int(self.now()) + ttl
        return mint_rest_credential(secrets[0], expires_at, user, self.server.auth.rest_separator)

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
        """Count one core event for the metrics, write its log line if it has one, and
        react to what it changed."""
        self.stats.record(event)
        if type(event) is RequestHandled:
            return
        self.session_log.write(event)
        if type(event) is AllocationCreated:
            self.memory.saw_running(len(self.server.allocations))
        elif type(event) is AllocationDeleted and not self.server.allocations:
            if self.state == "draining":
                log.info("drained: every allocation has ended")
                self._stopped.set()
            else:
                # Now rather than at the next tick: nothing is left to relay.
                self.loop.call_soon(self.memory.return_memory)

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
        self.session_log.flush(now)
        self.memory.return_memory()
        self._rearm_timer()

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
        if self.store is not None:
            try:
                await self.store.start()
            except StoreError as exc:
                raise StartupError(str(exc)) from exc
            self._closers.append(self.store.close)
        if not self._supervised:
            await self._start_control()
        if self.config.metrics.enabled:
            await self._start_ops_endpoint()
        if any(listener.transport in ("tls", "auto") for listener in self.config.listen):
            try:
                self._load_tls(self.config)
            except TlsError as exc:
                raise StartupError(str(exc)) from exc
        if self.config.relay.discovered():
            await self._discover_relay_addresses(at_start=True)
            self._rediscovery = self.loop.create_task(self._rediscover_forever())
            self._closers.append(self._stop_rediscovery)
        for position, listener in enumerate(self.config.listen):
            await self._bind(position, listener)
        self._rearm_timer()

    async def _start_control(self) -> None:
        self.control = NodeControl(
            self.config,
            _ThisWorker(self),
            node=self.node_name,
            reload=self._reload_now,
            drain=lambda: self.drain("pyturn drain") if self.state == "serving" else None,
            state=lambda: self.state,
        )
        self._closers.append(self.control.close)
        await self.control.start()
        self.obey({"op": "revocations", "revoked": revocations_to_json(self.control.revoked)})

    def obey(self, order: Message) -> Message:
        """A control order for this process's allocations (see node_control.py): list
        them, kick them, or take the node's revocations."""
        op = order.get("op")
        now = self.now()
        if op == "credential":
            return {"minted": self.mint_credential(int(order["ttl"]), str(order["user"]))}
        if op == "sessions":
            return {"sessions": self.server.sessions(SessionMatch.of_request(order), now)}
        if op == "kick":
            actions = self.server.kick(SessionMatch.of_request(order), now)
        elif op == "revocations":
            actions = self.server.set_revocations(revocations_from_json(order.get("revoked")), now)
        else:
            raise ValueError(f"unknown order {op!r}")
        for action in actions:
            if isinstance(action, Event):
                self._event(action)
            else:
                self._wire(action)
        return {"kicked": sum(type(action) is AllocationDeleted for action in actions)}

    async def _start_ops_endpoint(self) -> None:
        metrics = self.config.metrics
        try:
            self.ops_app = OpsApp(self, auth=BasicAuth.load(metrics.auth))
        except AuthFileError as exc:
            raise StartupError(str(exc)) from None
        ops_server, self.metrics_address = await start_ops_server(
            self.ops_app, metrics.address, metrics.port
        )
        self._closers.append(ops_server.close)
        log_ops_endpoint(self.metrics_address, metrics.auth)

    async def _discover_relay_addresses(self, *, at_start: bool) -> None:
        """relay.external_address(6) "auto": ask relay.discover's STUN servers."""
        relay = self.config.relay
        for version in relay.discovered():
            family = FAMILY_IPV4 if version == 4 else FAMILY_IPV6
            key = "relay.external_address" + ("6" if version == 6 else "")
            bind_ip = relay.address if version == 4 else relay.address6
            assert bind_ip is not None  # the config requires address6 for external_address6
            try:
                ip, url = await discover(bind_ip, version, relay.discover)
            except DiscoveryError as exc:
                if at_start:
                    raise StartupError(
                        f'{key} is "auto" but no STUN server of relay.discover answered: {exc}'
                    ) from None
                log.warning("%s: no STUN server answered (%s); keeping the address", key, exc)
                continue
            told = self.server.relay_ips.get(family)
            if at_start:
                log.info("%s: %s, as %s sees this relay", key, ip, url)
            elif ip != told:
                log.warning(
                    "%s changed from %s to %s (as %s sees this relay): new allocations get it",
                    key,
                    told,
                    ip,
                    url,
                )
            self.server.use_discovered_address(family, ip)

    def _stop_rediscovery(self) -> None:
        if self._rediscovery is not None:
            self._rediscovery.cancel()

    async def _rediscover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.relay.discover_interval)
            try:
                await self._discover_relay_addresses(at_start=False)
            except Exception:
                log.exception("discovering the relay address failed")

    async def _bind(self, position: int, listener: Listener) -> None:
        """Serve `listen[position]`: on the socket the supervisor handed over, or on one
        bound here (a single process)."""
        inherited = self.sockets.get(position)
        sock = inherited if inherited is not None else listener_sockets(listener)[0]
        port = sock.getsockname()[1]
        try:
            if listener.transport == "udp":
                udp = UdpListener.open(
                    self.loop,
                    self.server,
                    self.now,
                    self.handle_actions,
                    sock,
                    clients=self.clients,
                )
                self._closers.append(udp.close)
            else:  # tcp, tls or both: the same framing over TLS (RFC 8656 §3.1)

                def make_stream(
                    name: str = "tcp", five_tuple: FiveTuple | None = None
                ) -> StreamConnection:
                    return StreamConnection(
                        self.server,
                        self.now,
                        self.handle_actions,
                        name,
                        counter=self.connections,
                        first_frame_timeout=self.config.limits.first_message_timeout,
                        clients=self.clients,
                        hand_over=None if self.handover is None else self.handover.hand_over,
                        five_tuple=five_tuple,
                    )

                tls = listener.transport in ("tls", "auto")
                if tls or listener.proxy_protocol:
                    assert self.tls is not None or not tls
                    acceptor = StreamAcceptor(
                        sock,
                        self.connections,
                        self.config.limits.first_message_timeout,
                        make_stream,
                        tls=self.tls.context if tls and self.tls is not None else None,
                        detect_tls=listener.transport == "auto",
                        trusted=listener.trusted_networks(),
                    )
                    self._closers.append(acceptor.close)
                else:
                    tcp_server = await self.loop.create_server(
                        make_stream, sock=sock, backlog=LISTEN_BACKLOG
                    )
                    self._closers.append(tcp_server.close)
        except OSError as exc:
            sock.close()
            where = format_address((listener.address, port))
            raise StartupError(
                f"cannot listen on {listener.transport} {where}: {_os_reason(exc)}"
            ) from exc
        self.bound.append((listener.transport, listener.address, port))
        if inherited is None:
            log.info("listening on %s %s:%d", listener.transport, listener.address, port)
        else:
            # The supervisor bound it and logged the `listening on` line, once.
            log.debug(
                "serving %s %s:%d on the supervisor's socket (fd %d)",
                listener.transport,
                listener.address,
                port,
                sock.fileno(),
            )

    def open_handover(self, sock: socket.socket) -> None:
        """Take the supervisor's handover channel (one per worker slot): RFC 6062 data
        connections accepted here for another worker's CONNECTION-ID go there, and those
        other workers accepted for ours come here (pyturn/net/handover.py)."""
        self.handover = Handover(
            self.loop, sock, self.server.worker_index, self.config.workers, self._handed_stream
        )
        self._closers.append(self.handover.close)

    def _handed_stream(self, five_tuple: FiveTuple, initial: bytes) -> StreamConnection:
        """The connection for a client's data connection another worker accepted."""
        return StreamConnection(
            self.server,
            self.now,
            self.handle_actions,
            five_tuple[0],
            counter=self.connections,
            first_frame_timeout=self.config.limits.first_message_timeout,
            clients=self.clients,
            five_tuple=five_tuple,
            initial=initial,
        )

    def _load_tls(self, config: Config) -> None:
        """Load (or, on reload, replace) the certificate pair of the TLS listeners."""
        certificate, private_key = config.tls.certificate, config.tls.private_key
        assert certificate is not None and private_key is not None  # the config checks it
        tls = config.tls
        if self.tls is None:
            self.tls = TlsContext(
                certificate, private_key, ciphers=tls.ciphers, min_version=tls.min_version
            )
        else:
            self.tls.configure(tls.ciphers, tls.min_version)
            self.tls.load(certificate, private_key)
        for warning in self.tls.warnings:
            log.warning("%s", warning)

    def mark_ready(self, started: float) -> None:
        """Every listener is bound: say so in /ready, to systemd and in the log."""
        self.state = "serving"
        self.memory.after_startup()
        log.info(
            "ready in %.0f ms: realm=%s relay=%s ports %d-%d",
            (time.perf_counter() - started) * 1000,
            self.config.realm,
            ",".join(ip for choices in self.server.relay_choices.values() for ip in choices),
            self.config.relay.min_port,
            self.config.relay.max_port,
        )
        listening = ", ".join(f"{t} {a}:{p}" for t, a, p in self.bound)
        self.notifier.ready(f"serving on {listening}")

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> str | None:
        """SIGHUP or `pyturn reload`: take the config file again, or keep the running one
        if it is invalid (and say why)."""
        if self.config_path is None:
            log.warning("reload ignored: no config file to reload (embedded default config)")
            return "no config file to reload (embedded default config)"
        new = load_for_reload(self.config_path, self.notifier)
        if isinstance(new, str):
            self.stats.config_reloads["failure"] += 1
            return new
        if self.apply_config(new, source=str(self.config_path)):
            self.notifier.ready(f"config reloaded from {self.config_path}")
            return None
        self.notifier.ready("config reload refused; running on the previous config")
        return "the TLS certificate or key could not be loaded (see the server's log)"

    async def _reload_now(self) -> str | None:
        return self.reload()

    def apply_config(self, new: Config, *, source: str) -> bool:
        """Take a validated config; sockets (listen, relay, metrics, workers) and the store
        stay as they are."""
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
            new,
            listen=old.listen,
            relay=old.relay,
            metrics=old.metrics,
            control=old.control,
            workers=old.workers,
            store=old.store,
        )
        self.config = new
        if self.ops_app is not None:
            self.ops_app.reload_auth(new.metrics.auth)
        for action in self.server.reconfigure(new):
            self._wire(action)
        self.connections.limit = new.limits.connections_per_source
        try:
            use_logging_config(new.logging)
        except OSError as exc:
            log.error("logging: %s; logging goes on as before", exc)
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


def node_name(pid: int) -> str:
    """How the fleet (and `pyturn sessions`) names this node: host and main process."""
    return f"{socket.gethostname()}:{pid}"


class _ThisWorker:
    """The WorkerLink of a single process: the control socket asks this worker."""

    count = 1

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def ask(self, message: Message) -> list[Message]:
        return [self.worker.obey(message)]


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
