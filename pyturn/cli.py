"""The `pyturn` command: parse arguments, then hand over to the library.

pyturn serve [-c FILE]        run the server (embedded default config without -c)
pyturn check-config FILE      print the effective config, or what is wrong with it
pyturn credentials --secret S print TURN REST API credentials for a WebRTC app
pyturn probe turn:HOST:PORT   check a TURN server end to end (Binding, Allocate, relay)
pyturn import-coturn FILE     a coturn config as pyturn's (pyturn/coturn_import.py)
pyturn user|secret ...        users and REST secrets in the store (pyturn/store/commands.py)
pyturn sessions|kick|revoke|reload|drain
                              a running server's control socket (pyturn/control_commands.py)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from types import MappingProxyType

import click
import yaml

from pyturn import __version__
from pyturn.config import (
    AuthConfig,
    Config,
    ConfigError,
    UserEntry,
    config_to_dict,
    config_warnings,
    default_config,
    load_config,
)
from pyturn.control_commands import drain, kick, reload_command, revoke, sessions
from pyturn.core.auth import mint_rest_credential, rest_password, rest_username
from pyturn.logs import use_logging_config
from pyturn.store.commands import secret, user


def _embedded_default() -> tuple[Config, str, str]:
    """The default config plus a credential made up for this run.

    A relay that anyone can use is an open door, so even the zero-config server requires
    a username and password; they are printed once at start-up.
    """
    username = "pyturn"
    password = secrets.token_urlsafe(18)
    config = default_config()
    auth = AuthConfig(
        users=MappingProxyType({username: UserEntry(password=password)}),
        secrets=config.auth.secrets,
        nonce_lifetime=config.auth.nonce_lifetime,
    )
    return dataclasses.replace(config, auth=auth), username, password


def _ice_server_hint(config: Config, host: str, username: str, password: str) -> str:
    urls = []
    for listener in config.listen:
        if listener.transport in ("tls", "auto"):
            urls.append(f"turns:{host}:{listener.port}?transport=tcp")
        if listener.transport == "auto":
            urls.append(f"turn:{host}:{listener.port}?transport=tcp")
        elif listener.transport != "tls":
            urls.append(f"turn:{host}:{listener.port}?transport={listener.transport}")
    entry = {"urls": urls, "username": username, "credential": password}
    return json.dumps(entry)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyturn")
def cli() -> None:
    """pyturn: a STUN/TURN relay server for WebRTC."""


@cli.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML config file (see conf/pyturn.yaml). Without it, an embedded default "
    "listens on UDP and TCP port 3478 with a random credential printed at start-up.",
)
def serve(config_path: Path | None) -> None:
    """Run the STUN/TURN server.

    SIGHUP reloads the config file (an invalid one is refused and the old one kept).
    SIGTERM or Ctrl-C drains: new allocations are refused, running ones keep relaying
    until they end or shutdown_timeout passes; a second SIGTERM or Ctrl-C stops at once.
    With `workers` other than 1 (0, the default, is one per CPU) a supervisor runs that
    many worker processes on the same ports and passes these signals on to them.
    """
    from pyturn.net.addresses import default_relay_ipv4  # noqa: PLC0415
    from pyturn.net.errors import StartupError  # noqa: PLC0415
    from pyturn.net.supervisor import supervise, worker_count  # noqa: PLC0415 (fast --help)
    from pyturn.net.worker import run  # noqa: PLC0415

    if config_path is None:
        config, username, password = _embedded_default()
        host = default_relay_ipv4(config)
        click.echo(
            "pyturn: no config file given, running on the embedded default.\n"
            f"  username:   {username}\n  password:   {password}\n"
            f"  ICE server: {_ice_server_hint(config, host, username, password)}",
            err=True,
        )
    else:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    try:
        use_logging_config(config.logging)
    except OSError as exc:
        raise click.ClickException(f"logging: {exc}") from exc
    for warning in config_warnings(config):
        logging.getLogger("pyturn.config").warning("%s", warning)
    try:
        if worker_count(config) > 1:
            supervise(config, config_path)
        else:
            run(config, config_path=config_path)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command(hidden=True)
@click.option("--control-fd", type=int, required=True)
def worker(control_fd: int) -> None:
    """One worker process of `workers: N`; started by `pyturn serve`, not by hand."""
    from pyturn.net.errors import StartupError  # noqa: PLC0415
    from pyturn.net.worker_process import run_worker  # noqa: PLC0415

    try:
        run_worker(control_fd)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print only errors (for ExecReload and scripts).")
def check_config(config_path: Path, quiet: bool) -> None:
    """Validate FILE and print the effective configuration (secrets redacted)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        click.echo(yaml.safe_dump(config_to_dict(config), sort_keys=False), nl=False)


@cli.command()
@click.option("--secret", required=True, help="A shared secret from auth.secrets.")
@click.option("--user", default=None, help="User id to embed in the username (optional).")
@click.option(
    "--ttl",
    default=86400,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds until the credential expires.",
)
@click.option(
    "--url",
    "urls",
    multiple=True,
    metavar="URL",
    help="ICE server URL(s) to include, e.g. turn:turn.example.org:3478.",
)
@click.option(
    "--separator",
    default=":",
    show_default=True,
    help="Between the expiry and --user: the server's auth.rest_separator.",
)
def credentials(
    secret: str, user: str | None, ttl: int, urls: tuple[str, ...], separator: str
) -> None:
    """Print TURN REST API credentials as JSON for RTCPeerConnection's iceServers.

    Allocation quotas and the bandwidth.per_user limit count every credential made with
    the same --user as that one user, however many are handed out; without --user each
    credential is a user of its own, held only by bandwidth.per_allocation and
    bandwidth.total.
    """
    minted = mint_rest_credential(secret, int(time.time()) + ttl, user, separator)
    entry = {"urls": list(urls), **minted, "ttl": ttl}
    click.echo(json.dumps(entry, indent=2))


@cli.command()
@click.argument("url", metavar="URL")
@click.option("--user", "username", help="Long-term credential username.")
@click.option("--password", help="Long-term credential password.")
@click.option(
    "--secret",
    help="A TURN REST API shared secret: the probe makes a credential from it "
    "(use instead of --password; --user becomes the user part).",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=60),
    help="Seconds to wait for each answer.",
)
@click.option("--insecure", is_flag=True, help="turns: do not verify the server's TLS certificate.")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="turns: verify the server's certificate against these CA certificates (PEM) "
    "instead of the system's.",
)
def probe(
    url: str,
    *,
    username: str | None,
    password: str | None,
    secret: str | None,
    timeout: float,
    insecure: bool,
    ca_file: str | None,
) -> None:
    """Check the TURN server at URL end to end, as a client would.

    URL is turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]. The probe sends a
    Binding request, allocates twice (after the 401 challenge), creates permissions and
    relays data between its two allocations in both directions (Send/Data indications,
    then ChannelData), then releases them. Each step is printed with its timing; the exit
    status is 0 when all passed, 1 when one failed.
    """
    from pyturn.probe import parse_turn_url, run_probe  # noqa: PLC0415 (fast --help)

    try:
        target = parse_turn_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from exc
    if secret is not None:
        if password is not None:
            raise click.UsageError("give --password or --secret, not both")
        username = rest_username(int(time.time()) + 3600, username)
        password = rest_password(secret, username)
    elif username is None or password is None:
        raise click.UsageError("give --user and --password (or --secret)")
    ok = run_probe(
        target,
        username,
        password,
        timeout=timeout,
        insecure=insecure,
        ca_file=ca_file,
        out=click.echo,
    )
    sys.exit(0 if ok else 1)


@cli.command("import-coturn")
@click.argument("source", required=False, metavar="FILE")
@click.option(
    "--args",
    "args_text",
    metavar="'ARGS'",
    help="coturn's command line, as Docker or Kubernetes pass it (such as "
    "'-n --use-auth-secret --static-auth-secret=S'); it applies over FILE, or over the "
    "file its -c names.",
)
def import_coturn(source: str | None, args_text: str | None) -> None:
    """Convert a coturn config (turnserver.conf; - reads standard input) to pyturn's.

    The pyturn config goes to standard output; standard error gets one line per coturn
    option: mapped (to which key), dropped (no effect in pyturn, and why) or unsupported
    (what you must decide), and warnings. Exit status 0 when everything was mapped or
    dropped, 1 when something is unsupported.
    """
    from pyturn import coturn_import  # noqa: PLC0415 (fast --help)

    options: list[coturn_import.Option] = []
    names: list[str] = []
    argv_options: list[coturn_import.Option] = []
    if args_text is not None:
        argv_options, named, no_file = coturn_import.read_args(coturn_import.split_args(args_text))
        if no_file and source is not None:
            raise click.UsageError("--args says -n (no config file): coturn reads no FILE")
        if source is None and named is not None and not no_file:
            source = named
    if source is not None:
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"cannot read {source}: {exc}") from exc
        name = "stdin" if source == "-" else source
        options += coturn_import.read_file(text, name)
        names.append(name)
    if args_text is not None:
        options += argv_options
        names.append("a command line")
    if not names:
        raise click.UsageError("give FILE (or -), or --args")
    config, outcomes = coturn_import.convert(options)
    click.echo(coturn_import.to_yaml(config, " and ".join(names)), nl=False)
    for outcome in outcomes:
        click.echo(outcome.line(), err=True)
    if any(outcome.kind == coturn_import.UNSUPPORTED for outcome in outcomes):
        sys.exit(1)


cli.add_command(user)
cli.add_command(secret)
cli.add_command(sessions)
cli.add_command(kick)
cli.add_command(revoke)
cli.add_command(reload_command)
cli.add_command(drain)


def main() -> None:
    cli(prog_name="pyturn")
