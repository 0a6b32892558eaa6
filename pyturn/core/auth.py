"""Long-term credentials: static users, TURN REST API secrets, and stateless nonces.

The authenticator hands out *keys*, never passwords: the server only needs the key to
check MESSAGE-INTEGRITY and sign its answers (RFC 8489 §9.2).
"""

from __future__ import annotations

import base64
import enum
import hmac
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pyturn.config import UserEntry
from pyturn.wire.attributes import PASSWORD_ALGORITHM_MD5, PASSWORD_ALGORITHM_SHA256
from pyturn.wire.integrity import hmac_sha256, long_term_key, userhash

# RFC 8489 §9.2: "obMatJos2" then 24 bits of security features in base64. Bit 0 (the
# top bit) is password algorithms, bit 1 username anonymity: 0xC00000 is "wAAA".
NONCE_COOKIE = "obMatJos2" + base64.b64encode(bytes((0xC0, 0, 0))).decode("ascii")
SUPPORTED_ALGORITHMS = ((PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b""))
# Nonces remembered as already checked; only ones that passed the MAC check get in.
_CHECKED_NONCES = 4096
_DERIVED_KEYS = 4096


class AuthFailure(enum.Enum):
    """Why a request was not authenticated; metrics label auth failures with these."""

    NO_CREDENTIALS = "no_credentials"
    BAD_PASSWORD = "bad_password"  # noqa: S105 (a metrics label, not a password)
    STALE_NONCE = "stale_nonce"
    EXPIRED_REST_CREDENTIAL = "expired_rest_credential"
    UNKNOWN_USER = "unknown_user"
    REVOKED = "revoked"  # `pyturn revoke`


@dataclass(frozen=True, slots=True)
class UserKeys:
    """A stored user's long-term keys (RFC 8489 §9.2.2): MD5, and SHA-256 when known (a
    user imported from coturn has only the MD5 one)."""

    md5: bytes
    sha256: bytes | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One key that may have signed a request for `username`."""

    username: str
    quota_user: str
    key: bytes
    # When a REST credential stops being valid (its username's timestamp).
    expires_at: float = math.inf


def rest_password(secret: str, username: str) -> str:
    """TURN REST API password: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.digest(secret.encode(), username.encode(), "sha1")
    return base64.b64encode(mac).decode("ascii")


def rest_username(expires_at: int, user: str | None = None, separator: str = ":") -> str:
    return f"{expires_at}{separator}{user}" if user else str(expires_at)


def mint_rest_credential(
    secret: str, expires_at: int, user: str | None = None, separator: str = ":"
) -> dict[str, str]:
    """A TURN REST API credential, as RTCPeerConnection's iceServers entries name it."""
    username = rest_username(expires_at, user, separator)
    return {"username": username, "credential": rest_password(secret, username)}


def parse_rest_username(username: str, separator: str = ":") -> tuple[int, str] | None:
    """`<unix-expiry>[:<user>]` -> (expiry, user part or ""), or None if not of that form
    (coturn's rest-api-separator may replace the ":")."""
    stamp, _, user = username.partition(separator)
    if not (1 <= len(stamp) <= 12 and stamp.isascii() and stamp.isdigit()):
        return None
    return int(stamp), user


class Authenticator:
    """Looks up keys for usernames and makes and checks nonces.

    Nonces are `obMatJos2<features><expiry hex>-<hmac>`: the RFC 8489 §9.2 cookie that
    announces PASSWORD-ALGORITHMS and USERHASH support, then an HMAC-SHA256 over the
    expiry and the client's IP address with a per-process secret, so issuing one costs
    no memory and a nonce captured on the wire is useless from another address.
    """

    def __init__(
        self,
        realm: str,
        users: Mapping[str, UserEntry] | None = None,
        secrets_: Sequence[str] = (),
        *,
        nonce_lifetime: float = 600.0,
        nonce_secret: bytes | None = None,
        stored: Mapping[str, UserKeys] | None = None,
        rest_separator: str = ":",
    ) -> None:
        """`users` and `secrets_` come from the config, `stored` users from the store
        (pyturn/store); a name in both is the config's."""
        self.realm = realm
        self.secrets = tuple(secrets_)
        self.rest_separator = rest_separator
        self.nonce_lifetime = nonce_lifetime
        self._nonce_secret = nonce_secret or secrets.token_bytes(32)
        self._keys: dict[str, bytes] = {}
        self._passwords: dict[str, str] = {}
        # Nonces that passed the MAC check, by (nonce, client IP) -> expiry: a session
        # signs its Allocate, Refresh, CreatePermission... with the same nonce.
        self._checked_nonces: dict[tuple[str, str], int] = {}
        self._derived_keys: dict[tuple[str, int], tuple[Candidate, ...]] = {}
        # RFC 8489 §9.2.4: a client may hide its name behind SHA-256(username ":" realm).
        self._userhashes: dict[bytes, str] = {}
        # SHA-256 keys kept as such: stored users have no password to derive them from.
        self._sha256_keys: dict[str, tuple[Candidate, ...]] = {}
        for name, keys in (stored or {}).items():
            if users and name in users:
                continue
            self._keys[name] = keys.md5
            if keys.sha256 is not None:
                self._sha256_keys[name] = (Candidate(name, name, keys.sha256),)
            self._userhashes[userhash(name, realm)] = name
        for name, user in (users or {}).items():
            if user.key is not None:
                self._keys[name] = user.key
            elif user.password is not None:
                self._keys[name] = long_term_key(name, realm, user.password)
                self._passwords[name] = user.password
            self._userhashes[userhash(name, realm)] = name
        self._md5_candidates = {
            name: (Candidate(name, name, key),) for name, key in self._keys.items()
        }

    # -- nonces --------------------------------------------------------------------------

    def _nonce_mac(self, expiry: str, client_ip: str) -> str:
        material = f"{expiry}|{client_ip}".encode()
        # The one-shot C function; the same 24 hex digits as hmac.new(...).hexdigest().
        return hmac_sha256(self._nonce_secret, material)[:12].hex()

    def make_nonce(self, client_ip: str, now: float) -> str:
        expiry = f"{int(now + self.nonce_lifetime):x}"
        return f"{NONCE_COOKIE}{expiry}-{self._nonce_mac(expiry, client_ip)}"

    def forget_cached(self) -> None:
        """Drop the caches of checked nonces and derived keys: entries of gone clients
        would keep freed memory from the OS (TurnServer.compact calls this)."""
        self._checked_nonces = {}
        self._derived_keys = {}

    def nonce_is_valid(self, nonce: str, client_ip: str, now: float) -> bool:
        """False for a nonce we did not issue to this IP, or one past its expiry (438)."""
        checked = self._checked_nonces
        expires_at = checked.get((nonce, client_ip))
        if expires_at is None:
            if not nonce.startswith(NONCE_COOKIE):
                return False
            expiry, sep, mac = nonce[len(NONCE_COOKIE) :].partition("-")
            if not sep or not 1 <= len(expiry) <= 12:
                return False
            try:
                expires_at = int(expiry, 16)
            except ValueError:
                return False
            if not mac.isascii() or not hmac.compare_digest(
                mac, self._nonce_mac(expiry, client_ip)
            ):
                return False
            if len(checked) >= _CHECKED_NONCES:
                checked.clear()
            checked[nonce, client_ip] = expires_at
        return now < expires_at

    # -- keys ----------------------------------------------------------------------------

    def username_for_userhash(self, value: bytes) -> str | None:
        """The static user behind a USERHASH (REST names cannot be found from a hash)."""
        return self._userhashes.get(value)

    def candidates(
        self, username: str, now: float, algorithm: int = PASSWORD_ALGORITHM_MD5
    ) -> Sequence[Candidate] | AuthFailure:
        """Every key that could have signed a request from `username`.

        A static user wins over a REST-shaped name. REST credentials yield one candidate per
        configured secret so that operators can rotate secrets without a flag day. SHA-256
        keys (PASSWORD-ALGORITHM 2) need the password itself, so a user configured with a
        precomputed MD5 key can only use MD5.
        """
        if algorithm == PASSWORD_ALGORITHM_SHA256:
            password = self._passwords.get(username)
            if password is not None:
                return self._derived(username, algorithm, lambda: self._sha256_static(username))
            stored = self._sha256_keys.get(username)
            if stored is not None:
                return stored
            if username in self._keys:
                return AuthFailure.BAD_PASSWORD
        else:
            static = self._md5_candidates.get(username)
            if static is not None:
                return static
        if not self.secrets:
            return AuthFailure.UNKNOWN_USER
        parsed = parse_rest_username(username, self.rest_separator)
        if parsed is None:
            return AuthFailure.UNKNOWN_USER
        expires_at, user = parsed
        if expires_at <= now:
            return AuthFailure.EXPIRED_REST_CREDENTIAL
        quota_user = user or username
        return self._derived(
            username,
            algorithm,
            lambda: tuple(
                Candidate(
                    username,
                    quota_user,
                    long_term_key(username, self.realm, rest_password(secret, username), algorithm),
                    expires_at,
                )
                for secret in self.secrets
            ),
        )

    def _sha256_static(self, username: str) -> tuple[Candidate, ...]:
        password = self._passwords[username]
        key = long_term_key(username, self.realm, password, PASSWORD_ALGORITHM_SHA256)
        return (Candidate(username, username, key),)

    def _derived(
        self, username: str, algorithm: int, derive: Callable[[], tuple[Candidate, ...]]
    ) -> tuple[Candidate, ...]:
        """Keys derived from a password (string preparation, then a hash, per request
        otherwise), kept per name and algorithm: they depend on nothing else that can
        change without a new Authenticator."""
        found = self._derived_keys.get((username, algorithm))
        if found is None:
            found = derive()
            if len(self._derived_keys) >= _DERIVED_KEYS:
                self._derived_keys.clear()
            self._derived_keys[username, algorithm] = found
        return found
