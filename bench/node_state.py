#!/usr/bin/env python3
"""What the node-wide checks cost an Allocate: the core with in-process counts (`workers:
1`) against the shared region of `workers: N` (pyturn/net/node_state.py).

Each cycle is what a client's session costs the core: the Allocate without credentials
(401, which spends a token of the source's budget), the signed Allocate (quota check and
count, a relay port), and Refresh 0 (release, port back). The relay "sockets" are plain
objects, so only the core and the node state are timed. Prints microseconds per cycle,
the median of several rounds, for each, and the difference.

    .venv/bin/python bench/node_state.py [--cycles 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyturn.core.node import LocalNodeState, NodeState
from pyturn.core.server import TurnServer
from pyturn.net.node_state import NodeLayout, SharedNodeState, SupervisorRegion
from tests.core.turn_client import FakeBinder, TurnTestClient, make_config

MIN_PORT, MAX_PORT = 49152, 65535


def per_cycle(node: NodeState, cycles: int) -> float:
    config = make_config(
        {
            "relay": {"min_port": MIN_PORT, "max_port": MAX_PORT},
            "limits": {"unauthenticated_burst": 10**9},
        }
    )
    server = TurnServer(config, FakeBinder(), relay_ipv4="192.0.2.1", node=node)
    clients = [
        TurnTestClient(server, client=("203.0.113.5", 1024 + i % 60000)) for i in range(cycles)
    ]
    started = time.perf_counter()
    for client in clients:
        client.nonce = None  # a fresh session: 401 first, as a browser's
        assert client.allocate().code == 0
        assert client.refresh(0).code == 0
    return (time.perf_counter() - started) / cycles * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    layout = NodeLayout(MIN_PORT, MAX_PORT)
    region = SupervisorRegion(layout, b"bench-secret")
    local: list[float] = []
    shared: list[float] = []
    for _ in range(args.rounds):  # alternating, so drift hits both alike
        local.append(per_cycle(LocalNodeState(), args.cycles))
        node = SharedNodeState(region.fd, layout, b"bench-secret", index=0, burst=32, rate=8.0)
        shared.append(per_cycle(node, args.cycles))
        node.close()
    region.close()
    lo, sh = statistics.median(local), statistics.median(shared)
    print(f"session cycle (401, Allocate, Refresh 0), median of {args.rounds} x {args.cycles}:")
    for name, runs, median in (
        ("in-process counts (workers: 1)", local, lo),
        ("shared node state (workers: N)", shared, sh),
    ):
        print(f"  {name}: {median:8.1f} us  (runs {min(runs):.1f}-{max(runs):.1f})")
    print(f"  node-wide checks cost: {sh - lo:.1f} us per cycle ({(sh / lo - 1) * 100:+.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
