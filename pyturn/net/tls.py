"""TLS for `transport: tls` listeners (turns:), with start-up checks and reload.

The certificate and key are checked with `cryptography` before the server binds, so an
operator reads "the key does not match the certificate" rather than an OpenSSL error
code. Reloading loads the new pair into the same `SSLContext`: connections already up
keep their session, new handshakes get the new certificate.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TlsError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


def check_certificate_pair(
    certificate: str, private_key: str, *, now: datetime.datetime | None = None
) -> list[str]:
    """Validate the files; return warnings (e.g. expiring soon), raise TlsError if unusable."""
    cert_path, key_path = Path(certificate), Path(private_key)
    try:
        cert_bytes = cert_path.read_bytes()
    except OSError as exc:
        raise TlsError(f"tls.certificate {certificate}: cannot read: {exc.strerror}") from exc
    try:
        key_bytes = key_path.read_bytes()
    except OSError as exc:
        raise TlsError(f"tls.private_key {private_key}: cannot read: {exc.strerror}") from exc
    try:
        chain = x509.load_pem_x509_certificates(cert_bytes)
    except ValueError as exc:
        raise TlsError(f"tls.certificate {certificate}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError as exc:
        raise TlsError(f"tls.private_key {private_key}: encrypted keys are not supported") from exc
    except ValueError as exc:
        raise TlsError(f"tls.private_key {private_key}: not a PEM private key ({exc})") from exc
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
        raise TlsError(
            f"tls.private_key {private_key}: does not match the certificate in {certificate}"
        )
    moment = now or datetime.datetime.now(datetime.UTC)
    warnings: list[str] = []
    if leaf.not_valid_after_utc <= moment:
        raise TlsError(
            f"tls.certificate {certificate}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > moment:
        raise TlsError(
            f"tls.certificate {certificate}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_after_utc - moment < datetime.timedelta(days=14):
        warnings.append(
            f"tls.certificate {certificate}: expires on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    return warnings


ALPN_PROTOCOLS = ["stun.turn", "stun.nat-discovery"]


class TlsContext:
    """One server-side SSLContext for every TLS listener, TLS 1.2 and newer only."""

    def __init__(
        self,
        certificate: str,
        private_key: str,
        *,
        ciphers: str | None = None,
        min_version: str = "1.2",
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.options |= ssl.OP_NO_COMPRESSION
        # RFC 7443: a proxy in front (nginx ssl_preread, HAProxy) can route by these;
        # a client that offers neither still gets its handshake, without ALPN.
        self.context.set_alpn_protocols(ALPN_PROTOCOLS)
        self.warnings: list[str] = []
        self.configure(ciphers, min_version)
        self.load(certificate, private_key)

    def configure(self, ciphers: str | None, min_version: str) -> None:
        """The protocol versions and TLS 1.2 ciphers offered from the next handshake on."""
        self.context.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        if ciphers is not None:
            try:
                self.context.set_ciphers(ciphers)
            except ssl.SSLError:
                raise TlsError(f"tls.ciphers: OpenSSL knows none of {ciphers!r}") from None

    def load(self, certificate: str, private_key: str) -> None:
        """Check, then load the pair; on error the previous pair stays in use."""
        self.warnings = check_certificate_pair(certificate, private_key)
        try:
            self.context.load_cert_chain(certificate, private_key)
        except ssl.SSLError as exc:
            raise TlsError(f"tls.certificate {certificate}: OpenSSL refused it: {exc}") from exc
        self.certificate = certificate
        self.private_key = private_key
