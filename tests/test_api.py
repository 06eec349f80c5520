"""The Store API of one process (docs/api.md) against a real PostgreSQL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import in_thread
from sqlalchemy.engine import make_url

import sessionstore as ss

TEMPLATE = {"coins": 0, "inventory": []}


# -- helpers ---------------------------------------------------------------------------


def add_coins(n: int) -> Callable[[Any], bool]:
    def fn(data: Any) -> bool:
        data["coins"] += n
        return True

    return fn


def call_with_timeout(fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run ``fn`` on a thread; fail (instead of hanging) if it does not return in time.

    Returns ``("ok", value)`` or ``("error", exception)``.
    """
    outcome: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"call did not return within {timeout}s (deadlock?)")
    return outcome[0]


class Recorder:
    """A changed callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def __call__(self, key: str, new: Any, old: Any) -> None:
        self.calls.append((key, new, old))


def count_rows(dsn: str, schema: str, store: str, key: str) -> dict[str, int]:
    engine = sa.create_engine(make_url(dsn).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            return {
                table: conn.execute(
                    sa.text(
                        f'SELECT count(*) FROM "{schema}".{table} WHERE store = :s AND key = :k'
                    ),
                    {"s": store, "k": key},
                ).scalar_one()
                for table in ("records", "versions", "shards", "locks")
            }
    finally:
        engine.dispose()


# -- load ------------------------------------------------------------------------------


def test_load_new_key_gives_a_copy_of_the_template(store: ss.Store) -> None:
    store.load("p1")
    assert store.get("p1") == TEMPLATE
    store.update("p1", lambda d: d["inventory"].append("sword") or True)
    store.load("p2")
    assert store.get("p2") == TEMPLATE, "keys must not share the template's containers"


def test_template_is_deep_copied_at_construction(make_store: Callable[..., ss.Store]) -> None:
    template = {"coins": 0, "inventory": []}
    store = make_store(template)
    template["inventory"].append("leaked")
    template["coins"] = 99
    store.load("k")
    assert store.get("k") == {"coins": 0, "inventory": []}


def test_load_reads_the_saved_version(make_store: Callable[..., ss.Store]) -> None:
    first = make_store()
    first.load("k")
    first.update("k", add_coins(7))
    first.unload("k")
    second = make_store()
    second.load("k")
    assert second.get("k") == {"coins": 7, "inventory": []}


def test_load_fires_changed_callbacks_with_old_none(make_store: Callable[..., ss.Store]) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    assert len(recorder.calls) == 1
    key, new, old = recorder.calls[0]
    assert key == "k"
    assert new == TEMPLATE
    assert isinstance(new, ss.FrozenDict)
    assert old is None


def test_load_of_a_loaded_key_is_a_noop(make_store: Callable[..., ss.Store]) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    store.update("k", add_coins(3))
    calls = len(recorder.calls)
    store.load("k")
    assert store.get("k")["coins"] == 3, "reloading must not replace in-memory data"
    assert store.is_saved("k") is False
    assert len(recorder.calls) == calls, "a no-op load must not fire callbacks"


def test_concurrent_load_of_the_same_key_waits_and_shares_the_outcome(
    make_store: Callable[..., ss.Store],
) -> None:
    """A changed contract (docs/api.md, "Calls"): another thread's load of a loading key waits.

    It used to raise LoadInProgressError; now the second load returns once the
    first is done, having loaded nothing itself (one legacy import, one lease),
    and a re-entry on the loading thread still raises LoadInProgressError.
    """
    entered = threading.Event()
    release = threading.Event()
    imports: list[str] = []
    reentry: list[BaseException] = []

    def slow_import(key: str) -> Any:
        imports.append(key)
        try:
            store.load(key)  # from the loading thread itself
        except BaseException as exc:
            reentry.append(exc)
        entered.set()
        assert release.wait(10)
        return {"coins": 42, "inventory": []}

    store = make_store(import_legacy_data=slow_import)
    first, first_outcome = in_thread(lambda: store.load("k"))
    assert entered.wait(10), "the first load never reached import_legacy_data"
    second, second_outcome = in_thread(lambda: store.load("k"))
    getter, got = in_thread(lambda: store.get("k"))
    time.sleep(0.1)  # give the second load a chance to (wrongly) finish early
    assert second.is_alive(), "the second load must wait for the first"
    assert getter.is_alive(), "get() of a loading key must wait for the load"
    release.set()
    for thread in (first, second, getter):
        thread.join(10)
    assert first_outcome == [None] and second_outcome == [None] and got == [None]
    assert imports == ["k"], "the second load must not load again"
    assert len(reentry) == 1 and isinstance(reentry[0], ss.LoadInProgressError)
    assert store.get("k") == {"coins": 42, "inventory": []}


def test_a_failed_load_fails_its_waiters_too(make_store: Callable[..., ss.Store]) -> None:
    entered = threading.Event()
    release = threading.Event()

    def failing_import(key: str) -> Any:
        entered.set()
        assert release.wait(10)
        raise RuntimeError("legacy system down")

    store = make_store(import_legacy_data=failing_import)
    first, first_outcome = in_thread(lambda: store.load("k"))
    assert entered.wait(10)
    second, second_outcome = in_thread(lambda: store.load("k"))
    time.sleep(0.05)
    release.set()
    first.join(10)
    second.join(10)
    assert isinstance(first_outcome[0], RuntimeError)
    assert second_outcome and second_outcome[0] is first_outcome[0], "waiters share the error"
    assert not store.probe_lock_active("k"), "the failed load released its lease"


def test_load_uses_import_legacy_data_for_unknown_keys(make_store: Callable[..., ss.Store]) -> None:
    asked: list[str] = []

    def legacy(key: str) -> Any:
        asked.append(key)
        return {"coins": 5, "inventory": ["old"]} if key == "old" else None

    store = make_store(import_legacy_data=legacy)
    store.load("old")
    store.load("new")
    assert store.get("old") == {"coins": 5, "inventory": ["old"]}
    assert store.get("new") == TEMPLATE
    assert sorted(asked) == ["new", "old"]
    store.unload("old")
    assert store.peek("old") == {"coins": 5, "inventory": ["old"]}, "imported data is saved"
    asked.clear()
    store.load("old")
    assert asked == [], "a saved key must not be imported again"


def test_failed_import_releases_the_lease(make_store: Callable[..., ss.Store]) -> None:
    boom = RuntimeError("legacy backend down")

    def legacy(key: str) -> Any:
        raise boom

    store = make_store(import_legacy_data=legacy)
    with pytest.raises(Exception) as info:
        store.load("k")
    assert info.value is boom or info.value.__cause__ is boom
    assert store.probe_lock_active("k") is False
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    other = make_store(lock_timeout=0)
    other.load("k")
    assert other.get("k") == TEMPLATE


def test_load_failing_schema_releases_the_lease(make_store: Callable[..., ss.Store]) -> None:
    writer = make_store()
    writer.load("k")
    writer.update("k", add_coins(-5))
    writer.unload("k")
    strict = make_store(schema=lambda d: d["coins"] >= 0)
    with pytest.raises(ss.SchemaValidationError):
        strict.load("k")
    assert strict.probe_lock_active("k") is False
    again = make_store(lock_timeout=0)
    again.load("k")
    assert again.get("k")["coins"] == -5


# -- get -------------------------------------------------------------------------------


def test_get_returns_the_same_frozen_object(store: ss.Store) -> None:
    store.load("k")
    first = store.get("k")
    assert isinstance(first, ss.FrozenDict)
    assert store.get("k") is first
    assert store.get("k") is first
    with pytest.raises(TypeError):
        first["coins"] = 1


def test_get_after_update_is_new_and_old_object_unchanged(store: ss.Store) -> None:
    store.load("k")
    before = store.get("k")
    store.update("k", add_coins(2))
    after = store.get("k")
    assert after == {"coins": 2, "inventory": []}
    assert before == TEMPLATE, "a frozen snapshot must never change"
    assert store.get("k") is after


def test_get_is_fast_for_a_large_document(store: ss.Store) -> None:
    store.load("k")
    store.update("k", lambda d: d["inventory"].extend(range(200_000)) or True)
    store.get("k")  # first access may build the frozen view
    started = time.perf_counter()
    for _ in range(1000):
        store.get("k")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"1000 gets of a 200k-item document took {elapsed:.3f}s: not O(1)"


# -- update ----------------------------------------------------------------------------


def test_update_gets_a_mutable_deep_copy(store: ss.Store) -> None:
    store.load("k")
    frozen = store.get("k")
    seen: list[Any] = []

    def fn(data: Any) -> bool:
        seen.append(data)
        assert type(data) is dict
        assert type(data["inventory"]) is list
        data["inventory"].append("x")
        data["coins"] = 9
        return False

    assert store.update("k", fn) is False
    assert seen[0] is not frozen
    assert store.get("k") == TEMPLATE, "an aborted transform must change nothing"
    assert store.is_saved("k") is True


def test_update_true_commits_in_memory_only(store: ss.Store) -> None:
    store.load("k")
    assert store.update("k", add_coins(5)) is True
    assert store.get("k") == {"coins": 5, "inventory": []}
    assert store.is_saved("k") is False
    assert store.peek("k") is None, "update must not write to the database"
    assert store.list_versions("k") == []


def test_update_sees_previous_updates(store: ss.Store) -> None:
    store.load("k")
    for _ in range(5):
        store.update("k", add_coins(1))
    assert store.get("k")["coins"] == 5


@pytest.mark.parametrize("verdict", [None, 1, 0, "yes", [], {"coins": 1}])
def test_update_wrong_return_raises_transform_error(store: ss.Store, verdict: Any) -> None:
    store.load("k")

    def fn(data: Any) -> Any:
        data["coins"] = 100
        return verdict

    with pytest.raises(ss.TransformError):
        store.update("k", fn)
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True


def test_update_exception_is_chained_and_changes_nothing(
    make_store: Callable[..., ss.Store],
) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    recorder.calls.clear()
    boom = KeyError("missing")

    def fn(data: Any) -> bool:
        data["coins"] = 100
        data["inventory"].append("half-done")
        raise boom

    with pytest.raises(ss.TransformError) as info:
        store.update("k", fn)
    assert info.value.__cause__ is boom
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True
    assert recorder.calls == []
    # The next transform must not see the half-done mutation.
    seen: list[Any] = []
    store.update("k", lambda d: seen.append(ss.thaw(d)) or False)
    assert seen == [TEMPLATE]


def test_update_keeps_no_reference_to_the_callers_copy(store: ss.Store) -> None:
    store.load("k")
    kept: list[Any] = []

    def fn(data: Any) -> bool:
        data["coins"] = 1
        kept.append(data)
        return True

    store.update("k", fn)
    kept[0]["coins"] = 666
    kept[0]["inventory"].append("smuggled")
    assert store.get("k") == {"coins": 1, "inventory": []}
    store.save("k")
    assert store.peek("k") == {"coins": 1, "inventory": []}


def test_update_result_must_pass_the_schema(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=lambda d: (d["coins"] >= 0, "coins must not be negative"))
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="coins must not be negative"):
        store.update("k", add_coins(-1))
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True


def test_update_immutable_gets_frozen_data_and_commits_new_data(store: ss.Store) -> None:
    store.load("k")
    seen: list[Any] = []

    def fn(data: Any) -> Any:
        seen.append(data)
        return {**data, "coins": data["coins"] + 4}

    assert store.update_immutable("k", fn) is True
    assert isinstance(seen[0], ss.FrozenDict)
    assert store.get("k") == {"coins": 4, "inventory": []}
    assert store.is_saved("k") is False


def test_update_immutable_false_aborts(store: ss.Store) -> None:
    store.load("k")
    assert store.update_immutable("k", lambda d: False) is False
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True


def test_update_immutable_mutating_the_frozen_data_is_a_transform_error(store: ss.Store) -> None:
    store.load("k")

    def fn(data: Any) -> Any:
        data["coins"] = 5
        return data

    with pytest.raises(ss.TransformError) as info:
        store.update_immutable("k", fn)
    assert isinstance(info.value.__cause__, TypeError)
    assert store.get("k") == TEMPLATE


@pytest.mark.parametrize("result", [True, None])
def test_update_immutable_wrong_return_raises(store: ss.Store, result: Any) -> None:
    store.load("k")
    with pytest.raises(ss.TransformError):
        store.update_immutable("k", lambda d: result)
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True


def test_update_immutable_exception_is_chained(store: ss.Store) -> None:
    store.load("k")
    boom = ValueError("nope")

    def fn(data: Any) -> Any:
        raise boom

    with pytest.raises(ss.TransformError) as info:
        store.update_immutable("k", fn)
    assert info.value.__cause__ is boom


def test_committed_change_fires_callbacks_with_new_and_old(
    make_store: Callable[..., ss.Store],
) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    recorder.calls.clear()
    store.update("k", add_coins(3))
    assert len(recorder.calls) == 1
    key, new, old = recorder.calls[0]
    assert key == "k"
    assert new == {"coins": 3, "inventory": []}
    assert old == TEMPLATE
    assert isinstance(new, ss.FrozenDict)
    assert isinstance(old, ss.FrozenDict)
    store.update_immutable("k", lambda d: {**d, "inventory": ["gem"]})
    assert len(recorder.calls) == 2
    assert recorder.calls[1] == ("k", {"coins": 3, "inventory": ["gem"]}, new)


def test_all_changed_callbacks_fire_even_if_one_raises(make_store: Callable[..., ss.Store]) -> None:
    recorder = Recorder()

    def broken(key: str, new: Any, old: Any) -> None:
        raise RuntimeError("callback bug")

    store = make_store(changed_callbacks=[broken, recorder])
    store.load("k")
    assert store.update("k", add_coins(1)) is True
    assert store.get("k")["coins"] == 1
    assert [c[1]["coins"] for c in recorder.calls] == [0, 1]


def test_aborted_or_failed_transform_fires_nothing(make_store: Callable[..., ss.Store]) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    recorder.calls.clear()
    store.update("k", lambda d: False)
    store.update_immutable("k", lambda d: False)
    with pytest.raises(ss.TransformError):
        store.update("k", lambda d: 1 / 0)
    assert recorder.calls == []


def test_committed_transform_that_changes_nothing_neither_dirties_nor_fires(
    make_store: Callable[..., ss.Store],
) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    store.load("k")
    store.update("k", add_coins(1))
    store.save("k")
    recorder.calls.clear()
    versions = len(store.list_versions("k"))
    assert store.update("k", lambda d: True) is True
    assert store.update("k", lambda d: d.update(coins=1) or True) is True
    assert store.update_immutable("k", lambda d: d) is True
    assert store.update_immutable("k", lambda d: ss.thaw(d)) is True
    assert store.is_saved("k") is True
    assert recorder.calls == []
    store.save("k")
    assert len(store.list_versions("k")) == versions


# -- re-entry --------------------------------------------------------------------------


REENTRY_CALLS: dict[str, Callable[[ss.Store], Any]] = {
    "update same key": lambda s: s.update("a", add_coins(1)),
    "update other key": lambda s: s.update("b", add_coins(1)),
    "update_immutable same key": lambda s: s.update_immutable("a", lambda d: False),
    "save same key": lambda s: s.save("a"),
    "save other key": lambda s: s.save("b"),
    "unload same key": lambda s: s.unload("a"),
    "unload other key": lambda s: s.unload("b"),
    "tx same key": lambda s: s.tx(["a"], lambda m: True),
    "tx other key": lambda s: s.tx(["b"], lambda m: True),
    "load other key": lambda s: s.load("c"),
    "load same key": lambda s: s.load("a"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("immutable", [False, True], ids=["update", "update_immutable"])
@pytest.mark.parametrize("what", sorted(REENTRY_CALLS))
def test_transform_calling_back_into_the_store_gets_transform_error(
    store: ss.Store, what: str, immutable: bool
) -> None:
    store.load("a")
    store.load("b")
    inner: list[BaseException] = []

    def fn(data: Any) -> Any:
        try:
            REENTRY_CALLS[what](store)
        except BaseException as exc:
            inner.append(exc)
        return False

    runner = store.update_immutable if immutable else store.update
    status, value = call_with_timeout(lambda: runner("a", fn))
    assert (status, value) == ("ok", False)
    assert len(inner) == 1, f"{what} inside a transform did not raise"
    assert isinstance(inner[0], ss.TransformError), repr(inner[0])
    assert store.get("a") == TEMPLATE
    assert store.get("b") == TEMPLATE
    # The store still works afterwards.
    assert call_with_timeout(lambda: store.update("a", add_coins(1))) == ("ok", True)
    assert call_with_timeout(lambda: store.save("a")) == ("ok", None)


@pytest.mark.timeout(30)
def test_uncaught_reentry_error_surfaces_as_transform_error(store: ss.Store) -> None:
    store.load("a")
    status, value = call_with_timeout(
        lambda: store.update("a", lambda d: store.update("a", lambda e: True))
    )
    assert status == "error"
    assert isinstance(value, ss.TransformError)
    assert store.get("a") == TEMPLATE


@pytest.mark.timeout(30)
def test_tx_transform_calling_back_into_the_store_gets_transform_error(store: ss.Store) -> None:
    store.load("a")
    store.load("b")
    status, value = call_with_timeout(
        lambda: store.tx(["a", "b"], lambda m: store.update("a", add_coins(1)))
    )
    assert status == "error"
    assert isinstance(value, ss.TransformError)
    assert store.get("a") == TEMPLATE


READ_IN_TRANSFORM = """
import json, sys
import sessionstore as ss

dsn, schema, name = sys.argv[1:4]
store = ss.Store(name, {"coins": 0, "inventory": []}, dsn=dsn, db_schema=schema,
                 lock_duration=5, lock_refresh_interval=1, lock_timeout=1)
store.load("a")
store.update("a", lambda d: d.update(coins=1) or True)  # a change since the last get
seen = []

def fn(data):
    seen.append(store.get("a"))
    seen.append(store.peek("a"))
    return False

print(json.dumps([store.update("a", fn), seen]), flush=True)
store.close()
"""


def test_transform_may_read_with_get_and_peek(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> None:
    # In a child process: a deadlock there cannot hang this test run.
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                READ_IN_TRANSFORM,
                sessionstore_dsn,
                sessionstore_schema,
                store_name,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("get() inside an update transform deadlocked")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [False, [{"coins": 1, "inventory": []}, None]]


# -- save ------------------------------------------------------------------------------


def test_save_writes_one_new_version_and_a_clean_save_writes_nothing(store: ss.Store) -> None:
    store.load("k")
    store.update("k", add_coins(1))
    assert store.is_saved("k") is False
    store.save("k")
    assert store.is_saved("k") is True
    versions = store.list_versions("k")
    assert [v.version for v in versions] == [1]
    store.save("k")
    assert len(store.list_versions("k")) == 1, "a clean save must write nothing"
    store.update("k", add_coins(1))
    store.save("k")
    versions = store.list_versions("k")
    assert len(versions) == 2
    assert versions[0].version > versions[1].version
    assert store.peek("k") == {"coins": 2, "inventory": []}


def test_save_of_unchanged_new_key_writes_nothing(store: ss.Store) -> None:
    store.load("k")
    assert store.is_saved("k") is True
    store.save("k")
    assert store.list_versions("k") == []


# -- unload and close ------------------------------------------------------------------


def test_unload_saves_and_releases(make_store: Callable[..., ss.Store]) -> None:
    store = make_store()
    store.load("k")
    store.update("k", add_coins(4))
    assert store.probe_lock_active("k") is True
    store.unload("k")
    assert store.peek("k") == {"coins": 4, "inventory": []}
    assert store.probe_lock_active("k") is False
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    other = make_store(lock_timeout=0)
    other.load("k")
    assert other.get("k")["coins"] == 4


def test_close_unloads_every_key_and_is_idempotent(make_store: Callable[..., ss.Store]) -> None:
    store = make_store()
    for key in ("a", "b", "c"):
        store.load(key)
        store.update(key, add_coins(len(key) + ord(key)))
    store.close()
    store.close()
    reader = make_store(lock_timeout=0)
    for key in ("a", "b", "c"):
        assert reader.peek(key) == {"coins": len(key) + ord(key), "inventory": []}
        assert reader.probe_lock_active(key) is False
    reader.load("a")


AFTER_CLOSE: dict[str, Callable[[ss.Store], Any]] = {
    "load": lambda s: s.load("k"),
    "get": lambda s: s.get("k"),
    "update": lambda s: s.update("k", add_coins(1)),
    "update_immutable": lambda s: s.update_immutable("k", lambda d: False),
    "tx": lambda s: s.tx(["k"], lambda m: True),
    "tx_immutable": lambda s: s.tx_immutable(["k"], lambda m: False),
    "save": lambda s: s.save("k"),
    "unload": lambda s: s.unload("k"),
    "is_saved": lambda s: s.is_saved("k"),
    "peek": lambda s: s.peek("k"),
    "probe_lock_active": lambda s: s.probe_lock_active("k"),
    "list_versions": lambda s: s.list_versions("k"),
    "read_version": lambda s: s.read_version("k", 1),
    "restore": lambda s: s.restore("k", 1),
    "erase": lambda s: s.erase("k"),
    "session": lambda s: s.session("k").__enter__(),
}


@pytest.mark.parametrize("what", sorted(AFTER_CLOSE))
def test_calls_after_close_raise_store_closed(store: ss.Store, what: str) -> None:
    store.load("k")
    store.update("k", add_coins(1))
    store.save("k")
    store.close()
    with pytest.raises(ss.StoreClosedError):
        AFTER_CLOSE[what](store)


def test_store_as_context_manager_closes(make_store: Callable[..., ss.Store]) -> None:
    with make_store() as store:
        assert isinstance(store, ss.Store)
        store.load("k")
        store.update("k", add_coins(6))
    with pytest.raises(ss.StoreClosedError):
        store.get("k")
    assert make_store().peek("k") == {"coins": 6, "inventory": []}


def test_session_handle(make_store: Callable[..., ss.Store]) -> None:
    store = make_store()
    with store.session("k") as s:
        assert s.get() == TEMPLATE
        assert s.is_saved() is True
        assert s.update(add_coins(2)) is True
        assert s.get() == {"coins": 2, "inventory": []}
        assert s.is_saved() is False
        s.save()
        assert s.is_saved() is True
        assert store.peek("k") == {"coins": 2, "inventory": []}
        assert s.update_immutable(lambda d: {**d, "coins": 3}) is True
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    assert store.peek("k") == {"coins": 3, "inventory": []}
    assert store.probe_lock_active("k") is False


def test_session_handle_unloads_on_exception(store: ss.Store) -> None:
    with pytest.raises(RuntimeError, match="inside"), store.session("k") as s:
        s.update(add_coins(1))
        raise RuntimeError("inside the block")
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    assert store.probe_lock_active("k") is False
    assert store.peek("k") == {"coins": 1, "inventory": []}


# -- unknown keys ----------------------------------------------------------------------


NEEDS_LOADED: dict[str, Callable[[ss.Store], Any]] = {
    "get": lambda s: s.get("nope"),
    "update": lambda s: s.update("nope", add_coins(1)),
    "update_immutable": lambda s: s.update_immutable("nope", lambda d: False),
    "save": lambda s: s.save("nope"),
    "unload": lambda s: s.unload("nope"),
    "is_saved": lambda s: s.is_saved("nope"),
    "tx": lambda s: s.tx(["k", "nope"], lambda m: True),
    "tx_immutable": lambda s: s.tx_immutable(["nope"], lambda m: False),
    "restore": lambda s: s.restore("nope", 1),
}


@pytest.mark.parametrize("what", sorted(NEEDS_LOADED))
def test_calls_on_unknown_keys_raise_key_not_loaded(store: ss.Store, what: str) -> None:
    store.load("k")
    with pytest.raises(ss.KeyNotLoadedError, match="nope"):
        NEEDS_LOADED[what](store)
    assert store.get("k") == TEMPLATE


def test_unloaded_key_is_unknown_again(store: ss.Store) -> None:
    store.load("k")
    store.unload("k")
    with pytest.raises(ss.KeyNotLoadedError):
        store.update("k", add_coins(1))
    with pytest.raises(ss.KeyNotLoadedError):
        store.unload("k")


# -- peek, probe -----------------------------------------------------------------------


def test_peek_returns_saved_data_only(make_store: Callable[..., ss.Store]) -> None:
    store = make_store()
    other = make_store()
    assert store.peek("k") is None
    store.load("k")
    store.update("k", add_coins(1))
    store.save("k")
    store.update("k", add_coins(1))
    assert store.peek("k") == {"coins": 1, "inventory": []}
    peeked = other.peek("k")
    assert peeked == {"coins": 1, "inventory": []}
    assert isinstance(peeked, ss.FrozenDict)
    with pytest.raises(TypeError):
        peeked["coins"] = 3


def test_probe_lock_active(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(on_handoff_request=lambda key: False)
    other = make_store(lock_timeout=0.3)
    assert store.probe_lock_active("k") is False
    store.load("k")
    assert store.probe_lock_active("k") is True
    assert other.probe_lock_active("k") is True
    with pytest.raises(ss.LockUnavailableError, match="'k'"):
        other.load("k")
    assert store.get("k") == TEMPLATE
    store.unload("k")
    assert other.probe_lock_active("k") is False


# -- versions --------------------------------------------------------------------------


def saved_versions(store: ss.Store, key: str, count: int) -> None:
    store.load(key)
    for _ in range(count):
        store.update(key, add_coins(1))
        store.save(key)


def test_list_versions_order_and_limit(store: ss.Store) -> None:
    saved_versions(store, "k", 4)
    newest = store.list_versions("k")
    assert [v.version for v in newest] == [4, 3, 2, 1]
    assert all(isinstance(v, ss.VersionInfo) for v in newest)
    assert [v.version for v in store.list_versions("k", newest_first=False)] == [1, 2, 3, 4]
    assert [v.version for v in store.list_versions("k", limit=2)] == [4, 3]
    assert [v.version for v in store.list_versions("k", newest_first=False, limit=2)] == [1, 2]
    assert newest[0].created_at >= newest[-1].created_at
    assert all(v.size > 0 for v in newest)
    assert store.list_versions("never-saved") == []


def test_list_versions_since_until(store: ss.Store) -> None:
    saved_versions(store, "k", 3)
    by_version = {v.version: v for v in store.list_versions("k")}
    t2 = by_version[2].created_at
    assert by_version[1].created_at < t2 < by_version[3].created_at
    assert [v.version for v in store.list_versions("k", since=t2)] == [3, 2]
    assert [v.version for v in store.list_versions("k", until=t2)] == [1]
    assert [
        v.version for v in store.list_versions("k", since=t2, until=by_version[3].created_at)
    ] == [2]
    assert store.list_versions("k", since=by_version[3].created_at + timedelta(seconds=1)) == []


def test_read_version(store: ss.Store) -> None:
    saved_versions(store, "k", 3)
    data, info = store.read_version("k", 2)
    assert data == {"coins": 2, "inventory": []}
    assert isinstance(data, ss.FrozenDict)
    assert info.version == 2
    assert info == {v.version: v for v in store.list_versions("k")}[2]


@pytest.mark.parametrize("version", [0, 99, -1])
def test_read_missing_version_raises(store: ss.Store, version: int) -> None:
    saved_versions(store, "k", 1)
    with pytest.raises(ss.VersionNotFoundError, match="k"):
        store.read_version("k", version)
    with pytest.raises(ss.VersionNotFoundError):
        store.read_version("other", 1)


def test_restore_makes_an_old_version_current_as_a_new_version(
    make_store: Callable[..., ss.Store],
) -> None:
    recorder = Recorder()
    store = make_store(changed_callbacks=[recorder])
    saved_versions(store, "k", 3)
    recorder.calls.clear()
    store.restore("k", 1)
    assert store.get("k") == {"coins": 1, "inventory": []}
    versions = store.list_versions("k")
    assert [v.version for v in versions] == [4, 3, 2, 1]
    assert store.read_version("k", 4)[0] == {"coins": 1, "inventory": []}
    assert store.peek("k") == {"coins": 1, "inventory": []}
    assert store.is_saved("k") is True
    assert [(c[1]["coins"], c[2]["coins"]) for c in recorder.calls] == [(1, 3)]


def test_restore_missing_version_changes_nothing(store: ss.Store) -> None:
    saved_versions(store, "k", 2)
    with pytest.raises(ss.VersionNotFoundError):
        store.restore("k", 7)
    assert store.get("k") == {"coins": 2, "inventory": []}
    assert len(store.list_versions("k")) == 2


# -- erase -----------------------------------------------------------------------------


def test_erase_loaded_key_removes_every_row(
    make_store: Callable[..., ss.Store], sessionstore_dsn: str, sessionstore_schema: str
) -> None:
    store = make_store(compress_threshold=10**9, inline_threshold=64, shard_size=64)
    store.load("k")
    store.update("k", lambda d: d["inventory"].extend(f"item-{i}" for i in range(50)) or True)
    store.save("k")
    store.update("k", add_coins(1))
    store.save("k")
    store.load("keep")
    store.update("keep", add_coins(1))
    store.save("keep")
    rows = count_rows(sessionstore_dsn, sessionstore_schema, store.name, "k")
    assert rows["versions"] == 2 and rows["shards"] > 0 and rows["locks"] == 1
    store.erase("k")
    assert count_rows(sessionstore_dsn, sessionstore_schema, store.name, "k") == {
        "records": 0,
        "versions": 0,
        "shards": 0,
        "locks": 0,
    }
    assert store.peek("k") is None
    assert store.list_versions("k") == []
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    with pytest.raises(ss.VersionNotFoundError):
        store.read_version("k", 1)
    assert count_rows(sessionstore_dsn, sessionstore_schema, store.name, "keep")["versions"] == 1
    assert store.get("keep")["coins"] == 1
    store.load("k")
    assert store.get("k") == TEMPLATE


def test_erase_key_not_loaded(
    make_store: Callable[..., ss.Store], sessionstore_dsn: str, sessionstore_schema: str
) -> None:
    writer = make_store()
    saved_versions(writer, "k", 2)
    writer.unload("k")
    eraser = make_store()
    eraser.erase("k")
    assert count_rows(sessionstore_dsn, sessionstore_schema, eraser.name, "k") == {
        "records": 0,
        "versions": 0,
        "shards": 0,
        "locks": 0,
    }
    assert eraser.probe_lock_active("k") is False


def test_erase_respects_a_lease_held_elsewhere(make_store: Callable[..., ss.Store]) -> None:
    holder = make_store(on_handoff_request=lambda key: False)
    saved_versions(holder, "k", 1)
    eraser = make_store(lock_timeout=0.3)
    with pytest.raises(ss.LockUnavailableError):
        eraser.erase("k")
    assert holder.peek("k") == {"coins": 1, "inventory": []}
    assert holder.get("k") == {"coins": 1, "inventory": []}


# -- logging ---------------------------------------------------------------------------


def test_log_records_carry_store_key_and_holder(
    make_store: Callable[..., ss.Store], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: str, new: Any, old: Any) -> None:
        raise RuntimeError("callback bug")

    caplog.set_level(logging.DEBUG, logger="sessionstore")
    store = make_store(changed_callbacks=[broken])
    store.load("k")
    store.update("k", add_coins(1))
    store.save("k")
    store.unload("k")
    store.erase("k")
    records = [r for r in caplog.records if r.name == "sessionstore"]
    assert records, "expected log records on logger 'sessionstore'"
    for record in records:
        for attr in ("store", "key", "holder"):
            assert hasattr(record, attr), f"record {record.getMessage()!r} has no {attr!r}"
        assert record.store == store.name
        assert record.holder == store.holder
    keyed = [r for r in records if r.key is not None]
    assert keyed and all(r.key == "k" for r in keyed)


def test_logs_and_errors_never_show_the_password(
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "Pw-do-not-log-93711"
    url = make_url(sessionstore_dsn).set(password=password)
    if url.username is None:
        url = url.set(username="postgres")
    dsn = url.render_as_string(hide_password=False)
    caplog.set_level(logging.DEBUG, logger="sessionstore")
    with ss.Store(
        store_name,
        TEMPLATE,
        dsn=dsn,
        db_schema=sessionstore_schema,
        lock_timeout=0,
        retry_timeout=1,
    ) as store:
        store.load("k")
        store.update("k", add_coins(1))
        store.save("k")
        assert password not in repr(store)
        store.unload("k")
    bad = make_url(dsn).set(host="127.0.0.1", port=1, query={})
    with pytest.raises(Exception) as info:
        ss.Store(
            store_name,
            TEMPLATE,
            dsn=bad.render_as_string(hide_password=False),
            db_schema=sessionstore_schema,
            retry_timeout=0.2,
        ).close()
    chain: list[BaseException] = []
    error: BaseException | None = info.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in chain:
        assert password not in str(error), f"password in {type(error).__name__}: {error}"
    assert caplog.records
    for record in caplog.records:
        assert password not in record.getMessage()
        assert password not in str(record.__dict__)
