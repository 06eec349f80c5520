"""A load in one call, and lease acquisitions committed without waiting for the WAL flush.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``lease_acquire_read`` takes a key's lease and, if taken, reads what a load
needs (the newest version, the newest applied request ids, whether messages
wait) in the same call: one round trip instead of two. A sharded version's
shards, and on Citus the whole read, stay one statement of the caller's.

``lease_acquire`` (and so ``lease_acquire_read``) now commits with
``synchronous_commit = off`` (not on Citus) unless the server names a synchronous standby
(``synchronous_standby_names``): the call returns without waiting for its
WAL record to reach the disk. That record need not survive a crash for
anything to be safe: every write re-checks the lease row under a row lock
in the same transaction as the write, and that write commits synchronously
(docs/concepts.md). A lease whose acquisition a crash lost is a lost lease,
fenced like any other: the holder's next save raises ``LockLostError``, and
nothing it did in memory reaches the database. What the holder gains is the
flush wait (about 0.3 ms on a local disk). With a synchronous standby the
acquisition waits for it, as before, so that a failover keeps every lease
it acknowledged. Releases, renewals and writes keep the server's setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACQUIRE_ARGS = "text, text, uuid, float8, text, integer, boolean, uuid, bigint"
_ACQUIRE_READ_ARGS = _ACQUIRE_ARGS + ", integer"


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


def _acquire(s: str, commit: str) -> str:
    # ``commit``: the statements that set how this call's transaction commits.
    # The upserts compare with excluded.acquired_at (the statement's clock, in
    # the row) rather than a variable: Citus cannot type a parameter in the ON
    # CONFLICT condition of an INSERT ... SELECT.
    return f"""
CREATE OR REPLACE FUNCTION {s}.lease_acquire(
    p_store text, p_key text, p_holder uuid, p_duration float8, p_host text, p_pid integer,
    p_liveness boolean, p_dead_holder uuid, p_dead_token bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_dead boolean := p_dead_holder IS NOT NULL AND NOT {s}.holder_alive(p_dead_holder);
    v_token bigint;
BEGIN
    {commit}
    INSERT INTO {s}.locks AS l (store, key, holder, token, acquired_at, expires_at, host, pid,
                                liveness)
    VALUES (p_store, p_key, p_holder, nextval('{s}.lease_tokens'), v_now,
            v_now + make_interval(secs => p_duration), p_host, p_pid, p_liveness)
    ON CONFLICT (store, key) DO UPDATE
        SET holder = excluded.holder, token = excluded.token,
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
            host = excluded.host, pid = excluded.pid, liveness = excluded.liveness
        WHERE l.expires_at <= excluded.acquired_at OR l.holder = excluded.holder
           OR (v_dead AND l.holder = p_dead_holder AND l.token = p_dead_token AND l.liveness)
    RETURNING token INTO v_token;
    RETURN v_token;
END $$;
"""


# The SET LOCALs last to the end of the caller's transaction: every caller
# is one autocommit statement (the lease call of a load), never a
# transaction that goes on to write data. Only without a synchronous
# standby: an operator who named one wants what commits to survive a
# failover, and a lease lost in a failover costs every holder its keys at
# once. SET LOCAL, not set_config(): on Citus,
# propagate_set_commands carries a SET LOCAL to the worker connections of
# the transaction, whose commits are the ones that flush the lease row.
_ASYNC = """IF current_setting('synchronous_standby_names') = '' THEN
        SET LOCAL citus.propagate_set_commands = 'local';
        SET LOCAL synchronous_commit = off;
    END IF;"""


_READ_COLUMNS = """lease_token bigint, complete boolean, version bigint, created_at timestamptz,
               codec smallint, raw_size bigint, stored_size bigint, checksum bigint,
               shard_count integer, migrations jsonb, token bigint, inline bytea,
               shards bytea[], requests text[], has_messages boolean"""


def _acquire_read(s: str, citus: bool) -> str:
    # No row: the lease was not taken. ``complete`` false: the caller reads
    # the rest itself, in one more statement on the same connection: for a
    # sharded version (its shards are MBs, which RETURN QUERY would copy
    # into a tuplestore, on disk past work_mem) and always on Citus, where
    # each of the reads below would be a round trip from the coordinator to
    # the key's worker while the caller's own read is one routed statement.
    if citus:
        body = (
            "RETURN QUERY SELECT v_token, false, NULL::bigint, NULL::timestamptz, "
            "NULL::smallint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::integer, "
            "NULL::jsonb, NULL::bigint, NULL::bytea, NULL::bytea[], NULL::text[], NULL::boolean;"
        )
    else:
        body = f"""RETURN QUERY
    SELECT v_token, coalesce(v.shard_count, 0) = 0, v.version, v.created_at, v.codec,
           v.raw_size, v.stored_size, v.checksum, v.shard_count, v.migrations, v.token,
           v.inline, NULL::bytea[],
           ARRAY(SELECT r.request_id FROM {s}.applied_requests r
                 WHERE r.store = p_store AND r.key = p_key
                 ORDER BY r.version DESC, r.idx DESC LIMIT p_retention),
           EXISTS (SELECT 1 FROM {s}.messages m WHERE m.store = p_store AND m.key = p_key)
    FROM (SELECT 1) AS one LEFT JOIN LATERAL (
        SELECT * FROM {s}.versions x WHERE x.store = p_store AND x.key = p_key
        ORDER BY x.version DESC LIMIT 1) AS v ON true;"""
    return f"""
CREATE FUNCTION {s}.lease_acquire_read(
    p_store text, p_key text, p_holder uuid, p_duration float8, p_host text, p_pid integer,
    p_liveness boolean, p_dead_holder uuid, p_dead_token bigint, p_retention integer)
RETURNS TABLE ({_READ_COLUMNS})
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_token bigint := {s}.lease_acquire(p_store, p_key, p_holder, p_duration, p_host, p_pid,
                                        p_liveness, p_dead_holder, p_dead_token);
BEGIN
    IF v_token IS NULL THEN
        RETURN;
    END IF;
    {body}
END $$;
"""


def _has_citus() -> bool:
    found = op.get_bind().execute(
        sa.text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    )
    return bool(found.scalar())


# At close(): every lease handed over to this holder that it never took (its
# load was cancelled by the close), released for the askers at once rather
# than left to expire.
_UNCLAIMED = """
CREATE FUNCTION {s}.lease_release_unclaimed_all(p_store text, p_holder uuid, p_channel text)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_key text;
BEGIN
    FOR v_key IN
        DELETE FROM {s}.locks l WHERE l.store = p_store AND l.holder = p_holder AND l.pid = 0
        RETURNING l.key
    LOOP
        PERFORM pg_notify(p_channel, v_key);
        RETURN NEXT v_key;
    END LOOP;
END $$;
"""

FUNCTIONS = (
    ("lease_acquire_read", _ACQUIRE_READ_ARGS),
    ("lease_release_unclaimed_all", "text, uuid, text"),
)
"""The functions this revision adds, with their argument types."""


def upgrade() -> None:
    s = f'"{_schema()}"'
    citus = _has_citus()
    # On Citus the SET LOCAL would be one more coordinator-to-worker round trip
    # per acquisition, costing more than the worker's flush wait it saves
    # (a load of a saved key: 601 us against 552 us, measured): not there.
    op.execute(_acquire(s, "" if citus else _ASYNC))
    op.execute(_acquire_read(s, citus))
    op.execute(_UNCLAIMED.format(s=s))


def downgrade() -> None:
    s = f'"{_schema()}"'
    for name, args in FUNCTIONS:
        op.execute(f"DROP FUNCTION {s}.{name}({args})")
    op.execute(_acquire(s, ""))
