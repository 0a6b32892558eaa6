"""A small sd_notify(3) client: tell systemd we are ready, reloading, stopping or alive.

systemd passes the address of its notification socket in `$NOTIFY_SOCKET`: a path, or an
abstract socket name written with a leading `@`. Each message is one AF_UNIX datagram of
newline-separated `KEY=value` lines. With `Type=notify` and `WatchdogSec=`, systemd also
sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`); we send `WATCHDOG=1` at half that interval
from the event loop, so a wedged loop stops the pings and systemd restarts the service.
Outside systemd nothing is set and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str | None) -> str | None:
    """The AF_UNIX address for `$NOTIFY_SOCKET`, or None when unset or unsupported."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: addresses, which only VMs receive


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None when off."""
    usec = environ.get("WATCHDOG_USEC", "")
    target = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if target and (not target.isdigit() or int(target) != pid):
        return None  # the watchdog is meant for another process of the unit
    return int(usec) / 2_000_000


class SystemdNotifier:
    """Sends sd_notify messages; every method is a cheap no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(env, os.getpid())
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=value` lines as one datagram; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise log every ping
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(*_status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> tuple[str, ...]:
    return (f"STATUS={text}",) if text else ()
