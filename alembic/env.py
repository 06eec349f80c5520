"""Alembic environment of sessionstore (shipped as ``sessionstore._alembic``).

The schema name is configurable: it comes from ``config.attributes["schema"]``
(set by :func:`sessionstore.db.ensure_schema`) or from ``-x schema=NAME`` on the
alembic command line, default ``sessionstore``. The ``alembic_version`` table
lives in that schema too, so several sessionstore schemas can share a database.

Online mode uses the connection in ``config.attributes["connection"]`` when one
is given (the caller owns its transaction and commits it); otherwise it builds
an engine from ``sqlalchemy.url``, ``-x dsn=...`` or ``$SESSIONSTORE_DSN``.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, create_engine, pool, text

from alembic import context

config = context.config

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _schema() -> str:
    schema = config.attributes.get("schema") or context.get_x_argument(as_dictionary=True).get(
        "schema", "sessionstore"
    )
    if not isinstance(schema, str) or not _IDENTIFIER.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: expected [a-z_][a-z0-9_]{{0,62}}")
    return schema


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option(
        "sqlalchemy.url"
    )
    from sessionstore.db import resolve_url

    return resolve_url(url or None)


def _configure(connection: Connection, schema: str) -> None:
    context.configure(
        connection=connection,
        version_table_schema=schema,
        include_schemas=False,
        transaction_per_migration=False,
    )


def run_migrations_offline() -> None:
    """Emit the SQL script instead of running it (``alembic upgrade --sql``)."""
    schema = _schema()
    context.configure(
        url=_url(),
        version_table_schema=schema,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        context.run_migrations()


def _run_on(connection: Connection, schema: str) -> None:
    # The version table lives in the schema, so the schema must exist before
    # alembic looks for (or creates) alembic_version.
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    _configure(connection, schema)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection or on a fresh engine."""
    schema = _schema()
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection, schema)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_on(conn, schema)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
