"""The control channel between the supervisor and its worker processes.

One AF_UNIX stream socket per worker (a socketpair made before the worker starts),
carrying one JSON object per line. The supervisor sends the worker its config (secrets
included, which is why they do not travel on the command line), asks for metrics and
tells it to reload, drain or stop; the worker says when it is ready.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

Message = dict[str, Any]

# A metrics exposition of a worker with thousands of allocations is tens of KB.
LINE_LIMIT = 16 * 1024 * 1024


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the other side has gone."""
    try:
        line = await reader.readline()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        return None
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("control message is not an object")
    return message


def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
