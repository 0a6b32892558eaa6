"""grow_buffers: relay and listener sockets get the buffers media bursts need."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyturn.net import relay
from pyturn.net.relay import grow_buffers

SIZE = 1 << 20


def _cap(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


@pytest.mark.parametrize("force_allowed", [True, False], ids=["force", "plain"])
def test_buffers_reach_the_size_or_the_systems_cap(
    monkeypatch: pytest.MonkeyPatch, force_allowed: bool
) -> None:
    monkeypatch.setattr(relay, "_force_allowed", force_allowed)
    forced = force_allowed and os.geteuid() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        grow_buffers(sock, SIZE)
        # Linux doubles the value it is given (bookkeeping overhead) and caps the plain
        # option at net.core.rmem_max / wmem_max.
        rcv = SIZE if forced else min(SIZE, _cap("rmem_max"))
        snd = SIZE if forced else min(SIZE, _cap("wmem_max"))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * rcv
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * snd
