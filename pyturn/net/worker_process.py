"""A worker process's side of the supervisor's control channel (`workers: N`).

The supervisor owns the config file, the signals of the terminal and systemd, /metrics
and the listening sockets; each worker process gets its config, the descriptors it
inherits (its listening sockets, its RFC 6062 handover channel, the node state) and its
orders (metrics, reload, drain, resync, stop, and the control socket's sessions, kick
and revocations) over one Unix socket, and answers there.
The supervisor's side is pyturn.net.supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

from pyturn.config import parse_config
from pyturn.logs import use_logging_config
from pyturn.metrics import relayed_totals, render
from pyturn.net.control import LINE_LIMIT, Message, read_message, write_message
from pyturn.net.errors import StartupError
from pyturn.net.node_state import NodeLayout, SharedNodeState
from pyturn.net.sdnotify import SystemdNotifier
from pyturn.net.worker import Worker, install_event_loop_policy

# The worker's logger: these lines have always carried its name, and log filters match it.
log = logging.getLogger("pyturn.net.worker")


def inherited(start: Message, kind: str) -> list[Message]:
    """The descriptors of `kind` the supervisor handed over (see Supervisor.inherit):
    each entry has "fd", its number in this process, "kind" and what else describes it."""
    return [entry for entry in start.get("fds", ()) if entry.get("kind") == kind]


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
    use_logging_config(config.logging)
    # Workers share the nonce and reservation-token secret: a client's next 5-tuple
    # may hash to another worker.
    secret = bytes.fromhex(first["secret"])
    sockets = {}
    for entry in inherited(first, "listener"):
        sock = socket.socket(fileno=int(entry["fd"]))
        sock.setblocking(False)
        sockets[int(entry["listen"])] = sock
    node = None
    for entry in inherited(first, "node"):
        relay, limits = config.relay, config.limits
        node = SharedNodeState(
            int(entry["fd"]),
            NodeLayout(relay.min_port, relay.max_port),
            secret,
            index=int(first["index"]),
            burst=limits.unauthenticated_burst,
            rate=limits.unauthenticated_rate,
        )
    worker = Worker(
        config,
        node=node,
        notifier=SystemdNotifier({}),
        secret=secret,
        sockets=sockets,
        worker_index=int(first["index"]),
        supervised=True,
    )
    # Before the first client: the node's revoked users stay out of a restarted worker.
    worker.obey({"op": "revocations", "revoked": first.get("revoked", {})})
    for entry in inherited(first, "handover"):
        worker.open_handover(socket.socket(fileno=int(entry["fd"])))
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
        elif op == "relayed":
            totals = relayed_totals(worker.server, worker.stats)
            write_message(writer, {"op": "answer", "id": message.get("id"), "relayed": totals})
        elif op == "reload":
            new = parse_config(message["config"], source="supervisor")
            ok = worker.apply_config(new, source=str(message.get("source", "supervisor")))
            write_message(writer, {"op": "reloaded", "ok": ok, "id": message.get("id")})
        elif op == "drain":
            if worker.state == "serving":
                worker.drain("supervisor")
        elif op in ("sessions", "kick", "revocations", "credential"):
            try:
                answer = worker.obey(message)
            except ValueError as exc:
                answer = {"error": str(exc)}
            write_message(writer, {**answer, "op": "answer", "id": message.get("id")})
        elif op == "resync" and isinstance(worker.server.node, SharedNodeState):
            worker.server.node.sync()
        elif op == "stop":
            worker.stop()
    # The supervisor is gone: nobody can stop or reload this process any more.
    log.error("supervisor gone: stopping")
    worker.stop()


def run_worker(control_fd: int) -> None:
    install_event_loop_policy()
    asyncio.run(serve_as_worker(control_fd))
