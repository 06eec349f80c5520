"""Lease releases committed without waiting for the WAL flush.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

``lease_release_one_async`` and ``lease_release_async`` release leases as
``lease_release_one`` and ``lease_release`` do, and commit with
``synchronous_commit = off`` under the same condition as revision 0005's
acquisitions: no synchronous standby named, and not on Citus (there the SET
LOCAL is one more coordinator-to-worker round trip; the wrappers then only
call through).

A release comes after the key's final save, which committed synchronously:
no data depends on it. What a crash can lose is the release itself (the
last few hundred milliseconds of asynchronous commits): the lease row
stays, under the holder's id. The holder is alive and no longer holds the
key, so nothing renews the row. ``lease_release_stale`` deletes a holder's
rows of the given keys whatever their tokens (a crash may issue a token
again): a Store calls it, when its control connection comes back after a
drop (a server restart drops it), for the keys it released in the seconds
before the drop that it does not use now, claimed in its registry first
(docs/concepts.md, "Fencing tokens and fenced writes"). What the holder
gains is the flush wait on every unload (a release of one key: 164 us
against 396 us, measured).

Deploy code that calls these functions only after this upgrade, and
downgrade only after the code that calls them is gone: a release that
finds no function fails (logged) and its leases wait to expire.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RELEASE_ONE_ARGS = "text, uuid, text, bigint, text"
_RELEASE_ARGS = "text, uuid, text[], bigint[], text"


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


# Revision 0005's condition, as it was then (a revision does not change under
# its successors): asynchronous only without a synchronous standby. Its
# Citus line is left out: on Citus these wrappers keep the server's setting.
_ASYNC = """IF current_setting('synchronous_standby_names') = '' THEN
        SET LOCAL synchronous_commit = off;
    END IF;"""


def _wrappers(s: str, commit: str) -> str:
    # ``commit``: the statements that set how the caller's transaction commits
    # (a SET LOCAL lasts to its end: every caller is one autocommit statement).
    return f"""
CREATE FUNCTION {s}.lease_release_one_async(
    p_store text, p_holder uuid, p_key text, p_token bigint, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    {commit}
    RETURN {s}.lease_release_one(p_store, p_holder, p_key, p_token, p_channel);
END $$;

CREATE FUNCTION {s}.lease_release_async(
    p_store text, p_holder uuid, p_keys text[], p_tokens bigint[], p_channel text)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
BEGIN
    {commit}
    RETURN QUERY SELECT * FROM {s}.lease_release(p_store, p_holder, p_keys, p_tokens, p_channel);
END $$;

CREATE FUNCTION {s}.lease_release_stale(p_store text, p_holder uuid, p_keys text[], p_channel text)
RETURNS SETOF text
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_keys text[];
    v_tokens bigint[];
BEGIN
    -- Whatever their tokens: this holder's rows of p_keys, released as lease_release does.
    SELECT array_agg(l.key), array_agg(l.token) INTO v_keys, v_tokens
    FROM {s}.locks l WHERE l.store = p_store AND l.holder = p_holder AND l.key = ANY(p_keys);
    IF v_keys IS NOT NULL THEN
        RETURN QUERY
            SELECT * FROM {s}.lease_release(p_store, p_holder, v_keys, v_tokens, p_channel);
    END IF;
END $$;
"""


def _has_citus() -> bool:
    found = op.get_bind().execute(
        sa.text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    )
    return bool(found.scalar())


FUNCTIONS = (
    ("lease_release_one_async", _RELEASE_ONE_ARGS),
    ("lease_release_async", _RELEASE_ARGS),
    ("lease_release_stale", "text, uuid, text[], text"),
)
"""The functions this revision adds, with their argument types."""


def upgrade() -> None:
    s = f'"{_schema()}"'
    op.execute(_wrappers(s, "" if _has_citus() else _ASYNC))


def downgrade() -> None:
    s = f'"{_schema()}"'
    for name, args in FUNCTIONS:
        op.execute(f"DROP FUNCTION {s}.{name}({args})")
