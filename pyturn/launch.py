"""The `pyturn` command's entry point: `pyturn serve` runs on the system allocator.

CPython's own small-object allocator returns memory to the OS only in whole 1 MiB
arenas, and a few long-lived objects made while allocations came and went (counters,
timers, log records) keep most arenas of a wave of allocations alive after it ends. With
PYTHONMALLOC=malloc the same objects come from glibc, whose free pages `malloc_trim`
gives back (the worker calls it once many allocations have ended). It costs some speed:
about 6% of an Allocate, and about 3 us of CPU per relayed packet at a moderate rate
(see README, Performance). PYTHONMALLOC can only be chosen before the interpreter
starts, so `serve` re-executes itself once, before any heavy import (about 15 ms).
Setting PYTHONMALLOC yourself (e.g. `pymalloc`) keeps your choice.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if (
        sys.argv[1:2] == ["serve"]
        and "PYTHONMALLOC" not in os.environ
        and sys.executable
        and sys.platform.startswith("linux")
    ):
        env = dict(os.environ, PYTHONMALLOC="malloc")
        # -P: the working directory stays off sys.path, as for the installed command.
        argv = [sys.executable, "-P", "-m", "pyturn", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)  # noqa: S606 (our own interpreter, no shell)
    from pyturn.cli import main as cli_main  # noqa: PLC0415 (after the decision above)

    cli_main()
