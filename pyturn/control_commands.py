"""`pyturn sessions`, `kick`, `revoke`, `reload` and `drain`: requests on a running
server's control socket (pyturn/net/control_socket.py, pyturn/net/node_control.py).

Each finds the socket through the server's config (`control.socket`) or takes --socket,
and exits 1 with one clear line when no server answers there.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pyturn.config import ConfigError, ControlConfig, load_config
from pyturn.core.sessions import SessionMatch, parse_duration
from pyturn.store.commands import DEFAULT_CONFIG

TIMEOUT = 15.0
_ANSWER_LIMIT = 256 * 1024 * 1024

F = TypeVar("F", bound=Callable[..., Any])


def socket_options(command: F) -> F:
    command = click.option(
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False),
        help="The control socket (instead of the config's control.socket).",
    )(command)
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_CONFIG,
        show_default=True,
        help="The server's config, whose control.socket to use.",
    )(command)


def find_socket(config_path: Path, socket_path: str | None) -> str:
    if socket_path is not None:
        return socket_path
    if config_path == DEFAULT_CONFIG and not config_path.exists():
        return ControlConfig().socket
    try:
        control = load_config(config_path).control
    except ConfigError as exc:
        raise click.ClickException(f"{exc} (or give --socket PATH)") from exc
    if not control.enabled:
        raise click.ClickException(f"{config_path}: control.enabled is false: no control socket")
    return control.socket


def request(path: str, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request and its answer; a failed answer ends the command with exit code 1."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise click.ClickException(f"pyturn is not running: nothing answers on {path}") from None
    except PermissionError:
        sock.close()
        raise click.ClickException(
            f"{path}: permission denied (run as the server's user or a member of its group)"
        ) from None
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n") and len(data) < _ANSWER_LIMIT:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise click.ClickException(f"no answer from {path} within {timeout:.0f} s") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise click.ClickException(f"{path}: the server closed without an answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise click.ClickException(str(error))
    return answer


def _missing(answer: dict[str, Any], what: str) -> bool:
    """Say so when some workers did not answer; True if any."""
    missing = int(answer.get("missing_workers", 0))
    if missing:
        click.echo(f"warning: {missing} workers did not answer (restarting?): {what}", err=True)
    return missing > 0


def _match(user: str | None, client: str | None, relayed: str | None) -> dict[str, Any]:
    try:
        return SessionMatch.parse(user=user, client=client, relayed=relayed).to_dict()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count}{unit}"
        count //= 1000
    return f"{count}TB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _table(rows: list[dict[str, Any]], fleet: bool) -> str:
    header = ["USER", "CLIENT", "TRANSPORT", "RELAYED", "AGE", "LEFT", "PERMS", "CHANNELS"]
    header += ["TO PEER", "TO CLIENT", "WORKER"] + (["NODE"] if fleet else [])
    lines = [header]
    for row in rows:
        transport = row["transport"] + ("+tcp-relay" if row.get("tcp_relay") else "")
        line = [
            row["user"],
            row["client"],
            transport,
            " ".join(row["relayed"]),
            _duration(row["age"]),
            _duration(row["lifetime_left"]),
            str(len(row["permissions"])),
            str(len(row["channels"])),
            f"{_size(row['bytes_to_peer'])}/{row['packets_to_peer']}",
            f"{_size(row['bytes_to_client'])}/{row['packets_to_client']}",
            str(row["worker"]),
        ]
        lines.append(line + ([str(row.get("node", ""))] if fleet else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


@click.command()
@socket_options
@click.option("--user", help="Only this user's (or REST username's user part's) sessions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.option("--fleet", is_flag=True, help="Every node's sessions (with a Redis store; ~5 s old).")
def sessions(
    *, config_path: Path, socket_path: str | None, user: str | None, as_json: bool, fleet: bool
) -> None:
    """List the live allocations: user, client, relayed addresses, age, lifetime left,
    permissions, channels, traffic each way (bytes/packets) and worker."""
    path = find_socket(config_path, socket_path)
    match = _match(user, None, None)
    answer = request(path, {"op": "sessions", "match": match, "fleet": fleet})
    _missing(answer, "their allocations are not listed")
    rows = answer["sessions"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(_table(rows, fleet))
    else:
        click.echo("no sessions", err=True)


@click.command()
@socket_options
@click.option("--user", help="End this user's allocations (or a REST username's user part's).")
@click.option("--client", help="End the allocations of this client: IP or IP:PORT.")
@click.option("--relayed", help="End the allocation with this relayed address: IP:PORT.")
def kick(
    *,
    config_path: Path,
    socket_path: str | None,
    user: str | None,
    client: str | None,
    relayed: str | None,
) -> None:
    """End allocations now: their relaying stops at once and the client's next Refresh
    gets 437. With a Redis store, every node of the fleet ends its own.

    The client may allocate again at once (over TCP/TLS its connection stays open): to
    keep a user out, use `pyturn revoke`.
    """
    match = _match(user, client, relayed)
    if not match:
        raise click.UsageError("give --user, --client or --relayed")
    answer = request(find_socket(config_path, socket_path), {"op": "kick", "match": match})
    told = f"; {answer['nodes']} other nodes told" if answer.get("nodes") else ""
    click.echo(f"kicked {answer['kicked']} allocations on this node{told}")
    if _missing(answer, "their allocations were not kicked; run kick again"):
        sys.exit(1)


@click.command()
@socket_options
@click.option("--user", help="The user, or a REST username's user part (or whole).")
@click.option(
    "--for",
    "duration",
    metavar="DURATION",
    help="How long: 90s, 10m, 2h, 1d (default: until --remove).",
)
@click.option("--list", "listing", is_flag=True, help="Show the revocations in force.")
@click.option("--remove", is_flag=True, help="End --user's revocation now.")
def revoke(
    *,
    config_path: Path,
    socket_path: str | None,
    user: str | None,
    duration: str | None,
    listing: bool,
    remove: bool,
) -> None:
    """Kick a user and refuse their requests (401) until the revocation ends.

    Revocations outlive a restart: in the Redis store for the whole fleet, else in
    control.state_file.
    """
    path = find_socket(config_path, socket_path)
    if listing:
        if user or remove or duration:
            raise click.UsageError("--list takes no other option")
        revoked = request(path, {"op": "revocations"})["revoked"]
        for name, until in sorted(revoked.items()):
            ends = "until removed" if until is None else f"until {_when(until)}"
            click.echo(f"{name}\t{ends}")
        if not revoked:
            click.echo("no revocations", err=True)
        return
    if user is None:
        raise click.UsageError("give --user (or --list)")
    if remove:
        if duration:
            raise click.UsageError("--remove takes no --for")
        answer = request(path, {"op": "unrevoke", "user": user})
        click.echo(f"{user}: {'revocation removed' if answer['removed'] else 'was not revoked'}")
        if not answer["removed"]:
            sys.exit(1)
        return
    seconds = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--for") from exc
    answer = request(path, {"op": "revoke", "user": user, "for": seconds})
    ends = "until removed" if answer["until"] is None else f"until {_when(answer['until'])}"
    click.echo(f"{user}: revoked {ends}; {answer['kicked']} allocations ended on this node")
    if _missing(answer, "their allocations may still run; run revoke again"):
        sys.exit(1)


def _when(unix: float) -> str:
    import datetime  # noqa: PLC0415 (only here)

    return datetime.datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


@click.command("reload")
@socket_options
def reload_command(config_path: Path, socket_path: str | None) -> None:
    """Re-read the server's config file (as SIGHUP does); an invalid one is refused,
    with the reason, and the running config stays."""
    answer = request(find_socket(config_path, socket_path), {"op": "reload"})
    click.echo(answer["message"])


@click.command()
@socket_options
def drain(config_path: Path, socket_path: str | None) -> None:
    """Drain the server (as SIGTERM does): new allocations are refused, running ones go
    on until they end or shutdown_timeout passes, then the server exits."""
    answer = request(find_socket(config_path, socket_path), {"op": "drain"})
    click.echo(answer["message"])
