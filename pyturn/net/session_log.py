"""The session log: a line per allocation created, refreshed or deleted, and per refusal.

These are the lines operators read and fail2ban matches, so their wording and fields
are kept in one place, apart from what the worker does with the same core events
(count them for the metrics, stop once drained, give memory back). Refusals are
throttled: a client can cause as many as it likes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyturn.core.allocation import Allocation
from pyturn.core.auth import AuthFailure
from pyturn.core.bandwidth import TO_CLIENT, TO_PEER, dropped
from pyturn.core.server import (
    AllocationCreated,
    AllocationDeleted,
    AllocationRefreshed,
    AuthFailed,
    Event,
    PeerDenied,
    QuotaRejected,
)
from pyturn.logs import FieldValue, LogThrottle, format_address, log_event

# Auth failures that are part of the normal flow (the first challenge, an expired nonce)
# are logged at DEBUG; the others at INFO, for fail2ban.
_ROUTINE_AUTH = (AuthFailure.NO_CREDENTIALS, AuthFailure.STALE_NONCE)


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
    counters = allocation.counters
    return {
        "bytes_to_peer": allocation.bytes_to_peer,
        "packets_to_peer": allocation.packets_to_peer,
        "bytes_to_client": allocation.bytes_to_client,
        "packets_to_client": allocation.packets_to_client,
        # Over the bandwidth limits, whichever refused them (pyturn/core/bandwidth.py).
        "dropped_to_peer": dropped(counters, TO_PEER),
        "dropped_to_client": dropped(counters, TO_CLIENT),
    }


class SessionLog:
    """Writes the log line of a core event, if it has one, to `logger`.

    The logger is the worker's: the lines carry its name (`pyturn.net.worker`), which
    log filters match on.
    """

    def __init__(self, logger: logging.Logger, now: Callable[[], float]) -> None:
        self.logger = logger
        self.now = now
        self.throttle = LogThrottle(logger)

    def write(self, event: Event) -> None:
        if type(event) is AllocationCreated:
            allocation = event.allocation
            lifetime = round(allocation.expires_at - allocation.created_at)
            log_event(
                self.logger,
                logging.INFO,
                "allocation_created",
                {**_session(allocation), "lifetime": lifetime},
            )
        elif type(event) is AllocationDeleted:
            a = event.allocation
            log_event(
                self.logger,
                logging.INFO,
                "allocation_deleted",
                {
                    **_session(a),
                    "reason": event.reason.replace(" ", "_"),
                    "duration": event.now - a.created_at,
                    **_traffic(a),
                },
            )
        elif type(event) is AllocationRefreshed:
            a = event.allocation
            duration = a.expires_at - event.lifetime - a.created_at
            log_event(
                self.logger,
                logging.INFO,
                "allocation_refreshed",
                {**_session(a), "lifetime": event.lifetime, "duration": duration, **_traffic(a)},
            )
        elif isinstance(event, AuthFailed | PeerDenied | QuotaRejected):
            self._refusal(event)

    def flush(self, now: float) -> None:
        """Log what the throttle held back; at least once a second (the worker's timer)."""
        self.throttle.flush(now)

    def _refusal(self, event: AuthFailed | PeerDenied | QuotaRejected) -> None:
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
        if not self.logger.isEnabledFor(level):
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
        log_event(self.logger, level, name, fields)
