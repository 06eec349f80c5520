"""Engines, DSNs and the database schema.

Owns three things and nothing else:

* turning what a user passes as ``dsn`` (a libpq URL, a SQLAlchemy URL, an
  :class:`~sqlalchemy.engine.Engine`, or nothing) into an Engine on the
  psycopg 3 driver (:func:`resolve_url`, :func:`create_engine`);
* bringing a sessionstore schema to the newest alembic revision shipped in the
  package (:func:`ensure_schema`), serialised across processes by an advisory
  lock, with a per-process cache so that repeated ``Store()`` constructions
  cost nothing;
* checking names that are spliced into SQL (:func:`validate_identifier`).

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
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, ProgrammingError

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "DEFAULT_SCHEMA",
    "DSN_ENV",
    "alembic_config",
    "clear_schema_cache",
    "create_engine",
    "current_revision",
    "display_url",
    "driver_connection",
    "driver_cursor",
    "ensure_schema",
    "head_revision",
    "migrate_lock_key",
    "resolve_url",
    "script_location",
    "validate_identifier",
]

_log = logging.getLogger(__name__)

DEFAULT_SCHEMA = "sessionstore"
"""Schema that holds sessionstore's tables unless a Store says otherwise."""

DSN_ENV = "SESSIONSTORE_DSN"
"""Environment variable consulted when no ``dsn`` is given."""

_DRIVER = "postgresql+psycopg"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# libpq key/value names that map onto URL parts; the rest become query params.
_KV_URL_PARTS = ("user", "password", "host", "port", "dbname")


def validate_identifier(name: str) -> str:
    """Return ``name`` if it is a safe lower-case PostgreSQL identifier.

    Schema names are spliced into SQL text, so only ``[a-z_][a-z0-9_]*`` of at
    most 63 characters is accepted (no quoting surprises, no case folding).

    Raises:
        ValueError: ``name`` is not such an identifier.
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(
            f"invalid PostgreSQL identifier {name!r}: expected 1-63 characters of "
            "lower-case letters, digits and '_', not starting with a digit"
        )
    return name


# --------------------------------------------------------------------- URLs


def _from_keyvalue(dsn: str) -> URL:
    """Parse a libpq ``key=value`` connection string into a SQLAlchemy URL."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception as exc:
        raise ValueError(f"cannot parse connection string: {exc}") from None
    host = params.pop("host", None)
    query = {k: v for k, v in params.items() if k not in _KV_URL_PARTS}
    if host is not None and (host.startswith("/") or "," in host):
        query["host"] = host  # socket directory or multi-host: keep it as libpq does
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


def resolve_url(dsn: str | None) -> str:
    """Return a SQLAlchemy URL string on the psycopg 3 driver for ``dsn``.

    ``dsn`` may be ``None`` (then ``$SESSIONSTORE_DSN``, then the embedded
    server of :mod:`sessionstore.embedded`), a libpq URL (``postgresql://`` or
    ``postgres://``), a SQLAlchemy URL on any PostgreSQL driver
    (``postgresql+psycopg2://`` ...) or a libpq ``key=value`` string. Query
    parameters such as ``host=/socket/dir`` or ``sslmode`` are preserved.

    Raises:
        ValueError: the DSN cannot be parsed or is not a PostgreSQL DSN.
    """
    if dsn is None:
        dsn = os.environ.get(DSN_ENV) or None
    if dsn is None:
        from sessionstore.embedded import embedded_dsn

        dsn = embedded_dsn()
    dsn = dsn.strip()
    if not dsn:
        raise ValueError("empty DSN")
    if "://" not in dsn:
        if "=" not in dsn:
            raise ValueError(f"not a PostgreSQL DSN: {dsn!r}")
        return _from_keyvalue(dsn).render_as_string(hide_password=False)
    try:
        url = make_url(dsn)
    except ArgumentError:
        raise ValueError("cannot parse DSN (expected postgresql://user:pw@host:port/db)") from None
    backend = url.drivername.split("+", 1)[0]
    if backend not in ("postgresql", "postgres"):
        raise ValueError(
            f"not a PostgreSQL DSN: {url.render_as_string(hide_password=True)!r} "
            f"(scheme {url.drivername!r})"
        )
    return url.set(drivername=_DRIVER).render_as_string(hide_password=False)


def display_url(url: str | URL) -> str:
    """``url`` for messages and logs: password hidden, query readable."""
    from urllib.parse import unquote

    return unquote(make_url(url).render_as_string(hide_password=True))


def create_engine(
    dsn: str | Engine | None,
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
        ValueError: the Engine uses another driver, or the DSN is invalid.
    """
    if isinstance(dsn, Engine):
        if dsn.dialect.name != "postgresql" or dsn.dialect.driver != "psycopg":
            raise ValueError(
                "sessionstore needs a PostgreSQL engine on the psycopg (3) driver, "
                f"got {dsn.dialect.name}+{dsn.dialect.driver} "
                f"({dsn.url.render_as_string(hide_password=True)}); "
                "use a 'postgresql+psycopg://' URL"
            )
        return dsn
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    url = make_url(resolve_url(dsn))
    _log.debug("creating engine for %s", url.render_as_string(hide_password=True))
    return sqlalchemy.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        connect_args={"application_name": application_name, "connect_timeout": 10},
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )


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
_ready: set[tuple[str, str]] = set()


def _cache_key(engine: Engine, schema: str) -> tuple[str, str]:
    return (engine.url.render_as_string(hide_password=True), schema)


def clear_schema_cache() -> None:
    """Forget which schemas this process has seen at head (after dropping one)."""
    with _ready_lock:
        _ready.clear()


def ensure_schema(engine: Engine, schema: str = DEFAULT_SCHEMA) -> None:
    """Bring ``schema`` to the newest shipped alembic revision.

    Fast path: a schema already at head costs one query, and nothing at all
    once this process has seen it at head. Slow path: take a session advisory
    lock (so that processes starting together migrate one at a time), check
    again, run ``alembic upgrade head`` on that connection in one transaction,
    and unlock. A database at a revision this package does not know (a newer
    deploy migrated it) is left alone.
    """
    validate_identifier(schema)
    key = _cache_key(engine, schema)
    with _ready_lock:
        if key in _ready:
            return
    head, known = _shipped_revisions()
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
        with _ready_lock:
            _ready.add(key)
        return

    from alembic import command

    lock_key = migrate_lock_key(schema)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_key})
        conn.commit()
        try:
            revision = _read_revision(conn, schema, savepoint=True)
            if revision != head and (revision is None or revision in known):
                _log.info(
                    "upgrading schema %r of %s from %s to %s",
                    schema,
                    engine.url.render_as_string(hide_password=True),
                    revision,
                    head,
                )
                command.upgrade(alembic_config(schema, conn), "head")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key})
                conn.commit()
            except Exception:  # the connection is gone: so is its advisory lock
                conn.invalidate()
    with _ready_lock:
        _ready.add(key)


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
