"""Giving memory back once a wave of allocations has ended.

A Python process keeps what it once needed: dicts sized for the peak, caches of gone
clients' addresses, the interpreter's free lists, heap pages glibc does not return by
itself. Left alone, a server that once held many allocations would stay that large.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

from pyturn.core.server import TurnServer
from pyturn.logs import forget_plain_values
from pyturn.net import batch
from pyturn.net.stream import ConnectionCounter

# Memory is handed back once at least this many allocations (and at least as many as are
# still running) have ended, or this many TCP/TLS connections have closed: the work is
# O(running allocations), so it stays amortised.
_COMPACT_AFTER = 256
# A full collection walks what was made since start-up: only with few allocations left.
_COLLECT_BELOW = 256


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        import ctypes  # noqa: PLC0415 (only once memory is to be given back)

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class MemoryReturner:
    """Hands back what ended allocations left behind in `server`, and in this process."""

    def __init__(
        self,
        server: TurnServer,
        now: Callable[[], float],
        connections: ConnectionCounter | None = None,
    ) -> None:
        self.server = server
        self.now = now
        self.connections = connections
        # Most allocations at once since memory was last handed back (return_memory).
        self.peak_allocations = 0
        # connections.closed when memory was last handed back.
        self._closed_mark = 0

    def after_startup(self) -> None:
        """Once start-up is over, before the first client."""
        _malloc_trim()  # loads ctypes now: made during a wave of allocations, it would pin
        # What start-up made (modules, config, sockets) lives as long as the process:
        # kept out of the collector's sight, a full collection under allocation churn
        # scans only what serving made, not every object the process ever loaded. Before
        # the first client, so that no allocation is ever frozen with it.
        gc.freeze()

    def saw_running(self, running: int) -> None:
        """An allocation was created and `running` are now running."""
        self.peak_allocations = max(self.peak_allocations, running)

    def return_memory(self) -> None:
        """Once many allocations have ended, drop what they left behind; once the running
        allocations, or the open TCP/TLS connections, fell to half their peak, also give
        the freed heap pages back to the OS. A few ms at most, from the timer or when the
        last allocation ends, never per packet.
        """
        wave_ended = self._compact()
        if wave_ended or self._connections_closed():
            self._give_back()

    def _compact(self) -> bool:
        """Compaction after many ended allocations; True at the end of a wave of them."""
        server = self.server
        ended = server.ended_since_compact
        if ended < _COMPACT_AFTER or ended < len(server.allocations):
            return False
        server.compact(self.now())
        batch.forget_addresses()  # caches: a miss only formats the address again
        forget_plain_values()
        # Below half the peak, a wave has ended; above, it is churn: what was freed is
        # about to be used again, and a full collection and a trim every few hundred
        # allocations would cost more than the compaction itself.
        return len(server.allocations) * 2 <= self.peak_allocations

    def _connections_closed(self) -> bool:
        """A TCP or TLS client closes its connection after its allocation has ended (its
        Refresh(0) comes first), and each connection held buffers and, over TLS,
        OpenSSL's state: a wave of closed connections is handed back too."""
        counter = self.connections
        if counter is None:
            return False
        closed = counter.closed - self._closed_mark
        return closed >= _COMPACT_AFTER and counter.total * 2 <= counter.peak

    def _give_back(self) -> None:
        running = len(self.server.allocations)
        self.peak_allocations = running
        if self.connections is not None:
            self._closed_mark = self.connections.closed
            self.connections.peak = self.connections.total
        if running <= _COLLECT_BELOW:
            # A full collection also empties the interpreter's free lists (thousands of
            # tuples of gone clients); it walks every object made since start-up (the
            # rest is frozen by after_startup), so it runs only when few allocations are
            # left.
            gc.collect()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
