"""Who may use a PostgreSQL study database, for its owner: db add-user."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import UserError
from .apps import db_app
from .options import StorageOpt, out

PASSWORD_ENV = "KMNIST_TUNE_NEW_PASSWORD"


@db_app.command("add-user")
def add_user(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the user's login: lower-case letters, digits and _")],
    storage: StorageOpt = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            metavar="HOST:PORT",
            help="where the user connects, for the URL printed (PgBouncer's, e.g. db-host:6432); default the --storage URL's",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Give a person (or a host) a login of their own in the study database: a role in its users group
    (storage/initdb made it), which may read and write every study and change only its own password and
    settings. An existing user of the group gets the new password instead. Run it as the database owner
    (--storage is the owner's URL). The password comes from $KMNIST_TUNE_NEW_PASSWORD, or is asked for;
    never from an argument. Prints the storage URL to give them (the password as ***)."""
    from ..service.users import add_user as add

    added = add(storage, name, _new_password(name), address=address)
    what = "created" if added.created else "already a user: new password set, its settings reset"
    out(f"user {added.name}: {what}; a member of {added.group}, so it may read and write every study of this database")
    out(f"give them: {added.url} (and the password, apart)")


def _new_password(name: str) -> str:
    password = os.environ.get(PASSWORD_ENV, "")
    if password:
        return password
    if not sys.stdin.isatty():
        raise UserError(f"no password for {name}: set {PASSWORD_ENV}, or run this in a terminal, where it asks for one")
    import getpass

    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ; nothing changed")
    return first
