"""Engines, DSNs and the database schema.

Owns four things and nothing else:

* turning what a user passes as ``dsn`` (a libpq URL, a libpq ``key=value``
  string, a SQLAlchemy URL, an :class:`~sqlalchemy.engine.Engine`, or
  nothing) into an Engine on the psycopg 3 driver (:func:`parse_dsn`,
  :func:`resolve_url`, :func:`create_engine`), and a URL into the libpq
  connection string of the same server for connections made with psycopg
  directly (:func:`libpq_conninfo`); no error message quotes a password;
* bringing a sessionstore schema to the newest alembic revision shipped in the
  package (:func:`ensure_schema`), serialised across processes by an advisory
  lock, with a per-process cache so that repeated ``Store()`` constructions
  cost nothing, and retried like every other database call;
* checking names that are spliced into SQL (:func:`validate_identifier`,
  :func:`validate_schema_name`).

The DDL itself lives in the alembic revisions under the top-level ``alembic/``
folder of the repository, shipped in the wheel as ``sessionstore._alembic``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, ProgrammingError

from .errors import ArgumentTypeError, InsufficientPrivilegeError, InvalidArgumentError
from .retry import INSUFFICIENT_PRIVILEGE, RetryPolicy, describe, sqlstate_of, with_retries

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "DEFAULT_SCHEMA",
    "DSN_ENV",
    "alembic_config",
    "check_engine",
    "clear_schema_cache",
    "create_engine",
    "current_revision",
    "disable_prepared_statements",
    "display_url",
    "driver_connection",
    "driver_cursor",
    "ensure_schema",
    "head_revision",
    "libpq_conninfo",
    "migrate_lock_key",
    "parse_dsn",
    "resolve_url",
    "script_location",
    "validate_identifier",
    "validate_schema_name",
]

_log = logging.getLogger(__name__)

DEFAULT_SCHEMA = "sessionstore"
"""Schema that holds sessionstore's tables unless a Store says otherwise."""

DSN_ENV = "SESSIONSTORE_DSN"
"""Environment variable consulted when no ``dsn`` is given."""

_DRIVER = "postgresql+psycopg"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# libpq key/value names that map onto URL parts; the rest become query params.
_KV_URL_PARTS = ("user", "password", "host", "port", "dbname")
# Query parameters never shown: a password without a user, a client key's passphrase.
_SECRET_PARAMS = ("password", "sslpassword")


def validate_identifier(name: object, option: str = "identifier") -> str:
    """Return ``name`` if it is a safe lower-case PostgreSQL identifier.

    Schema names are spliced into SQL text, so only ``[a-z_][a-z0-9_]*`` of at
    most 63 characters is accepted (no quoting surprises, no case folding).

    Raises:
        ArgumentTypeError: ``name`` is not a str.
        InvalidArgumentError: ``name`` is not such an identifier (a ValueError).
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"{option} must be a str, not {type(name).__name__}")
    if not _IDENTIFIER.fullmatch(name):
        raise InvalidArgumentError(
            f"{option}: invalid PostgreSQL identifier {name!r}: expected 1-63 characters of "
            "lower-case letters, digits and '_', not starting with a digit"
        )
    return name


def validate_schema_name(name: object, option: str = "db_schema") -> str:
    """Return ``name`` if sessionstore may keep its tables in a schema of that name.

    A valid identifier (:func:`validate_identifier`) that is not a system
    schema: ``information_schema``, or any name starting with ``pg_``, which
    PostgreSQL reserves (``pg_catalog``, ``pg_toast``, ``pg_temp_3`` ...).
    """
    validate_identifier(name, option)
    assert isinstance(name, str)
    if name.startswith("pg_") or name == "information_schema":
        raise InvalidArgumentError(
            f"{option}: {name!r} is a PostgreSQL system schema (names starting with 'pg_' "
            "and information_schema are reserved); choose another, e.g. 'sessionstore'"
        )
    return name


# --------------------------------------------------------------------- URLs

_KEYVALUE_HELP = (
    "expected space-separated key=value pairs such as "
    '"host=db dbname=app user=me password=..."; quote a value holding spaces, '
    "quotes or backslashes in single quotes, escaping ' and \\ with a backslash"
)


def _from_keyvalue(dsn: str) -> URL:
    """Parse a libpq ``key=value`` connection string into a SQLAlchemy URL."""
    try:
        parsed: dict[str, Any] | None = conninfo_to_dict(dsn)
    except Exception:
        parsed = None
    if parsed is None:
        # Raised here, outside the handler, so that not even __context__ keeps
        # libpq's message: it quotes the text near the mistake, which may well
        # be a piece of the password (`password=my secret` fails at "secret").
        raise InvalidArgumentError(f"cannot parse the connection string: {_KEYVALUE_HELP}")
    params = {k: str(v) for k, v in parsed.items() if v is not None}
    host = params.pop("host", None)
    query: dict[str, str | list[str]] = {k: v for k, v in params.items() if k not in _KV_URL_PARTS}
    if host is not None and "," in host:
        # Several hosts: SQLAlchemy's psycopg dialect takes them as repeated
        # host=name:port query entries (a port list of one applies to all).
        ports = params.pop("port", "").split(",")
        hosts = host.split(",")
        if len(ports) == 1:
            ports *= len(hosts)
        if len(ports) != len(hosts):
            raise InvalidArgumentError(
                "the connection string has a different number of hosts and ports"
            )
        query["host"] = [f"{h}:{p}" if p else h for h, p in zip(hosts, ports, strict=True)]
        host = None
    elif host is not None and host.startswith("/"):
        query["host"] = host  # a socket directory: keep it as libpq does
        host = None
    if "password" in params and "user" not in params:
        query["password"] = params["password"]  # a URL cannot carry a password without a user
    port = params.get("port")
    return URL.create(
        _DRIVER,
        username=params.get("user"),
        password=params.get("password"),
        host=host,
        port=int(port) if port and port.isdigit() else None,
        database=params.get("dbname"),
        query=query,
    )


def _on_psycopg(url: URL) -> URL:
    """``url`` on the psycopg 3 driver, if it is a PostgreSQL URL at all."""
    backend = url.drivername.split("+", 1)[0]
    if backend not in ("postgresql", "postgres"):
        raise InvalidArgumentError(
            f"not a PostgreSQL DSN: {display_url(url)!r} (scheme {url.drivername!r})"
        )
    return url.set(drivername=_DRIVER)


def parse_dsn(dsn: str | URL) -> URL:
    """The SQLAlchemy URL, on the psycopg 3 driver, of a DSN given as text or URL.

    Accepts a libpq URL (``postgresql://`` or ``postgres://``), a SQLAlchemy
    URL on any PostgreSQL driver (``postgresql+psycopg2://`` ...), as text or
    as a :class:`~sqlalchemy.engine.URL`, or a libpq ``key=value`` string.
    Query parameters such as ``host=/socket/dir``, ``sslmode`` or
    ``options`` are preserved. No I/O.

    Raises:
        ArgumentTypeError: ``dsn`` is neither a str nor a URL.
        InvalidArgumentError: it cannot be parsed or is not a PostgreSQL DSN;
            the message never quotes the DSN's password.
    """
    if isinstance(dsn, URL):
        return _on_psycopg(dsn)
    if not isinstance(dsn, str):
        raise ArgumentTypeError(
            f"dsn must be a str, a sqlalchemy URL or Engine, not {type(dsn).__name__}"
        )
    dsn = dsn.strip()
    if not dsn:
        raise InvalidArgumentError("empty DSN")
    if "://" not in dsn:
        if "=" not in dsn:  # not quoted: it may be all password (`u:pw@host/db`)
            raise InvalidArgumentError(
                "not a PostgreSQL DSN: expected postgresql://user:password@host:port/dbname "
                "or libpq key=value pairs"
            )
        return _from_keyvalue(dsn)
    if dsn.startswith(("postgresql://", "postgres://")) and "," in dsn.split("/", 3)[2]:
        # libpq's multi-host URL (postgresql://u@db1:5432,db2:5432/app, the
        # failover shape of docs/scaling.md): SQLAlchemy's parser takes the
        # host list for one host with a bad port; libpq's own parser, behind
        # the key=value path, reads it as libpq will.
        return _from_keyvalue(dsn)
    try:
        url: URL | None = make_url(dsn)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        url = None
    if url is None:  # raised outside the handler: the parser's message may quote the DSN
        raise InvalidArgumentError(
            "cannot parse DSN (expected postgresql://user:password@host:port/dbname)"
        )
    return _on_psycopg(url)


def resolve_url(dsn: str | URL | None) -> str:
    """Return a SQLAlchemy URL string on the psycopg 3 driver for ``dsn``.

    ``dsn`` may be ``None`` (then ``$SESSIONSTORE_DSN``, then the embedded
    server of :mod:`sessionstore.embedded`) or anything :func:`parse_dsn`
    takes.

    Raises:
        InvalidArgumentError: the DSN cannot be parsed or is not a PostgreSQL
            DSN (a ValueError).
    """
    if dsn is None:
        dsn = os.environ.get(DSN_ENV) or None
    if dsn is None:
        from sessionstore.embedded import embedded_dsn

        dsn = embedded_dsn()
    return parse_dsn(dsn).render_as_string(hide_password=False)


def libpq_conninfo(url: str | URL) -> str:
    """The libpq connection string (``key=value`` pairs) of the server ``url`` names.

    For connections that sessionstore makes with psycopg directly (the
    control connection). The parameters are the ones SQLAlchemy's psycopg
    dialect gives psycopg for the same URL, so both reach the same server
    with the same settings (multi-host lists, ``host=/socket/dir``,
    ``options=-c statement_timeout=5000``). Quoted by psycopg, not rendered
    as a URL: SQLAlchemy renders a space in a query value as ``+``, which
    libpq does not decode, and leaves a space in a password bare, which
    libpq refuses (quoting the password in its message).
    """
    url = url if isinstance(url, URL) else make_url(url)
    dialect = url.set(drivername=_DRIVER).get_dialect()()
    args, params = dialect.create_connect_args(url)
    return make_conninfo(*args, **{k: v for k, v in params.items() if v is not None})


def display_url(url: str | URL) -> str:
    """``url`` for messages and logs: password hidden, query readable.

    The query is shown decoded (``options=-c statement_timeout=5000``, not
    SQLAlchemy's ``-c+statement_timeout%3D5000``); a ``password`` in it
    (a ``key=value`` DSN without a user) and an ``sslpassword`` (the client
    key's passphrase) are hidden too.
    """
    from urllib.parse import unquote

    url = url if isinstance(url, URL) else make_url(url)
    shown = unquote(url.set(query={}).render_as_string(hide_password=True))
    pairs = [
        f"{name}={'***' if name in _SECRET_PARAMS else value}"
        for name, values in url.query.items()
        for value in ((values,) if isinstance(values, str) else values)
    ]
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


def check_engine(engine: Engine) -> Engine:
    """``engine`` if it is a PostgreSQL engine on the psycopg (3) driver.

    Raises:
        InvalidArgumentError: it uses another database or driver.
    """
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        raise InvalidArgumentError(
            "sessionstore needs a PostgreSQL engine on the psycopg (3) driver, "
            f"got {engine.dialect.name}+{engine.dialect.driver} "
            f"({display_url(engine.url)}); use a 'postgresql+psycopg://' URL"
        )
    return engine


def create_engine(
    dsn: str | URL | Engine | None,
    *,
    pool_size: int = 10,
    application_name: str = "sessionstore",
    autocommit: bool = False,
) -> Engine:
    """Return an Engine on the psycopg 3 driver for ``dsn``.

    An Engine passed in is returned as is (its pool settings are the caller's)
    if it uses psycopg 3; anything else goes through :func:`resolve_url`.
    ``autocommit`` makes every pooled connection autocommit from the start,
    which costs nothing per checkout (an ``execution_options`` isolation
    level is set and reset on every checkout: 73 µs against 34 µs, measured).

    Raises:
        InvalidArgumentError: the Engine uses another driver, or the DSN is
            invalid (a ValueError).
    """
    if isinstance(dsn, Engine):
        return check_engine(dsn)
    if pool_size < 1:
        raise InvalidArgumentError(f"pool_size must be >= 1, got {pool_size}")
    url = make_url(resolve_url(dsn))
    _log.debug("creating engine for %s", display_url(url))
    return sqlalchemy.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        # Defaults only: an application_name or connect_timeout in the DSN wins.
        connect_args={
            "fallback_application_name": application_name,
            **({} if "connect_timeout" in url.query else {"connect_timeout": 10}),
        },
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )


_unprepare_lock = threading.Lock()


def _prepare_nothing(dbapi_connection: Any, _record: Any) -> None:
    """Pool ``connect`` listener: psycopg prepares no statement on this connection."""
    dbapi_connection.prepare_threshold = None


def disable_prepared_statements(engine: Engine) -> bool:
    """Make psycopg prepare no statement on ``engine``'s connections; False if already so.

    psycopg prepares a statement on the server once a connection has run it
    ``prepare_threshold`` times (5). A pool that keeps no prepared statement
    across transactions (PgBouncer in transaction mode before 1.21) then
    answers that it does not exist, or that another client's of the same
    name does. Every new connection of the pool gets ``prepare_threshold =
    None`` (a ``connect`` listener; it outlives ``dispose``, so a forked
    child keeps it) and the pool is disposed: idle connections are closed
    now, those in use when they come back (their statement caches name
    statements the server may not have). An Engine a user passed is changed
    the same way: its connections are the same connections.

    ``cursor.execute(..., prepare=None)`` follows the connection's setting,
    so the storage layer's statements are covered; ``prepare=False`` never
    prepares anyway.
    """
    with _unprepare_lock:
        # Not event.contains(): it knows only the pool listened to, and dispose()
        # (here, or after a fork) replaces the pool, carrying its listeners over.
        if _prepare_nothing in engine.pool.dispatch.connect:
            return False
        sqlalchemy.event.listen(engine.pool, "connect", _prepare_nothing)
        engine.dispose()
    _log.debug("prepared statements off for %s", display_url(engine.url))
    return True


# ------------------------------------------------------------------ schema


def script_location() -> Path:
    """Directory of the shipped alembic environment (``sessionstore._alembic``).

    ``sessionstore._alembic`` is the repository's top-level ``alembic/`` folder,
    mapped into the package at build time. It has no ``__init__.py`` (a
    top-level package named ``alembic`` would shadow the alembic library when
    the repository root is on ``sys.path``), so it is a namespace package: its
    search locations are read from its spec, which works for wheels and for
    editable installs alike (``importlib.resources.files`` does not, for
    namespace packages of editable installs, before Python 3.12).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("sessionstore._alembic")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations is not None:
        candidates.extend(Path(location) for location in spec.submodule_search_locations)
    # A source tree that was not installed: <repo>/alembic next to <repo>/sessionstore.
    candidates.append(Path(__file__).resolve().parent.parent / "alembic")
    for path in candidates:
        if (path / "env.py").is_file() and (path / "versions").is_dir():
            return path
    raise RuntimeError(
        "cannot find sessionstore's alembic scripts (package sessionstore._alembic); "
        "reinstall sessionstore"
    )


def alembic_config(schema: str = DEFAULT_SCHEMA, connection: Connection | None = None) -> Config:
    """Return an :class:`alembic.config.Config` for ``schema``.

    With ``connection``, migrations run on it (the caller commits).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["schema"] = validate_identifier(schema)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


_revisions_lock = threading.Lock()
_revisions: tuple[str, frozenset[str]] | None = None


def _shipped_revisions() -> tuple[str, frozenset[str]]:
    """(head, all revision ids) of the alembic scripts shipped with this package."""
    global _revisions
    with _revisions_lock:
        if _revisions is None:
            from alembic.script import ScriptDirectory

            scripts = ScriptDirectory.from_config(alembic_config())
            head = scripts.get_current_head()
            if head is None:
                raise RuntimeError("sessionstore ships no alembic revision")
            known = frozenset(rev.revision for rev in scripts.walk_revisions())
            _revisions = (head, known)
        return _revisions


def head_revision() -> str:
    """Newest alembic revision shipped with this package."""
    return _shipped_revisions()[0]


def _read_revision(conn: Connection, schema: str, *, savepoint: bool) -> str | None:
    """Revision stamped in ``schema``, or None if it has no version table.

    Without ``savepoint`` a missing table aborts the connection's transaction
    (the caller rolls back); with it, the transaction stays usable.
    """
    query = text(f'SELECT version_num FROM "{schema}".alembic_version')
    try:
        if savepoint:
            with conn.begin_nested():
                revisions = list(conn.execute(query).scalars())
        else:
            revisions = list(conn.execute(query).scalars())
    except ProgrammingError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate in ("42P01", "3F000"):  # undefined_table, invalid_schema_name
            return None
        raise
    if len(revisions) > 1:
        raise RuntimeError(f"schema {schema!r} has several alembic heads: {revisions}")
    return str(revisions[0]) if revisions else None


def current_revision(engine: Engine, schema: str = DEFAULT_SCHEMA) -> str | None:
    """Alembic revision of ``schema`` in the database, or None if not created."""
    validate_identifier(schema)
    with engine.connect() as conn:
        try:
            return _read_revision(conn, schema, savepoint=False)
        finally:
            conn.rollback()


def migrate_lock_key(schema: str) -> int:
    """Stable signed 64-bit advisory lock key serialising migrations of ``schema``."""
    digest = hashlib.blake2b(f"sessionstore:migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_ready_lock = threading.Lock()


def _new_locks() -> None:
    """In a forked child: fresh locks (another thread may have held one at the fork)."""
    global _ready_lock, _revisions_lock
    _ready_lock = threading.Lock()
    _revisions_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks)
_ready: set[tuple[str, str]] = set()


def _cache_key(engine: Engine, schema: str) -> tuple[str, str]:
    return (engine.url.render_as_string(hide_password=True), schema)


def clear_schema_cache() -> None:
    """Forget which schemas this process has seen at head (after dropping one)."""
    with _ready_lock:
        _ready.clear()


def ensure_schema(
    engine: Engine, schema: str = DEFAULT_SCHEMA, *, retry: RetryPolicy | None = None
) -> None:
    """Bring ``schema`` to the newest shipped alembic revision.

    Fast path: a schema already at head costs one query, and nothing at all
    once this process has seen it at head. Slow path, in one transaction: take
    a transaction advisory lock (so that processes starting together migrate
    one at a time), check again, run ``alembic upgrade head``, and commit,
    which unlocks (also through PgBouncer in transaction mode). A database at
    a revision this package does not know (a newer deploy migrated it) is left
    alone.

    Database errors go through :func:`~sessionstore.retry.with_retries` with
    ``retry`` (default: :class:`RetryPolicy`'s 10 s): a server that does not
    answer raises :class:`StorageUnavailableError` once that runs out, any
    other database error at once; the message hides the password.

    Raises:
        InsufficientPrivilegeError: the role may not read the schema's
            revision, or the schema is behind head and the role may not
            upgrade it (it does not own it): the message gives both revisions
            and says to run ``sessionstore db upgrade`` as the schema's owner.
            A role without DDL rights never attempts DDL here.
    """
    validate_schema_name(schema, "schema")
    key = _cache_key(engine, schema)
    with _ready_lock:
        if key in _ready:
            return
    head, known = _shipped_revisions()
    password = engine.url.password
    with_retries(
        retry if retry is not None else RetryPolicy(),
        f"schema {schema!r} of {display_url(engine.url)}: ensure schema",
        lambda: _bring_to_head(engine, schema, head, known),
        secrets=[str(password)] if password else [],
    )
    with _ready_lock:
        _ready.add(key)


def _bring_to_head(engine: Engine, schema: str, head: str, known: frozenset[str]) -> None:
    """One attempt of :func:`ensure_schema`."""
    # Transactions here, whatever the engine's own default (a Store's is autocommit).
    engine = engine.execution_options(isolation_level="READ COMMITTED")
    revision = current_revision(engine, schema)
    if revision == head or (revision is not None and revision not in known):
        if revision != head:
            _log.warning(
                "schema %r is at revision %r, unknown to this sessionstore (head %r): "
                "a newer version migrated it; leaving it alone",
                schema,
                revision,
                head,
            )
        return
    role = _check_may_upgrade(engine, schema, revision, head)

    lock_key = migrate_lock_key(schema)
    with engine.connect() as conn:
        try:
            # A transaction lock, released by the commit. A session lock would,
            # behind PgBouncer in transaction mode, stay on the server connection
            # that took it (the unlock runs on another) and block every later upgrade.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
            revision = _read_revision(conn, schema, savepoint=True)
            if revision != head and (revision is None or revision in known):
                _log.info(
                    "upgrading schema %r of %s from %s to %s",
                    schema,
                    display_url(engine.url),
                    revision,
                    head,
                )
                _upgrade(conn, schema, revision, head, role)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


# Who may migrate: alembic alters the schema's tables, so their owner (a
# member of the role owning the schema), or for a schema not created yet a
# role that may create one in the database. Checked before the advisory lock,
# so a role with DML rights only never attempts DDL.
_MAY_UPGRADE = text(
    "SELECT current_user AS role, "
    "has_database_privilege(current_database(), 'CREATE') AS may_create, "
    "(SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace "
    "WHERE nspname = :schema) AS owns"
)


def _behind_head(schema: str, revision: str | None, head: str, role: str, why: str) -> str:
    """The message for a schema behind head that this role may not upgrade."""
    at = "is not created" if revision is None else f"is at revision {revision}"
    return (
        f"schema {schema!r} {at}, this sessionstore needs revision {head}, and the database "
        f"role {role!r} may not upgrade it ({why}): run `sessionstore db upgrade --schema "
        f"{schema}` as the schema's owner, then start the application again"
    )


def _check_may_upgrade(engine: Engine, schema: str, revision: str | None, head: str) -> str:
    """The current role's name if it may bring ``schema`` to head, else the error saying who may.

    Raises:
        InsufficientPrivilegeError: it does not own the schema, or may not
            create it (a role with DML rights only, as an application should be).
    """
    with engine.connect() as conn:
        row = conn.execute(_MAY_UPGRADE, {"schema": schema}).one()
        conn.rollback()
    role = str(row.role)
    if row.owns is None and not row.may_create:
        why = "it may not create schemas in this database"
    elif row.owns is False:
        why = "it does not own the schema"
    else:
        return role
    raise InsufficientPrivilegeError(_behind_head(schema, revision, head, role, why))


def _upgrade(conn: Connection, schema: str, revision: str | None, head: str, role: str) -> None:
    """``alembic upgrade head`` on ``conn``; a denied DDL statement says what to run instead."""
    from alembic import command

    try:
        command.upgrade(alembic_config(schema, conn), "head")
    except DBAPIError as exc:
        if sqlstate_of(exc) != INSUFFICIENT_PRIVILEGE:
            raise
        # The owner may still lack a right (CREATE on the database, say): name
        # it and the command, not which statement of which revision failed.
        raise InsufficientPrivilegeError(
            _behind_head(schema, revision, head, role, describe(exc))
        ) from exc


def driver_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection (the engine is psycopg 3)."""
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"sessionstore needs the psycopg driver, not {type(driver).__name__}")
    return driver


def driver_cursor(conn: Connection, *, binary: bool = False) -> psycopg.Cursor[Any]:
    """A psycopg cursor (rows as named tuples) on a SQLAlchemy connection's driver connection.

    For the few statements SQLAlchemy cannot run as well: binary transfer of
    document bytes, and ``prepare=False`` for statements over large arrays
    (psycopg prepares a statement after five runs, and PostgreSQL may then
    switch to a generic plan that ignores the array sizes: seconds instead
    of milliseconds for 10,000 leases, measured).
    """
    return driver_connection(conn).cursor(binary=binary, row_factory=namedtuple_row)
