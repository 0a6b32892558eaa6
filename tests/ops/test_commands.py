"""The operator-facing command-line bits: quiet config checks, clear start-up failures."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner

from pyturn.cli import cli
from tests.interop.server_process import run_pyturn as pyturn

LOOPBACK = "127.0.0.1"


def test_check_config_quiet_prints_nothing_for_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("realm: example.org\n")
    result = CliRunner().invoke(cli, ["check-config", "--quiet", str(path)])
    assert (result.exit_code, result.output) == (0, "")


def test_check_config_quiet_still_names_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("workers: -1\n")
    result = CliRunner().invoke(cli, ["check-config", "-q", str(path)])
    assert result.exit_code == 1
    assert "workers: must be an integer >= 0" in result.output


def test_serve_on_a_taken_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(
            f"listen: [{{transport: tcp, address: {LOOPBACK}, port: {port}}}]\n"
            f"relay: {{address: {LOOPBACK}, min_port: 45100, max_port: 45109}}\n"
            "metrics: {enabled: false}\n"
        )
        result = pyturn("serve", "-c", str(config))
    assert result.returncode == 1
    assert f"Error: cannot listen on tcp {LOOPBACK}:{port}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_serve_on_a_taken_metrics_port_names_the_setting(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(
            f"listen: [{{transport: udp, address: {LOOPBACK}, port: 0}}]\n"
            f"relay: {{address: {LOOPBACK}, min_port: 45100, max_port: 45109}}\n"
            f"metrics: {{address: {LOOPBACK}, port: {port}}}\n"
        )
        result = pyturn("serve", "-c", str(config))
    assert result.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:" in result.stderr
    assert "(metrics.address, metrics.port)" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_when_the_relay_range_is_smaller_than_the_quotas(
    tmp_path: Path,
) -> None:
    """A 21-port range (a common Docker default) under the default 64 allocations per
    user: one user could take every port. check-config says so and still succeeds."""
    config = tmp_path / "c.yaml"
    config.write_text("relay: {min_port: 49152, max_port: 49172}\n")
    result = pyturn("check-config", "-q", str(config))
    assert result.returncode == 0
    assert result.stderr.strip() == (
        "warning: relay ports 49152-49172 (21): fewer than quotas.allocations_per_user (64),"
        " so one user can take every port; lower it, set quotas.allocations_total or widen"
        " the range"
    )
    config.write_text(
        "relay: {min_port: 49152, max_port: 49172}\nquotas: {allocations_total: 20}\n"
    )
    result = pyturn("check-config", "-q", str(config))
    assert (result.returncode, result.stderr) == (0, "")
