"""The privileges a Store's database role needs, the GRANTs that give them, and the check.

Owns the least-privilege contract of docs/scaling.md ("Least privilege and
TLS"): an application role needs no DDL right at all, only USAGE on the
schema, SELECT on ``alembic_version`` (the schema check at ``Store()``),
SELECT/INSERT/UPDATE/DELETE on the tables a Store reads and writes, USAGE
on the ``lease_tokens`` sequence (fencing tokens; the identity columns of
``messages`` need no sequence right) and EXECUTE on the schema's functions.
The ``audit`` table is the operators' (``sessionstore unlock``): an
application role gets nothing on it, so it can never rewrite the log.

:func:`grant_sql` is the one text of those GRANTs (the docs show it, the
tests run it); :func:`missing_privileges` checks them all for the current
user in one statement over the catalogs (no lock, no table read), at
``Store()`` start (:func:`check_privileges`) and after a denied statement
(:func:`explain`), so every error names the privileges and the objects.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..db import validate_identifier
from ..errors import InsufficientPrivilegeError
from ..retry import RetryPolicy, with_retries

__all__ = [
    "DML_TABLES",
    "check_privileges",
    "explain",
    "grant_sql",
    "missing_privileges",
]

DML_TABLES = ("locks", "records", "versions", "shards", "applied_requests", "messages")
"""The tables a Store reads and writes (``audit`` is not one: it is the operators')."""

_NEEDED: tuple[tuple[str, str, str], ...] = (
    ("schema", "", "USAGE"),
    ("table", "alembic_version", "SELECT"),
    *(
        ("table", table, privilege)
        for table in DML_TABLES
        for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE")
    ),
    ("sequence", "lease_tokens", "USAGE"),
)

# Functions for operators, not for Stores (``sessionstore unlock``, revision
# 0004): a role may lack EXECUTE on them; it lacks INSERT on audit anyway.
_OPERATOR_FUNCTIONS = ["unlock_key"]

_HELP = (
    "grant them as the schema's owner (the GRANTs are in the docs: Scaling out, "
    "'Least privilege and TLS')"
)


def grant_sql(schema: str = "sessionstore", role: str = "app") -> str:
    """The GRANTs that let ``role`` run Stores on ``schema``, and nothing more.

    Idempotent; run them as the schema's owner after every ``sessionstore db
    upgrade`` (a new revision may add a table or a function). Both names must
    be plain lower-case identifiers (:func:`~sessionstore.db.validate_identifier`).
    """
    s = validate_identifier(schema, "schema")
    r = validate_identifier(role, "role")
    tables = [f"{s}.{table}" for table in DML_TABLES]
    return "\n".join(
        [
            f"GRANT USAGE ON SCHEMA {s} TO {r};",
            f"GRANT SELECT ON {s}.alembic_version TO {r};",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON",
            f"    {', '.join(tables[:3])},",
            f"    {', '.join(tables[3:])}",
            f"    TO {r};",
            f"GRANT USAGE ON SEQUENCE {s}.lease_tokens TO {r};",
            f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {r};",
        ]
    )


# Relations are found by OID in the catalogs, not by name: has_table_privilege
# of 'schema.table' fails outright ("permission denied for schema") when USAGE
# on the schema is the privilege missing, and we want the whole list.
# nextval needs USAGE or UPDATE on a sequence: either will do. Trigger
# functions are left out (a trigger runs its function without EXECUTE), and
# so are the operators' functions.
_CHECK = sa.text(
    """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = CAST(:schema AS text)),
need AS (
    SELECT * FROM unnest(CAST(:kinds AS text[]), CAST(:names AS text[]),
                         CAST(:privileges AS text[]))
                  WITH ORDINALITY AS t(kind, name, privilege, ord)
),
-- Materialised, on the namespace alone: the planner would otherwise run the
-- other tests, has_function_privilege included, on every row of pg_proc
-- (30 ms, against under 1).
functions AS MATERIALIZED (
    SELECT p.oid, p.proname, p.prorettype FROM pg_proc p
    WHERE p.pronamespace = (SELECT oid FROM ns)
),
missing AS (
    SELECT n.ord, n.privilege, n.kind,
           CASE n.kind WHEN 'schema' THEN CAST(:schema AS text)
                       ELSE CAST(:schema AS text) || '.' || n.name END AS object
    FROM need n
    LEFT JOIN pg_class c
           ON n.kind <> 'schema' AND c.relnamespace = (SELECT oid FROM ns) AND c.relname = n.name
    WHERE CASE n.kind
        WHEN 'schema'
            THEN NOT coalesce(has_schema_privilege((SELECT oid FROM ns), n.privilege), false)
        WHEN 'sequence' THEN c.oid IS NULL OR NOT has_sequence_privilege(c.oid, 'USAGE, UPDATE')
        ELSE c.oid IS NULL OR NOT has_table_privilege(c.oid, n.privilege)
    END
    UNION ALL
    SELECT 1000000, 'EXECUTE', 'function',
           format('%s.%s(%s)', CAST(:schema AS text), f.proname,
                  pg_get_function_identity_arguments(f.oid))
    FROM functions f
    WHERE f.prorettype NOT IN (CAST('trigger' AS regtype), CAST('event_trigger' AS regtype))
      AND f.proname <> ALL (CAST(:operator_functions AS text[]))
      AND NOT has_function_privilege(f.oid, 'EXECUTE')
)
SELECT current_user AS role, privilege, kind, object FROM missing ORDER BY ord, object
"""
)


def missing_privileges(conn: sa.Connection, schema: str) -> tuple[str, list[str]]:
    """(the current user, each privilege it lacks as ``"DELETE on table s.versions"``).

    One statement over the catalogs; an empty list when nothing is missing.
    A table or sequence that does not exist counts as missing.
    """
    kinds, names, privileges = (list(column) for column in zip(*_NEEDED, strict=True))
    rows = conn.execute(
        _CHECK,
        {
            "schema": schema,
            "kinds": kinds,
            "names": names,
            "privileges": privileges,
            "operator_functions": _OPERATOR_FUNCTIONS,
        },
    ).all()
    role = str(rows[0].role) if rows else ""
    return role, [f"{row.privilege} on {row.kind} {row.object}" for row in rows]


def check_privileges(engine: sa.Engine, schema: str, *, retry: RetryPolicy, what: str) -> None:
    """Raise :class:`InsufficientPrivilegeError` listing every privilege the role lacks.

    For ``Store()`` start, so that a misconfigured deploy fails at once and
    says everything at once, rather than at the first call that needs one.
    """

    def attempt() -> tuple[str, list[str]]:
        with engine.connect() as conn:
            return missing_privileges(conn, schema)

    role, missing = with_retries(retry, f"{what}: privilege check", attempt)
    if missing:
        raise InsufficientPrivilegeError(
            f"{what}: the database role {role!r} lacks privileges sessionstore needs in "
            f"schema {schema!r}: {', '.join(missing)}; {_HELP}",
            missing,
        )


def explain(
    engine: sa.Engine, schema: str, error: InsufficientPrivilegeError
) -> InsufficientPrivilegeError:
    """``error`` (a denied statement) with the privileges the role lacks named, if found.

    The server's message names the object but not the privilege ("permission
    denied for table versions"); the check names both. If the check finds
    nothing (the denial was of something else) or fails, ``error`` as it is.
    """
    try:
        with engine.connect() as conn:
            role, missing = missing_privileges(conn, schema)
    except Exception:  # the error at hand is the one to report, not this one's
        return error
    if not missing:
        return error
    return InsufficientPrivilegeError(
        f"{error}; the database role {role!r} lacks: {', '.join(missing)}; {_HELP}", missing
    )
