"""Files: the versions and shards tables, and the fenced write.

Owns the statements on ``versions``, ``shards`` and ``records``. A save is a
*file* (see :mod:`.codec`) kept inline in the version row or split across
shard rows. :func:`write_versions` is the fenced write of the package: one
call of a server function (revision 0004: ``write_version``, ``write_few``
or ``write_versions``) that row-locks each key's lease row (in key order),
checks holder, token and expiry on the database clock, and only then
inserts the versions, their shards and, on a key's first save, its record.
:func:`write_streamed` does the same for one large document, whose shards
follow in the same transaction as they are compressed, fenced again at its
end (:data:`.sql.LEASE_HELD`). The newest version of a key is its current
data.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa

from ..db import driver_connection, driver_cursor
from . import leases
from .codec import CODEC_NAMES, EncodedFile, FileSettings, compress_stream, decode_file
from .sql import LEASE_HELD, free_channel, one_lease
from .types import LeaseInfo, LoadedKey, Retention, StoredVersion, VersionInfo, WriteResult

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
        # The key is named, not joined (s.key = v.key): on Citus a named key
        # routes the whole statement to one shard.
        shards = (
            f"CASE WHEN v.shard_count > 0 THEN ARRAY(SELECT s.data FROM {s}.shards s "
            "WHERE s.store = %(store)b AND s.key = %(key)b AND s.version = v.version "
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
        # A load's statement: the newest version (if any) but its shards, the
        # newest applied request ids, and whether messages wait for the key.
        self.read_for_load = (
            f"SELECT {columns}, v.inline, "
            f"ARRAY(SELECT r.request_id FROM {s}.applied_requests r "
            "WHERE r.store = %(store)b AND r.key = %(key)b "
            "ORDER BY r.version DESC, r.idx DESC LIMIT %(retention)b) AS requests, "
            f"EXISTS (SELECT 1 FROM {s}.messages m "
            "WHERE m.store = %(store)b AND m.key = %(key)b) AS has_messages "
            "FROM (SELECT 1) AS one LEFT JOIN LATERAL ("
            f"SELECT * FROM {s}.versions v WHERE v.store = %(store)b AND v.key = %(key)b "
            "ORDER BY v.version DESC LIMIT 1) AS v ON true"
        )
        # A sharded version's shards, one row each (read_for_load streams them).
        self.read_shards = (
            f"SELECT s.data FROM {s}.shards s WHERE s.store = %(store)b AND s.key = %(key)b "
            "AND s.version = %(version)b ORDER BY s.idx"
        )
        # The lease and the same reads in one call (revision 0005).
        self.acquire_read = (
            f"SELECT * FROM {s}.lease_acquire_read(%(store)b, %(key)b, CAST(%(holder)b AS uuid), "
            "CAST(%(duration)b AS float8), %(host)b, CAST(%(pid)b AS integer), "
            "CAST(%(liveness)b AS boolean), CAST(%(dead_holder)b AS uuid), "
            "CAST(%(dead_token)b AS bigint), CAST(%(retention)b AS integer))"
        )
        # The newest version of many keys (a batch of offline edits, an
        # export), and with each key's newest applied ids for load_many.
        # Through records (one row per saved key), joined on the key: Citus
        # runs it on every shard in parallel (it cannot join a list of keys
        # to a LATERAL subquery); keys never saved have no row.
        many = (
            f"FROM {s}.records rec JOIN LATERAL ("
            f"SELECT * FROM {s}.versions x WHERE x.store = rec.store AND x.key = rec.key "
            "ORDER BY x.version DESC LIMIT 1) AS v ON true "
            "WHERE rec.store = %(store)b AND rec.key = ANY(CAST(%(keys)b AS text[]))"
        )
        shards_of = (
            f"CASE WHEN v.shard_count > 0 THEN ARRAY(SELECT s.data FROM {s}.shards s "
            "WHERE s.store = rec.store AND s.key = rec.key AND s.version = v.version "
            "ORDER BY s.idx) END AS shards"
        )
        self.read_many = f"SELECT rec.key AS wanted, {columns}, v.inline, {shards_of} {many}"
        self.read_many_for_load = (
            f"SELECT rec.key AS wanted, {columns}, v.inline, {shards_of}, "
            f"ARRAY(SELECT r.request_id FROM {s}.applied_requests r "
            "WHERE r.store = rec.store AND r.key = rec.key "
            "ORDER BY r.version DESC, r.idx DESC LIMIT %(retention)b) AS requests "
            f"{many}"
        )

    def _maintenance(self, s: str) -> None:
        # Prune one batch of keys (those after :after, in key order): versions
        # older than the newest :keep and older than :age seconds go, with
        # their shards (ON DELETE CASCADE); one process at a time per store.
        self.prune = sa.text(
            f"SELECT * FROM {s}.prune_batch(:schema, :store, :after, :batch, :keep, "
            "CAST(:age AS float8))"
        )
        self.erase = sa.text(
            f"SELECT {s}.erase_key(:store, :key, CAST(:holder AS uuid), :token, :channel)"
        )

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
        # The lease row stays locked from here to the commit, one round trip
        # later: should the client freeze in between, the server ends the
        # transaction (idle_in_transaction_session_timeout, set first) so the
        # row never blocks a takeover for long.
        self.finish_version = f"""
WITH guard AS (
    SELECT set_config('idle_in_transaction_session_timeout', %(idle)b, true)
), lease AS (
    SELECT 1 FROM {s}.locks l WHERE {fence} AND EXISTS (SELECT 1 FROM guard)
    FOR UPDATE
)
UPDATE {s}.versions v
SET stored_size = %(stored_size)b, checksum = %(checksum)b, shard_count = %(shard_count)b,
    inline = CAST(%(inline)b AS bytea)
WHERE v.store = %(store)b AND v.key = %(key)b AND v.version = %(version)b
  AND EXISTS (SELECT 1 FROM lease)
RETURNING v.version
"""


_FEW = 8
"""Up to this many keys, a write locks and writes them one statement each."""


@functools.cache
def _write_call(schema: str, many: int) -> str:
    """The fenced write: a call of ``write_version`` (one key) or ``write_versions`` (many).

    Both are server functions (alembic revision 0004) that lock each key's
    lease row, check holder, token and expiry on the database clock, and
    only then insert the version, its shards, its record on a first save,
    its applied request ids (pruned to the retention) and the deletion of
    the messages it carries. The single-key call passes the key as a plain
    parameter: on Citus the call then runs on the key's worker.
    """
    s = f'"{schema}"'
    if not many:
        return (
            f"SELECT leased, written FROM {s}.write_version(%(store)b, CAST(%(holder)b AS uuid), "
            "%(key)b, CAST(%(token)b AS bigint), CAST(%(version)b AS bigint), "
            "CAST(%(codec)b AS smallint), CAST(%(raw_size)b AS bigint), "
            "CAST(%(stored_size)b AS bigint), CAST(%(checksum)b AS bigint), "
            "CAST(%(shard_count)b AS integer), CAST(%(inline)b AS bytea), "
            "CAST(%(migrations)b AS jsonb), CAST(%(new_record)b AS boolean), "
            "CAST(%(shards)b AS bytea[]), CAST(%(requests)b AS text[]), "
            "CAST(%(messages)b AS bigint[]), CAST(%(prune)b AS boolean), "
            "CAST(%(retention)b AS integer), CAST(%(lock)b AS boolean))"
        )
    arrays = ", ".join(f"CAST(%({name})b AS {kind}[])" for name, kind in _MANY_ARRAYS)
    # A few keys: single-key statements with cached plans (write_few); more:
    # set-based statements planned for their arrays (write_versions).
    function = "write_few" if many <= _FEW else "write_versions"
    return (
        f"SELECT key, leased, written FROM {s}.{function}(%(store)b, "
        f"CAST(%(holder)b AS uuid), CAST(%(atomic)b AS boolean), {arrays}, "
        "CAST(%(retention)b AS integer))"
    )


_MANY_ARRAYS = (
    ("keys", "text"),
    ("tokens", "bigint"),
    ("versions", "bigint"),
    ("codecs", "smallint"),
    ("raw_sizes", "bigint"),
    ("stored_sizes", "bigint"),
    ("checksums", "bigint"),
    ("shard_counts", "integer"),
    ("inlines", "bytea"),
    ("migrations", "jsonb"),
    ("new_records", "boolean"),
    ("shard_keys", "text"),
    ("shard_idx", "integer"),
    ("shards", "bytea"),
    ("request_keys", "text"),
    ("request_idx", "integer"),
    ("requests", "text"),
    ("message_keys", "text"),
    ("messages", "bigint"),
    ("prune_keys", "text"),
)
"""The arrays of ``write_versions``, in its argument order, with their element types."""


@functools.cache
def statements(schema: str) -> _Statements:
    """The statements for one schema, built once."""
    return _Statements(schema)


def _one_params(item: WriteItem, lock: bool) -> dict[str, Any]:
    """The single-key write's parameters for ``item`` (beside store, holder, retention)."""
    return {
        "key": item.key,
        "token": item.token,
        "version": item.version,
        "codec": item.file.codec,
        "raw_size": item.file.raw_size,
        "stored_size": item.file.stored_size,
        "checksum": item.file.checksum,
        "shard_count": len(item.file.shards),
        "inline": item.file.inline,
        "migrations": orjson.dumps(list(item.migrations)).decode(),
        "new_record": item.new_record,
        "shards": list(item.file.shards),
        "requests": list(item.requests),
        "messages": list(item.messages),
        "prune": item.prune_requests,
        "lock": lock,
    }


def _many_params(items: Sequence[WriteItem]) -> dict[str, Any]:
    """The many-key write's arrays: one entry per item, and per shard, id and message.

    A shard, an applied id and a delivered message each name their key
    (``*_keys``) and their place (``*_idx``).
    """
    singles = [_one_params(item, True) for item in sorted(items, key=lambda item: item.key)]
    params: dict[str, Any] = {
        plural: [one[single] for one in singles]
        for plural, single in (
            ("keys", "key"),
            ("tokens", "token"),
            ("versions", "version"),
            ("codecs", "codec"),
            ("raw_sizes", "raw_size"),
            ("stored_sizes", "stored_size"),
            ("checksums", "checksum"),
            ("shard_counts", "shard_count"),
            ("inlines", "inline"),
            ("migrations", "migrations"),
            ("new_records", "new_record"),
        )
    }
    for name, keys, places in (
        ("shards", "shard_keys", "shard_idx"),
        ("requests", "request_keys", "request_idx"),
    ):
        parts = [(one["key"], at, part) for one in singles for at, part in enumerate(one[name])]
        params[keys] = [key for key, _, _ in parts]
        params[places] = [at for _, at, _ in parts]
        params[name] = [part for _, _, part in parts]
    delivered = [(one["key"], message) for one in singles for message in one["messages"]]
    params["message_keys"] = [key for key, _ in delivered]
    params["messages"] = [message for _, message in delivered]
    params["prune_keys"] = [one["key"] for one in singles if one["prune"]]
    return params


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

    ``final=False`` (the first statement of :func:`write_streamed`, one
    item): the lease row is checked but not locked, and only a version
    inserted now counts as written (the caller checks for an earlier
    attempt itself). ``retention``: applied ids kept per key when an item
    prunes them.
    """
    many = len(items) if len(items) > 1 else 0
    params: dict[str, Any] = {"store": store, "holder": holder, "retention": retention}
    if many:
        params.update(_many_params(items), atomic=atomic)
    else:
        params.update(_one_params(items[0], final))
    result = WriteResult()
    by_key = {item.key: item for item in items}
    with driver_cursor(conn, binary=True) as cursor:
        answer = cursor.execute(_write_call(schema, min(many, _FEW + 1)), params)
        rows = [
            (row.key if many else items[0].key, row.leased, row.written)
            for row in answer.fetchall()
        ]
    for key, leased, written in rows:
        # Not written now: an earlier attempt of this very write may have
        # committed before its connection dropped (even if the lease has
        # gone since); only then does it count as written.
        if written or (final and _ours(conn, schema, store, holder, by_key[key])):
            result.written.add(key)
        elif not leased:
            result.lost.add(key)
    return result


_COMMIT_GRACE = "2s"
"""How long a streamed write's transaction may sit idle once it holds the lease row."""


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
                    "idle": _COMMIT_GRACE,
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


def _stored(row: Any, context: str, shards: Sequence[bytes] | None) -> StoredVersion:
    raw = decode_file(
        row.codec, row.raw_size, row.checksum, row.shard_count, row.inline, shards, context
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
    return _stored(row, f"store {store!r} key {key!r} version {row.version}", row.shards)


def read_for_load(
    conn: sa.Connection, schema: str, store: str, key: str, retention: int
) -> LoadedKey:
    """What a load needs: newest version, applied ids, messages waiting.

    One statement, and for a sharded version one more that streams its
    shards a row at a time: the caller holds the lease, so the newest
    version stays (the janitor keeps it; an erase or a restore needs the
    lease) unless the lease is lost in between. Streamed rows arrive at the
    socket's speed; one array of MBs in one result took 3-5x as long (14 MB:
    29-52 ms against 9 ms).
    """
    sql = statements(schema)
    params = {"store": store, "key": key, "retention": retention}
    with driver_cursor(conn, binary=True) as cursor:
        for _ in range(2):
            row = cursor.execute(sql.read_for_load, params).fetchone()
            assert row is not None, "the statement always returns one row"
            shards = None
            if row.version is None or not row.shard_count:
                break
            where = {"store": store, "key": key, "version": row.version}
            shards = [data for (data,) in cursor.stream(sql.read_shards, where)]
            if len(shards) == row.shard_count:
                break
            # Shards missing: the version may have gone in between (the lease
            # lost meanwhile, and its new holder erased the key). Read once
            # more; still missing is damage, which decode_file reports.
    return _loaded(row, store, key, shards)


def acquire_for_load(
    conn: sa.Connection,
    schema: str,
    store: str,
    key: str,
    holder: str,
    duration: float,
    *,
    liveness: bool,
    dead: LeaseInfo | None,
    retention: int,
) -> tuple[int, Callable[[], LoadedKey] | None] | None:
    """Take the key's lease (as ``leases.acquire``) and read what a load needs, in one call.

    ``(token, a call that gives what read_for_load reads)``, or None if the
    lease was not taken. Revision 0005's ``lease_acquire_read``: one round
    trip. For a sharded version, and on Citus, the call is None: the caller
    reads with ``read_for_load`` once it holds the lease (so that a failed
    read releases it). The call checks and decompresses the stored file: it
    may raise :class:`CorruptDataError`, which the caller, holding the lease,
    handles.
    """
    params = {
        **leases.acquire_params(store, key, holder, duration, liveness=liveness, dead=dead),
        "retention": retention,
    }
    with driver_cursor(conn, binary=True) as cursor:
        row = cursor.execute(statements(schema).acquire_read, params).fetchone()
    if row is None:
        return None
    if not row.complete:  # a sharded version, or Citus: read_for_load it is
        return int(row.lease_token), None
    return int(row.lease_token), functools.partial(_loaded, row, store, key, row.shards)


def _loaded(row: Any, store: str, key: str, shards: Sequence[bytes] | None) -> LoadedKey:
    stored = None
    if row.version is not None:
        stored = _stored(row, f"store {store!r} key {key!r} version {row.version}", shards)
    return LoadedKey(stored, tuple(row.requests), bool(row.has_messages))


def _read_rows(
    conn: sa.Connection, schema: str, store: str, keys: Sequence[str], retention: int | None
) -> dict[str, Any]:
    """Rows of the saved ``keys`` by key; with their applied ids unless ``retention`` is None."""
    sql = statements(schema)
    params = {"store": store, "keys": list(keys), "retention": retention or 0}
    statement = sql.read_many if retention is None else sql.read_many_for_load
    with driver_cursor(conn, binary=True) as cursor:
        rows = cursor.execute(statement, params, prepare=False).fetchall()
    return {row.wanted: row for row in rows}


def _stored_of(store: str, row: Any) -> StoredVersion | None:
    if row is None:
        return None
    return _stored(row, f"store {store!r} key {row.wanted!r} version {row.version}", row.shards)


def read_many(
    conn: sa.Connection, schema: str, store: str, keys: Sequence[str]
) -> dict[str, StoredVersion | None]:
    """The newest version of each of ``keys`` (None: never saved), in one statement."""
    rows = _read_rows(conn, schema, store, keys, None)
    return {key: _stored_of(store, rows.get(key)) for key in keys}


def read_many_for_load(
    conn: sa.Connection,
    schema: str,
    store: str,
    keys: Sequence[str],
    retention: int,
    waiting: set[str],
) -> dict[str, LoadedKey]:
    """:func:`read_for_load` of many keys, in one statement; ``waiting``: keys with messages."""
    rows = _read_rows(conn, schema, store, keys, retention)
    return {
        key: LoadedKey(
            _stored_of(store, rows.get(key)),
            tuple(rows[key].requests) if key in rows else (),
            key in waiting,
        )
        for key in keys
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
    return bool(conn.execute(statements(schema).erase, params).scalar())
