"""`pyturn serve` re-executes itself on the system allocator (pyturn/launch.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.interop.server_process import ServerProcess, base_config


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_serve_runs_on_the_system_allocator_in_the_same_process(tmp_path: Path) -> None:
    if "PYTHONMALLOC" in os.environ:
        pytest.skip("PYTHONMALLOC is set for the test run; the server keeps it")
    with ServerProcess(base_config(), tmp_path) as server:
        assert server.process is not None
        pid = server.process.pid  # the exec keeps the PID that systemd and Docker watch
        assert _environ(pid).get("PYTHONMALLOC") == "malloc"
        assert _cmdline(pid)[1:5] == ["-P", "-m", "pyturn", "serve"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_an_allocator_chosen_by_the_operator_is_kept(tmp_path: Path) -> None:
    with ServerProcess(base_config(), tmp_path, env={"PYTHONMALLOC": "pymalloc"}) as server:
        assert server.process is not None
        pid = server.process.pid
        assert _environ(pid).get("PYTHONMALLOC") == "pymalloc"
        assert "-P" not in _cmdline(pid)
