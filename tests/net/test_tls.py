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


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """A whole handshake in memory; the protocol version agreed, or the error's reason."""
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    s = server.wrap_bio(pipes[0], pipes[1], server_side=True)
    c = client.wrap_bio(pipes[2], pipes[3], server_hostname="localhost")
    for _ in range(10):
        for side, outgoing, incoming in ((c, pipes[3], pipes[0]), (s, pipes[1], pipes[2])):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return str(exc.reason)
            incoming.write(outgoing.read())
        if c.version() and s.version():
            return str(c.version())
    return "no handshake"


def _client(maximum: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = maximum
    if ciphers is not None:
        client.set_ciphers(ciphers)
    return client


def test_tls_1_3_only_refuses_a_tls_1_2_client(tmp_path: Path) -> None:
    """coturn's no-tlsv1_2, as tls.min_version "1.3"."""
    cert, key = make_certificate(tmp_path)
    strict = TlsContext(str(cert), str(key), min_version="1.3").context
    assert _handshake(strict, _client(ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"
    assert _handshake(strict, _client(ssl.TLSVersion.TLSv1_2)) != "TLSv1.2"
    lenient = TlsContext(str(cert), str(key)).context
    assert _handshake(lenient, _client(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"


def test_a_cipher_list_limits_what_tls_1_2_clients_may_use(tmp_path: Path) -> None:
    """coturn's cipher-list, as tls.ciphers (the test key is ECDSA)."""
    cert, key = make_certificate(tmp_path)
    context = TlsContext(str(cert), str(key), ciphers="ECDHE-ECDSA-AES256-GCM-SHA384").context
    wanted = _client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384")
    other = _client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert _handshake(context, wanted) == "TLSv1.2"
    assert _handshake(context, other) != "TLSv1.2"


def test_a_cipher_list_openssl_does_not_know_is_refused(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    with pytest.raises(TlsError, match=r"tls\.ciphers: OpenSSL knows none of"):
        TlsContext(str(cert), str(key), ciphers="NOT-A-CIPHER")
