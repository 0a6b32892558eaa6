"""TLS listeners: `pyturn probe turns:` passes, and SIGHUP loads a renewed certificate."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.interop.server_process import LOOPBACK
from tests.net.certs import make_certificate
from tests.ops.conftest import StartServer
from tests.ops.helpers import OpsServer, value


def tls_config(directory: Path) -> dict[str, object]:
    directory.mkdir(exist_ok=True)
    certificate, key = make_certificate(directory)
    return {
        "listen": [
            {"transport": "udp", "address": LOOPBACK, "port": 0},
            {"transport": "tcp", "address": LOOPBACK, "port": 0},
            {"transport": "tls", "address": LOOPBACK, "port": 0},
        ],
        "tls": {"certificate": str(certificate), "private_key": str(key)},
    }


def served_certificate(server: OpsServer) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, server.ports["tls"]), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_probe_passes_against_pyturn_over_tls(start_server: StartServer, tmp_path: Path) -> None:
    config = tls_config(tmp_path)
    server = start_server(config)
    tls = config["tls"]
    assert isinstance(tls, dict)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pyturn", "probe", f"turns:localhost:{server.ports['tls']}"),
            *("--user", "alice", "--password", "alicepw", "--ca-file", tls["certificate"]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  every step passed" in result.stdout
    assert value(server.scrape(), "pyturn_allocations_created_total", transport="tls") == 2


def test_sighup_loads_a_renewed_certificate_kept_under_the_same_file_names(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = tls_config(tmp_path / "live")
    server = start_server(config)
    before = served_certificate(server)
    renewed_certificate, renewed_key = make_certificate(tmp_path, days=60)
    tls = config["tls"]
    assert isinstance(tls, dict)
    shutil.copy(renewed_certificate, tls["certificate"])
    shutil.copy(renewed_key, tls["private_key"])
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log("config reloaded ", since=mark)
    after = served_certificate(server)
    assert after.serial_number != before.serial_number
    assert after == x509.load_pem_x509_certificate(renewed_certificate.read_bytes())


def test_an_unusable_certificate_on_sighup_is_refused_and_the_old_one_stays(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = tls_config(tmp_path / "live")
    server = start_server(config)
    before = served_certificate(server)
    _, other_key = make_certificate(tmp_path, days=60)
    tls = config["tls"]
    assert isinstance(tls, dict)
    shutil.copy(other_key, tls["private_key"])  # no longer matches the certificate
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    server.wait_for_log(
        r"config reload refused, keeping the running config: .*does not match", since=mark
    )
    assert served_certificate(server) == before
    assert value(server.scrape(), "pyturn_config_reloads_total", result="failure") == 1


@pytest.mark.parametrize("missing", ["certificate", "private_key"])
def test_an_unreadable_certificate_at_start_fails_naming_the_file(
    tmp_path: Path, missing: str
) -> None:
    config_dict = tls_config(tmp_path)
    tls = config_dict["tls"]
    assert isinstance(tls, dict)
    Path(tls[missing]).unlink()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**config_dict, "metrics": {"enabled": False}}))
    result = subprocess.run(
        [sys.executable, "-m", "pyturn", "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert f"tls.{missing} {tls[missing]}: cannot read" in result.stderr
    assert "Traceback" not in result.stderr
