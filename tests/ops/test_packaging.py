"""The systemd unit and the Dockerfile: they verify, and they say what the README says.

`systemd-analyze verify` insists that every Exec*= binary exists, and on a development
machine pyturn is not in /usr/local/bin: the test verifies a copy of the unit whose
paths point at this virtualenv's `pyturn`, which is otherwise the same file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pyturn import web

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "pyturn.service"
DOCKERFILE = ROOT / "Dockerfile"
INSTALLED = "/usr/local/bin/pyturn"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (install systemd to verify the unit)")
    pyturn = Path(sys.executable).with_name("pyturn")
    assert pyturn.exists(), f"{pyturn}: install the project (pip install -e .) first"
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / "pyturn.service"
    copy.write_text(text.replace(INSTALLED, str(pyturn)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_unit_uses_notify_reload_and_the_usual_hardening() -> None:
    settings = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "pyturn",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }
    for key, value in expected.items():
        assert settings[key] == [value], key
    assert settings["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "WatchdogSec" in settings
    # SIGTERM drains for up to shutdown_timeout: systemd must wait longer than that.
    example = yaml.safe_load((ROOT / "conf" / "pyturn.yaml").read_text())
    stop = re.fullmatch(r"(\d+)s", settings["TimeoutStopSec"][0])
    assert stop is not None
    assert int(stop[1]) > example["shutdown_timeout"]
    # One descriptor per relay port at least.
    ports = example["relay"]["max_port"] - example["relay"]["min_port"] + 1
    assert int(settings["LimitNOFILE"][0]) >= 2 * ports


def test_the_dockerfile_runs_as_non_root_with_the_config_in_etc_pyturn() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line[0].isspace()
    ]
    by_name: dict[str, list[str]] = {}
    for parts in instructions:
        if parts[0].isupper() and len(parts) == 2:
            by_name.setdefault(parts[0], []).append(parts[1])
    stages = [re.fullmatch(r"python:3\.\d+-slim(?: AS (\w+))?", f) for f in by_name["FROM"]]
    assert all(stages), by_name["FROM"]
    names = {m.group(1) for m in stages if m and m.group(1)}
    user = by_name["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert by_name["CMD"] == ['["serve", "-c", "/etc/pyturn/pyturn.yaml"]']
    assert by_name["ENTRYPOINT"] == ['["pyturn"]']
    for copy in by_name["COPY"]:
        if copy.startswith("--from="):  # from an earlier stage, not from the build context
            assert copy.split()[0].removeprefix("--from=") in names
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"
    assert "9641/tcp" in by_name["EXPOSE"][0]


def test_the_image_is_built_with_the_batching_module_and_checks_it_loads() -> None:
    """The build stage has a compiler; the final stage refuses an image without it."""
    text = DOCKERFILE.read_text()
    build, final = text.split("\nFROM python:3.11-slim\n")
    assert "gcc" in build and "hatch_build.py" in build and "pip wheel" in build
    assert "assert batch.NATIVE" in final


def test_the_readme_explains_host_networking_for_docker() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "--network host" in readme
    assert "--stop-timeout" in readme


def test_the_wheel_carries_the_pages(tmp_path: Path) -> None:
    """The status and test pages are files beside pyturn/web, served from the install."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=120,
        env={**os.environ, "PYTURN_NO_NATIVE": "1"},
    )
    (wheel,) = tmp_path.glob("pyturn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for name in set(web._ROUTES.values()):
        assert f"pyturn/web/{name}" in names
