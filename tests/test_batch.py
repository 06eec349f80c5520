"""Batch jobs (docs/batch.md): keys, update_offline, export_jsonl / import_jsonl."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from conftest import Sql

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


def export_of(keys: dict[str, Any]) -> io.BytesIO:
    lines = b"".join(
        orjson.dumps({"key": k, "version": 1, "migrations": [], "data": v}) + b"\n"
        for k, v in keys.items()
    )
    return io.BytesIO(lines)


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def test_keys_are_streamed_in_order_with_a_prefix(store: ss.Store) -> None:
    names = [f"user:{i:05}" for i in range(2300)] + ["other"]
    result = store.import_jsonl(export_of({k: {"coins": 0} for k in names}))
    assert result.imported == len(names) and not result.failed
    listed = list(store.keys())
    assert listed == sorted(names) or listed == sorted(names, key=lambda k: (k != "other", k))
    assert len(listed) == len(names)
    assert list(store.keys(prefix="user:001")) == [f"user:{i:05}" for i in range(100, 200)]
    assert list(store.keys(prefix="nobody")) == []


def test_update_offline_edits_keys_nobody_holds_and_skips_held_ones(
    make_store: MakeStore, sql: Sql
) -> None:
    batch, live = make_store(), make_store(on_handoff_request=lambda key: False)
    batch.import_jsonl(export_of({f"k{i}": {"coins": i, "inventory": []} for i in range(10)}))
    live.load("k3")
    batch.load("k4")  # held by the batch's own store: skipped too
    seen: list[int] = []
    result = batch.update_offline(inc, batch_size=3, progress=seen.append)
    assert result.updated == 8 and result.unchanged == 0 and not result.failed
    assert result.held == ["k3", "k4"]
    assert seen == [3, 6, 9, 10]
    reader = make_store()
    assert [reader.peek(f"k{i}")["coins"] for i in range(10)] == [1, 2, 3, 3, 4, 6, 7, 8, 9, 10]
    assert live.get("k3")["coins"] == 3  # the live holder's key untouched
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 2  # k3, k4 only
    batch.save("k4")


def test_update_offline_reports_failures_and_goes_on(make_store: MakeStore) -> None:
    store = make_store()
    store.import_jsonl(export_of({f"k{i}": {"coins": i, "inventory": []} for i in range(4)}))

    def picky(data: dict[str, Any]) -> bool:
        if data["coins"] == 1:
            raise RuntimeError("bad row")
        if data["coins"] == 2:
            return False
        data["coins"] += 100
        return True

    result = store.update_offline(picky)
    assert result.updated == 2 and result.unchanged == 1
    assert set(result.failed) == {"k1"} and isinstance(result.failed["k1"], ss.TransformError)
    assert [store.peek(f"k{i}")["coins"] for i in range(4)] == [100, 1, 2, 103]


def test_update_offline_never_writes_under_a_lease_taken_meanwhile(
    make_store: MakeStore, sql: Sql
) -> None:
    store = make_store()
    store.import_jsonl(export_of({"a": {"coins": 0, "inventory": []}}))

    def steal_then_change(data: dict[str, Any]) -> bool:
        sql.steal("a")  # another holder takes the key while the batch runs
        data["coins"] = 666
        return True

    result = store.update_offline(steal_then_change)
    assert result.updated == 0 and isinstance(result.failed["a"], ss.LockLostError)
    assert store.peek("a")["coins"] == 0


def test_update_offline_without_fn_applies_pending_migrations(make_store: MakeStore) -> None:
    old = make_store()
    old.import_jsonl(export_of({f"k{i}": {"coins": i, "inventory": []} for i in range(3)}))
    new = make_store(migrations=[ss.add_fields("gems", {"gems": 0})])
    result = new.update_offline(None)
    assert result.updated == 3
    assert new.list_versions("k0")[0].migrations == ("gems",)
    assert new.update_offline(None).unchanged == 3  # nothing left to do


def test_export_and_import_round_trip(make_store: MakeStore) -> None:
    source = make_store()
    for i in range(5):
        source.load(f"k{i}")
        source.update(f"k{i}", lambda d, i=i: d.update(coins=i + 1) or True)
    source.close()
    source = make_store()
    out = io.StringIO()
    assert source.export_jsonl(out) == 5
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["key"] for line in lines] == [f"k{i}" for i in range(5)]
    assert lines[2] == {
        "key": "k2",
        "version": 1,
        "migrations": [],
        "data": {"coins": 3, "inventory": []},
    }
    target = make_store(name=source.name + "-copy")
    result = target.import_jsonl(io.StringIO(out.getvalue()))
    assert result.imported == 5
    assert target.peek("k3") == {"coins": 4, "inventory": []}
    again = target.import_jsonl(io.StringIO(out.getvalue()))  # resumable: existing skipped
    assert again.imported == 0 and again.skipped == [f"k{i}" for i in range(5)]
    target.load("k0")
    over = target.import_jsonl(io.StringIO(out.getvalue()), overwrite=True)
    assert over.imported == 4 and over.held == ["k0"]
    assert len(target.list_versions("k1")) == 2


def test_import_refuses_a_bad_line(store: ss.Store) -> None:
    with pytest.raises(ss.InvalidDataError, match="line 2"):
        store.import_jsonl(io.StringIO('{"key": "a", "data": {}}\nnot json\n'))
    assert store.peek("a") is None, "a batch with a bad line is not written"


def test_bad_batch_arguments(store: ss.Store) -> None:
    with pytest.raises(ss.InvalidArgumentError):
        store.update_offline(inc, batch_size=0)
    with pytest.raises(ss.ArgumentTypeError):
        store.update_offline("not callable")  # type: ignore[arg-type]
    with pytest.raises(ss.ArgumentTypeError):
        list(store.keys(prefix=3))  # type: ignore[arg-type]
    with pytest.raises(ss.InvalidKeyError):
        store.update_offline(inc, keys=[""])


def test_load_many_and_unload_many(make_store: MakeStore, sql: Sql) -> None:
    store = make_store()
    keys = [f"k{i:04}" for i in range(1200)]
    assert store.load_many(keys) == []
    assert store.stats()["loaded"] == 1200
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 1200
    for key in keys[::100]:
        store.update(key, inc)
    store.load_many(keys[:10])  # already loaded: a no-op
    store.unload_many(keys)
    assert store.stats()["loaded"] == 0
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 0
    assert make_store().peek("k0100")["coins"] == 1
    with pytest.raises(ss.KeyNotLoadedError):
        store.unload_many(["k0001"])


def test_load_many_is_all_or_none_against_a_live_holder_in_another_process(
    make_store: MakeStore, spawn: Callable[..., Any], sql: Sql
) -> None:
    holder = spawn(refuse_handoff=True)
    holder.ok("load", key="b")
    store = make_store(lock_timeout=0.5)
    with pytest.raises(ss.LockUnavailableError):
        store.load_many(["a", "b", "c"])
    assert store.stats()["loaded"] == 0
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 1  # b only
    assert store.load_many(["a", "b", "c"], skip_unavailable=True) == ["b"]
    assert store.get("a") == {"coins": 0, "inventory": []} and store.stats()["loaded"] == 2
    result = store.update_offline(inc, keys=["b", "d"])  # a live holder elsewhere refuses
    assert result.held == ["b"] and result.updated == 1
    assert holder.ok("get", key="b") == {"coins": 0}


def test_load_many_waits_for_a_holder_that_hands_over(make_store: MakeStore) -> None:
    other = make_store()
    other.load("b")
    other.update("b", inc)
    store = make_store(lock_timeout=10.0)
    assert store.load_many(["a", "b"]) == []
    assert store.get("b")["coins"] == 1
    assert store.stats()["handoffs_in"] == 1


def test_a_load_many_that_fails_on_corrupt_data_keeps_none(make_store: MakeStore, sql: Sql) -> None:
    store = make_store()
    store.import_jsonl(export_of({"x": {"coins": 1, "inventory": []}}))
    sql.execute("UPDATE {s}.versions SET checksum = checksum + 1 WHERE store = :store")
    with pytest.raises(ss.CorruptDataError):
        store.load_many(["a", "x", "z"])
    assert store.stats()["loaded"] == 0
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 0
