"""A login of their own for each person (or host) who shares a PostgreSQL study database.

storage/initdb makes the group `<database>_users` (NOLOGIN), which holds every right a user has;
`add_user` makes a LOGIN role in it, as the database owner. One role per user means that no user can
change another's password or settings, or end another's sessions: PostgreSQL lets a role do that to
itself only. The password never travels in the clear: the server's own SCRAM verifier is computed
here (libpq's PQencryptPasswordConn) and only that is sent, so no statement log holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import UserError
from ..masking import mask
from .storage import first_line, resolve_url, short_engine, user_errors

GROUP_SUFFIX = "_users"  # storage/initdb/10-kmnist-roles.sh names the group the same way
# Plain lower-case names only: they go into URLs and SQL as they are, with nothing to quote or escape.
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MIN_PASSWORD = 12


@dataclass(frozen=True)
class AddedUser:
    name: str
    group: str
    created: bool  # False: the role was a user already, and got the new password
    url: str  # the storage URL to give them, the password shown as ***


def users_group(database: str) -> str:
    return f"{database}{GROUP_SUFFIX}"


def add_user(owner_url: str | None, name: str, password: str, *, address: str | None = None) -> AddedUser:
    """Make `name` a LOGIN role in the database's users group with `password`, or, if it is a user of
    that group already, give it that password (and reset its settings). Run as the database owner."""
    url = resolve_url(owner_url)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise UserError(f"users are PostgreSQL roles: {mask(url)} is no PostgreSQL database; give the owner's postgresql:// URL")
    if not NAME.fullmatch(name):
        raise UserError(f"user name {name!r}: use lower-case letters, digits and _ (63 at most), starting with a letter or _")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is shorter than {MIN_PASSWORD} characters; use a long random one (`openssl rand -hex 24`)")
    database = str(parsed.database or "")
    group = users_group(database)
    import psycopg

    with user_errors(url), short_engine(url) as eng, eng.connect() as conn:
        pg = conn.connection.driver_connection  # psycopg's: its libpq computes the verifier
        assert pg is not None
        try:
            created = _add(pg, name, group, password)
        except psycopg.Error as e:
            raise UserError(f"cannot add user {name} to {mask(url)}: {first_line(e)}") from None
    return AddedUser(name, group, created, _user_url(parsed, name, address))


def _add(pg: Any, name: str, group: str, password: str) -> bool:
    from psycopg import sql

    me, may = pg.execute("SELECT current_user, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
    if not may:
        raise UserError(f"role {me} may not create roles: run `db add-user` as the database owner (POSTGRES_USER)")
    row = pg.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (group,)).fetchone()
    if row is None or row[0]:
        raise UserError(
            f"this database has no users group {group} (a NOLOGIN role): run storage/initdb's 10-kmnist-roles.sh "
            "for it again (storage/README.md), which makes it"
        )
    if name in (me, group):
        raise UserError(f"{name} is {'you' if name == me else 'the users group'}; choose another user name")
    row = pg.execute(
        "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls, rolcanlogin, "
        "EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid AND g.rolname = %s) "
        "FROM pg_roles r WHERE rolname = %s",
        (group, name),
    ).fetchone()
    if row is not None and (row[0] or not row[1] or not row[2]):
        raise UserError(f"role {name} exists and is not a user of this database (a plain login in {group}); choose another name")
    verifier = pg.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
    role, grp = sql.Identifier(name), sql.Identifier(group)
    # One transaction (psycopg began it with the first query above): all of it, or nothing.
    if row is None:
        pg.execute(
            sql.SQL(
                "CREATE ROLE {} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}"
            ).format(role, sql.Literal(verifier))
        )
        pg.execute(sql.SQL("GRANT {} TO {}").format(grp, role))
    else:
        pg.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(role, sql.Literal(verifier)))
        pg.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(role))
    pg.commit()
    return row is None


def _user_url(owner: Any, name: str, address: str | None) -> str:
    """postgresql+psycopg://NAME:***@HOST:PORT/DB, at `address` (HOST:PORT, PgBouncer's) or the owner's."""
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or re.search(r"[\s/@?#]", host):
            raise UserError(f"--address {address!r}: give HOST:PORT, where users connect (PgBouncer: db-host:6432)")
        where = address
    else:
        where = f"{owner.host or 'localhost'}" + (f":{owner.port}" if owner.port else "")
    query = "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in sorted(owner.query.items()) if k != "password")
    return f"postgresql+psycopg://{name}:***@{where}/{quote(str(owner.database or ''))}" + (f"?{query}" if query else "")
