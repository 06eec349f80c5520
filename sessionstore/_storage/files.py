"""Files: the versions and shards tables, and the fenced write.

Owns the statements on ``versions``, ``shards`` and ``records``. A save is a
*file* (see :mod:`.codec`) kept inline in the version row or split across
shard rows. :func:`write_versions` is the fenced write of the package: a
single statement that row-locks each key's lease row (in key order), checks
holder, token and expiry on the database clock (:data:`.sql.LEASE_HELD`),
and only then inserts the versions, their shards and, on a key's first save,
its record. :func:`write_streamed` does the same for one large document,
whose shards follow in the same transaction as they are compressed. The
newest version of a key is its current data.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa

from ..db import driver_connection, driver_cursor
from .codec import CODEC_NAMES, EncodedFile, FileSettings, compress_stream, decode_file
from .sql import LEASE_HELD, free_channel, one_lease
from .types import LoadedKey, Retention, StoredVersion, VersionInfo, WriteResult

__all__ = [
    "WriteItem",
    "erase_key",
    "keys_page",
    "list_versions",
    "prune_versions",
    "read_for_load",
    "read_many",
    "read_many_for_load",
    "read_version",
    "write_streamed",
    "write_versions",
]


@dataclass
class WriteItem:
    """One key's new version as the write statement takes it: the file already encoded."""

    key: str
    token: int
    version: int
    file: EncodedFile
    migrations: Sequence[str]
    new_record: bool
    requests: Sequence[str] = ()
    messages: Sequence[int] = ()
    prune_requests: bool = False


def _info(row: Any) -> VersionInfo:
    return VersionInfo(
        version=row.version,
        created_at=row.created_at,
        size=row.raw_size,
        stored_size=row.stored_size,
        migrations=tuple(row.migrations),
        token=row.token,
        codec=CODEC_NAMES.get(row.codec, str(row.codec)),
        shard_count=row.shard_count,
    )


class _Statements:
    """The SQL of this module for one (validated) schema name."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        columns = (
            "v.version, v.created_at, v.codec, v.raw_size, v.stored_size, v.checksum, "
            "v.shard_count, v.migrations, v.token"
        )
        shards = (
            f"CASE WHEN v.shard_count > 0 THEN ARRAY(SELECT s.data FROM {s}.shards s "
            "WHERE s.store = v.store AND s.key = v.key AND s.version = v.version "
            "ORDER BY s.idx) END AS shards"
        )
        self._reads(s, columns, shards)
        self._loads(s, columns, shards)
        self._maintenance(s)
        self._streamed(s)

    def _reads(self, s: str, columns: str, shards: str) -> None:
        # Read through a binary psycopg cursor (db.driver_cursor): bytea arrives as
        # bytes, not hex text, which costs more than the read itself when large.
        self.read_newest = (
            f"SELECT {columns}, v.inline, {shards} FROM {s}.versions v "
            "WHERE v.store = %(store)b AND v.key = %(key)b ORDER BY v.version DESC LIMIT 1"
        )
        self.read_version = (
            f"SELECT {columns}, v.inline, {shards} FROM {s}.versions v "
            "WHERE v.store = %(store)b AND v.key = %(key)b AND v.version = %(version)b"
        )
        # One page of the saved keys, in key order, after :after (keyset paging:
        # bounded memory, no cursor held open across pages).
        self.keys_page = sa.text(
            f"SELECT key FROM {s}.records WHERE store = :store AND key > :after "
            "AND (CAST(:prefix AS text) IS NULL OR starts_with(key, :prefix)) "
            "ORDER BY key LIMIT :limit"
        )
        where = (
            "WHERE v.store = :store AND v.key = :key "
            "AND (CAST(:since AS timestamptz) IS NULL OR v.created_at >= :since) "
            "AND (CAST(:until AS timestamptz) IS NULL OR v.created_at < :until)"
        )
        self.list_desc = sa.text(
            f"SELECT {columns} FROM {s}.versions v {where} ORDER BY v.version DESC LIMIT :limit"
        )
        self.list_asc = sa.text(
            f"SELECT {columns} FROM {s}.versions v {where} ORDER BY v.version ASC LIMIT :limit"
        )

    def _loads(self, s: str, columns: str, shards: str) -> None:
        # A load's one statement: the newest version (if any), the newest
        # applied request ids, and whether messages wait for the key.
        self.read_for_load = (
            f"SELECT {columns}, v.inline, {shards}, "
            f"ARRAY(SELECT r.request_id FROM {s}.applied_requests r "
            "WHERE r.store = %(store)b AND r.key = %(key)b "
            "ORDER BY r.version DESC, r.idx DESC LIMIT %(retention)b) AS requests, "
            f"EXISTS (SELECT 1 FROM {s}.messages m "
            "WHERE m.store = %(store)b AND m.key = %(key)b) AS has_messages "
            "FROM (SELECT 1) AS one LEFT JOIN LATERAL ("
            f"SELECT * FROM {s}.versions v WHERE v.store = %(store)b AND v.key = %(key)b "
            "ORDER BY v.version DESC LIMIT 1) AS v ON true"
        )
        # The newest version of many keys (a batch of offline edits, an
        # export), and with each key's bookkeeping for load_many.
        many = (
            "FROM unnest(CAST(%(keys)b AS text[])) AS k(key) LEFT JOIN LATERAL ("
            f"SELECT * FROM {s}.versions v WHERE v.store = %(store)b AND v.key = k.key "
            "ORDER BY v.version DESC LIMIT 1) AS v ON true"
        )
        self.read_many = f"SELECT k.key AS wanted, {columns}, v.inline, {shards} {many}"
        self.read_many_for_load = (
            f"SELECT k.key AS wanted, {columns}, v.inline, {shards}, "
            f"ARRAY(SELECT r.request_id FROM {s}.applied_requests r "
            "WHERE r.store = %(store)b AND r.key = k.key "
            "ORDER BY r.version DESC, r.idx DESC LIMIT %(retention)b) AS requests, "
            f"EXISTS (SELECT 1 FROM {s}.messages m "
            f"WHERE m.store = %(store)b AND m.key = k.key) AS has_messages {many}"
        )

    def _maintenance(self, s: str) -> None:
        # Prune one batch of keys (those after :after, in key order): versions
        # older than the newest :keep and older than :age seconds go, with
        # their shards (ON DELETE CASCADE). The transaction-level advisory lock
        # keeps a second process from pruning the same store concurrently.
        self.prune = sa.text(f"""
WITH turn AS (
    SELECT pg_try_advisory_xact_lock(hashtext('sessionstore:janitor:' || :schema),
                                     hashtext(:store)) AS ours
), batch AS (
    SELECT key FROM {s}.records
    WHERE store = :store AND key > :after AND (SELECT ours FROM turn)
    ORDER BY key
    LIMIT :batch
), cutoff AS (
    SELECT b.key,
           (SELECT v.version FROM {s}.versions v WHERE v.store = :store AND v.key = b.key
            ORDER BY v.version DESC OFFSET :keep LIMIT 1) AS version
    FROM batch b
), pruned AS (
    DELETE FROM {s}.versions v USING cutoff c
    WHERE v.store = :store AND v.key = c.key AND v.version <= c.version
      AND v.created_at < clock_timestamp() - make_interval(secs => :age)
    RETURNING 1
)
SELECT (SELECT ours FROM turn) AS ours, (SELECT max(key) FROM batch) AS last_key,
       (SELECT count(*) FROM pruned) AS pruned
""")
        self.erase = sa.text(f"""
WITH lease AS (
    SELECT l.key FROM {s}.locks l
    WHERE {LEASE_HELD.format(store=":store", holder=":holder", match=one_lease(":key", ":token"))}
    FOR UPDATE
), rec AS (
    DELETE FROM {s}.records WHERE store = :store AND key IN (SELECT key FROM lease)
), ver AS (
    DELETE FROM {s}.versions WHERE store = :store AND key IN (SELECT key FROM lease)
), req AS (
    DELETE FROM {s}.applied_requests WHERE store = :store AND key IN (SELECT key FROM lease)
), msg AS (
    DELETE FROM {s}.messages WHERE store = :store AND key IN (SELECT key FROM lease)
), gone AS (
    DELETE FROM {s}.locks WHERE store = :store AND key IN (SELECT key FROM lease) RETURNING key
)
SELECT key, pg_notify(:channel, key) FROM gone
""")

    def _streamed(self, s: str) -> None:
        fence = LEASE_HELD.format(
            store="%(store)b", holder="%(holder)b", match=one_lease("%(key)b", "%(token)b")
        )
        self.earlier = sa.text(
            f"SELECT checksum FROM {s}.versions WHERE store = :store AND key = :key "
            "AND version = :version AND holder = :holder AND token = :token "
            "AND raw_size = :raw_size"
        )
        # The streamed write (write_streamed): shard rows as they are
        # compressed, then the version row's final sizes and checksum, if the
        # lease still holds (locked now, until the commit).
        self.insert_shards = (
            f"INSERT INTO {s}.shards (store, key, version, idx, data) "
            "SELECT %(store)b, %(key)b, CAST(%(version)b AS bigint), "
            "CAST(%(first)b AS integer) + CAST(u.i AS integer) - 1, u.d "
            "FROM unnest(CAST(%(data)b AS bytea[])) WITH ORDINALITY AS u(d, i)"
        )
        self.finish_version = f"""
WITH lease AS (
    SELECT 1 FROM {s}.locks l WHERE {fence}
    FOR UPDATE
)
UPDATE {s}.versions v
SET stored_size = %(stored_size)b, checksum = %(checksum)b, shard_count = %(shard_count)b,
    inline = CAST(%(inline)b AS bytea)
WHERE v.store = %(store)b AND v.key = %(key)b AND v.version = %(version)b
  AND EXISTS (SELECT 1 FROM lease)
RETURNING v.version
"""


_INPUT_COLUMNS = (
    ("key", "text"),
    ("token", "bigint"),
    ("version", "bigint"),
    ("codec", "smallint"),
    ("raw_size", "bigint"),
    ("stored_size", "bigint"),
    ("checksum", "bigint"),
    ("shard_count", "integer"),
    ("inline", "bytea"),
    ("migrations", "jsonb"),
    ("new_record", "boolean"),
)


# Up to this many keys the write lists its rows as VALUES (one statement
# text per count, prepared and planned once); beyond, it takes arrays.
_MAX_VALUES_ROWS = 8


@dataclass(frozen=True)
class _WriteShape:
    """What one write statement text covers (each shape is prepared once)."""

    rows: int
    """VALUES rows (up to :data:`_MAX_VALUES_ROWS`), or 0 for the array form."""
    shards: bool
    requests: bool
    messages: bool
    prune: bool
    lock: bool
    """Lock the lease rows (all but the first statement of :func:`write_streamed`)."""


def _write_source(rows: int) -> tuple[str, str, str]:
    """The ``input`` relation, its row count and the lease match, for ``rows`` (0: arrays)."""
    names = ", ".join(name for name, _ in _INPUT_COLUMNS)
    if rows:
        values = ", ".join(
            "("
            + ", ".join(f"CAST(%({name}_{row})b AS {kind})" for name, kind in _INPUT_COLUMNS)
            + ")"
            for row in range(rows)
        )
        source = f"SELECT * FROM (VALUES {values}) AS t({names})"
        return source, str(rows), "(l.key, l.token) IN (SELECT key, token FROM input)"
    arrays = ", ".join(f"CAST(%({name}s)b AS {kind}[])" for name, kind in _INPUT_COLUMNS)
    source = f"SELECT * FROM unnest({arrays}) AS t({names})"
    # Two = ANY filters, not a join: with stale statistics (a table that
    # just grew) the planner turns a join into nested seq scans, seconds
    # for 10,000 keys; a filter is a hashed lookup either way. Tokens are
    # unique across all leases, so matching key and token separately
    # matches the pairs.
    match = "l.key = ANY(CAST(%(keys)b AS text[])) AND l.token = ANY(CAST(%(tokens)b AS bigint[]))"
    return source, "cardinality(CAST(%(keys)b AS text[]))", match


def _bookkeeping_ctes(s: str, shape: _WriteShape) -> str:
    """The parts of a write beside the version: shards, applied ids, delivered messages.

    Each joins ``ver`` (the versions inserted now), so it happens exactly
    when its key's version is written, in the same statement.
    """
    parts = []
    if shape.shards:
        parts.append(f"""sh AS (
    INSERT INTO {s}.shards (store, key, version, idx, data)
    SELECT %(store)b, p.key, p.version, p.idx, p.data
    FROM unnest(CAST(%(shard_keys)b AS text[]), CAST(%(shard_versions)b AS bigint[]),
                CAST(%(shard_idx)b AS integer[]), CAST(%(shard_data)b AS bytea[]))
         AS p(key, version, idx, data)
    JOIN ver USING (key)
)""")
    if shape.requests:
        parts.append(f"""req AS (
    INSERT INTO {s}.applied_requests (store, key, request_id, version, idx)
    SELECT %(store)b, p.key, p.request_id, ver.version, p.idx
    FROM unnest(CAST(%(req_keys)b AS text[]), CAST(%(req_ids)b AS text[]),
                CAST(%(req_idx)b AS integer[])) AS p(key, request_id, idx)
    JOIN ver USING (key)
    ON CONFLICT DO NOTHING
)""")
    if shape.prune:
        # Ids older than the newest :retention (as of before this statement)
        # go; the ones written now are kept on top of those.
        # The cutoff of each key is computed once (MATERIALIZED): left to the
        # planner, the lateral subquery ran again for every row it deleted
        # (measured: 400 ms for a key with 1,125 ids, against 1 ms).
        parts.append(f"""req_cut AS MATERIALIZED (
    SELECT ver.key, c.version, c.idx FROM ver CROSS JOIN LATERAL (
        SELECT q.version, q.idx FROM {s}.applied_requests q
        WHERE q.store = %(store)b AND q.key = ver.key
        ORDER BY q.version DESC, q.idx DESC OFFSET %(retention)b LIMIT 1
    ) AS c
    WHERE ver.key = ANY(CAST(%(prune_keys)b AS text[]))
), req_prune AS (
    DELETE FROM {s}.applied_requests r USING req_cut cut
    WHERE r.store = %(store)b AND r.key = cut.key AND (r.version, r.idx) <= (cut.version, cut.idx)
)""")
    if shape.messages:
        parts.append(f"""msg AS (
    DELETE FROM {s}.messages m
    USING unnest(CAST(%(msg_keys)b AS text[]), CAST(%(msg_ids)b AS bigint[])) AS p(key, id)
    JOIN ver USING (key)
    WHERE m.store = %(store)b AND m.key = p.key AND m.id = p.id
)""")
    return "".join(", " + part for part in parts)


def _write_statement(schema: str, shape: _WriteShape) -> str:
    """The fenced write, for ``shape.rows`` keys as VALUES rows or (0) as arrays.

    Both forms are the same statement over an ``input`` relation. The VALUES
    form exists because PostgreSQL plans the array form on every execution,
    which costs more than a whole single-key write (measured: 1.4 ms against
    0.4 ms). Optional parts (shards, applied ids, delivered messages) are
    left out when the write has none, and the lease rows are not locked
    when ``shape.lock`` is false (the first statement of
    :func:`write_streamed`, whose last statement locks and checks again).
    """
    s = f'"{schema}"'
    source, count, match = _write_source(shape.rows)
    return f"""
WITH input AS (
    {source}
), lease AS (
    SELECT l.key FROM {s}.locks l
    WHERE {LEASE_HELD.format(store="%(store)b", holder="%(holder)b", match=match)}
    ORDER BY l.key{" FOR UPDATE OF l" if shape.lock else ""}
), go AS (
    SELECT i.* FROM input i JOIN lease USING (key)
    WHERE NOT CAST(%(atomic)b AS boolean) OR (SELECT count(*) FROM lease) = {count}
), rec AS (
    INSERT INTO {s}.records (store, key)
    SELECT %(store)b, key FROM go WHERE new_record
    ON CONFLICT DO NOTHING
), ver AS (
    INSERT INTO {s}.versions (store, key, version, holder, token, codec, raw_size, stored_size,
                              checksum, shard_count, inline, migrations)
    SELECT %(store)b, key, version, CAST(%(holder)b AS uuid), token, codec, raw_size,
           stored_size, checksum, shard_count, inline, migrations
    FROM go
    ON CONFLICT DO NOTHING
    RETURNING key, version
){_bookkeeping_ctes(s, shape)}
SELECT i.key, i.version,
       EXISTS (SELECT 1 FROM lease WHERE lease.key = i.key) AS leased,
       EXISTS (SELECT 1 FROM ver WHERE ver.key = i.key) AS written
FROM input i
"""


@functools.cache
def statements(schema: str) -> _Statements:
    """The statements for one schema, built once."""
    return _Statements(schema)


@functools.cache
def _write_text(schema: str, shape: _WriteShape) -> str:
    return _write_statement(schema, shape)


def _write_params(
    store: str, holder: str, items: Sequence[WriteItem], *, atomic: bool, rows: int
) -> dict[str, Any]:
    """The write statement's parameters: one set per row (VALUES form) or arrays."""
    columns = [
        (
            item.key,
            item.token,
            item.version,
            item.file.codec,
            item.file.raw_size,
            item.file.stored_size,
            item.file.checksum,
            len(item.file.shards),
            item.file.inline,
            orjson.dumps(list(item.migrations)).decode(),
            item.new_record,
        )
        for item in items
    ]
    params: dict[str, Any] = {"store": store, "holder": holder, "atomic": atomic}
    for position, (name, _) in enumerate(_INPUT_COLUMNS):
        if rows:
            for row, values in enumerate(columns):
                params[f"{name}_{row}"] = values[position]
        else:
            params[name + "s"] = [values[position] for values in columns]
    shards = [
        (item.key, item.version, index, chunk)
        for item in items
        for index, chunk in enumerate(item.file.shards)
    ]
    if shards:
        keys, versions, indexes, data = zip(*shards, strict=True)
        params.update(
            shard_keys=list(keys),
            shard_versions=list(versions),
            shard_idx=list(indexes),
            shard_data=list(data),
        )
    _bookkeeping_params(params, items)
    return params


def _bookkeeping_params(params: dict[str, Any], items: Sequence[WriteItem]) -> None:
    """Applied request ids, messages to delete and keys to prune, as arrays."""
    requests = [(i.key, rid, idx) for i in items for idx, rid in enumerate(i.requests)]
    if requests:
        keys, ids, indexes = zip(*requests, strict=True)
        params.update(req_keys=list(keys), req_ids=list(ids), req_idx=list(indexes))
    messages = [(i.key, mid) for i in items for mid in i.messages]
    if messages:
        keys, mids = zip(*messages, strict=True)
        params.update(msg_keys=list(keys), msg_ids=list(mids))
    prune = [i.key for i in items if i.prune_requests]
    if prune:
        params["prune_keys"] = prune


def write_versions(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    items: Sequence[WriteItem],
    *,
    atomic: bool,
    retention: int = 0,
    final: bool = True,
) -> WriteResult:
    """The fenced write: insert each item's version if its lease still holds.

    With ``atomic`` every item is written or none is (a ``tx``); otherwise each
    key stands alone (a batch of saves). Lease rows are locked in key order,
    so concurrent writers over overlapping keys cannot deadlock. A version
    that an earlier attempt of this same write already committed (the
    connection dropped before the answer came) counts as written.

    ``final=False`` (the first statement of :func:`write_streamed`): the
    lease rows are checked but not locked, and only versions inserted now
    count as written (the caller checks for an earlier attempt itself).
    ``retention``: applied ids kept per key when an item prunes them.
    """
    rows = len(items) if len(items) <= _MAX_VALUES_ROWS else 0
    params = _write_params(store, holder, items, atomic=atomic, rows=rows)
    shape = _WriteShape(
        rows=rows,
        shards="shard_keys" in params,
        requests="req_keys" in params,
        messages="msg_keys" in params,
        prune="prune_keys" in params,
        lock=final,
    )
    if shape.prune:
        params["retention"] = retention
    statement = _write_text(schema, shape)
    result = WriteResult()
    by_key = {item.key: item for item in items}
    with driver_cursor(conn, binary=True) as cursor:
        # The array form is planned afresh each time (see db.driver_cursor).
        answer = cursor.execute(statement, params, prepare=None if rows else False).fetchall()
    for row in answer:
        # Not written now: an earlier attempt of this very write may have
        # committed before its connection dropped (even if the lease has
        # gone since); only then does it count as written.
        if row.written or (final and _ours(conn, schema, store, holder, by_key[row.key])):
            result.written.add(row.key)
        elif not row.leased:
            result.lost.add(row.key)
    return result


class _Upload:
    """The shard rows of one streamed write, sent as the compressor fills them."""

    def __init__(
        self, cursor: psycopg.Cursor[Any], sql: _Statements, params: dict[str, Any], size: int
    ) -> None:
        self._cursor = cursor
        self._sql = sql
        self._params = params
        self._size = size
        self._held = bytearray()  # compressed, not yet sent
        self.sent = 0
        self.checksum = 0

    def add(self, output: bytes, inline_threshold: int) -> None:
        self._held += output
        # Sharded once it outgrows the inline threshold: whole shards leave now.
        if self.sent or len(self._held) > inline_threshold:
            self._send(len(self._held) - len(self._held) % self._size)

    def finish(self, inline_threshold: int) -> tuple[int, bytes | None]:
        """Send the rest; ``(stored size, inline bytes or None)``."""
        stored_size = self.sent * self._size + len(self._held)
        if self.sent or len(self._held) > inline_threshold:
            self._send(len(self._held))
            return stored_size, None
        inline = bytes(self._held)
        self.checksum = zlib.crc32(inline)
        return stored_size, inline

    def _send(self, end: int) -> None:
        if not end:
            return
        with memoryview(self._held) as whole:
            chunk = bytes(whole[:end])
        del self._held[:end]
        self.checksum = zlib.crc32(chunk, self.checksum)
        view = memoryview(chunk)
        shards = [view[at : at + self._size] for at in range(0, len(chunk), self._size)]
        self._cursor.execute(
            self._sql.insert_shards, {**self._params, "first": self.sent, "data": shards}
        )
        self.sent += len(shards)


def write_streamed(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    item: WriteItem,
    raw: bytes,
    settings: FileSettings,
    retention: int = 0,
) -> WriteResult:
    """The fenced write of one large document, compressed while it is sent.

    ``item`` names the version; its file is :meth:`EncodedFile.pending` and
    is made here from ``raw``. One transaction of several statements instead
    of :func:`write_versions`' one, so that zstd's worker threads compress
    while this thread waits on PostgreSQL (measured: 1.3x the throughput of
    compressing first, for 100 MB):

    1. the version row, with sizes and checksum not yet known, if the lease
       holds (checked, not locked: the heartbeat and other writers must not
       wait for the upload);
    2. shard rows, as the compressor fills them;
    3. the fence: the lease row locked and checked again (holder, token,
       expiry), and only then the version row's sizes and checksum; else
       everything is rolled back (``lost``).

    Peak memory is the JSON plus a few MiB, not the JSON plus its whole
    compressed copy. The stored layout is the one :func:`encode_file` makes.
    """
    sql = statements(schema)
    params: dict[str, Any] = {
        "store": store,
        "key": item.key,
        "version": item.version,
        "holder": holder,
        "token": item.token,
    }
    with driver_connection(conn).transaction() as transaction:
        started = write_versions(
            conn, schema, store, holder, [item], atomic=True, retention=retention, final=False
        )
        if item.key in started.written:
            with driver_cursor(conn, binary=True) as cursor:
                upload = _Upload(cursor, sql, params, settings.shard_size)
                for output in compress_stream(raw, settings):
                    upload.add(output, settings.inline_threshold)
                stored_size, inline = upload.finish(settings.inline_threshold)
                finish = {
                    **params,
                    "stored_size": stored_size,
                    "checksum": upload.checksum,
                    "shard_count": upload.sent,
                    "inline": inline,
                }
                if cursor.execute(sql.finish_version, finish).fetchone() is not None:
                    return started
            raise psycopg.Rollback(transaction)  # the lease went during the upload
    if item.key in started.written:  # ... and was rolled back
        return WriteResult(lost={item.key})
    # Nothing inserted. An earlier attempt of this same write may have
    # committed before its connection dropped (even if the lease has gone
    # since): its bytes are the ones compressed now (zstd is deterministic).
    found = _earlier_checksum(conn, schema, store, holder, item)
    if found is not None:
        checksum = 0
        for output in compress_stream(raw, settings):
            checksum = zlib.crc32(output, checksum)
        if checksum == found:
            return WriteResult(written={item.key})
    return WriteResult(lost=started.lost)


def _earlier_checksum(
    conn: sa.Connection, schema: str, store: str, holder: str, item: WriteItem
) -> int | None:
    """Checksum of ``item``'s version if it exists with this holder, token and raw size."""
    params = {
        "store": store,
        "key": item.key,
        "version": item.version,
        "holder": holder,
        "token": item.token,
        "raw_size": item.file.raw_size,
    }
    found = conn.execute(statements(schema).earlier, params).scalar()
    return None if found is None else int(found)


def _ours(conn: sa.Connection, schema: str, store: str, holder: str, item: WriteItem) -> bool:
    """Did an earlier attempt of this write already commit ``item``'s version?

    Matched on holder, token, version *and* content (checksum and size): a
    different write that reused the version number is not ours.
    """
    return _earlier_checksum(conn, schema, store, holder, item) == item.file.checksum


def _stored(row: Any, context: str) -> StoredVersion:
    raw = decode_file(
        row.codec, row.raw_size, row.checksum, row.shard_count, row.inline, row.shards, context
    )
    return StoredVersion(_info(row), raw, context)


def read_version(
    conn: sa.Connection, schema: str, store: str, key: str, version: int | None
) -> StoredVersion | None:
    """The newest version of ``key`` (``version=None``) or the given one; None if absent."""
    sql = statements(schema)
    with driver_cursor(conn, binary=True) as cursor:
        if version is None:
            cursor.execute(sql.read_newest, {"store": store, "key": key})
        else:
            cursor.execute(sql.read_version, {"store": store, "key": key, "version": version})
        row = cursor.fetchone()
    if row is None:
        return None
    return _stored(row, f"store {store!r} key {key!r} version {row.version}")


def read_for_load(
    conn: sa.Connection, schema: str, store: str, key: str, retention: int
) -> LoadedKey:
    """What a load needs, in one statement: newest version, applied ids, messages waiting."""
    with driver_cursor(conn, binary=True) as cursor:
        params = {"store": store, "key": key, "retention": retention}
        row = cursor.execute(statements(schema).read_for_load, params).fetchone()
    assert row is not None, "the statement always returns one row"
    stored = None
    if row.version is not None:
        stored = _stored(row, f"store {store!r} key {key!r} version {row.version}")
    return LoadedKey(stored, tuple(row.requests), bool(row.has_messages))


def read_many(
    conn: sa.Connection, schema: str, store: str, keys: Sequence[str]
) -> dict[str, StoredVersion | None]:
    """The newest version of each of ``keys`` (None: never saved), in one statement."""
    with driver_cursor(conn, binary=True) as cursor:
        params = {"store": store, "keys": list(keys)}
        rows = cursor.execute(statements(schema).read_many, params, prepare=False).fetchall()
    return {
        row.wanted: None
        if row.version is None
        else _stored(row, f"store {store!r} key {row.wanted!r} version {row.version}")
        for row in rows
    }


def read_many_for_load(
    conn: sa.Connection, schema: str, store: str, keys: Sequence[str], retention: int
) -> dict[str, LoadedKey]:
    """:func:`read_for_load` of many keys, in one statement."""
    with driver_cursor(conn, binary=True) as cursor:
        params = {"store": store, "keys": list(keys), "retention": retention}
        sql = statements(schema).read_many_for_load
        rows = cursor.execute(sql, params, prepare=False).fetchall()
    return {
        row.wanted: LoadedKey(
            None
            if row.version is None
            else _stored(row, f"store {store!r} key {row.wanted!r} version {row.version}"),
            tuple(row.requests),
            bool(row.has_messages),
        )
        for row in rows
    }


def keys_page(
    conn: sa.Connection, schema: str, store: str, after: str, prefix: str | None, limit: int
) -> list[str]:
    """Up to ``limit`` saved keys after ``after`` (optionally starting with ``prefix``)."""
    params = {"store": store, "after": after, "prefix": prefix, "limit": limit}
    # Scalars fetched at once: iterating Row objects cost 2.6x the whole page.
    return list(conn.execute(statements(schema).keys_page, params).scalars().all())


def list_versions(
    conn: sa.Connection,
    schema: str,
    store: str,
    key: str,
    *,
    newest_first: bool,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[VersionInfo]:
    sql = statements(schema)
    stmt = sql.list_desc if newest_first else sql.list_asc
    params = {"store": store, "key": key, "since": since, "until": until, "limit": limit}
    return [_info(row) for row in conn.execute(stmt, params)]


def prune_versions(
    conn: sa.Connection, schema: str, store: str, after: str, retention: Retention
) -> tuple[bool, str | None, int]:
    """Prune one batch of keys after ``after``: ``(had the turn, last key seen, versions deleted)``.

    The current (newest) version is never pruned: ``keep`` is at least 1. A
    reader in the middle of a version still sees it: every read is one
    statement, so one snapshot.
    """
    params = {
        "schema": schema,
        "store": store,
        "after": after,
        "batch": retention.batch,
        "keep": retention.keep,
        "age": retention.age,
    }
    row = conn.execute(statements(schema).prune, params).one()
    return bool(row.ours), row.last_key, int(row.pruned)


def erase_key(
    conn: sa.Connection, schema: str, store: str, key: str, holder: str, token: int
) -> bool:
    """Delete the key's record, versions, shards and lease in one statement, if the lease holds."""
    params = {
        "store": store,
        "key": key,
        "holder": holder,
        "token": token,
        "channel": free_channel(schema, store),
    }
    return conn.execute(statements(schema).erase, params).first() is not None
