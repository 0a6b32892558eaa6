"""`metrics.auth`: HTTP basic authentication for the ops port, from a file.

The file holds one `user:password` per line (blank lines and `#` comments ignored), the
form Prometheus's `basic_auth.password_file` pairs with. A password may instead be
written as `sha256:<hex digest of the password>` so the file need not hold it in
clear. /live and /ready stay open: kubelets and load balancers probe without secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

_SHA256 = "sha256:"


class AuthFileError(ValueError):
    """The file cannot be read or a line is not `user:password`."""


@dataclass(frozen=True, slots=True)
class BasicAuth:
    # user -> SHA-256 of the password: every check compares digests of equal length.
    digests: dict[str, bytes]

    @classmethod
    def from_text(cls, text: str, source: str = "metrics.auth") -> BasicAuth:
        digests: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, password = line.partition(":")
            if not colon or not user or not password:
                raise AuthFileError(f"{source}:{number}: not user:password")
            if password.startswith(_SHA256):
                try:
                    digest = bytes.fromhex(password[len(_SHA256) :])
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise AuthFileError(f"{source}:{number}: sha256: needs 64 hex digits")
            else:
                digest = hashlib.sha256(password.encode()).digest()
            digests[user] = digest
        if not digests:
            raise AuthFileError(f"{source}: holds no user:password line")
        return cls(digests)

    @classmethod
    def from_file(cls, path: str) -> BasicAuth:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise AuthFileError(f"metrics.auth: {path}: {reason}") from None
        return cls.from_text(text, path)

    @classmethod
    def load(cls, path: str | None) -> BasicAuth | None:
        """The users of `metrics.auth`, or None when it is not set."""
        return None if path is None else cls.from_file(path)

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header value names a user with its password."""
        if authorization is None:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, colon, password = decoded.partition(":")
        expected = self.digests.get(user)
        given = hashlib.sha256(password.encode()).digest()
        # Compared even for an unknown user, so the time taken does not tell users apart.
        matched = hmac.compare_digest(given, expected or bytes(32))
        return bool(colon) and expected is not None and matched
