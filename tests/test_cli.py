"""The `pyturn` command line: version, check-config, credentials, embedded default."""

from __future__ import annotations

import base64
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyturn import __version__
from pyturn.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_python_dash_m_pyturn_runs_the_same_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyturn", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert __version__ in out.stdout


def test_check_config_prints_the_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("realm: example.org\nauth: {users: {alice: topsecretpw}}\n")
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "realm: example.org" in result.output
    assert "alice" in result.output
    assert "topsecretpw" not in result.output


def test_check_config_names_the_bad_key_and_file_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("relay: {min_port: abc}\n")
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 1
    assert "relay.min_port" in result.output
    assert "bad.yaml" in result.output


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("per_allocation", "-1"),
        ("per_user", "fast"),
        ("total", '"2 parsecs"'),
        ("per_allocation", '"2 Mbit"'),
        ("total", "1.5"),
    ],
)
def test_check_config_refuses_a_bad_bandwidth_naming_the_key(
    tmp_path: Path, key: str, value: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"bandwidth: {{{key}: {value}}}\n")
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 1
    assert f"bandwidth.{key}" in result.output
    assert "bad.yaml" in result.output
    assert "Mbit/s" in result.output  # says what would do


def test_check_config_shows_a_bandwidth_with_units_in_bytes_per_second(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('bandwidth: {per_allocation: "2 Mbit/s", per_user: "500 kB/s", total: 0}\n')
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "per_allocation: 250000" in result.output
    assert "per_user: 500000" in result.output


def test_serve_refuses_an_invalid_config_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [{transport: udp, address: 127.0.0.1, port: 0, colour: red}]\n")
    result = CliRunner().invoke(cli, ["serve", "-c", str(path)])
    assert result.exit_code != 0
    assert "listen[0].colour" in result.output


def test_credentials_prints_rest_api_credentials_for_rtcpeerconnection() -> None:
    """TURN REST API: username `<expiry>:<user>`, password base64(HMAC-SHA1(secret, name))."""
    before = int(time.time())
    result = CliRunner().invoke(
        cli,
        ["credentials", "--secret", "s3", "--user", "alice", "--ttl", "60", "--url", "turn:h"],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)
    expiry, user = entry["username"].split(":")
    assert user == "alice"
    assert before + 60 <= int(expiry) <= int(time.time()) + 60
    mac = hmac.digest(b"s3", entry["username"].encode(), "sha1")
    assert entry["credential"] == base64.b64encode(mac).decode()
    assert entry["urls"] == ["turn:h"]
    assert entry["ttl"] == 60


def test_embedded_default_prints_a_random_credential_and_an_ice_server_line() -> None:
    """With no config file, serve makes up a credential rather than run an open relay."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyturn", "serve"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "ready in" in line or "Address already in use" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    text = "".join(lines)
    assert "password:" in text
    ice = next(line for line in lines if "ICE server:" in line)
    entry = json.loads(ice.split("ICE server:", 1)[1])
    assert entry["username"] == "pyturn"
    assert len(entry["credential"]) >= 20
    assert any(url.endswith(":3478?transport=udp") for url in entry["urls"])
