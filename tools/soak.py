"""A bounded soak run: allocation churn with relaying clients against `pyturn serve`.

Starts a server on loopback (the interop test config: 127.0.0.1 listeners, relay and
peers), a loopback echo peer, and `--clients` clients that allocate, bind a channel,
relay through the echo peer, refresh, delete and start again, for `--minutes`. The
server's open file descriptors and VmRSS are sampled every `--every` seconds. At the
end, with every allocation deleted, both must be back at their baseline (taken after a
warm-up round) within `--fd-tolerance` descriptors and `--rss-tolerance` MiB; the
exit status is 0 when they are and no relay or request failed, else 1.

    .venv/bin/python tools/soak.py                 # 3 minutes
    .venv/bin/python tools/soak.py --minutes 10 --clients 16 --json soak.json

Everything talks to 127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

# Running as `python tools/soak.py` puts tools/ first on sys.path, not the project root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hostile.churn import Sample, SoakReport, soak
from tests.hostile.client import EchoPeer
from tests.interop.server_process import ServerProcess, base_config

MAX_MINUTES = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="churn time (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--fd-tolerance", type=int, default=0, help="descriptors (default 0)")
    parser.add_argument("--rss-tolerance", type=float, default=8.0, help="MiB (default 8)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    if not 1 <= args.clients <= 256:
        parser.error("--clients must be in 1..256")
    return args


def verdict(report: SoakReport, fd_tolerance: int, rss_tolerance_mib: float) -> list[str]:
    """What went wrong, if anything."""
    problems = []
    if report.failures:
        problems.append(f"failures: {dict(report.failures)}")
    if report.cycles == 0:
        problems.append("no allocation cycle completed")
    if abs(report.fd_delta) > fd_tolerance:
        problems.append(f"file descriptors {report.fd_delta:+d} after the run")
    if report.rss_delta_kib > rss_tolerance_mib * 1024:
        problems.append(f"VmRSS {report.rss_delta_kib:+d} KiB after the run")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def show(sample: Sample) -> None:
        print(
            f"  t={sample.at:6.0f}s  fds={sample.fds:4d}  VmRSS={sample.rss_kib:7d} KiB  "
            f"cycles={sample.cycles}",
            flush=True,
        )

    echo = EchoPeer()
    with tempfile.TemporaryDirectory(prefix="pyturn-soak-") as workdir:
        server = ServerProcess(base_config(), Path(workdir))
        try:
            server.start()
            print(
                f"pyturn pid {server.process.pid if server.process else '?'}, "
                f"{args.clients} clients for {args.minutes:g} min",
                flush=True,
            )
            report = asyncio.run(
                soak(
                    server,
                    echo,
                    seconds=args.minutes * 60,
                    clients=args.clients,
                    sample_every=args.every,
                    on_sample=show,
                )
            )
        finally:
            server.stop()
            echo.close()
    for line in report.lines():
        print(line)
    if args.json is not None:
        data = asdict(report)
        data["failures"] = dict(report.failures)
        args.json.write_text(json.dumps(data, indent=2))
    problems = verdict(report, args.fd_tolerance, args.rss_tolerance)
    for problem in problems:
        print(f"LEAK OR FAILURE: {problem}")
    print("soak: ok" if not problems else "soak: FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
