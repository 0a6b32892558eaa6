"""Worker processes: `workers: N` runs N copies of the server on the same ports.

The supervisor binds the listening sockets once, keeps them open for its whole life and
hands them to the workers (see `Supervisor.inherit`). Each UDP listener is N sockets on
one port with SO_REUSEPORT, one per worker slot: the kernel hashes a client's addresses
to one of them, so a client keeps talking to the worker that holds its allocation, and
since the set of sockets never changes, neither does the hash when a worker dies and
its slot's socket passes to the worker restarted in its place. Relay ports, quotas and
the per-source budgets are the node's, counted in a shared region the supervisor
creates (pyturn/net/node_state.py); RFC 6062 data connections reach the worker that
owns their CONNECTION-ID through the supervisor (pyturn/net/handover.py). The
supervisor starts the workers, restarts one that dies, serves /metrics (the sum of the
workers' metrics), /live and /ready, and turns signals into orders:

- SIGHUP: re-read and check the config file, then send it to every worker;
- SIGTERM/SIGINT: tell the workers to drain; a second one tells them to stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pyturn.config import MAX_WORKERS, Config, Listener, config_to_dict
from pyturn.core.sessions import revocations_to_json
from pyturn.logs import use_logging_config
from pyturn.net import batch
from pyturn.net.control import LINE_LIMIT, Message, read_message, write_message
from pyturn.net.errors import StartupError
from pyturn.net.handover import HandoverRelay
from pyturn.net.http import OpsApp, log_ops_endpoint, start_ops_server
from pyturn.net.node_control import NodeControl
from pyturn.net.node_state import NodeLayout, SupervisorRegion
from pyturn.net.sdnotify import SystemdNotifier
from pyturn.net.sockets import listener_sockets
from pyturn.net.worker import install_event_loop_policy, load_for_reload, node_name
from pyturn.web.basic_auth import AuthFileError, BasicAuth
from pyturn.web.status import listener_facts, relay_facts

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
METRICS_TIMEOUT = 2.0
# Control orders (sessions, kick, revocations) wait this long for each worker.
ASK_TIMEOUT = 2.0
RESTART_DELAY = 1.0
# Samples that are one process's value rather than a share of the whole.
# Each worker sees the node's free relay ports: the sum would count them N times.
_TAKE_MIN = ("process_start_time_seconds", "pyturn_relay_ports_available")
_TAKE_MAX = ("pyturn_info", "pyturn_draining", "python_info", "pyturn_bandwidth_limit")


def worker_count(config: Config) -> int:
    """`workers: 0` means one per CPU (up to MAX_WORKERS)."""
    return config.workers or min(os.cpu_count() or 1, MAX_WORKERS)


def worker_config(config: Config, listen: tuple[Listener, ...], count: int) -> Config:
    """What a worker runs: the listeners as bound, and no /metrics of its own. Relay
    ports and quotas are the node's, shared through the node state (node_state.py)."""
    return dataclasses.replace(
        config,
        listen=listen,
        metrics=dataclasses.replace(config.metrics, enabled=False),
        workers=count,
    )


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One Prometheus exposition summing the workers' samples of the same name and labels."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = samples.get(key)
                if old is None:
                    samples[key] = sample.value
                elif sample.name.startswith(_TAKE_MIN):
                    samples[key] = min(old, sample.value)
                elif sample.name.startswith(_TAKE_MAX):
                    samples[key] = max(old, sample.value)
                else:
                    samples[key] = old + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return generate_latest(_Snapshot(list(families.values())))


class _Snapshot(CollectorRegistry):
    def __init__(self, families: list[Metric]) -> None:
        super().__init__(auto_describe=False)
        self.register(_Fixed(families))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


@dataclasses.dataclass(frozen=True)
class Inherited:
    """A descriptor the supervisor holds and hands to workers at every spawn.

    pass_fds gives it the same number in the worker, and the start message's "fds" list
    says what it is: `{"fd": fd, **description}`, where `description` has a "kind" (a
    worker picks its entries with worker_process.inherited) and whatever the worker needs
    to use it. `slot` is the one worker index that gets it; None gives it to every worker.
    """

    fd: int
    description: Message
    slot: int | None = None


@dataclasses.dataclass(eq=False)
class WorkerProcess:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Future[bool]
    # Answers awaited by request id (metrics, control orders).
    replies: dict[int, asyncio.Future[Message]] = dataclasses.field(default_factory=dict)


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.notifier = SystemdNotifier()
        self.loop = asyncio.get_running_loop()
        self.listen: tuple[Listener, ...] = config.listen
        self.workers: dict[int, WorkerProcess] = {}
        self.state = "starting"
        self.restarts = 0
        self._ids = itertools.count()
        self._all_exited = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closers: list[Callable[[], None]] = []
        self.inherited: list[Inherited] = []
        self.node: SupervisorRegion | None = None
        self.secret = secrets.token_bytes(32)
        self.control: NodeControl | None = None
        self.ops_app: OpsApp | None = None

    def _spawn_task(self, coro: Coroutine[object, object, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- start-up --------------------------------------------------------------------------

    def inherit(
        self,
        fd: int,
        description: Message,
        close: Callable[[], None],
        *,
        slot: int | None = None,
    ) -> None:
        """Hand `fd` to every worker spawned from now on (or only to worker `slot`), with
        `description` in its start message; `close` runs when the supervisor stops. The
        descriptor stays open here, so a restarted worker gets the very same one."""
        self.inherited.append(Inherited(fd, {**description, "fd": fd}, slot))
        self._closers.append(close)

    def _open_listeners(self) -> None:
        """Bind every `listen` entry once, before any worker starts.

        UDP: one SO_REUSEPORT socket per worker slot, and slot i always gets socket i, so
        the kernel's hash of a client's 5-tuple picks the same slot for the life of the
        supervisor. TCP and TLS: one listening socket that every worker accepts from. A
        stream client stays on the worker that accepted it, so there is no hash to keep
        stable, and while a worker restarts the others take its share of new connections
        at once, where a socket of its own would queue them until it is back. (Each
        connection wakes every worker, and the first to accept takes it; with a worker
        per core that costs little.)
        """
        resolved: list[Listener] = []
        for position, listener in enumerate(self.config.listen):
            sockets = listener_sockets(listener, self.count)
            resolved.append(dataclasses.replace(listener, port=sockets[0].getsockname()[1]))
            for slot, sock in enumerate(sockets):
                self.inherit(
                    sock.fileno(),
                    {"kind": "listener", "listen": position},
                    sock.close,
                    slot=slot if listener.transport == "udp" else None,
                )
        self.listen = tuple(resolved)
        for listener in self.listen:
            log.info("listening on %s %s:%d", listener.transport, listener.address, listener.port)

    def _open_handover_channels(self) -> None:
        """One channel per worker slot for the RFC 6062 data connections a worker accepts
        for another one's CONNECTION-ID; slot i's end goes to every worker started in
        slot i, and the supervisor relays between them (pyturn/net/handover.py)."""
        relay = HandoverRelay(self.loop, self.count, lambda slot: slot in self.workers)
        for slot, child in enumerate(relay.children):
            self.inherit(child.fileno(), {"kind": "handover"}, lambda: None, slot=slot)
        self._closers.append(relay.close)

    def _open_node_state(self) -> None:
        """The region where the workers count quotas, budgets and relay ports together."""
        relay = self.config.relay
        self.node = SupervisorRegion(NodeLayout(relay.min_port, relay.max_port), self.secret)
        self.inherit(self.node.fd, {"kind": "node"}, self.node.close)

    async def _start_control(self) -> None:
        """The control socket and the fleet's messages: before the workers, which start
        with the node's revocations."""
        self.control = NodeControl(
            self.config,
            self,
            node=node_name(os.getpid()),
            reload=self.reload_and_confirm,
            drain=lambda: self.stop_or_drain("pyturn drain", again=False),
            state=lambda: self.state,
        )
        self._closers.append(self.control.close)
        await self.control.start()

    async def ask(self, message: Message, timeout: float = ASK_TIMEOUT) -> list[Message]:
        """Every ready worker's answer to `message` (an order with an "id"), as far as
        they come within `timeout`."""
        asks = []
        for worker in list(self.workers.values()):
            if not (worker.ready.done() and worker.ready.result()):
                continue
            ident = next(self._ids)
            reply: asyncio.Future[Message] = self.loop.create_future()
            worker.replies[ident] = reply
            write_message(worker.writer, {**message, "id": ident})
            asks.append(reply)
        if not asks:
            return []
        done, pending = await asyncio.wait(asks, timeout=timeout)
        for future in pending:
            future.cancel()
        return [f.result() for f in done if not f.cancelled() and f.exception() is None]

    async def start(self) -> None:
        started = time.perf_counter()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._on_stop_signal, signum)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.notifier.enabled and self.notifier.watchdog_interval is not None:
            self._ping_watchdog(self.notifier.watchdog_interval)
        self._open_listeners()
        self._open_handover_channels()
        self._open_node_state()
        await self._start_control()
        for index in range(self.count):
            if self.state != "starting":
                break  # a stop signal came in while the workers started
            await self._start_worker(index)
        results = await asyncio.wait_for(
            asyncio.gather(*(w.ready for w in self.workers.values())), READY_TIMEOUT
        )
        if self.state != "starting":
            return  # SIGTERM or SIGINT came while the workers were starting
        if not all(results):
            raise StartupError("a worker failed to start (see its log line above)")
        if self.config.metrics.enabled:
            await self._start_ops_endpoint()
            if self.state != "starting":
                # The signal came while the endpoint started: the workers are draining,
                # and "serving" now would take their exits for crashes and restart them.
                return
        self.state = "serving"
        log.info(
            "ready in %.0f ms: %d workers sharing relay ports %d-%d",
            (time.perf_counter() - started) * 1000,
            self.count,
            self.config.relay.min_port,
            self.config.relay.max_port,
        )
        self.notifier.ready(f"serving with {self.count} workers")

    def _ping_watchdog(self, interval: float) -> None:
        # The supervisor is the unit's main process, so it answers systemd's watchdog;
        # a stuck worker is caught by its own death and restart instead.
        self.notifier.watchdog()
        self.loop.call_later(interval, self._ping_watchdog, interval)

    async def _start_worker(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = [item for item in self.inherited if item.slot in (None, index)]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # the working directory stays off sys.path
            "-m",
            "pyturn",
            "worker",
            "--control-fd",
            str(child.fileno()),
            pass_fds=(child.fileno(), *(item.fd for item in inherited)),
            env=env,
        )
        child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=LINE_LIMIT)
        worker = WorkerProcess(index, process, writer, self.loop.create_future())
        self.workers[index] = worker
        config = worker_config(self.config, self.listen, self.count)
        write_message(
            writer,
            {
                "op": "start",
                "index": index,
                "config": config_to_dict(config, redact=False),
                "secret": self.secret.hex(),
                "fds": [item.description for item in inherited],
                "revoked": revocations_to_json(self.control.revoked if self.control else {}),
            },
        )
        if self.state in ("draining", "stopping"):
            # Spawned while a stop signal was being handled: it missed the order.
            write_message(writer, {"op": "drain"})
        self._spawn_task(self._listen_to(worker, reader))
        self._spawn_task(self._watch(worker))

    async def _listen_to(self, worker: WorkerProcess, reader: asyncio.StreamReader) -> None:
        while (message := await read_message(reader)) is not None:
            self._on_message(worker, message)
        if not worker.ready.done():
            worker.ready.set_result(False)

    def _on_message(self, worker: WorkerProcess, message: Message) -> None:
        op = message.get("op")
        if op == "ready" and not worker.ready.done():
            worker.ready.set_result(True)
            log.debug("worker %d ready (pid %s)", worker.index, message.get("pid"))
        elif op == "failed":
            log.error("worker %d failed to start: %s", worker.index, message.get("error"))
            if not worker.ready.done():
                worker.ready.set_result(False)
        elif op in ("metrics", "answer", "reloaded"):
            if op == "reloaded" and not message.get("ok"):
                log.error("worker %d refused the reloaded config", worker.index)
            ident = message.get("id")  # None: a reload by SIGHUP, which no one awaits
            reply = worker.replies.pop(ident, None) if isinstance(ident, int) else None
            if reply is not None and not reply.done():
                reply.set_result(message)

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.process.wait()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        worker.writer.close()
        for reply in worker.replies.values():
            reply.cancel()
        if self.node is not None:
            # Its ports are free again; the living re-add the users they count.
            self.node.forget_worker(worker.index)
            for other in self.workers.values():
                write_message(other.writer, {"op": "resync"})
        if self.state == "serving":
            self.restarts += 1
            log.error(
                "worker %d (pid %d) exited with code %s: restarting it",
                worker.index,
                worker.process.pid,
                code,
            )
            await asyncio.sleep(RESTART_DELAY)
            if self.state == "serving":
                await self._start_worker(worker.index)
            return
        if not self.workers:
            self._all_exited.set()

    # -- operations endpoint ---------------------------------------------------------------

    async def _start_ops_endpoint(self) -> None:
        metrics = self.config.metrics
        try:
            self.ops_app = OpsApp(self, auth=BasicAuth.load(metrics.auth))
        except AuthFileError as exc:
            raise StartupError(str(exc)) from None
        server, address = await start_ops_server(self.ops_app, metrics.address, metrics.port)
        self._closers.append(server.close)
        log_ops_endpoint(address, metrics.auth)

    def readiness(self) -> str | None:
        if self.state != "serving":
            return self.state
        if len(self.workers) < self.count or not all(
            w.ready.done() and w.ready.result() for w in self.workers.values()
        ):
            return "restarting a worker"
        return None

    # -- what the ops endpoint reads (see http.NodeView) -----------------------------------

    async def exposition(self) -> bytes:
        return await self.gather_metrics()

    async def relayed_bytes(self) -> dict[str, int]:
        totals = {"client_to_peer": 0, "peer_to_client": 0}
        for answer in await self.ask({"op": "relayed"}, METRICS_TIMEOUT):
            relayed = answer.get("relayed")
            if isinstance(relayed, dict):
                for direction in totals:
                    totals[direction] += int(relayed.get(direction, 0))
        return totals

    def facts(self) -> dict[str, Any]:
        workers = [
            {
                "index": worker.index,
                "pid": worker.process.pid,
                "ready": worker.ready.done() and worker.ready.result(),
            }
            for worker in sorted(self.workers.values(), key=lambda w: w.index)
        ]
        listeners = [(lst.transport, lst.address, lst.port) for lst in self.listen]
        return {
            "state": self.state,
            "workers": workers,
            "workers_configured": self.count,
            "listeners": listener_facts(listeners),
            "relay": relay_facts(self.config.relay),
        }

    async def test_credential(self, ttl: int, user: str) -> dict[str, Any] | None:
        """Minted by a worker: it holds the secrets in use (config, files and store)."""
        for answer in await self.ask({"op": "credential", "ttl": ttl, "user": user}):
            minted = answer.get("minted")
            if isinstance(minted, dict):
                return minted
        return None

    async def gather_metrics(self) -> bytes:
        answers = await self.ask({"op": "metrics"}, METRICS_TIMEOUT)
        texts = [str(answer.get("text", "")) for answer in answers]
        supervisor = (
            "# HELP pyturn_workers Worker processes running.\n"
            "# TYPE pyturn_workers gauge\n"
            f"pyturn_workers {len(self.workers)}\n"
            "# HELP pyturn_worker_restarts_total Workers restarted after dying.\n"
            "# TYPE pyturn_worker_restarts_total counter\n"
            f"pyturn_worker_restarts_total {self.restarts}\n"
        )
        return merge_expositions([*texts, supervisor])

    # -- signals ---------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: send the workers the config file again, if it is valid."""
        order = self._reload_order()
        if isinstance(order, dict):
            for worker in self.workers.values():
                write_message(worker.writer, order)
            log.info("config reload sent to %d workers", len(self.workers))

    async def reload_and_confirm(self) -> str | None:
        """`pyturn reload`: None once every worker took the config, or why not."""
        order = self._reload_order()
        if not isinstance(order, dict):
            return order
        answers = await self.ask(order)
        refused = sum(not answer.get("ok") for answer in answers)
        silent = self.count - len(answers)
        log.info("config reload taken by %d of %d workers", len(answers) - refused, self.count)
        if refused:
            return f"{refused} workers refused it (a TLS certificate or key; see the log)"
        if silent:
            return f"{silent} workers did not answer (restarting?); they start with it"
        return None

    def _reload_order(self) -> Message | str:
        """The reload order for the workers, or why the running config stays."""
        if self.config_path is None:
            log.warning("reload ignored: no config file to reload (embedded default config)")
            return "no config file to reload (embedded default config)"
        new = load_for_reload(self.config_path, self.notifier)
        if isinstance(new, str):
            return new
        # Sockets, relay ports, the control socket, the worker count and the store need a
        # restart; the rest reloads (the store's contents are followed anyway).
        new = dataclasses.replace(
            new,
            listen=self.config.listen,
            relay=self.config.relay,
            metrics=self.config.metrics,
            control=self.config.control,
            workers=self.config.workers,
            store=self.config.store,
        )
        self.config = new
        if self.ops_app is not None:
            self.ops_app.reload_auth(new.metrics.auth)
        try:
            # The supervisor's own lines: a new level, and a log file reopened (logrotate).
            use_logging_config(new.logging)
        except OSError as exc:
            log.error("logging: %s; logging goes on as before", exc)
        self.notifier.ready(f"config reloaded from {self.config_path}")
        return {
            "op": "reload",
            "config": config_to_dict(worker_config(new, self.listen, self.count), redact=False),
            "source": str(self.config_path),
        }

    def _on_stop_signal(self, signum: int) -> None:
        self.stop_or_drain(signal.Signals(signum).name)

    def stop_or_drain(self, cause: str, *, again: bool = True) -> None:
        """Tell the workers to drain; if they already are, to stop at once (unless not
        `again`: `pyturn drain` twice drains, it does not stop)."""
        if self.state in ("draining", "stopping") and not again:
            return
        order = "stop" if self.state in ("draining", "stopping") else "drain"
        self.state = "draining" if order == "drain" else "stopping"
        log.info("%s: telling %d workers to %s", cause, len(self.workers), order)
        self.notifier.stopping(f"{order} requested by {cause}")
        for worker in self.workers.values():
            write_message(worker.writer, {"op": order})
        if not self.workers:
            self._all_exited.set()

    async def wait(self) -> None:
        await self._all_exited.wait()
        self.close()
        log.info("stopped: every worker has exited")

    def close(self) -> None:
        """Close the endpoint and the descriptors held for the workers."""
        for close in self._closers:
            close()
        self._closers.clear()
        self.notifier.close()


def supervise(config: Config, config_path: Path | None) -> None:
    install_event_loop_policy()
    log.info(batch.describe())
    asyncio.run(_supervise(config, config_path))


async def _supervise(config: Config, config_path: Path | None) -> None:
    supervisor = Supervisor(config, config_path, worker_count(config))
    try:
        await supervisor.start()
    except BaseException:
        for worker in supervisor.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        supervisor.close()
        raise
    await supervisor.wait()
