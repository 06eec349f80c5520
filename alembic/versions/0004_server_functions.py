"""Server functions for every statement that locks a lease row, and Citus distribution.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Every statement that takes, renews, releases or fences with a lease row is
a PL/pgSQL function in the sessionstore schema, called as one statement
(docs/scaling.md#citus). Two reasons, one per engine:

* on Citus, what Citus cannot route as one statement (a lease check
  beside the write, ``nextval`` and ``clock_timestamp()`` in an upsert's
  condition, ``pg_notify``, the liveness test on ``pg_locks``) runs here as
  single-shard statements over plain parameters, on the coordinator
  (``nextval`` of its one sequence: tokens strictly increasing; ``pg_locks``
  and ``pg_notify`` where the control connections are). The single-key
  write, the hot path, is a distributed function delegated to the worker
  that holds the key (``create_distributed_function``, co-located with
  ``locks``): one round trip, one shard;
* on both, a lease row is locked only inside one server-side call, never
  across a client round trip: a frozen client can never hold a lease row
  locked (and so block a takeover) past its statement.

With the citus extension present, the tables are distributed by ``key``
and co-located with ``locks``; without it this revision only adds the
functions. Function bodies use ``#variable_conflict use_column``: a column
name always means the column. Functions over arrays of keys plan each call
afresh (``plan_cache_mode = force_custom_plan``): a cached generic plan,
blind to the arrays' sizes, took 2.5 s instead of 0.25 s to renew 10,000
leases (measured).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("locks", "records", "versions", "shards", "applied_requests", "messages", "audit")
"""In distribution order: ``locks`` first (the others co-locate with it), versions before shards."""

_WRITE_LEASED_ARGS = (
    "text, uuid, text, bigint, bigint, smallint, bigint, bigint, bigint, integer, bytea, jsonb, "
    "boolean, bytea[], text[], bigint[], boolean, integer"
)
_WRITE_VERSION_ARGS = _WRITE_LEASED_ARGS + ", boolean"
_PRUNE_ARGS = "text, text, integer"
_MANY_ARGS = (
    "text, uuid, boolean, text[], bigint[], bigint[], smallint[], bigint[], bigint[], "
    "bigint[], integer[], bytea[], jsonb[], boolean[], text[], integer[], bytea[], text[], "
    "integer[], text[], text[], bigint[], text[], integer"
)


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "env.py sets version_table_schema to the sessionstore schema"
    return str(schema)


def _liveness(s: str) -> str:
    # A holder is alive while it holds its session advisory lock (taken by
    # the control connection: sessionstore/_storage/sql.py ADVISORY_LOCK).
    return f"""
CREATE FUNCTION {s}.holder_alive(p_holder uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks pl
        WHERE pl.locktype = 'advisory' AND pl.granted AND pl.objsubid = 2
          AND pl.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND pl.classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid
          AND pl.objid = (hashtext(p_holder::text)::bigint & 4294967295)::oid)
$$;
"""


def _taking(s: str) -> str:
    # The upserts compare with excluded.acquired_at (the statement's clock,
    # in the row) rather than a variable: Citus cannot type a parameter in
    # the ON CONFLICT condition of an INSERT ... SELECT.
    return f"""
CREATE FUNCTION {s}.lease_acquire(
    p_store text, p_key text, p_holder uuid, p_duration float8, p_host text, p_pid integer,
    p_liveness boolean, p_dead_holder uuid, p_dead_token bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_dead boolean := p_dead_holder IS NOT NULL AND NOT {s}.holder_alive(p_dead_holder);
    v_token bigint;
BEGIN
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

CREATE FUNCTION {s}.lease_acquire_many(
    p_store text, p_keys text[], p_holder uuid, p_duration float8, p_host text,
    p_pid integer, p_liveness boolean) RETURNS TABLE (key text, token bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    RETURN QUERY
    INSERT INTO {s}.locks AS l (store, key, holder, token, acquired_at, expires_at, host, pid,
                                liveness)
    SELECT p_store, k.key, p_holder, nextval('{s}.lease_tokens'), v_now,
           v_now + make_interval(secs => p_duration), p_host, p_pid, p_liveness
    FROM unnest(p_keys) AS k(key)
    ORDER BY k.key
    ON CONFLICT (store, key) DO UPDATE
        SET holder = excluded.holder, token = excluded.token,
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
            host = excluded.host, pid = excluded.pid, liveness = excluded.liveness
        WHERE l.expires_at <= excluded.acquired_at OR l.holder = excluded.holder
    RETURNING l.key, l.token;
END $$;
"""


def _looking(s: str) -> str:
    # A lease row as the loader and the operator see it, with its holder's
    # liveness (pg_locks of this node: Citus' coordinator).
    return f"""
CREATE FUNCTION {s}.lease_info(p_store text, p_key text)
RETURNS TABLE (holder uuid, token bigint, expires_at timestamptz, active boolean, host text,
               pid integer, liveness boolean, alive boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT l.holder, l.token, l.expires_at, l.expires_at > clock_timestamp() AS active,
           l.host, l.pid, l.liveness
    INTO r FROM {s}.locks l WHERE l.store = p_store AND l.key = p_key;
    IF FOUND THEN
        RETURN QUERY SELECT r.holder, r.token, r.expires_at, r.active, r.host, r.pid,
                            r.liveness, {s}.holder_alive(r.holder);
    END IF;
END $$;
"""


def _keeping(s: str) -> str:
    # The heartbeat's one statement. A lease row locked by someone else
    # would stall it: lock_timeout bounds the wait (propagated to Citus'
    # workers with SET LOCAL), and the caller splits the keys on a timeout.
    return f"""
CREATE FUNCTION {s}.lease_renew(
    p_store text, p_holder uuid, p_keys text[], p_tokens bigint[], p_duration float8,
    p_lock_timeout text) RETURNS TABLE (key text, token bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    SET LOCAL citus.propagate_set_commands = 'local';
    SET LOCAL citus.enable_deadlock_prevention = off;
    EXECUTE 'SET LOCAL lock_timeout = ' || quote_literal(p_lock_timeout);
    RETURN QUERY
    UPDATE {s}.locks l SET expires_at = v_now + make_interval(secs => p_duration)
    WHERE l.store = p_store AND l.holder = p_holder AND l.key = ANY(p_keys)
      AND l.token = ANY(p_tokens) AND l.expires_at > v_now
    RETURNING l.key, l.token;
END $$;
"""


def _letting_go(s: str) -> str:
    # Releases announce each key on the store's free channel (waiting
    # loaders wake), on the coordinator where the listeners are.
    return f"""
CREATE FUNCTION {s}.lease_release(
    p_store text, p_holder uuid, p_keys text[], p_tokens bigint[], p_channel text)
RETURNS SETOF text
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_gone text[];
BEGIN
    SET LOCAL citus.enable_deadlock_prevention = off;
    WITH gone AS (
        DELETE FROM {s}.locks l
        WHERE l.store = p_store AND l.holder = p_holder AND l.key = ANY(p_keys)
          AND l.token = ANY(p_tokens)
        RETURNING l.key
    ) SELECT array_agg(gone.key) INTO v_gone FROM gone;
    PERFORM pg_notify(p_channel, k) FROM unnest(v_gone) AS k;
    RETURN QUERY SELECT unnest(v_gone);
END $$;

-- One lease (an unload, a request's session): a single-key statement whose
-- plan is cached, where lease_release plans its arrays on every call.
CREATE FUNCTION {s}.lease_release_one(
    p_store text, p_holder uuid, p_key text, p_token bigint, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    DELETE FROM {s}.locks l
    WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder AND l.token = p_token;
    IF FOUND THEN
        PERFORM pg_notify(p_channel, p_key);
    END IF;
    RETURN FOUND;
END $$;

CREATE FUNCTION {s}.lease_release_unclaimed(
    p_store text, p_key text, p_holder uuid, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    DELETE FROM {s}.locks l
    WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder AND l.pid = 0;
    IF FOUND THEN
        PERFORM pg_notify(p_channel, p_key);
    END IF;
    RETURN FOUND;
END $$;

CREATE FUNCTION {s}.lease_hand_over(
    p_store text, p_holder uuid, p_key text, p_token bigint, p_to uuid, p_reserve float8,
    p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_token bigint := nextval('{s}.lease_tokens');
BEGIN
    UPDATE {s}.locks l
    SET holder = p_to, token = v_token, expires_at = v_now + make_interval(secs => p_reserve),
        acquired_at = v_now, host = '', pid = 0, liveness = true
    WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder AND l.token = p_token;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(p_channel, p_key);
    RETURN true;
END $$;
"""


def _writing(s: str) -> str:
    # write_leased: one key's version, shards, applied ids and delivered
    # messages, for a caller that holds the key's lease row locked.
    # prune_requests runs before this write's ids go in: the newest
    # p_retention ids as of before the write stay, and the new ones on top.
    return f"""
CREATE FUNCTION {s}.prune_requests(p_store text, p_key text, p_retention integer)
RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_cut_version bigint;
    v_cut_idx integer;
BEGIN
    SELECT q.version, q.idx INTO v_cut_version, v_cut_idx FROM {s}.applied_requests q
    WHERE q.store = p_store AND q.key = p_key
    ORDER BY q.version DESC, q.idx DESC OFFSET p_retention LIMIT 1;
    IF v_cut_version IS NOT NULL THEN
        DELETE FROM {s}.applied_requests r
        WHERE r.store = p_store AND r.key = p_key
          AND (r.version, r.idx) <= (v_cut_version, v_cut_idx);
    END IF;
END $$;

CREATE FUNCTION {s}.write_leased(
    p_store text, p_holder uuid, p_key text, p_token bigint, p_version bigint,
    p_codec smallint, p_raw_size bigint, p_stored_size bigint, p_checksum bigint,
    p_shard_count integer, p_inline bytea, p_migrations jsonb, p_new_record boolean,
    p_shards bytea[], p_requests text[], p_messages bigint[], p_prune boolean,
    p_retention integer) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF p_new_record THEN
        INSERT INTO {s}.records (store, key) VALUES (p_store, p_key) ON CONFLICT DO NOTHING;
    END IF;
    INSERT INTO {s}.versions (store, key, version, holder, token, codec, raw_size,
                              stored_size, checksum, shard_count, inline, migrations)
    VALUES (p_store, p_key, p_version, p_holder, p_token, p_codec, p_raw_size, p_stored_size,
            p_checksum, p_shard_count, p_inline, p_migrations)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF cardinality(p_shards) > 0 THEN
        INSERT INTO {s}.shards (store, key, version, idx, data)
        SELECT p_store, p_key, p_version, u.i - 1, u.d
        FROM unnest(p_shards) WITH ORDINALITY AS u(d, i);
    END IF;
    IF p_prune THEN
        PERFORM {s}.prune_requests(p_store, p_key, p_retention);
    END IF;
    IF cardinality(p_requests) > 0 THEN
        INSERT INTO {s}.applied_requests (store, key, request_id, version, idx)
        SELECT p_store, p_key, u.id, p_version, u.i - 1
        FROM unnest(p_requests) WITH ORDINALITY AS u(id, i)
        ON CONFLICT DO NOTHING;
    END IF;
    IF cardinality(p_messages) > 0 THEN
        DELETE FROM {s}.messages m
        WHERE m.store = p_store AND m.key = p_key AND m.id = ANY(p_messages);
    END IF;
    RETURN true;
END $$;
"""


def _fencing(s: str) -> str:
    # The single-key fenced write: lock (or, for the first statement of a
    # streamed write, only check) the lease row, then write_leased.
    return f"""
CREATE FUNCTION {s}.write_version(
    p_store text, p_holder uuid, p_key text, p_token bigint, p_version bigint,
    p_codec smallint, p_raw_size bigint, p_stored_size bigint, p_checksum bigint,
    p_shard_count integer, p_inline bytea, p_migrations jsonb, p_new_record boolean,
    p_shards bytea[], p_requests text[], p_messages bigint[], p_prune boolean,
    p_retention integer, p_lock boolean) RETURNS TABLE (leased boolean, written boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF p_lock THEN
        PERFORM 1 FROM {s}.locks l
        WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder
          AND l.token = p_token AND l.expires_at > clock_timestamp()
        FOR UPDATE;
    ELSE
        PERFORM 1 FROM {s}.locks l
        WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder
          AND l.token = p_token AND l.expires_at > clock_timestamp();
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, {s}.write_leased(
        p_store, p_holder, p_key, p_token, p_version, p_codec, p_raw_size, p_stored_size,
        p_checksum, p_shard_count, p_inline, p_migrations, p_new_record, p_shards,
        p_requests, p_messages, p_prune, p_retention);
END $$;
"""


_MANY_PARAMS = """
    p_store text, p_holder uuid, p_atomic boolean, p_keys text[], p_tokens bigint[],
    p_versions bigint[], p_codecs smallint[], p_raw_sizes bigint[], p_stored_sizes bigint[],
    p_checksums bigint[], p_shard_counts integer[], p_inlines bytea[], p_migrations jsonb[],
    p_new_records boolean[], p_shard_keys text[], p_shard_idx integer[], p_shards bytea[],
    p_request_keys text[], p_request_idx integer[], p_requests text[], p_message_keys text[],
    p_messages bigint[], p_prune_keys text[], p_retention integer"""
"""The parameters of write_few and write_versions: one array entry per key (in key
order), and per shard, applied id and delivered message, each naming its key."""


def _writing_few(s: str) -> str:
    # A few keys (a tx, a small batch): each key's lease row locked by its
    # own single-key statement, in key order (writers over overlapping keys
    # never deadlock), then write_leased for each: statements planned once
    # and cached, cheaper than planning set-based ones for two keys. With
    # p_atomic, all are written or (if one lease is gone) none.
    return f"""
CREATE FUNCTION {s}.write_few({_MANY_PARAMS})
RETURNS TABLE (key text, leased boolean, written boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_n integer := cardinality(p_keys);
    v_leased boolean[] := array_fill(false, ARRAY[v_n]);
    v_all boolean := true;
    v_written boolean;
BEGIN
    SET LOCAL citus.enable_deadlock_prevention = off;
    FOR i IN 1 .. v_n LOOP
        PERFORM 1 FROM {s}.locks l
        WHERE l.store = p_store AND l.key = p_keys[i] AND l.holder = p_holder
          AND l.token = p_tokens[i] AND l.expires_at > v_now
        FOR UPDATE;
        v_leased[i] := FOUND;
        v_all := v_all AND FOUND;
    END LOOP;
    FOR i IN 1 .. v_n LOOP
        v_written := false;
        IF v_leased[i] AND (v_all OR NOT p_atomic) THEN
            v_written := {s}.write_leased(
                p_store, p_holder, p_keys[i], p_tokens[i], p_versions[i], p_codecs[i],
                p_raw_sizes[i], p_stored_sizes[i], p_checksums[i], p_shard_counts[i],
                p_inlines[i], p_migrations[i], p_new_records[i],
                ARRAY(SELECT u.d FROM unnest(p_shard_keys, p_shard_idx, p_shards) AS u(k, x, d)
                      WHERE u.k = p_keys[i] ORDER BY u.x),
                ARRAY(SELECT u.r FROM unnest(p_request_keys, p_request_idx, p_requests)
                      AS u(k, x, r) WHERE u.k = p_keys[i] ORDER BY u.x),
                ARRAY(SELECT u.m FROM unnest(p_message_keys, p_messages) AS u(k, m)
                      WHERE u.k = p_keys[i]),
                p_keys[i] = ANY(p_prune_keys), p_retention);
        END IF;
        key := p_keys[i];
        leased := v_leased[i];
        written := v_written;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def _writing_many(s: str) -> str:
    # Many keys, set-based (on Citus each statement runs on every shard in
    # parallel). The lease rows are locked by a no-op UPDATE that returns
    # the ones still ours (Citus refuses FOR UPDATE across shards); on plain
    # PostgreSQL its index scan takes them in key order, so writers over
    # overlapping keys cannot deadlock. With p_atomic, all are written or
    # (if one lease is gone) none. Message ids are unique across keys.
    return f"""
CREATE FUNCTION {s}.write_versions({_MANY_PARAMS})
RETURNS TABLE (key text, leased boolean, written boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_leased text[];
    v_written text[] := '{{}}';
BEGIN
    SET LOCAL citus.enable_deadlock_prevention = off;
    WITH mine AS (
        UPDATE {s}.locks l SET expires_at = l.expires_at
        WHERE l.store = p_store AND l.holder = p_holder AND l.key = ANY(p_keys)
          AND l.token = ANY(p_tokens) AND l.expires_at > v_now
        RETURNING l.key
    ) SELECT coalesce(array_agg(mine.key), '{{}}') INTO v_leased FROM mine;
    IF NOT p_atomic OR cardinality(v_leased) = cardinality(p_keys) THEN
        INSERT INTO {s}.records (store, key)
        SELECT p_store, i.key FROM unnest(p_keys, p_new_records) AS i(key, new)
        WHERE i.new AND i.key = ANY(v_leased)
        ON CONFLICT DO NOTHING;
        WITH ver AS (
            INSERT INTO {s}.versions (store, key, version, holder, token, codec, raw_size,
                                      stored_size, checksum, shard_count, inline, migrations)
            SELECT p_store, i.key, i.version, p_holder, i.token, i.codec, i.raw_size,
                   i.stored_size, i.checksum, i.shard_count, i.inline, i.migrations
            FROM unnest(p_keys, p_tokens, p_versions, p_codecs, p_raw_sizes, p_stored_sizes,
                        p_checksums, p_shard_counts, p_inlines, p_migrations)
                 AS i(key, token, version, codec, raw_size, stored_size, checksum,
                      shard_count, inline, migrations)
            WHERE i.key = ANY(v_leased)
            ON CONFLICT DO NOTHING
            RETURNING key
        ) SELECT coalesce(array_agg(ver.key), '{{}}') INTO v_written FROM ver;
        IF cardinality(p_shards) > 0 THEN
            INSERT INTO {s}.shards (store, key, version, idx, data)
            SELECT p_store, i.key, i.version, sh.idx, sh.data
            FROM unnest(p_shard_keys, p_shard_idx, p_shards) AS sh(key, idx, data)
            JOIN unnest(p_keys, p_versions) AS i(key, version) ON i.key = sh.key
            WHERE sh.key = ANY(v_written);
        END IF;
        PERFORM {s}.prune_requests(p_store, k, p_retention)
        FROM unnest(p_prune_keys) AS k WHERE k = ANY(v_written);
        IF cardinality(p_requests) > 0 THEN
            INSERT INTO {s}.applied_requests (store, key, request_id, version, idx)
            SELECT p_store, q.key, q.id, i.version, q.idx
            FROM unnest(p_request_keys, p_request_idx, p_requests) AS q(key, idx, id)
            JOIN unnest(p_keys, p_versions) AS i(key, version) ON i.key = q.key
            WHERE q.key = ANY(v_written)
            ON CONFLICT DO NOTHING;
        END IF;
        IF cardinality(p_messages) > 0 THEN
            DELETE FROM {s}.messages m
            WHERE m.store = p_store AND m.key = ANY(p_message_keys) AND m.id = ANY(p_messages)
              AND m.key = ANY(v_written);
        END IF;
    END IF;
    RETURN QUERY SELECT i.key, i.key = ANY(v_leased), i.key = ANY(v_written)
                 FROM unnest(p_keys) AS i(key);
END $$;
"""


def _erasing(s: str) -> str:
    return f"""
CREATE FUNCTION {s}.erase_key(
    p_store text, p_key text, p_holder uuid, p_token bigint, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM {s}.locks l
    WHERE l.store = p_store AND l.key = p_key AND l.holder = p_holder AND l.token = p_token
      AND l.expires_at > clock_timestamp()
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM {s}.records WHERE store = p_store AND key = p_key;
    DELETE FROM {s}.versions WHERE store = p_store AND key = p_key;
    DELETE FROM {s}.applied_requests WHERE store = p_store AND key = p_key;
    DELETE FROM {s}.messages WHERE store = p_store AND key = p_key;
    DELETE FROM {s}.locks WHERE store = p_store AND key = p_key;
    PERFORM pg_notify(p_channel, p_key);
    RETURN true;
END $$;
"""


def _maintaining(s: str) -> str:
    # One batch of the janitor: the keys after p_after in key order, each
    # pruned by its own single-shard statement. The transaction-level
    # advisory lock keeps a second process from pruning the same store.
    return f"""
CREATE FUNCTION {s}.prune_batch(
    p_schema text, p_store text, p_after text, p_batch integer, p_keep integer,
    p_age float8) RETURNS TABLE (ours boolean, last_key text, pruned bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_keys text[];
    v_cut bigint;
    v_count bigint;
    v_total bigint := 0;
    v_before timestamptz := clock_timestamp() - make_interval(secs => p_age);
    k text;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('sessionstore:janitor:' || p_schema),
                                     hashtext(p_store)) THEN
        RETURN QUERY SELECT false, NULL::text, 0::bigint;
        RETURN;
    END IF;
    v_keys := ARRAY(SELECT r.key FROM {s}.records r
                    WHERE r.store = p_store AND r.key > p_after ORDER BY r.key LIMIT p_batch);
    FOREACH k IN ARRAY v_keys LOOP
        SELECT v.version INTO v_cut FROM {s}.versions v WHERE v.store = p_store AND v.key = k
        ORDER BY v.version DESC OFFSET p_keep LIMIT 1;
        CONTINUE WHEN v_cut IS NULL;
        DELETE FROM {s}.versions v
        WHERE v.store = p_store AND v.key = k AND v.version <= v_cut
          AND v.created_at < v_before;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_total := v_total + v_count;
    END LOOP;
    RETURN QUERY SELECT true, v_keys[cardinality(v_keys)], v_total;
END $$;
"""


def _messaging(s: str) -> str:
    # A send, bounded per key under a transaction-level advisory lock on the
    # key (concurrent senders cannot overshoot p_max); a retry of the same
    # send (p_nonce) finds its row. The key's live holder is woken on its
    # message channel (sessionstore/_storage/sql.py message_channel).
    return f"""
CREATE FUNCTION {s}.message_send(
    p_store text, p_key text, p_body jsonb, p_nonce uuid, p_max integer) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
    v_holder uuid;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sessionstore.messages'),
                                  hashtext(p_store || '/' || p_key));
    SELECT m.id INTO v_id FROM {s}.messages m
    WHERE m.store = p_store AND m.key = p_key AND m.nonce = p_nonce;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    IF (SELECT count(*) FROM (SELECT 1 FROM {s}.messages m
                              WHERE m.store = p_store AND m.key = p_key LIMIT p_max) AS q)
       >= p_max THEN
        RETURN NULL;
    END IF;
    INSERT INTO {s}.messages (store, key, body, nonce) VALUES (p_store, p_key, p_body, p_nonce)
    RETURNING id INTO v_id;
    SELECT l.holder INTO v_holder FROM {s}.locks l
    WHERE l.store = p_store AND l.key = p_key AND l.expires_at > clock_timestamp();
    IF FOUND THEN
        PERFORM pg_notify('sessionstore_m' || replace(v_holder::text, '-', ''), p_key);
    END IF;
    RETURN v_id;
END $$;
"""


def _operating(s: str) -> str:
    # sessionstore unlock: take a key's lease from whoever holds it (a new
    # token, expired at once, under the operator's holder id), log it, and
    # announce the key free; waiting at most p_lock_timeout for a save in flight.
    return f"""
CREATE FUNCTION {s}.unlock_key(
    p_store text, p_key text, p_reason text, p_actor text, p_holder uuid, p_host text,
    p_pid integer, p_lock_timeout text, p_channel text)
RETURNS TABLE (old_holder text, old_token bigint, old_host text, old_pid integer,
               was_active boolean, was_alive boolean, new_token bigint, audit_id bigint,
               at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    v_token bigint;
    v_id bigint;
    v_at timestamptz;
    v_now timestamptz;
BEGIN
    SET LOCAL citus.propagate_set_commands = 'local';
    EXECUTE 'SET LOCAL lock_timeout = ' || quote_literal(p_lock_timeout);
    SELECT l.holder, l.token, l.host, l.pid, l.expires_at > clock_timestamp() AS active
    INTO r FROM {s}.locks l WHERE l.store = p_store AND l.key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_token := nextval('{s}.lease_tokens');
    v_now := clock_timestamp();
    UPDATE {s}.locks l
    SET holder = p_holder, token = v_token, acquired_at = v_now, expires_at = v_now,
        host = p_host, pid = p_pid, liveness = false
    WHERE l.store = p_store AND l.key = p_key;
    INSERT INTO {s}.audit (store, key, action, reason, old_holder, old_token, old_host,
                           old_pid, new_token, actor)
    VALUES (p_store, p_key, 'unlock', p_reason, r.holder, r.token, r.host, r.pid, v_token,
            p_actor)
    RETURNING id, at INTO v_id, v_at;
    PERFORM pg_notify(p_channel, p_key);
    RETURN QUERY SELECT r.holder::text, r.token, r.host, r.pid, r.active,
                        {s}.holder_alive(r.holder), v_token, v_id, v_at;
END $$;
"""


FUNCTIONS = (
    ("holder_alive", "uuid"),
    ("lease_acquire", "text, text, uuid, float8, text, integer, boolean, uuid, bigint"),
    ("lease_acquire_many", "text, text[], uuid, float8, text, integer, boolean"),
    ("lease_info", "text, text"),
    ("lease_renew", "text, uuid, text[], bigint[], float8, text"),
    ("lease_release", "text, uuid, text[], bigint[], text"),
    ("lease_release_one", "text, uuid, text, bigint, text"),
    ("lease_release_unclaimed", "text, text, uuid, text"),
    ("lease_hand_over", "text, uuid, text, bigint, uuid, float8, text"),
    ("prune_requests", _PRUNE_ARGS),
    ("write_leased", _WRITE_LEASED_ARGS),
    ("write_version", _WRITE_VERSION_ARGS),
    ("write_few", _MANY_ARGS),
    ("write_versions", _MANY_ARGS),
    ("erase_key", "text, text, uuid, bigint, text"),
    ("prune_batch", "text, text, text, integer, integer, float8"),
    ("message_send", "text, text, jsonb, uuid, integer"),
    ("unlock_key", "text, text, text, text, uuid, text, integer, text, text"),
)
"""Every function of this revision with its argument types (for DROP and for the docs' GRANTs)."""


def _has_citus() -> bool:
    found = op.get_bind().execute(
        sa.text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    )
    return bool(found.scalar())


def _distribute(s: str) -> None:
    # In the migration's one transaction, after this transaction's DDL:
    # sequential mode lets Citus use the connection that saw it.
    op.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
    distributed = {
        str(name)
        for (name,) in op.get_bind().execute(
            sa.text("SELECT CAST(logicalrelid AS text) FROM pg_dist_partition")
        )
    }
    for table in TABLES:
        if f"{_schema()}.{table}" in distributed:
            continue  # distributed already (a downgrade to 0003 keeps the layout)
        colocate = "none" if table == "locks" else f"{s}.locks"
        op.execute(
            sa.text(
                "SELECT create_distributed_table(CAST(:t AS regclass), 'key', colocate_with => :c)"
            ).bindparams(t=f"{s}.{table}", c=colocate)
        )
    # write_version runs on the worker holding p_key's shard (one round trip),
    # and calls write_leased and prune_requests there: all exist on every node.
    for helper in (f"prune_requests({_PRUNE_ARGS})", f"write_leased({_WRITE_LEASED_ARGS})"):
        op.execute(
            sa.text("SELECT create_distributed_function(CAST(:f AS regprocedure))").bindparams(
                f=f"{s}.{helper}"
            )
        )
    op.execute(
        sa.text(
            "SELECT create_distributed_function(CAST(:f AS regprocedure), 'p_key', "
            "colocate_with := :c)"
        ).bindparams(f=f"{s}.write_version({_WRITE_VERSION_ARGS})", c=f"{s}.locks")
    )


def upgrade() -> None:
    s = f'"{_schema()}"'
    for part in (
        _liveness,
        _taking,
        _looking,
        _keeping,
        _letting_go,
        _writing,
        _fencing,
        _writing_few,
        _writing_many,
        _erasing,
        _maintaining,
        _messaging,
        _operating,
    ):
        op.execute(part(s))
    if _has_citus():
        _distribute(s)


def downgrade() -> None:
    # The functions go; on Citus the tables stay distributed (Citus cannot
    # undistribute a table with an identity column, and 0003 runs as well on
    # distributed tables: its statements are the callers' business).
    s = f'"{_schema()}"'
    for name, args in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {s}.{name}({args})")
