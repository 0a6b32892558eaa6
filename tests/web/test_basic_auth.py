"""metrics.auth's file and the Authorization header check."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from pyturn.web.basic_auth import AuthFileError, BasicAuth


def header(user: str, password: str, scheme: str = "Basic") -> str:
    return f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_users_in_clear_and_as_sha256_both_check() -> None:
    digest = hashlib.sha256(b"grafana pw").hexdigest()
    auth = BasicAuth.from_text(f"# scrapers\nprometheus:scrape-pw\n\ngrafana:sha256:{digest}\n")
    assert auth.allows(header("prometheus", "scrape-pw"))
    assert auth.allows(header("grafana", "grafana pw"))
    assert auth.allows(header("prometheus", "scrape-pw", scheme="basic"))


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        header("prometheus", "wrong"),
        header("nobody", "scrape-pw"),
        header("prometheus", ""),
        "Bearer " + base64.b64encode(b"prometheus:scrape-pw").decode(),
        "Basic not-base64!!",
        "Basic " + base64.b64encode(b"prometheus").decode(),  # no colon
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    ],
)
def test_anything_but_a_known_user_and_password_is_refused(value: str | None) -> None:
    auth = BasicAuth.from_text("prometheus:scrape-pw\n")
    assert not auth.allows(value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "holds no user:password line"),
        ("# only a comment\n", "holds no user:password line"),
        ("prometheus\n", ":1: not user:password"),
        ("ok:pw\n:nouser\n", ":2: not user:password"),
        ("a:sha256:abc\n", ":1: sha256: needs 64 hex digits"),
    ],
)
def test_a_bad_file_names_the_line(text: str, problem: str) -> None:
    with pytest.raises(AuthFileError, match=problem):
        BasicAuth.from_text(text, "/etc/pyturn/ops-users")


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="No such file"):
        BasicAuth.from_file(str(tmp_path / "absent"))
    assert BasicAuth.load(None) is None
