"""Version history (docs/api.md): list, read back, prune, peek, restore and erase.

Against a real PostgreSQL. Where the contract is about rows (pruning leaves no
shards behind, erase leaves nothing that mentions the key) the tables are
checked directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import lock_waiter, wait_until

import sessionstore as ss
from sessionstore.db import create_engine

TABLES = ("records", "versions", "shards", "locks")
# Small thresholds: a few hundred bytes of JSON already make a sharded version.
SHARDED = {"inline_threshold": 512, "shard_size": 128, "compress_threshold": 10**9}
NO_JANITOR = {"janitor_interval": 3600.0}  # tests call prune() themselves


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
def sql(sessionstore_dsn: str) -> Iterator[sa.Engine]:
    engine = create_engine(sessionstore_dsn, pool_size=4)
    yield engine
    engine.dispose()


def set_doc(store: ss.Store, key: str, doc: Any) -> None:
    assert store.update_immutable(key, lambda _old: doc) is True


def doc(n: int, *, big: bool = False) -> dict[str, Any]:
    """Version ``n``'s data; ``big`` ones are sharded under ``SHARDED``."""
    return {"n": n, "pad": f"{n:04d}" * (300 if big else 1)}


def save_versions(
    store: ss.Store, key: str, count: int, *, big: Callable[[int], bool] = lambda n: False
) -> list[dict[str, Any]]:
    """Load ``key`` and save ``count`` versions of it; the documents, oldest first."""
    store.load(key)
    docs = []
    for n in range(1, count + 1):
        d = doc(n, big=big(n))
        set_doc(store, key, d)
        store.save(key)
        docs.append(d)
    return docs


def count_rows(engine: sa.Engine, schema: str, store: str, key: str | None = None) -> dict:
    where = "store = :s" + ("" if key is None else " AND key = :k")
    with engine.connect() as conn:
        return {
            table: conn.execute(
                sa.text(f'SELECT count(*) FROM "{schema}".{table} WHERE {where}'),
                {"s": store, "k": key},
            ).scalar_one()
            for table in TABLES
        }


def mentions(engine: sa.Engine, schema: str, key: str) -> dict[str, int]:
    """Rows of any store whose key is ``key`` (erase must leave none)."""
    with engine.connect() as conn:
        return {
            table: conn.execute(
                sa.text(f'SELECT count(*) FROM "{schema}".{table} WHERE key = :k'), {"k": key}
            ).scalar_one()
            for table in TABLES
        }


def versions_in_db(engine: sa.Engine, schema: str, store: str, key: str) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    f'SELECT version FROM "{schema}".versions WHERE store = :s AND key = :k '
                    "ORDER BY version"
                ),
                {"s": store, "k": key},
            ).scalars()
        )


def shard_consistency(engine: sa.Engine, schema: str, store: str) -> tuple[int, int, int]:
    """(shard rows, sum of shard_count over versions, shard rows without a version)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(f'SELECT count(*) FROM "{schema}".shards WHERE store = :s'), {"s": store}
        ).scalar_one()
        expected = conn.execute(
            sa.text(
                f'SELECT coalesce(sum(shard_count), 0) FROM "{schema}".versions WHERE store = :s'
            ),
            {"s": store},
        ).scalar_one()
        orphans = conn.execute(
            sa.text(
                f'SELECT count(*) FROM "{schema}".shards s WHERE s.store = :s AND NOT EXISTS '
                f'(SELECT 1 FROM "{schema}".versions v WHERE v.store = s.store '
                "AND v.key = s.key AND v.version = s.version)"
            ),
            {"s": store},
        ).scalar_one()
    return rows, int(expected), orphans


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[tuple[str, Any]]]:
    outcome: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:  # handed back to the test
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finish(thread: threading.Thread, outcome: list[tuple[str, Any]], timeout: float = 10.0) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout}s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


# -- list_versions and read_version -------------------------------------------------------


def test_list_versions_order_filters_and_limit(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(template={}, **SHARDED)
    key = "hist"
    docs = save_versions(store, key, 12, big=lambda n: n % 3 == 0)

    newest = store.list_versions(key)
    assert [v.version for v in newest] == list(range(12, 0, -1))
    oldest = store.list_versions(key, newest_first=False)
    assert [v.version for v in oldest] == list(range(1, 13))
    assert oldest == newest[::-1]
    stamps = [v.created_at for v in oldest]
    assert stamps == sorted(stamps) and len(set(stamps)) == 12
    assert all(v.created_at.tzinfo is not None for v in oldest)
    for info, d in zip(oldest, docs, strict=True):
        assert info.size == len(orjson.dumps(d))
        assert info.shard_count > 0 if info.version % 3 == 0 else info.shard_count == 0
        assert info.migrations == ()

    by_version = {v.version: v for v in oldest}
    since, until = by_version[5].created_at, by_version[9].created_at
    # since is inclusive, until exclusive.
    assert [v.version for v in store.list_versions(key, since=since, until=until)] == [8, 7, 6, 5]
    assert [
        v.version for v in store.list_versions(key, since=since, until=until, newest_first=False)
    ] == [5, 6, 7, 8]
    assert [v.version for v in store.list_versions(key, since=since)] == list(range(12, 4, -1))
    assert [v.version for v in store.list_versions(key, until=until)] == list(range(8, 0, -1))
    assert store.list_versions(key, since=until, until=since) == []

    assert [v.version for v in store.list_versions(key, limit=3)] == [12, 11, 10]
    assert [v.version for v in store.list_versions(key, limit=3, newest_first=False)] == [1, 2, 3]
    assert [
        v.version for v in store.list_versions(key, since=since, limit=2, newest_first=False)
    ] == [5, 6]
    assert [v.version for v in store.list_versions(key, until=until, limit=2)] == [8, 7]
    assert len(store.list_versions(key, limit=1000)) == 12
    with pytest.raises(ValueError):
        store.list_versions(key, limit=0)

    assert store.list_versions("never-saved") == []
    other = make_store(template={}, name=f"{store.name}-other")
    assert other.list_versions(key) == []


def test_list_versions_default_limit_is_100(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(template={})
    save_versions(store, "many", 105)
    listed = store.list_versions("many")
    assert len(listed) == 100
    assert listed[0].version == 105 and listed[-1].version == 6


def test_read_version_reads_back_every_version(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    store = make_store(template={}, **SHARDED)
    key = "read-back"
    docs = save_versions(store, key, 8, big=lambda n: n % 2 == 0)
    listed = {v.version: v for v in store.list_versions(key)}
    # Read from another store that does not hold the key, while the writer still does.
    reader = make_store(template={"never": "used"})
    for version, d in enumerate(docs, start=1):
        data, info = reader.read_version(key, version)
        assert data == d
        assert info == listed[version]
        with pytest.raises(TypeError):
            data["n"] = 0  # type: ignore[index]
    assert store.get(key) == docs[-1]  # the holder is undisturbed

    for missing in (0, -1, 9, 10**12):
        with pytest.raises(ss.VersionNotFoundError):
            reader.read_version(key, missing)
    with pytest.raises(ss.VersionNotFoundError):
        reader.read_version("no-such-key", 1)
    # A version of a key of another store with the same key name is not ours.
    stranger = make_store(template={}, name=f"{store_name}-x")
    with pytest.raises(ss.VersionNotFoundError):
        stranger.read_version(key, 1)
    assert versions_in_db(sql, sessionstore_schema, store_name, key) == list(range(1, 9))


def test_version_info_tracks_token_and_migrations(make_store: Callable[..., ss.Store]) -> None:
    key = "tokens"
    first = make_store(template={"coins": 0})
    first.load(key)
    for n in (1, 2):
        set_doc(first, key, {"coins": n})
        first.save(key)
    first.unload(key)

    steps = [ss.add_fields("add_gems", {"gems": 0})]
    second = make_store(template={"coins": 0}, migrations=steps)
    second.load(key)  # migrates in memory: version 3 carries the step
    second.save(key)
    set_doc(second, key, {"coins": 9, "gems": 1})
    second.save(key)
    v1, v2, v3, v4 = second.list_versions(key, newest_first=False)
    assert v1.token == v2.token
    assert v3.token == v4.token > v2.token
    assert v1.migrations == v2.migrations == ()
    assert v3.migrations == v4.migrations == ("add_gems",)
    # read_version gives data as stored, not migrated.
    assert second.read_version(key, 2)[0] == {"coins": 2}
    assert second.read_version(key, 3)[0] == {"coins": 2, "gems": 0}


# -- pruning -----------------------------------------------------------------------------------


def test_prune_keeps_newest_versions_per_key_and_their_shards(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    # save_batch_size=2 also makes the janitor walk the keys in several batches.
    options = {**SHARDED, **NO_JANITOR, "retain_versions": 3, "retain_for": 0}
    store = make_store(template={}, save_batch_size=2, **options)
    counts = {"a": 10, "b": 2, "c": 3, "d": 5, "e": 7}
    docs = {
        key: save_versions(store, key, count, big=lambda n: n % 2 == 1)
        for key, count in counts.items()
    }
    for key in ("a", "c", "e"):
        store.unload(key)  # pruning works on loaded and unloaded keys alike
    # Another store name in the same tables must not be touched.
    bystander = make_store(template={}, name=f"{store_name}-by", **options)
    save_versions(bystander, "a", 6, big=lambda n: True)
    before_bystander = count_rows(sql, sessionstore_schema, bystander.name)

    expected = sum(max(0, count - 3) for count in counts.values())
    assert store.prune() == expected

    for key, count in counts.items():
        kept = list(range(max(1, count - 2), count + 1))
        assert versions_in_db(sql, sessionstore_schema, store_name, key) == kept
        assert [v.version for v in store.list_versions(key, newest_first=False)] == kept
        for version in kept:
            assert store.read_version(key, version)[0] == docs[key][version - 1]
        for version in range(1, kept[0]):
            with pytest.raises(ss.VersionNotFoundError):
                store.read_version(key, version)
    rows, expected_shards, orphans = shard_consistency(sql, sessionstore_schema, store_name)
    assert orphans == 0
    assert rows == expected_shards > 0
    assert count_rows(sql, sessionstore_schema, bystander.name) == before_bystander

    assert store.prune() == 0  # nothing left to prune
    # Current versions survive: loaded keys keep saving, unloaded keys load their newest.
    set_doc(store, "d", {"after": "prune"})
    store.save("d")
    assert store.list_versions("d", limit=1)[0].version == 6
    reader = make_store(template={"never": "used"})
    reader.load("e")
    assert reader.get("e") == docs["e"][-1]


def test_prune_never_deletes_the_current_version(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    store = make_store(template={}, retain_versions=1, retain_for=0, **SHARDED, **NO_JANITOR)
    docs = save_versions(store, "k", 5, big=lambda n: True)
    assert store.prune() == 4
    assert versions_in_db(sql, sessionstore_schema, store_name, "k") == [5]
    assert store.peek("k") == docs[-1]
    set_doc(store, "k", doc(6, big=True))
    store.save("k")
    assert store.prune() == 1
    assert versions_in_db(sql, sessionstore_schema, store_name, "k") == [6]
    rows, expected_shards, orphans = shard_consistency(sql, sessionstore_schema, store_name)
    assert rows == expected_shards > 0 and orphans == 0
    store.unload("k")
    assert store.prune() == 0
    other = make_store(template={})
    other.load("k")
    assert other.get("k") == doc(6, big=True)


def test_prune_keeps_versions_younger_than_retain_for(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    keep_all = make_store(template={}, retain_versions=1, retain_for=3600, **NO_JANITOR)
    save_versions(keep_all, "k", 6)
    assert keep_all.prune() == 0
    assert versions_in_db(sql, sessionstore_schema, store_name, "k") == [1, 2, 3, 4, 5, 6]

    # Both rules must agree before a version goes: beyond the newest N *and* older than age.
    aging = make_store(
        template={}, name=f"{store_name}-age", retain_versions=1, retain_for=1.0, **NO_JANITOR
    )
    save_versions(aging, "k", 4)
    assert aging.prune() == 0  # all younger than a second
    time.sleep(1.2)
    for n in (5, 6, 7):
        set_doc(aging, "k", doc(n))
        aging.save("k")
    assert aging.prune() == 4
    assert [v.version for v in aging.list_versions("k", newest_first=False)] == [5, 6, 7]


def test_one_pruner_at_a_time(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    """While one store's prune is running, another's returns 0 at once instead of joining in."""
    options = {**SHARDED, **NO_JANITOR, "retain_versions": 2, "retain_for": 0}
    first = make_store(template={}, **options)
    second = make_store(template={}, **options)
    for key in ("k1", "k2"):
        save_versions(first, key, 6, big=lambda n: n % 2 == 0)
        first.unload(key)

    # Park the first pruner: a row it must delete is locked by another transaction.
    with sql.connect() as blocker:
        tx = blocker.begin()
        blocker.execute(
            sa.text(
                f'SELECT 1 FROM "{sessionstore_schema}".versions '
                "WHERE store = :s AND key = 'k1' AND version = 1 FOR UPDATE"
            ),
            {"s": store_name},
        )
        thread, outcome = in_thread(first.prune)
        wait_until(lambda: lock_waiter(sql, "%prune_batch%"), 10, "the first prune's DELETE")
        # Were the second pruner allowed in, it would block on the same row (or
        # delete k2's versions under the first one's feet).
        started = time.monotonic()
        second_thread, second_outcome = in_thread(second.prune)
        assert finish(second_thread, second_outcome, timeout=3.0) == 0
        assert time.monotonic() - started < 2.0
        assert thread.is_alive()
        tx.rollback()
    assert finish(thread, outcome) == 8
    assert second.prune() == 0 and first.prune() == 0
    for key in ("k1", "k2"):
        assert versions_in_db(sql, sessionstore_schema, store_name, key) == [5, 6]
    rows, expected_shards, orphans = shard_consistency(sql, sessionstore_schema, store_name)
    assert rows == expected_shards and orphans == 0


def test_concurrent_prunes_delete_exactly_what_should_go(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    options = {**SHARDED, **NO_JANITOR, "retain_versions": 2, "retain_for": 0}
    writer = make_store(template={}, **options)
    keys = [f"k{i:02d}" for i in range(12)]
    for i, key in enumerate(keys):
        save_versions(writer, key, 3 + i % 4, big=lambda n: n % 2 == 0)
        writer.unload(key)
    expected = sum(3 + i % 4 - 2 for i in range(len(keys)))
    pruners = [make_store(template={}, save_batch_size=3, **options) for _ in range(4)]
    barrier = threading.Barrier(len(pruners))

    def prune_until_done(store: ss.Store) -> int:
        barrier.wait()
        total = 0
        for _ in range(20):
            total += store.prune(time_budget=5.0)
        return total

    running = [in_thread(lambda s=s: prune_until_done(s)) for s in pruners]
    totals = [finish(thread, outcome, timeout=20) for thread, outcome in running]
    # A pruner that lost a turn resumes after the keys it last saw: one more
    # round by each (now alone) finishes any keys nobody reached.
    totals += [store.prune(time_budget=5.0) for store in pruners for _ in range(2)]
    assert sum(totals) == expected
    for i, key in enumerate(keys):
        count = 3 + i % 4
        assert versions_in_db(sql, sessionstore_schema, store_name, key) == [count - 1, count]
    rows, expected_shards, orphans = shard_consistency(sql, sessionstore_schema, store_name)
    assert rows == expected_shards and orphans == 0


def test_reading_a_version_while_it_is_pruned_gets_all_of_it_or_nothing(
    make_store: Callable[..., ss.Store],
) -> None:
    """A read that began before the prune committed sees the whole version, never a part.

    Readers hammer sharded versions (hundreds of shards each) while they are
    pruned. Each read must give the right data or VersionNotFoundError; a
    read split over two snapshots would see the version row but only some
    of its shards and fail with CorruptDataError.
    """
    options = {
        "inline_threshold": 64,
        "shard_size": 64,
        "compress_threshold": 10**9,
        "retain_versions": 1,
        "retain_for": 0,
        **NO_JANITOR,
    }
    writer = make_store(template={}, **options)
    pruner = make_store(template={}, **options)
    readers = [make_store(template={}, **options) for _ in range(3)]
    key = "hot"
    writer.load(key)
    expected: dict[int, Any] = {}
    results = {"ok": 0, "gone": 0}
    problems: list[BaseException] = []
    version = 0
    for _ in range(6):
        targets = []
        for _ in range(4):
            version += 1
            d = {"v": version, "blob": f"{version:06d}" * 6000}  # ~36 KB: ~560 shards
            set_doc(writer, key, d)
            writer.save(key)
            expected[version] = d
            targets.append(version)
        stop = threading.Event()
        started = threading.Barrier(len(readers) + 1)

        def read_loop(
            store: ss.Store,
            versions: list[int] = targets,
            stop: threading.Event = stop,
            started: threading.Barrier = started,
        ) -> None:
            started.wait()
            while not stop.is_set():
                for v in versions[:-1]:
                    try:
                        data, info = store.read_version(key, v)
                    except ss.VersionNotFoundError:
                        results["gone"] += 1
                        continue
                    except BaseException as exc:  # reported below
                        problems.append(exc)
                        return
                    if data != expected[v] or info.version != v:
                        problems.append(AssertionError(f"version {v} read back wrong"))
                        return
                    results["ok"] += 1

        threads = [threading.Thread(target=read_loop, args=(r,), daemon=True) for r in readers]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(0.05)
        assert pruner.prune() == len(targets) - 1 + (1 if targets[0] > 1 else 0)
        time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(10)
        assert not problems, problems[0]
    assert results["ok"] > 0 and results["gone"] > 0


# -- peek ---------------------------------------------------------------------------------


def test_peek_reads_saved_data_of_a_key_held_elsewhere(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    holder = make_store()
    peeker = make_store()
    key = "held"
    holder.load(key)
    holder.update(key, lambda d: d.update(coins=5) or True)
    holder.save(key)
    with sql.connect() as conn:
        lease_before = conn.execute(
            sa.text(
                f'SELECT holder, token FROM "{sessionstore_schema}".locks '
                "WHERE store = :s AND key = :k"
            ),
            {"s": store_name, "k": key},
        ).one()

    seen = peeker.peek(key)
    assert seen == {"coins": 5, "inventory": []}
    with pytest.raises(TypeError):
        seen["coins"] = 6
    holder.update(key, lambda d: d.update(coins=6) or True)
    assert peeker.peek(key) == {"coins": 5, "inventory": []}  # unsaved changes are not seen
    with pytest.raises(ss.KeyNotLoadedError):
        peeker.get(key)

    # The holder is undisturbed: same lease, its save works and is then visible.
    assert holder.probe_lock_active(key)
    holder.save(key)
    assert peeker.peek(key) == {"coins": 6, "inventory": []}
    with sql.connect() as conn:
        lease_after = conn.execute(
            sa.text(
                f'SELECT holder, token FROM "{sessionstore_schema}".locks '
                "WHERE store = :s AND key = :k"
            ),
            {"s": store_name, "k": key},
        ).one()
    assert lease_after == lease_before
    assert [v.version for v in holder.list_versions(key)] == [2, 1]
    holder.unload(key)


def test_peek_unknown_key_is_none(make_store: Callable[..., ss.Store]) -> None:
    store = make_store()
    assert store.peek("nobody") is None
    assert store.peek("nobody", max_age=5.0) is None
    with pytest.raises(ss.InvalidKeyError):
        store.peek("")
    # Loading without saving writes nothing: still nothing to peek.
    store.load("fresh")
    assert store.peek("fresh") is None


def test_peek_max_age_serves_cached_data_then_rereads(make_store: Callable[..., ss.Store]) -> None:
    holder = make_store()
    peeker = make_store()
    key = "cached"
    holder.load(key)
    holder.update(key, lambda d: d.update(coins=1) or True)
    holder.save(key)

    assert peeker.peek(key, max_age=0.5)["coins"] == 1  # read and cached
    holder.update(key, lambda d: d.update(coins=2) or True)
    holder.save(key)
    assert peeker.peek(key, max_age=0.5)["coins"] == 1  # within max_age: the cached result
    time.sleep(0.6)
    assert peeker.peek(key, max_age=0.5)["coins"] == 2  # too old: read again
    holder.update(key, lambda d: d.update(coins=3) or True)
    holder.save(key)
    assert peeker.peek(key, max_age=60)["coins"] == 2
    assert peeker.peek(key)["coins"] == 3  # no max_age: always reads
    holder.update(key, lambda d: d.update(coins=4) or True)
    holder.save(key)
    time.sleep(0.01)
    assert peeker.peek(key, max_age=0)["coins"] == 4


def test_peek_migrates_in_memory_only(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    old = make_store(template={"coins": 0})
    key = "legacy"
    old.load(key)
    set_doc(old, key, {"coins": 7})
    old.unload(key)
    with sql.connect() as conn:
        before = conn.execute(
            sa.text(
                f'SELECT version, migrations, checksum FROM "{sessionstore_schema}".versions '
                "WHERE store = :s AND key = :k"
            ),
            {"s": store_name, "k": key},
        ).all()

    steps = [
        ss.add_fields("add_gems", {"gems": 0}),
        ss.transform("double", lambda d: {**d, "coins": d["coins"] * 2}),
    ]
    new = make_store(template={"coins": 0, "gems": 0}, migrations=steps)
    assert new.peek(key) == {"coins": 14, "gems": 0}
    assert new.peek(key) == {"coins": 14, "gems": 0}  # not migrated twice

    with sql.connect() as conn:
        after = conn.execute(
            sa.text(
                f'SELECT version, migrations, checksum FROM "{sessionstore_schema}".versions '
                "WHERE store = :s AND key = :k"
            ),
            {"s": store_name, "k": key},
        ).all()
    assert after == before
    assert [tuple(r.migrations) for r in after] == [()]
    assert new.read_version(key, 1)[0] == {"coins": 7}
    assert old.peek(key) == {"coins": 7}
    assert not new.probe_lock_active(key)


# -- restore ------------------------------------------------------------------------------


def test_restore_makes_an_old_version_current_as_a_new_version(
    make_store: Callable[..., ss.Store],
) -> None:
    calls: list[tuple[str, Any, Any]] = []
    store = make_store(
        template={}, changed_callbacks=[lambda k, n, o: calls.append((k, n, o))], **SHARDED
    )
    key = "undo"
    docs = save_versions(store, key, 5, big=lambda n: n == 2)
    calls.clear()

    store.restore(key, 2)  # a sharded version
    versions = store.list_versions(key)
    assert [v.version for v in versions] == [6, 5, 4, 3, 2, 1]
    assert store.get(key) == docs[1]
    assert store.is_saved(key)  # restore saves
    assert store.read_version(key, 6)[0] == store.read_version(key, 2)[0] == docs[1]
    assert versions[0].shard_count == versions[4].shard_count > 0
    assert versions[0].token == versions[1].token
    assert calls == [(key, docs[1], docs[4])]

    store.restore(key, 5)
    assert store.get(key) == docs[4]
    assert [v.version for v in store.list_versions(key, limit=2)] == [7, 6]
    store.unload(key)
    other = make_store(template={})
    other.load(key)
    assert other.get(key) == docs[4]


def test_restore_of_a_missing_version_changes_nothing(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    store = make_store(template={}, retain_versions=2, retain_for=0, **NO_JANITOR)
    key = "nothing"
    docs = save_versions(store, key, 4)
    assert store.prune() == 2
    store.update(key, lambda d: d.update(pending=True) or True)  # unsaved change
    before = store.list_versions(key)

    for missing in (0, 1, 99):  # never existed, pruned, in the future
        with pytest.raises(ss.VersionNotFoundError):
            store.restore(key, missing)
    assert store.list_versions(key) == before
    assert versions_in_db(sql, sessionstore_schema, store_name, key) == [3, 4]
    assert store.get(key) == {**docs[-1], "pending": True}
    assert not store.is_saved(key)

    with pytest.raises(ss.KeyNotLoadedError):
        store.restore("not-loaded", 1)


# -- erase --------------------------------------------------------------------------------


def test_erase_loaded_key_removes_every_row(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    store = make_store(template={"fresh": True}, **SHARDED)
    key = "gone"
    save_versions(store, key, 4, big=lambda n: n % 2 == 0)
    save_versions(store, "kept", 2, big=lambda n: True)
    assert all(mentions(sql, sessionstore_schema, key).values())
    kept_before = count_rows(sql, sessionstore_schema, store_name, "kept")

    store.update(key, lambda d: d.update(unsaved=True) or True)
    store.erase(key)
    assert mentions(sql, sessionstore_schema, key) == dict.fromkeys(TABLES, 0)
    assert count_rows(sql, sessionstore_schema, store_name, "kept") == kept_before
    with pytest.raises((ss.KeyNotLoadedError, ss.SessionClosedError)):
        store.get(key)
    with pytest.raises((ss.KeyNotLoadedError, ss.SessionClosedError)):
        store.update(key, lambda d: True)
    assert store.peek(key) is None
    assert store.list_versions(key) == []
    with pytest.raises(ss.VersionNotFoundError):
        store.read_version(key, 1)
    assert not store.probe_lock_active(key)

    # The key starts over from the template; another store can take it at once.
    other = make_store(template={"fresh": True}, lock_timeout=5.0)
    started = time.monotonic()
    other.load(key)
    assert time.monotonic() - started < 2.0
    assert other.get(key) == {"fresh": True}
    set_doc(other, key, {"again": 1})
    other.save(key)
    assert [v.version for v in other.list_versions(key)] == [1]
    assert store.get("kept") == doc(2, big=True)


def test_erase_unloaded_key(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str
) -> None:
    writer = make_store(template={}, **SHARDED)
    key = "offline"
    save_versions(writer, key, 3, big=lambda n: True)
    writer.unload(key)
    eraser = make_store(template={})
    eraser.erase(key)
    assert mentions(sql, sessionstore_schema, key) == dict.fromkeys(TABLES, 0)
    assert writer.peek(key) is None
    eraser.erase(key)  # erasing a key that does not exist is fine
    assert mentions(sql, sessionstore_schema, key) == dict.fromkeys(TABLES, 0)


def test_erase_waits_for_a_holder_that_refuses_handoff(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str, store_name: str
) -> None:
    asked: list[str] = []

    def refuse(key: str) -> bool:
        asked.append(key)
        return False

    holder = make_store(on_handoff_request=refuse)
    key = "mine"
    holder.load(key)
    holder.update(key, lambda d: d.update(coins=3) or True)
    holder.save(key)
    before = count_rows(sql, sessionstore_schema, store_name, key)

    eraser = make_store(lock_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ss.LockUnavailableError):
        eraser.erase(key)
    assert time.monotonic() - started >= 0.9
    wait_until(lambda: asked, 5.0, "on_handoff_request (on the callback lane)")
    assert set(asked) == {key}
    assert count_rows(sql, sessionstore_schema, store_name, key) == before
    # The holder still has it and can go on saving.
    assert holder.get(key)["coins"] == 3
    holder.update(key, lambda d: d.update(coins=4) or True)
    holder.save(key)
    assert eraser.peek(key)["coins"] == 4
    holder.unload(key)


def test_erase_takes_over_from_a_holder_that_hands_over(
    make_store: Callable[..., ss.Store], sql: sa.Engine, sessionstore_schema: str
) -> None:
    lost: list[str] = []
    holder = make_store(on_lock_lost=lost.append)
    key = "handover"
    holder.load(key)
    holder.update(key, lambda d: d.update(coins=3) or True)
    holder.save(key)
    holder.update(key, lambda d: d.update(coins=4) or True)  # saved at handoff, then erased

    eraser = make_store(lock_timeout=10.0)
    eraser.erase(key)
    wait_until(lambda: lost, 5, "on_lock_lost (fires just after the lease is released)")
    assert lost == [key]
    assert mentions(sql, sessionstore_schema, key) == dict.fromkeys(TABLES, 0)
    with pytest.raises(ss.SessionClosedError):
        holder.get(key)
    holder.load(key)  # loads again, from the template
    assert holder.get(key) == {"coins": 0, "inventory": []}
