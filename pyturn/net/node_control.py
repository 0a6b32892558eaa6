"""What the control socket's requests do for the node (`pyturn sessions|kick|revoke|
reload|drain`), whatever the number of workers.

The process that serves the socket (the supervisor, or the only worker) owns this. It
asks the workers through a `WorkerLink` (the supervisor's control channels, or a direct
call), keeps the node's revocations, and with a Redis store takes part in the fleet
(pyturn/store/fleet.py): revocations are then the fleet's, kicks reach every node, and
the node publishes its sessions for `pyturn sessions --fleet`.

Requests (one JSON object each) and what they answer besides "ok":

    {"op": "ping"}                                   node, pid, workers, state
    {"op": "sessions", "match": M, "fleet": bool}    sessions: [rows, see core/sessions.py]
    {"op": "kick", "match": M}                       kicked (here), nodes (told)
    {"op": "revoke", "user": U, "for": seconds|null} until (null: until removed), kicked
    {"op": "unrevoke", "user": U}                    removed (bool)
    {"op": "revocations"}                            revoked: {user: until|null}
    {"op": "reload"} / {"op": "drain"}               message

M is {"user": U, "client": "IP[:PORT]", "relayed": "IP:PORT"}, each optional. The
answers to sessions, kick, revoke and unrevoke also say missing_workers: how many
workers did not answer in time, so that what they hold was not listed or not kicked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from pyturn.config import Config
from pyturn.core.sessions import (
    FOREVER,
    SessionMatch,
    active_revocations,
    revocations_from_json,
    revocations_to_json,
)
from pyturn.net.control_socket import ControlSocket, Message, NoSocketDirectory
from pyturn.net.errors import StartupError
from pyturn.store import StoreError, is_remote

log = logging.getLogger(__name__)

# How often a node of a fleet publishes its sessions (they lapse after SESSIONS_TTL).
PUBLISH_INTERVAL = 5.0
# Revocations are checked by their end time; the list is pruned this often.
PRUNE_INTERVAL = 60.0

T = TypeVar("T")


class WorkerLink(Protocol):
    """The node's workers, as the control socket reaches them."""

    @property
    def count(self) -> int: ...

    async def ask(self, message: Message) -> list[Message]:
        """Every worker's answer to `message` (those that answer in time)."""


class NodeControl:
    def __init__(
        self,
        config: Config,
        workers: WorkerLink,
        *,
        node: str,
        reload: Callable[[], Awaitable[str | None]],
        drain: Callable[[], None],
        state: Callable[[], str],
    ) -> None:
        """`reload` returns None or why the config was refused; `state` says "serving",
        "draining"..."""
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.workers = workers
        self.node = node
        self._reload = reload
        self._drain = drain
        self._state = state
        self.revoked: dict[str, float] = {}
        self.socket: ControlSocket | None = None
        self._state_file: str | None = config.control.state_file
        self._fleet_url = config.store if config.store and is_remote(config.store) else None
        self._fleet: Any = None  # RedisFleet, imported only with a Redis store
        self._listener: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        if self._fleet_url is not None:
            self._start_fleet(self._fleet_url)
        else:
            self.revoked = active_revocations(self._read_state_file(), time.time())
        if self.config.control.enabled:
            socket = ControlSocket(self.config.control.socket, self.handle)
            try:
                await socket.start()
            except NoSocketDirectory as missing:
                log.warning(
                    "no control socket: its directory %s does not exist (systemd's "
                    "RuntimeDirectory makes it; or set control.socket)",
                    missing,
                )
            else:
                self.socket = socket
        self._every(PRUNE_INTERVAL, self._prune)

    def _start_fleet(self, url: str) -> None:
        from pyturn.store.fleet import FleetListener, RedisFleet  # noqa: PLC0415 (redis only)

        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pyturn-fleet")
        try:
            self._fleet = RedisFleet(url, self.node)
        except StoreError as exc:
            raise StartupError(str(exc)) from exc
        try:
            # Before any worker serves: a revoked user must not slip in at start.
            self.revoked = self._fleet.revocations()
        except StoreError as exc:
            log.warning("fleet revocations not read yet (trying again): %s", exc)

        def on_message(message: Message) -> None:
            self.loop.call_soon_threadsafe(lambda: self._spawn(self._on_fleet(message)))

        def on_refresh() -> None:
            self.loop.call_soon_threadsafe(lambda: self._spawn(self._refresh_fleet()))

        self._listener = FleetListener(url, self.node, on_message, on_refresh)
        self._listener.start()
        self._every(PUBLISH_INTERVAL, lambda: self._spawn(self._publish_sessions()))

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._fleet is not None:
            self._fleet.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _every(self, interval: float, run: Callable[[], object]) -> None:
        def tick() -> None:
            run()
            self._timers[index] = self.loop.call_later(interval, tick)

        index = len(self._timers)
        self._timers.append(self.loop.call_later(interval, tick))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _blocking(self, call: Callable[[], T]) -> T:
        """A Redis call, on the fleet thread; StoreError becomes an error answer."""
        assert self._pool is not None
        return await self.loop.run_in_executor(self._pool, call)

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: Message) -> Message:
        op = request["op"]
        if op == "ping":
            return {
                "ok": True,
                "node": self.node,
                "pid": os.getpid(),
                "workers": self.workers.count,
                "state": self._state(),
            }
        if op == "sessions":
            return await self._sessions(request)
        if op == "kick":
            return await self._kick(request)
        if op == "revoke":
            return await self._revoke(request)
        if op == "unrevoke":
            return await self._unrevoke(request)
        if op == "revocations":
            return {"ok": True, "revoked": revocations_to_json(self._active())}
        if op == "reload":
            problem = await self._reload()
            if problem is not None:
                return {
                    "ok": False,
                    "error": f"config refused, still running the old one: {problem}",
                }
            return {"ok": True, "message": "config reloaded"}
        if op == "drain":
            self._drain()
            return {"ok": True, "message": "draining: new allocations refused"}
        raise ValueError(f"unknown op {op!r}")

    async def _sessions(self, request: Message) -> Message:
        match = SessionMatch.of_request(request)
        if request.get("fleet"):
            if self._fleet is None:
                raise ValueError("--fleet needs a Redis store (store: redis://...)")
            try:
                rows = await self._blocking(self._fleet.fleet_sessions)
            except StoreError as exc:
                return {"ok": False, "error": str(exc)}
            mine, missing = await self._local_sessions(match)
            rows = [row for row in rows if row.get("node") != self.node]
            rows = [*({**row, "node": self.node} for row in mine), *rows]
            rows = [row for row in rows if _row_matches(row, match)]
        else:
            rows, missing = await self._local_sessions(match)
        return {"ok": True, "sessions": rows, "missing_workers": missing}

    async def _ask(self, order: Message) -> tuple[list[Message], int]:
        """The workers' answers to `order`, and how many workers gave none (restarting,
        or too busy to answer in time): what they hold is not in the answers."""
        answers = [a for a in await self.workers.ask(order) if "error" not in a]
        return answers, max(self.workers.count - len(answers), 0)

    async def _local_sessions(self, match: SessionMatch) -> tuple[list[dict[str, Any]], int]:
        answers, missing = await self._ask({"op": "sessions", "match": match.to_dict()})
        rows = [row for answer in answers for row in answer.get("sessions", ())]
        # Oldest first within each user.
        rows.sort(key=lambda row: (row["user"], -row["age"]))
        return rows, missing

    async def _kick(self, request: Message) -> Message:
        match = SessionMatch.of_request(request)
        if match.empty:
            raise ValueError("kick needs --user, --client or --relayed")
        kicked, missing = await self._kick_here(match)
        nodes = 0
        if self._fleet is not None:
            try:
                nodes = await self._blocking(lambda: self._fleet.kick(match.to_dict()))
            except StoreError as exc:
                return {"ok": False, "error": f"kicked {kicked} here, but {exc}"}
        log.info("control: kicked %d allocations (%s)", kicked, _describe(match))
        return {"ok": True, "kicked": kicked, "nodes": nodes, "missing_workers": missing}

    async def _kick_here(self, match: SessionMatch) -> tuple[int, int]:
        answers, missing = await self._ask({"op": "kick", "match": match.to_dict()})
        return sum(int(answer.get("kicked", 0)) for answer in answers), missing

    async def _revoke(self, request: Message) -> Message:
        user = request.get("user")
        if not isinstance(user, str):
            raise ValueError("revoke needs a user")
        SessionMatch.parse(user=user)  # the same rule for the name
        seconds = request.get("for")
        if seconds is not None and (
            type(seconds) not in (int, float) or not 0 < seconds < 100 * 365 * 86400
        ):
            raise ValueError('"for" must be a number of seconds (or null: until removed)')
        until = FOREVER if seconds is None else time.time() + float(seconds)
        if self._fleet is not None:
            try:
                await self._blocking(lambda: self._fleet.revoke(user, until))
            except StoreError as exc:
                return {"ok": False, "error": f"not revoked: {exc}"}
            self.revoked = await self._blocking(self._fleet.revocations)
        else:
            self.revoked[user] = until
            self._write_state_file()
        kicked, missing = await self._apply()
        log.info(
            "control: revoked %s %s; %d allocations ended",
            user,
            "until removed" if until == FOREVER else f"for {seconds} s",
            kicked,
        )
        return {
            "ok": True,
            "user": user,
            "until": None if until == FOREVER else until,
            "kicked": kicked,
            "missing_workers": missing,
        }

    async def _unrevoke(self, request: Message) -> Message:
        user = request.get("user")
        if not isinstance(user, str):
            raise ValueError("unrevoke needs a user")
        if self._fleet is not None:
            try:
                removed = await self._blocking(lambda: self._fleet.unrevoke([user])) > 0
                self.revoked = await self._blocking(self._fleet.revocations)
            except StoreError as exc:
                return {"ok": False, "error": str(exc)}
        else:
            removed = self.revoked.pop(user, None) is not None
            self._write_state_file()
        _, missing = await self._apply()
        log.info("control: revocation of %s %s", user, "removed" if removed else "not found")
        return {"ok": True, "user": user, "removed": removed, "missing_workers": missing}

    def _active(self) -> dict[str, float]:
        return active_revocations(self.revoked, time.time())

    async def _apply(self) -> tuple[int, int]:
        """Send the revocations to every worker: how many allocations they ended, and how
        many workers did not answer (a restarting one gets them when it starts)."""
        revoked = revocations_to_json(self._active())
        answers, missing = await self._ask({"op": "revocations", "revoked": revoked})
        return sum(int(answer.get("kicked", 0)) for answer in answers), missing

    def _prune(self) -> None:
        active = self._active()
        if len(active) == len(self.revoked):
            return
        self.revoked = active
        if self._fleet is not None:
            self._spawn(self._forget_ended())
        else:
            self._write_state_file()

    async def _forget_ended(self) -> None:
        now = time.time()
        try:
            await self._blocking(lambda: self._fleet.forget_ended(now))
        except StoreError as exc:
            log.debug("ended revocations not removed from the store: %s", exc)

    # -- the fleet ---------------------------------------------------------------------------

    async def _on_fleet(self, message: Message) -> None:
        """Another node's kick or revocation: act on this node's allocations."""
        op = message.get("op")
        if op == "kick":
            try:
                match = SessionMatch.from_dict(message.get("match") or {})
            except ValueError:
                return
            if not match.empty:
                kicked, _ = await self._kick_here(match)
                log.info(
                    "fleet: node %s kicked %s; %d allocations ended here",
                    message.get("origin"),
                    _describe(match),
                    kicked,
                )
        elif op == "revoked":
            await self._refresh_fleet()

    async def _refresh_fleet(self) -> None:
        try:
            revoked = await self._blocking(self._fleet.revocations)
        except StoreError as exc:
            log.warning("fleet revocations not read: %s", exc)
            return
        if revoked != self.revoked:
            self.revoked = revoked
            kicked, _ = await self._apply()
            if kicked:
                log.info("fleet: revocations ended %d allocations here", kicked)

    async def _publish_sessions(self) -> None:
        rows, _ = await self._local_sessions(SessionMatch())
        try:
            await self._blocking(lambda: self._fleet.publish_sessions(rows))
        except StoreError as exc:
            log.debug("sessions not published: %s", exc)

    # -- the state file ----------------------------------------------------------------------

    def _read_state_file(self) -> dict[str, float]:
        path = self._state_file
        if path is None:
            return {}
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return revocations_from_json(data.get("revoked", {}))
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(path)):
                log.warning(
                    "revocations will not outlive a restart: the directory of "
                    "control.state_file %s does not exist (systemd's StateDirectory makes it)",
                    path,
                )
                self._state_file = None
            return {}
        except (OSError, ValueError) as exc:
            # Starting without them would let revoked users back in.
            raise StartupError(f"control.state_file {path}: {exc}") from exc

    def _write_state_file(self) -> None:
        path = self._state_file
        if path is None:
            return
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            # User names are nobody else's business: 0600, whatever the umask.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(descriptor, "w", encoding="utf-8") as file:
                json.dump({"revoked": revocations_to_json(self.revoked)}, file)
            os.replace(temporary, path)
        except OSError as exc:
            log.error("control.state_file %s not written: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _row_matches(row: dict[str, Any], match: SessionMatch) -> bool:
    """A published row (from another node) against `match`."""
    if match.user is not None and match.user not in (row.get("user"), row.get("quota_user")):
        return False
    if match.client_ip is not None:
        client = str(row.get("client", ""))
        host, _, port = client.rpartition(":")
        if host.strip("[]") != match.client_ip:
            return False
        if match.client_port is not None and port != str(match.client_port):
            return False
    if match.relayed is not None:
        wanted = match.to_dict()["relayed"]
        return wanted in row.get("relayed", ())
    return True


def _describe(match: SessionMatch) -> str:
    return " ".join(f"{key}={value}" for key, value in match.to_dict().items())
