"""Keeps a worker's users and REST secrets in step with the store (`store:`, pyturn/store).

Every store call runs on one thread of its own (a SQLite connection belongs to the thread
that made it), never on the event loop: the loop only hands the server a new snapshot.
Twice a second the thread asks the store's version, and reads a snapshot when it moved,
so a `pyturn user add` reaches every worker within about half a second. The Allocate
path never waits on the store: the server authenticates from the snapshot it holds.
The same poll shares this worker's holdings with the other nodes of a fleet, and takes
theirs for the quotas (`NodeState.fleet`; a store of one node shares nothing).

If the store cannot be read, the worker keeps the last snapshot, says so once in the log
and in `pyturn_store_up`, and tries again, every 0.5 s, 1 s, then 2 s; meanwhile its
quotas count this node only. At start, a SQLite file that
cannot be read stops the worker (a wrong path is a mistake to fix now); a Redis server
that does not answer does not: the worker starts with the config's users, says so, and
takes the store's as soon as it answers (a node of a fleet should not stay down because
Redis restarts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from pyturn.core.node import NO_FLEET, FleetCounts
from pyturn.core.server import TurnServer
from pyturn.store import Snapshot, Store, StoreError, is_remote, open_store

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
# While the store does not answer, polls come farther apart, doubling up to this (s).
MAX_BACKOFF = 2.0


class StoreFollower:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        server: TurnServer,
        url: str,
        *,
        node: str,
        worker: int,
    ) -> None:
        """`node` names this node in the fleet (the same for all its workers, different
        from every other node's), `worker` this worker in it."""
        self.loop = loop
        self.server = server
        self.url = url
        self.node = node
        self.worker = worker
        self.up = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pyturn-store")
        self._store: Store | None = None
        self._version: int | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._failures = 0

    async def start(self) -> None:
        """Open the store and take its users; a StoreError if that fails, unless the
        store is a server that may come back (see the module docstring)."""
        try:
            snapshot = await self.loop.run_in_executor(self._thread, self._open)
        except StoreError as exc:
            if not is_remote(self.url):
                raise
            log.warning("store unreachable, serving the config's users until it answers: %s", exc)
        else:
            self._take(snapshot)
        self._schedule()

    def _open(self) -> Snapshot:
        self._store = open_store(self.url)
        self._version = self._store.version()
        return self._store.snapshot(self.server.config.realm)

    def _take(self, snapshot: Snapshot) -> None:
        self.server.use_stored(snapshot.users, snapshot.secrets)
        if not self.up:
            log.info(
                "store %s: %d users, %d secrets",
                self.url,
                len(snapshot.users),
                len(snapshot.secrets),
            )
        self.up = True

    def _schedule(self) -> None:
        delay = min(POLL_INTERVAL * 2**self._failures, MAX_BACKOFF)
        self._poll = self.loop.call_later(delay, self._on_poll)

    def _on_poll(self) -> None:
        # The next poll is scheduled when this one is done (_polled): one at a time.
        # Copied here: the loop thread changes it.
        held = dict(self.server.node.held_here)
        future = self.loop.run_in_executor(self._thread, self._changed, held)
        future.add_done_callback(self._polled)

    def _changed(self, held: dict[str, int]) -> tuple[Snapshot | None, FleetCounts]:
        """On the store's thread: a new snapshot if the store changed (else None), and
        the rest of the fleet's holdings."""
        if self._store is None:
            snapshot: Snapshot | None = self._open()  # it did not answer at start
        else:
            version = self._store.version()
            snapshot = None
            if version != self._version:
                snapshot = self._store.snapshot(self.server.config.realm)
                self._version = version
        assert self._store is not None
        return snapshot, self._store.share_holdings(self.node, self.worker, held)

    def _polled(self, future: asyncio.Future[tuple[Snapshot | None, FleetCounts]]) -> None:
        try:
            snapshot, fleet = future.result()
        except StoreError as exc:
            if self.up:
                log.warning(
                    "store unreadable, keeping the users and secrets it had; quotas count"
                    " this node only: %s",
                    exc,
                )
            self.up = False
            self.server.node.fleet = NO_FLEET
            self._failures = min(self._failures + 1, 8)
        except asyncio.CancelledError:
            return
        else:
            self._failures = 0
            self.server.node.fleet = fleet
            if snapshot is not None:
                self._take(snapshot)
            elif not self.up:
                log.info("store %s readable again", self.url)
                self.up = True
        self._schedule()

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        store = self._store

        def close_store() -> None:
            if store is not None:
                store.close()

        self._thread.submit(close_store)
        self._thread.shutdown(wait=False)
