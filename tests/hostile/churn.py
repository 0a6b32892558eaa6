"""Allocation churn with relaying clients, and the gauges of a soak run.

Several clients at once, over UDP and TCP, each in a loop: allocate, create a
permission, bind a channel, relay through a loopback echo peer (ChannelData and Send
indications, both ways), refresh, delete, start again. Meanwhile the server's open file
descriptors and VmRSS are sampled. At the end, once every allocation is deleted, both
must be back at their baseline (taken after a warm-up round) within a tolerance.

Used by `tools/soak.py` (minutes) and `tests/hostile/test_soak.py` (seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.hostile.client import EchoPeer, TurnClient, code_of, open_fds, rss_kib
from tests.interop.server_process import ServerProcess

MESSAGES_PER_CYCLE = 10


@dataclass
class Sample:
    at: float
    fds: int
    rss_kib: int
    cycles: int


@dataclass
class SoakReport:
    seconds: float = 0.0
    clients: int = 0
    cycles: int = 0
    relayed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    baseline_fds: int = 0
    baseline_rss_kib: int = 0
    peak_fds: int = 0
    peak_rss_kib: int = 0
    final_fds: int = 0
    final_rss_kib: int = 0
    samples: list[Sample] = field(default_factory=list)

    @property
    def fd_delta(self) -> int:
        return self.final_fds - self.baseline_fds

    @property
    def rss_delta_kib(self) -> int:
        return self.final_rss_kib - self.baseline_rss_kib

    def lines(self) -> list[str]:
        rate = self.cycles / self.seconds if self.seconds else 0.0
        return [
            f"churn: {self.seconds:.0f} s, {self.clients} clients, {self.cycles} allocation "
            f"cycles ({rate:.1f}/s), {self.relayed} datagrams relayed and echoed",
            f"failures: {dict(self.failures) or 'none'}",
            f"fds: baseline {self.baseline_fds}, peak {self.peak_fds}, final {self.final_fds} "
            f"({self.fd_delta:+d})",
            f"VmRSS: baseline {self.baseline_rss_kib} KiB, peak {self.peak_rss_kib} KiB, "
            f"final {self.final_rss_kib} KiB ({self.rss_delta_kib:+d} KiB)",
        ]


async def one_cycle(
    server: ServerProcess, echo: EchoPeer, index: int, cycle: int, report: SoakReport
) -> None:
    """One client's life: allocate, permission, channel, relay, refresh, delete."""
    transport = "tcp" if (index + cycle) % 3 == 0 else "udp"
    address = server.tcp_address if transport == "tcp" else server.udp_address
    # A new source IP for each session, from 127.0.0.10-209: each session starts with a
    # 401, and 401s are budgeted per IP (limits.unauthenticated_rate, 8/s by default),
    # which many sessions a second from one address would exceed.
    source = f"127.0.0.{10 + (index * 37 + cycle) % 200}"
    client = await TurnClient.open(address, transport=transport, local_ip=source)
    try:
        code = code_of(await client.allocate(lifetime=600))
        if code != 0:
            report.failures[f"allocate ({code or 'no answer'}, {transport})"] += 1
            return
        channel = 0x4000 + (index % 0x100)
        if code_of(await client.create_permission(echo.address)) != 0:
            report.failures["permission"] += 1
        if code_of(await client.channel_bind(channel, echo.address)) != 0:
            report.failures["channel"] += 1
        for n in range(MESSAGES_PER_CYCLE):
            payload = b"%d/%d/%d" % (index, cycle, n)
            if n % 2:
                client.send_indication(echo.address, payload)
            else:
                client.channel_data(channel, payload)
            got = await client.receive(2.0)
            if got is None or got[1] != payload:
                report.failures["relay"] += 1
            else:
                report.relayed += 1
        if code_of(await client.refresh(600)) != 0:
            report.failures["refresh"] += 1
        if code_of(await client.refresh(0)) != 0:
            report.failures["delete"] += 1
        report.cycles += 1
    finally:
        client.close()


async def churn(
    server: ServerProcess,
    echo: EchoPeer,
    *,
    clients: int,
    seconds: float,
    report: SoakReport,
    max_cycles: int | None = None,
) -> None:
    """Churn until `seconds` pass or `max_cycles` cycles are done, whichever is first."""
    deadline = time.monotonic() + seconds

    def more() -> bool:
        return time.monotonic() < deadline and (max_cycles is None or report.cycles < max_cycles)

    async def worker(index: int) -> None:
        cycle = 0
        while more():
            try:
                await one_cycle(server, echo, index, cycle, report)
            except (OSError, AssertionError, TimeoutError) as exc:
                report.failures[type(exc).__name__] += 1
            cycle += 1

    await asyncio.gather(*(worker(i) for i in range(clients)))


async def sample_until(
    pid: int,
    report: SoakReport,
    stop: asyncio.Event,
    every: float,
    on_sample: Callable[[Sample], None] | None,
) -> None:
    started = time.monotonic()
    while not stop.is_set():
        sample = Sample(time.monotonic() - started, open_fds(pid), rss_kib(pid), report.cycles)
        report.samples.append(sample)
        report.peak_fds = max(report.peak_fds, sample.fds)
        report.peak_rss_kib = max(report.peak_rss_kib, sample.rss_kib)
        if on_sample is not None:
            on_sample(sample)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def soak(
    server: ServerProcess,
    echo: EchoPeer,
    *,
    seconds: float,
    clients: int = 8,
    sample_every: float = 1.0,
    settle: float = 2.0,
    max_cycles: int | None = None,
    on_sample: Callable[[Sample], None] | None = None,
) -> SoakReport:
    """Warm up, take the baseline, churn for `seconds` (or `max_cycles`), settle, take
    the final gauges."""
    assert server.process is not None
    pid = server.process.pid
    report = SoakReport(clients=clients)
    # Warm-up: one round of every code path, so the baseline includes lazy imports and
    # the allocator's first growth.
    await churn(server, echo, clients=clients, seconds=0.1, report=SoakReport())
    await asyncio.sleep(settle)
    report.baseline_fds, report.baseline_rss_kib = open_fds(pid), rss_kib(pid)
    stop = asyncio.Event()
    started = time.monotonic()
    sampler = asyncio.create_task(sample_until(pid, report, stop, sample_every, on_sample))
    await churn(
        server, echo, clients=clients, seconds=seconds, report=report, max_cycles=max_cycles
    )
    report.seconds = time.monotonic() - started
    stop.set()
    await sampler
    await asyncio.sleep(settle)
    report.final_fds, report.final_rss_kib = open_fds(pid), rss_kib(pid)
    return report
