"""STUN error responses as exceptions: a handler raises one, `TurnServer` answers it.

Each class carries the RFC's code and reason phrase, so one place builds every error
response (pyturn.core.server._error_response).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyturn.wire.attributes import Attribute


class StunErrorResponse(Exception):
    code: int = 500
    reason: str = "Server Error"
    # 401 and 438 go out unsigned: the client has not yet proved it holds the key.
    signed: bool = True

    def __init__(self, detail: str = "", attributes: Sequence[Attribute] = ()) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail
        self.attributes = tuple(attributes)


class TryAlternate(StunErrorResponse):
    code, reason = 300, "Try Alternate"


class BadRequest(StunErrorResponse):
    code, reason = 400, "Bad Request"


class Unauthorized(StunErrorResponse):
    code, reason, signed = 401, "Unauthorized", False


class Forbidden(StunErrorResponse):
    code, reason = 403, "Forbidden"


class UnknownAttributesError(StunErrorResponse):
    code, reason = 420, "Unknown Attribute"


class AllocationMismatch(StunErrorResponse):
    code, reason = 437, "Allocation Mismatch"


class StaleNonce(StunErrorResponse):
    code, reason, signed = 438, "Stale Nonce", False


class AddressFamilyNotSupported(StunErrorResponse):
    code, reason = 440, "Address Family not Supported"


class WrongCredentials(StunErrorResponse):
    code, reason = 441, "Wrong Credentials"


class UnsupportedTransport(StunErrorResponse):
    code, reason = 442, "Unsupported Transport Protocol"


class PeerAddressFamilyMismatch(StunErrorResponse):
    code, reason = 443, "Peer Address Family Mismatch"


class ConnectionAlreadyExists(StunErrorResponse):
    code, reason = 446, "Connection Already Exists"


class ConnectionTimeoutOrFailure(StunErrorResponse):
    code, reason = 447, "Connection Timeout or Failure"


class AllocationQuotaReached(StunErrorResponse):
    code, reason = 486, "Allocation Quota Reached"


class ServerError(StunErrorResponse):
    code, reason = 500, "Server Error"


class InsufficientCapacity(StunErrorResponse):
    code, reason = 508, "Insufficient Capacity"
