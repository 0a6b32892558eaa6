"""`pyturn user ...` and `pyturn secret ...`: the store that a config names (`store:`).

A running server picks the change up within a second (pyturn/net/store_follow.py).
Passwords are read from a prompt or standard input, never from the command line, and
only the keys derived from them are stored.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from pyturn.config import ConfigError, load_config
from pyturn.store import Store, StoreError, open_store

DEFAULT_CONFIG = Path("/etc/pyturn/pyturn.yaml")

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The config whose `store:` to use (and whose realm the keys are for).",
)


@contextmanager
def opened(config_path: Path) -> Iterator[tuple[Store, str]]:
    """The store and realm of a config; errors end the command with exit code 1."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if config.store is None:
        raise click.ClickException(
            f"{config_path}: no `store:` set; add one, such as"
            " store: sqlite:///var/lib/pyturn/users.db"
        )
    try:
        store = open_store(config.store, create=True)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store, config.realm
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password is empty")
    return password


@click.group()
def user() -> None:
    """Users in the store: add, remove, list, set-password."""


@user.command("add")
@click.argument("name")
@config_option
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(name: str, config_path: Path, password_stdin: bool) -> None:
    """Add user NAME (or replace its password)."""
    with opened(config_path) as (store, realm):
        store.add_user(name, realm, read_password(password_stdin))
    click.echo(f"user {name} added to realm {realm}")


@user.command("set-password")
@click.argument("name")
@config_option
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_set_password(name: str, config_path: Path, password_stdin: bool) -> None:
    """Give user NAME a new password."""
    with opened(config_path) as (store, realm):
        if name not in store.snapshot(realm).users:
            raise click.ClickException(f"no user {name} in realm {realm}")
        store.add_user(name, realm, read_password(password_stdin))
    click.echo(f"password of {name} changed")


@user.command("remove")
@click.argument("name")
@config_option
def user_remove(name: str, config_path: Path) -> None:
    """Remove user NAME; its running allocations end at their next refresh."""
    with opened(config_path) as (store, realm):
        if not store.remove_user(name, realm):
            raise click.ClickException(f"no user {name} in realm {realm}")
    click.echo(f"user {name} removed")


@user.command("list")
@config_option
def user_list(config_path: Path) -> None:
    """The store's users of the config's realm, one a line."""
    with opened(config_path) as (store, realm):
        for name in sorted(store.snapshot(realm).users):
            click.echo(name)


@click.group()
def secret() -> None:
    """TURN REST API secrets in the store: add, remove, list. All are accepted."""


@secret.command("add")
@config_option
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the secret from standard input.")
def secret_add(config_path: Path, from_stdin: bool) -> None:
    """Add a secret: a new random one, printed once, or the one read with --stdin."""
    value = sys.stdin.readline().strip() if from_stdin else secrets.token_urlsafe(32)
    if not value:
        raise click.ClickException("the secret is empty")
    with opened(config_path) as (store, realm):
        store.add_secret(value, realm)
    click.echo(value if not from_stdin else "secret added")


@secret.command("remove")
@config_option
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the secret from standard input.")
@click.argument("prefix", required=False)
def secret_remove(config_path: Path, from_stdin: bool, prefix: str | None) -> None:
    """Remove a secret: the one read with --stdin, or the one starting with PREFIX (as
    `pyturn secret list` shows it)."""
    with opened(config_path) as (store, realm):
        held = store.snapshot(realm).secrets
        if from_stdin:
            wanted = [sys.stdin.readline().strip()]
        else:
            wanted = [s for s in held if prefix and s.startswith(prefix)]
            if len(wanted) > 1:
                raise click.ClickException(f"{len(wanted)} secrets start with {prefix!r}")
        if not wanted or not store.remove_secret(wanted[0], realm):
            raise click.ClickException("no such secret")
    click.echo("secret removed")


@secret.command("list")
@config_option
def secret_list(config_path: Path) -> None:
    """The secrets, newest first, each shown by its first 6 characters."""
    with opened(config_path) as (store, realm):
        for value in store.snapshot(realm).secrets:
            click.echo(f"{value[:6]}...")
