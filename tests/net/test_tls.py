"""Start-up checks of the TLS certificate and key (pyturn.net.tls)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pyturn.net.tls import TlsContext, TlsError, check_certificate_pair
from tests.net.certs import make_certificate


def test_a_matching_valid_pair_loads_with_tls_1_2_as_the_minimum(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    context = TlsContext(str(cert), str(key))
    assert context.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.warnings == []


def test_a_key_that_does_not_match_the_certificate_is_named(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path, name="a")
    _, other_key = make_certificate(tmp_path, name="b")
    with pytest.raises(TlsError, match="does not match the certificate"):
        check_certificate_pair(str(cert), str(other_key))


def test_an_expired_certificate_is_refused_with_its_date(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, days=-1, not_before_days=-10)
    with pytest.raises(TlsError, match="expired on"):
        check_certificate_pair(str(cert), str(key))


def test_a_certificate_expiring_within_two_weeks_loads_with_a_warning(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, days=3)
    assert any("expires on" in w for w in check_certificate_pair(str(cert), str(key)))


def test_missing_and_garbage_files_are_reported_by_key_name(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    with pytest.raises(TlsError, match=r"tls\.certificate .*cannot read"):
        check_certificate_pair(str(tmp_path / "nope.crt"), str(key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(TlsError, match=r"tls\.certificate .*not a PEM certificate"):
        check_certificate_pair(str(garbage), str(key))
    with pytest.raises(TlsError, match=r"tls\.private_key .*not a PEM private key"):
        check_certificate_pair(str(cert), str(garbage))


def test_reload_keeps_the_old_pair_when_the_new_one_is_bad(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    context = TlsContext(str(cert), str(key))
    with pytest.raises(TlsError):
        context.load(str(cert), str(tmp_path / "missing.key"))
    assert context.certificate == str(cert)
    new_cert, new_key = make_certificate(tmp_path, name="renewed")
    context.load(str(new_cert), str(new_key))
    assert context.certificate == str(new_cert)
