"""Atheris (libFuzzer) target for the TURN core: `TurnServer` fed hostile sequences.

The input is a list of (5-tuple index, time step, bytes) records (see
`tests/hostile/core_harness.py`, `decode_steps`): the bytes are sent as they are, or
re-signed as a request from that 5-tuple's user (so the fuzzer gets past
authentication), or stand for an I/O event (timer, connection closed, a peer that
connects or goes away, drain). The server runs on a fake relay binder with a moving
`now`; after each step the harness checks that nothing is relayed to a denied or
unpermitted peer, that no relay port or socket leaks, and that quotas and caps hold;
at the end every lifetime runs out and everything must be back.

Any exception is a crash: libFuzzer saves the input as crash-<sha1>.

    .venv/bin/python fuzz/fuzz_core.py --seed-corpus /tmp/core-corpus
    .venv/bin/python fuzz/fuzz_core.py -max_total_time=120 -rss_limit_mb=2048 /tmp/core-corpus

Replay a crash without atheris:

    .venv/bin/python fuzz/fuzz_core.py --replay crash-<sha1>
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as `python fuzz/fuzz_core.py` puts fuzz/ first on sys.path, not the project root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["pyturn", "tests.hostile"]):
        from tests.hostile.core_harness import Harness, decode_steps, encode_steps
        from tests.hostile.core_seeds import seed_scenarios
else:
    from tests.hostile.core_harness import Harness, decode_steps, encode_steps
    from tests.hostile.core_seeds import seed_scenarios


def TestOneInput(data: bytes) -> None:
    Harness().run(decode_steps(data))


def write_seed_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    scenarios = seed_scenarios()
    for name, steps in scenarios.items():
        (directory / f"seed-{name}").write_bytes(encode_steps(steps))
    return len(scenarios)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        count = write_seed_corpus(Path(sys.argv[2]))
        print(f"wrote {count} seed inputs to {sys.argv[2]}")
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "--replay":
        for name in sys.argv[2:]:
            TestOneInput(Path(name).read_bytes())
            print(f"{name}: no crash")
        return
    if atheris is None:
        print(
            "fuzz_core.py needs atheris (libFuzzer for Python): pip install atheris",
            file=sys.stderr,
        )
        sys.exit(2)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
