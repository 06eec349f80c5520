"""How documents are stored (docs/architecture.md, "Storage"): inline or sharded, zstd or raw.

Every test runs against a real PostgreSQL and checks the rows the store wrote,
not only what the API hands back: sizes across the inline threshold and shard
boundaries, damaged bytes (which must fail loudly, never fall back to the
template or an older version), ``max_document_size`` and a large document.
"""

from __future__ import annotations

import base64
import contextlib
import math
import random
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
import zstandard
from conftest import in_thread, lock_waiter, on_citus, wait_until

import sessionstore as ss
from sessionstore._storage import codec, files
from sessionstore._storage.types import WriteResult
from sessionstore.db import create_engine

# Small thresholds so shard boundaries are cheap to cross.
INLINE = 1024
SHARD = 256
RAW_ONLY = 10**9  # a compress_threshold no test document reaches: stored bytes == JSON
SMALL = {"inline_threshold": INLINE, "shard_size": SHARD}


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
def sql(sessionstore_dsn: str) -> Iterator[sa.Engine]:
    """A plain engine for looking at (and damaging) the tables directly."""
    engine = create_engine(sessionstore_dsn, pool_size=2)
    yield engine
    engine.dispose()


def doc_of_size(size: int, fill: str = "x") -> dict[str, str]:
    """A document whose compact JSON is exactly ``size`` bytes (``size >= 8``)."""
    assert size >= 8
    doc = {"s": (fill * size)[: size - 8]}
    assert len(orjson.dumps(doc)) == size
    return doc


def random_text(size: int, seed: int) -> str:
    """Incompressible-ish ASCII: base64 of random bytes."""
    rng = random.Random(seed)
    return base64.b64encode(rng.randbytes(size * 3 // 4 + 3)).decode()[:size]


def set_doc(store: ss.Store, key: str, doc: Any) -> None:
    assert store.update_immutable(key, lambda _old: doc) is True


def version_rows(engine: sa.Engine, schema: str, store: str, key: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                f"SELECT version, codec, raw_size, stored_size, checksum, shard_count, inline, "
                f'migrations FROM "{schema}".versions WHERE store = :s AND key = :k '
                "ORDER BY version"
            ),
            {"s": store, "k": key},
        ).all()


def shard_rows(
    engine: sa.Engine, schema: str, store: str, key: str, version: int
) -> list[tuple[int, bytes]]:
    with engine.connect() as conn:
        return [
            (row.idx, bytes(row.data))
            for row in conn.execute(
                sa.text(
                    f'SELECT idx, data FROM "{schema}".shards '
                    "WHERE store = :s AND key = :k AND version = :v ORDER BY idx"
                ),
                {"s": store, "k": key, "v": version},
            )
        ]


def run_sql(engine: sa.Engine, statement: str, **params: Any) -> int:
    with engine.begin() as conn:
        return conn.execute(sa.text(statement), params).rowcount


def lock_rows(engine: sa.Engine, schema: str, store: str, key: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(f'SELECT count(*) FROM "{schema}".locks WHERE store = :s AND key = :k'),
            {"s": store, "k": key},
        ).scalar_one()


def check_stored(
    engine: sa.Engine,
    schema: str,
    store: str,
    key: str,
    version: int,
    raw_json: bytes,
    *,
    shard_size: int,
) -> Any:
    """Check the version row and its shards against the JSON they must hold; the row."""
    (row,) = [r for r in version_rows(engine, schema, store, key) if r.version == version]
    shards = shard_rows(engine, schema, store, key, version)
    assert row.raw_size == len(raw_json)
    if row.shard_count == 0:
        assert shards == []
        assert row.inline is not None
        stored = bytes(row.inline)
    else:
        assert row.inline is None
        assert [idx for idx, _ in shards] == list(range(row.shard_count))
        assert all(len(data) == shard_size for _, data in shards[:-1])
        assert 1 <= len(shards[-1][1]) <= shard_size
        stored = b"".join(data for _, data in shards)
    assert len(stored) == row.stored_size
    assert zlib.crc32(stored) == row.checksum
    if row.codec == 0:
        assert stored == raw_json
    else:
        assert row.codec == 1
        assert zstandard.ZstdDecompressor().decompress(stored) == raw_json
    return row


# -- round trips across the thresholds ----------------------------------------------------

# (compress_threshold, document, codec, expected shard count or None to compute from
# the stored size). Sizes are of the document's compact JSON.
CASES: dict[str, tuple[int, Callable[[], Any], str, int | None]] = {
    "empty-dict-raw": (RAW_ONLY, lambda: {}, "raw", 0),
    "empty-dict-zstd": (0, lambda: {}, "zstd", 0),
    "one-below-inline": (RAW_ONLY, lambda: doc_of_size(INLINE - 1), "raw", 0),
    "exactly-inline": (RAW_ONLY, lambda: doc_of_size(INLINE), "raw", 0),
    "one-over-inline": (RAW_ONLY, lambda: doc_of_size(INLINE + 1), "raw", 5),
    "exactly-8-shards": (RAW_ONLY, lambda: doc_of_size(8 * SHARD), "raw", 8),
    "8-shards-plus-one-byte": (RAW_ONLY, lambda: doc_of_size(8 * SHARD + 1), "raw", 9),
    "many-shards-raw": (RAW_ONLY, lambda: doc_of_size(40 * SHARD - 3), "raw", 40),
    "tiny-below-compress-threshold": (1024, lambda: doc_of_size(1023), "raw", 0),
    "at-compress-threshold": (1024, lambda: doc_of_size(1024), "zstd", 0),
    "compressible-large-inline": (1024, lambda: doc_of_size(200_000), "zstd", 0),
    "incompressible-sharded": (
        0,
        lambda: {"blob": random_text(30_000, seed=1), "n": [1, 2.5, None, True, "é"]},
        "zstd",
        None,
    ),
    "incompressible-raw-sharded": (
        RAW_ONLY,
        lambda: {"blob": random_text(5_000, seed=2)},
        "raw",
        None,
    ),
}


@pytest.mark.parametrize("streamed", [False, True], ids=["one-statement", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_across_thresholds(
    case: str,
    streamed: bool,
    make_store: Callable[..., ss.Store],
    sql: sa.Engine,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    compress_threshold, make_doc, codec, shards = CASES[case]
    doc = make_doc()
    raw_json = orjson.dumps(doc)
    # Streamed: every compressed document is written by files.write_streamed
    # (the same layout must come out).
    stream_threshold = 0 if streamed else 2**40
    options = {
        **SMALL,
        "compress_threshold": compress_threshold,
        "stream_threshold": stream_threshold,
    }
    writer = make_store(template={"placeholder": True}, **options)
    key = f"doc:{case}"
    writer.load(key)
    set_doc(writer, key, doc)
    writer.save(key)

    (info,) = writer.list_versions(key)
    assert info.version == 1
    assert info.size == len(raw_json)
    assert info.codec == codec
    if shards is None:
        assert info.stored_size > INLINE
        shards = math.ceil(info.stored_size / SHARD)
    assert info.shard_count == shards
    if codec == "raw":
        assert info.stored_size == len(raw_json)
    row = check_stored(sql, sessionstore_schema, store_name, key, 1, raw_json, shard_size=SHARD)
    assert row.stored_size == info.stored_size
    assert row.shard_count == info.shard_count
    if case == "incompressible-sharded":
        # Random base64 barely compresses: most of the bytes are still there.
        assert info.stored_size > 0.7 * len(raw_json)
    if case == "compressible-large-inline":
        assert info.stored_size < 2_000

    writer.unload(key)
    # A second store (other settings: reading must not depend on the writer's) sees it all.
    reader = make_store(template={"placeholder": True}, inline_threshold=10, shard_size=7)
    assert reader.peek(key) == doc
    data, read_info = reader.read_version(key, 1)
    assert data == doc
    assert read_info == info
    reader.load(key)
    assert reader.get(key) == doc
    assert orjson.dumps(reader.get(key)) == raw_json
    assert reader.is_saved(key)


STREAMED = {**SMALL, "compress_threshold": 0, "stream_threshold": 0}


@contextlib.contextmanager
def shard_inserts_blocked(sql: sa.Engine, schema: str) -> Iterator[Callable[[], int]]:
    """Hold a lock that makes shard INSERTs wait; yields the pid of a waiting writer (or 0)."""
    with sql.connect() as blocker:
        transaction = blocker.begin()
        blocker.execute(sa.text(f'LOCK TABLE "{schema}".shards IN SHARE MODE'))
        try:
            yield lambda: lock_waiter(sql, "INSERT INTO%shards%")
        finally:
            transaction.rollback()


def wait_for_pid(probe: Callable[[], int]) -> int:
    return int(wait_until(probe, 10, "the save to reach its shard INSERT"))


def lease_expiry(sql: sa.Engine, schema: str, store: str) -> Any:
    with sql.connect() as conn:
        return conn.execute(
            sa.text(f'SELECT expires_at FROM "{schema}".locks WHERE store = :s AND key = :k'),
            {"s": store, "k": KEY},
        ).scalar_one()


def expire_lease(sql: sa.Engine, schema: str, store: str) -> None:
    """End KEY's lease now, as if its holder had stopped renewing it."""
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".locks SET expires_at = now() WHERE store = :s AND key = :k',
            s=store,
            k=KEY,
        )
        == 1
    )


def test_streamed_save_is_fenced_when_the_lease_goes_mid_upload(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    """The upload locks no lease; the fence at its end finds the lease gone: nothing remains."""
    store = make_store(template={}, **STREAMED, lock_duration=2.0, lock_refresh_interval=0.2)
    store.load(KEY)
    set_doc(store, KEY, {"v": 1})
    store.save(KEY)
    set_doc(store, KEY, {"blob": random_text(20 * SHARD, seed=5)})
    with shard_inserts_blocked(sql, sessionstore_schema) as waiting_writer:
        thread, outcome = in_thread(lambda: store.save(KEY))
        wait_for_pid(waiting_writer)
        # The heartbeat still renews the lease while the upload waits.
        before = lease_expiry(sql, sessionstore_schema, store_name)
        wait_until(
            lambda: lease_expiry(sql, sessionstore_schema, store_name) != before,
            5,
            "a renewal during the upload (the heartbeat must not wait for it)",
        )
        # Another process takes the key meanwhile (its lease made to expire first).
        expire_lease(sql, sessionstore_schema, store_name)
        other = make_store(template={}, **STREAMED, lock_timeout=5.0)
        other.load(KEY)
        assert waiting_writer()  # the upload is still waiting
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ss.LockLostError)
    assert [r.version for r in version_rows(sql, sessionstore_schema, store_name, KEY)] == [1]
    assert shard_rows(sql, sessionstore_schema, store_name, KEY, 2) == []
    assert other.get(KEY) == {"v": 1}
    set_doc(other, KEY, {"v": "other"})
    other.save(KEY)
    assert other.peek(KEY) == {"v": "other"}


def test_streamed_save_survives_a_dropped_connection(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    """The connection dies mid-stream: the retry writes the whole version exactly once."""
    store = make_store(template={}, **STREAMED, retry_timeout=10.0)
    store.load(KEY)
    doc = {"blob": random_text(20 * SHARD, seed=6), "n": 1}
    set_doc(store, KEY, doc)
    with shard_inserts_blocked(sql, sessionstore_schema) as waiting_writer:
        thread, outcome = in_thread(lambda: store.save(KEY))
        first = wait_for_pid(waiting_writer)
        with sql.connect() as conn:
            # On Citus the waiter is named by its global pid (bigint), which
            # Citus' own pg_terminate_backend(bigint) takes.
            kind = "bigint" if on_citus(sql) else "integer"
            assert conn.execute(
                sa.text(f"SELECT pg_terminate_backend(CAST(:p AS {kind}))"), {"p": first}
            ).scalar()
        # The retry waits for the same lock on a new connection.
        wait_for_pid(lambda: (pid := waiting_writer()) != first and pid)
    thread.join(10)
    assert outcome == [None]
    assert store.is_saved(KEY)
    (row,) = version_rows(sql, sessionstore_schema, store_name, KEY)
    assert row.version == 1 and row.shard_count > 4
    check_stored(sql, sessionstore_schema, store_name, KEY, 1, orjson.dumps(doc), shard_size=SHARD)
    store.unload(KEY)
    assert make_store(template={}).peek(KEY) == doc


def test_streamed_write_recognises_its_own_earlier_commit(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    """A retry after a commit whose answer was lost counts it as written, and only it.

    Calls files.write_streamed again for a version already written, as the
    retry would: the same bytes are ours; other bytes under that version
    number are neither written nor lost (a clash the store reports).
    """
    store = make_store(template={}, **STREAMED)
    store.load(KEY)
    doc = {"blob": random_text(10 * SHARD, seed=8)}
    set_doc(store, KEY, doc)
    store.save(KEY)
    with sql.connect() as conn:
        token = conn.execute(
            sa.text(
                f'SELECT token FROM "{sessionstore_schema}".locks WHERE store = :s AND key = :k'
            ),
            {"s": store_name, "k": KEY},
        ).scalar_one()
    settings = codec.FileSettings(
        compress_threshold=0, inline_threshold=INLINE, shard_size=SHARD, stream_threshold=0
    )

    def again(raw: bytes) -> WriteResult:
        item = files.WriteItem(KEY, token, 1, codec.EncodedFile.pending(len(raw)), [], True)
        with sql.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return files.write_streamed(
                conn, sessionstore_schema, store_name, store.holder, item, raw, settings
            )

    assert again(orjson.dumps(doc)) == WriteResult(written={KEY})
    assert again(orjson.dumps({"other": 1})) == WriteResult()
    # Also once the lease has gone: what was committed stays counted as written.
    expire_lease(sql, sessionstore_schema, store_name)
    assert again(orjson.dumps(doc)) == WriteResult(written={KEY})
    assert again(orjson.dumps({"other": 1})) == WriteResult(lost={KEY})
    assert [r.version for r in version_rows(sql, sessionstore_schema, store_name, KEY)] == [1]
    check_stored(sql, sessionstore_schema, store_name, KEY, 1, orjson.dumps(doc), shard_size=SHARD)


def test_every_version_keeps_its_own_layout(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    """Inline -> sharded -> inline -> sharded under one key: each version stands alone."""
    store = make_store(template={}, compress_threshold=RAW_ONLY, **SMALL)
    key = "layouts"
    store.load(key)
    docs = [
        doc_of_size(100),
        doc_of_size(5 * SHARD + 10, fill="a"),
        {},
        doc_of_size(12 * SHARD, fill="b"),
        doc_of_size(INLINE),
    ]
    for doc in docs:
        set_doc(store, key, doc)
        store.save(key)
    infos = store.list_versions(key, newest_first=False)
    assert [i.version for i in infos] == [1, 2, 3, 4, 5]
    assert [i.shard_count for i in infos] == [0, 6, 0, 12, 0]
    for version, doc in enumerate(docs, start=1):
        check_stored(
            sql, sessionstore_schema, store_name, key, version, orjson.dumps(doc), shard_size=SHARD
        )
        assert store.read_version(key, version)[0] == doc
    with sql.connect() as conn:
        total = conn.execute(
            sa.text(f'SELECT count(*) FROM "{sessionstore_schema}".shards WHERE store = :s'),
            {"s": store_name},
        ).scalar_one()
    assert total == 18


def test_unicode_and_number_edge_values_round_trip(make_store: Callable[..., ss.Store]) -> None:
    doc = {
        "text": 'naïve ☃ 𝄞 \u2028 "quoted" \\ back',
        "ints": [0, -1, 2**63 - 1, -(2**63)],
        "floats": [0.1, -2.5e-308, 1.7976931348623157e308],
        "nested": {"a": [{"b": [None, True, False, ""]}]},
        "empty": {"list": [], "dict": {}},
    }
    writer = make_store(template={}, compress_threshold=0, **SMALL)
    writer.load("u")
    set_doc(writer, "u", doc)
    writer.unload("u")
    reader = make_store(template={})
    reader.load("u")
    assert reader.get("u") == doc
    assert orjson.dumps(reader.get("u")) == orjson.dumps(doc)


# -- corruption ---------------------------------------------------------------------------

KEY = "player:ß/42"
V2 = "WHERE store = :s AND key = :k AND version = 2"


def _flip_shard(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".shards SET data = set_byte(data, 3, get_byte(data, 3) # 255) '
            "WHERE store = :s AND key = :k AND version = 2 AND idx = 2",
            s=store,
            k=KEY,
        )
        == 1
    )


def _flip_inline(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".versions SET inline = set_byte(inline, 5, get_byte(inline, 5) # 1) '
            "WHERE store = :s AND key = :k AND version = 2 AND inline IS NOT NULL",
            s=store,
            k=KEY,
        )
        == 1
    )


def _change_checksum(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".versions SET checksum = checksum # 1 '
            "WHERE store = :s AND key = :k AND version = 2",
            s=store,
            k=KEY,
        )
        == 1
    )


def _delete_shard(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'DELETE FROM "{schema}".shards {V2} AND idx = 1',
            s=store,
            k=KEY,
        )
        == 1
    )


def _delete_last_shard(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'DELETE FROM "{schema}".shards {V2} '
            f'AND idx = (SELECT max(idx) FROM "{schema}".shards {V2})',
            s=store,
            k=KEY,
        )
        == 1
    )


def _swap_shards(sql: sa.Engine, schema: str, store: str) -> None:
    """Shards 0 and 1 trade places: every byte is present, in the wrong order."""
    table = f'"{schema}".shards'
    where = "store = :s AND key = :k AND version = 2"
    with sql.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE {table} SET idx = -1 WHERE {where} AND idx = 0"),
            {"s": store, "k": KEY},
        )
        conn.execute(
            sa.text(f"UPDATE {table} SET idx = 0 WHERE {where} AND idx = 1"), {"s": store, "k": KEY}
        )
        conn.execute(
            sa.text(f"UPDATE {table} SET idx = 1 WHERE {where} AND idx = -1"),
            {"s": store, "k": KEY},
        )


def _null_inline(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".versions SET inline = NULL '
            "WHERE store = :s AND key = :k AND version = 2",
            s=store,
            k=KEY,
        )
        == 1
    )


def _unknown_codec(sql: sa.Engine, schema: str, store: str) -> None:
    assert (
        run_sql(
            sql,
            f'UPDATE "{schema}".versions SET codec = 7 {V2}',
            s=store,
            k=KEY,
        )
        == 1
    )


def _replace_inline_keeping_checksum(new: Callable[[bytes], bytes]) -> Callable[..., None]:
    """Damage that a checksum cannot see: new bytes with a matching CRC (a buggy writer)."""

    def damage(sql: sa.Engine, schema: str, store: str) -> None:
        (row,) = [r for r in version_rows(sql, schema, store, KEY) if r.version == 2]
        stored = new(bytes(row.inline))
        assert len(stored) == len(row.inline) and stored != bytes(row.inline)
        assert (
            run_sql(
                sql,
                f'UPDATE "{schema}".versions SET inline = :b, checksum = :c '
                "WHERE store = :s AND key = :k AND version = 2",
                b=stored,
                c=zlib.crc32(stored),
                s=store,
                k=KEY,
            )
            == 1
        )

    return damage


def _garbage(stored: bytes) -> bytes:
    return bytes(random.Random(7).randbytes(len(stored)))


def _broken_json(stored: bytes) -> bytes:
    # Same length, valid CRC, not JSON any more: '{"s":"xxx...x"}' -> '{"s":"xxx...x"]'.
    return stored[:-1] + b"]"


# name -> (codec of version 2, sharded?, damage)
CORRUPTIONS: dict[str, tuple[str, bool, Callable[..., None]]] = {
    "flip-shard-byte-zstd": ("zstd", True, _flip_shard),
    "flip-shard-byte-raw": ("raw", True, _flip_shard),
    "flip-inline-byte-zstd": ("zstd", False, _flip_inline),
    "flip-inline-byte-raw": ("raw", False, _flip_inline),
    "checksum-changed-inline": ("raw", False, _change_checksum),
    "checksum-changed-sharded": ("zstd", True, _change_checksum),
    "shard-deleted": ("zstd", True, _delete_shard),
    "last-shard-deleted": ("raw", True, _delete_last_shard),
    "shards-swapped": ("raw", True, _swap_shards),
    "inline-null": ("raw", False, _null_inline),
    "unknown-codec": ("raw", False, _unknown_codec),
    "zstd-garbage-valid-crc": ("zstd", False, _replace_inline_keeping_checksum(_garbage)),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_version_fails_loudly(
    case: str,
    make_store: Callable[..., ss.Store],
    sql: sa.Engine,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    codec, sharded, damage = CORRUPTIONS[case]
    template = {"template": True}
    options = {**SMALL, "compress_threshold": 0 if codec == "zstd" else RAW_ONLY}
    writer = make_store(template=template, **options)
    writer.load(KEY)
    old = {"old": True, "s": "intact"}
    set_doc(writer, KEY, old)
    writer.save(KEY)
    new = {"s": random_text(12 * SHARD, seed=3)} if sharded else doc_of_size(300, fill="q")
    set_doc(writer, KEY, new)
    writer.unload(KEY)
    (_, v2) = writer.list_versions(KEY, newest_first=False)
    assert v2.codec == codec
    assert (v2.shard_count > 0) == sharded

    damage(sql, sessionstore_schema, store_name)

    def check(exc: pytest.ExceptionInfo[ss.CorruptDataError]) -> None:
        assert KEY in str(exc.value)
        assert "version 2" in str(exc.value)

    loader = make_store(template=template, **options)
    with pytest.raises(ss.CorruptDataError) as exc:
        loader.load(KEY)
    check(exc)
    # The failed load released its lease and kept nothing in memory.
    assert not loader.probe_lock_active(KEY)
    assert lock_rows(sql, sessionstore_schema, store_name, KEY) == 0
    with pytest.raises(ss.KeyNotLoadedError):
        loader.get(KEY)

    # Another store can try at once (no lock wait) and fails the same way: no template.
    other = make_store(template=template, **options, lock_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(ss.CorruptDataError) as exc:
        other.load(KEY)
    check(exc)
    assert time.monotonic() - started < 2.0
    with pytest.raises(ss.KeyNotLoadedError):
        other.get(KEY)
    # Loading again in the first store fails again too (no half-loaded session left over).
    with pytest.raises(ss.CorruptDataError):
        loader.load(KEY)

    with pytest.raises(ss.CorruptDataError) as exc:
        other.peek(KEY)
    check(exc)
    with pytest.raises(ss.CorruptDataError):
        other.peek(KEY, max_age=60.0)
    with pytest.raises(ss.CorruptDataError) as exc:
        other.read_version(KEY, 2)
    check(exc)

    # History is still there and the older version is intact, but it is not served as current.
    assert other.read_version(KEY, 1)[0] == old
    assert [v.version for v in other.list_versions(KEY)] == [2, 1]
    assert [r.version for r in version_rows(sql, sessionstore_schema, store_name, KEY)] == [1, 2]
    assert lock_rows(sql, sessionstore_schema, store_name, KEY) == 0


def test_json_that_does_not_parse_under_a_valid_checksum(
    make_store: Callable[..., ss.Store],
    sql: sa.Engine,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    """Bytes the checksum vouches for but that are not JSON (a writer other than ours).

    The load verifies integrity only; the first read raises, nothing is
    written or replaced, and ``restore`` recovers. A load that needs the data
    (schema, migration, changed callback) fails at once.
    """
    options = {**SMALL, "compress_threshold": RAW_ONLY}
    writer = make_store(template={"template": True}, **options)
    writer.load(KEY)
    old = {"old": True, "s": "intact"}
    set_doc(writer, KEY, old)
    writer.save(KEY)
    set_doc(writer, KEY, doc_of_size(300, fill="q"))
    writer.unload(KEY)
    _replace_inline_keeping_checksum(_broken_json)(sql, sessionstore_schema, store_name)

    def versions() -> list[int]:
        return [r.version for r in version_rows(sql, sessionstore_schema, store_name, KEY)]

    for strict in (
        {"schema": lambda data: True},
        {"changed_callbacks": [lambda key, new, old: None]},
        {"migrations": [ss.add_fields("gems", {"gems": 0})]},
    ):
        loader = make_store(template={"template": True}, **options, **strict)
        with pytest.raises(ss.CorruptDataError, match="version 2"):
            loader.load(KEY)
        assert lock_rows(sql, sessionstore_schema, store_name, KEY) == 0
        with pytest.raises(ss.KeyNotLoadedError):
            loader.get(KEY)

    store = make_store(template={"template": True}, **options)
    store.load(KEY)
    store.load("other")
    set_doc(store, "other", {"n": 1})
    store.save("other")
    called: list[str] = []

    def transform(data: Any) -> bool:
        called.append("transform")
        return True

    for read in (
        lambda: store.get(KEY),
        lambda: store.update(KEY, transform),
        lambda: store.update_immutable(KEY, lambda data: {"new": True}),
        lambda: store.tx([KEY, "other"], lambda docs: transform(docs)),
        lambda: store.tx_immutable([KEY, "other"], lambda docs: {k: {} for k in docs}),
        lambda: store.peek(KEY),
        lambda: store.read_version(KEY, 2),
    ):
        with pytest.raises(ss.CorruptDataError) as exc:
            read()
        assert KEY in str(exc.value) and "version 2" in str(exc.value)
    assert called == []
    assert store.is_saved(KEY) and store.get("other") == {"n": 1}
    store.save(KEY)
    store.unload(KEY)
    assert versions() == [1, 2]  # nothing written, nothing replaced by the template

    store.load(KEY)
    store.restore(KEY, 1)
    assert store.get(KEY) == old
    store.unload(KEY)
    assert versions() == [1, 2, 3]
    assert store.peek(KEY) == old


def test_corrupt_old_version_does_not_affect_current(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    store = make_store(template={}, compress_threshold=RAW_ONLY, **SMALL)
    store.load(KEY)
    set_doc(store, KEY, {"s": random_text(4 * SHARD, seed=4)})
    store.save(KEY)
    set_doc(store, KEY, {"s": "current"})
    store.unload(KEY)
    run_sql(
        sql,
        f'UPDATE "{sessionstore_schema}".shards SET data = set_byte(data, 0, 0) '
        "WHERE store = :s AND key = :k AND version = 1 AND idx = 0 AND get_byte(data, 0) <> 0",
        s=store_name,
        k=KEY,
    )
    with pytest.raises(ss.CorruptDataError, match="version 1"):
        store.read_version(KEY, 1)
    assert store.peek(KEY) == {"s": "current"}
    store.load(KEY)
    assert store.get(KEY) == {"s": "current"}


# -- limits ---------------------------------------------------------------------------------


def test_max_document_size_rejects_before_writing(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    limit = 2000
    store = make_store(template={"s": ""}, max_document_size=limit, **SMALL)
    key = "limited"
    store.load(key)
    exact = doc_of_size(limit)
    set_doc(store, key, exact)  # exactly at the limit: accepted
    store.save(key)
    assert [v.size for v in store.list_versions(key)] == [limit]

    too_big = doc_of_size(limit + 1)
    with pytest.raises(ss.InvalidDataError) as exc:
        store.update_immutable(key, lambda _old: too_big)
    assert isinstance(exc.value, ValueError)

    def grow(data: Any) -> bool:
        data["s"] += "y"
        return True

    with pytest.raises(ss.InvalidDataError):
        store.update(key, grow)

    def grow_tx(docs: dict[str, Any]) -> bool:
        docs[key]["s"] += "y" * 10_000
        return True

    with pytest.raises(ss.InvalidDataError):
        store.tx([key], grow_tx)

    # Nothing changed in memory, nothing is pending, nothing was written.
    assert store.get(key) == exact
    assert store.is_saved(key)
    store.save(key)
    rows = version_rows(sql, sessionstore_schema, store_name, key)
    assert [r.version for r in rows] == [1]
    store.unload(key)
    assert [r.version for r in version_rows(sql, sessionstore_schema, store_name, key)] == [1]

    with pytest.raises(ss.InvalidDataError):
        make_store(template=doc_of_size(limit + 1), max_document_size=limit)


# -- a large document -----------------------------------------------------------------------


def realistic_document(target_bytes: int) -> dict[str, Any]:
    """A player-profile-like document: many small records with mixed types."""
    rng = random.Random(20240601)
    words = [
        "sword", "shield", "potion", "arrow", "helmet", "ring", "amulet", "scroll", "gem",
        "boots", "cloak", "staff", "bow", "dagger", "axe", "lantern", "map", "key", "coin",
    ]  # fmt: skip
    items: list[dict[str, Any]] = []
    size = 0
    i = 0
    while size < target_bytes:
        item = {
            "id": i,
            "uid": f"{rng.getrandbits(128):032x}",
            "name": f"{rng.choice(words)} of {rng.choice(words)}",
            "level": rng.randint(1, 100),
            "weight": round(rng.uniform(0.1, 50.0), 3),
            "equipped": rng.random() < 0.1,
            "tags": rng.sample(words, 3),
            "stats": {"atk": rng.randint(0, 500), "def": rng.randint(0, 500), "crit": rng.random()},
            "acquired": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z",
            "note": None if rng.random() < 0.7 else " ".join(rng.choices(words, k=8)),
        }
        items.append(item)
        size += len(orjson.dumps(item)) + 1
        i += 1
    return {"coins": 123456789, "inventory": items, "settings": {"music": 0.5, "lang": "en"}}


def test_large_document_round_trip_throughput(
    make_store: Callable[..., ss.Store],
    sql: sa.Engine,
    sessionstore_schema: str,
    store_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = realistic_document(20 * 1024 * 1024)
    raw_json = orjson.dumps(doc)
    megabytes = len(raw_json) / 1e6
    key = "big"
    writer = make_store(template={})
    writer.load(key)

    started = time.perf_counter()
    set_doc(writer, key, doc)
    writer.save(key)
    save_seconds = time.perf_counter() - started
    writer.unload(key)

    (info,) = writer.list_versions(key)
    assert info.size == len(raw_json)
    assert info.codec == "zstd"
    assert info.stored_size < len(raw_json)
    default_shard = 1024 * 1024
    assert info.shard_count == math.ceil(info.stored_size / default_shard)
    check_stored(sql, sessionstore_schema, store_name, key, 1, raw_json, shard_size=default_shard)

    reader = make_store(template={})
    started = time.perf_counter()
    reader.load(key)
    read_seconds = time.perf_counter() - started  # lease, read, verify, decompress
    loaded = reader.get(key)  # the first get builds the frozen view
    load_seconds = time.perf_counter() - started
    assert loaded == doc
    assert orjson.dumps(loaded) == raw_json

    started = time.perf_counter()
    peeked = reader.peek(key)
    peek_seconds = time.perf_counter() - started
    assert peeked == doc

    with capsys.disabled():
        print(
            f"\n[large document] {megabytes:.1f} MB JSON -> {info.stored_size / 1e6:.1f} MB zstd "
            f"in {info.shard_count} shards; update+save {save_seconds:.3f}s "
            f"({megabytes / save_seconds:.0f} MB/s), load+get {load_seconds:.3f}s "
            f"({megabytes / load_seconds:.0f} MB/s; load alone {read_seconds:.3f}s, "
            f"{megabytes / read_seconds:.0f} MB/s), peek {peek_seconds:.3f}s "
            f"({megabytes / peek_seconds:.0f} MB/s)"
        )
