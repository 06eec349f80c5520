"""One key lifecycle for threads, cancellation and callbacks (docs/architecture.md).

Each test is one of the failures a real server showed on the code before the
key registry: threads of one process sharing a key, loads cancelled by
unload/erase/close, callbacks that call back into the store, a slow
handoff callback, a no-op ``tx``, and a user's own Engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Sql, in_thread, wait_until

import sessionstore as ss
from sessionstore import db

MakeStore = Callable[..., ss.Store]


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def slow_import(entered: threading.Event, release: threading.Event) -> Callable[[str], Any]:
    """import_legacy_data that parks the load until ``release`` (the lease is already taken)."""

    def legacy(key: str) -> Any:
        entered.set()
        assert release.wait(10), "the test never released the load"
        return {"coins": 7, "inventory": []}

    return legacy


def store_threads(store: ss.Store) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-" + store.name)]


# -- threads of one process -------------------------------------------------------------


def test_eight_threads_of_session_increments_on_one_key(make_store: MakeStore) -> None:
    store = make_store()
    errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(50):
            try:
                with store.session("hot") as s:
                    s.update(inc)
            except BaseException as exc:  # any error at all fails the test
                errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(worker) for _ in range(8)]:
            future.result()
    assert errors == []
    assert store.peek("hot")["coins"] == 400
    assert not store.probe_lock_active("hot"), "the last block out unloads the key"


def test_eight_concurrent_loads_of_one_key_share_one_load(make_store: MakeStore) -> None:
    imports: list[str] = []

    def legacy(key: str) -> Any:
        imports.append(key)
        time.sleep(0.05)  # keep the load running while the others arrive
        return {"coins": 1, "inventory": []}

    store = make_store(import_legacy_data=legacy)
    barrier = threading.Barrier(8)

    def load() -> None:
        barrier.wait()
        store.load("k")

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(load) for _ in range(8)]:
            future.result()
    assert imports == ["k"]
    assert store.get("k")["coins"] == 1


def test_session_block_leaves_a_key_loaded_by_another_thread(make_store: MakeStore) -> None:
    store = make_store()
    store.load("k")  # explicit: stays until unload()
    thread, outcome = in_thread(lambda: _one_session_update(store, "k"))
    thread.join(10)
    assert outcome == [None]
    assert store.get("k")["coins"] == 1, "the block must not unload a key load() holds"
    assert store.update("k", inc)
    store.unload("k")
    assert store.peek("k")["coins"] == 2


def _one_session_update(store: ss.Store, key: str) -> None:
    with store.session(key) as s:
        s.update(inc)


def test_nested_sessions_share_one_lease(make_store: MakeStore, sql: Sql) -> None:
    store = make_store()
    with store.session("k") as outer:
        token = sql.lease("k").token
        with store.session("k") as inner:
            inner.update(inc)
        assert store.probe_lock_active("k"), "the inner block's exit must not unload"
        outer.update(inc)
        assert sql.lease("k").token == token
    assert store.peek("k")["coins"] == 2
    assert sql.lease("k") is None


def test_unload_while_session_blocks_use_the_key_waits_for_the_last(
    make_store: MakeStore,
) -> None:
    store = make_store()
    store.load("k")
    with store.session("k") as s:
        store.unload("k")  # drops load()'s hold; the block still uses the key
        assert s.update(inc)
    assert store.peek("k")["coins"] == 1
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unload", "erase", "close"])
def test_unload_erase_close_cancel_a_running_load(
    make_store: MakeStore, sql: Sql, how: str
) -> None:
    entered, release = threading.Event(), threading.Event()
    store = make_store(import_legacy_data=slow_import(entered, release))
    loader, outcome = in_thread(lambda: store.load("k"))
    assert entered.wait(10)
    assert sql.lease("k") is not None, "the load holds the lease while it runs"
    canceller, cancel_outcome = in_thread(
        lambda: getattr(store, how)("k") if how != "close" else store.close()
    )
    time.sleep(0.05)  # let the cancel reach the load before it may finish
    release.set()
    loader.join(10)
    canceller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ss.LoadCancelledError), outcome
    assert cancel_outcome == [None]
    assert sql.lease("k") is None, "a cancelled load releases its lease"
    if how == "close":
        with pytest.raises(ss.StoreClosedError):
            store.load("k")
        return
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    release.clear()
    release.set()
    store.load("k")  # a later load works
    assert store.get("k")["coins"] == 7


def test_unload_of_a_loading_key_from_the_loading_thread_is_refused(
    make_store: MakeStore,
) -> None:
    seen: list[BaseException] = []

    def legacy(key: str) -> Any:
        try:
            store.unload(key)
        except BaseException as exc:
            seen.append(exc)
        return None

    store = make_store(import_legacy_data=legacy)
    store.load("k")
    assert len(seen) == 1 and isinstance(seen[0], ss.LoadInProgressError)


# -- callbacks -----------------------------------------------------------------------------


def test_close_from_on_lock_lost_completes(make_store: MakeStore, sql: Sql) -> None:
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def lost(key: str) -> None:
        try:
            store.close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    store = make_store(lock_refresh_interval=0.2, on_lock_lost=lost)
    store.load("victim")
    store.load("other")
    assert store.update("other", inc)  # unsaved: close() must save it
    sql.steal("victim")
    assert done.wait(10), "on_lock_lost never fired"
    assert outcome == [None]
    try:
        wait_until(lambda: not store_threads(store), 10, "every thread of the store to end")
    except AssertionError:
        raise AssertionError(f"threads left: {store_threads(store)}") from None
    assert sql.lease("other") is None, "close() from the callback released the other key"
    with pytest.raises(ss.StoreClosedError):
        store.get("other")
    assert make_store().peek("other")["coins"] == 1, "... after saving it"


def test_validator_calling_back_into_the_store_gets_transform_error(
    make_store: MakeStore,
) -> None:
    calls: list[BaseException] = []

    def schema(data: Any) -> bool:
        if data.get("coins") == 5:
            try:
                store.save("k")
            except BaseException as exc:
                calls.append(exc)
                raise
        return True

    store = make_store(schema=schema)
    store.load("k")

    def five(data: dict[str, Any]) -> bool:
        data["coins"] = 5
        return True

    with pytest.raises(ss.SessionStoreError):
        store.update("k", five)
    assert len(calls) == 1 and isinstance(calls[0], ss.TransformError)
    assert store.get("k")["coins"] == 0, "nothing changed"
    assert store.update("k", inc)  # the key is not stuck
    store.save("k")
    assert store.peek("k")["coins"] == 1


def test_slow_on_handoff_request_does_not_stall_autosave(make_store: MakeStore) -> None:
    asked, release = threading.Event(), threading.Event()

    def slow_handoff(key: str) -> bool:
        asked.set()
        release.wait(10)
        return False

    holder = make_store(autosave_interval=0.2, on_handoff_request=slow_handoff)
    other = make_store(lock_timeout=5.0)
    holder.load("wanted")
    holder.load("busy")
    waiter, _ = in_thread(lambda: other.load("wanted"))
    try:
        assert asked.wait(10), "the handoff request never reached the callback"
        assert holder.update("busy", inc)
        wait_until(lambda: holder.is_saved("busy"), 5, "autosave while the callback blocks")
        assert holder.peek("busy")["coins"] == 1
    finally:
        release.set()
        waiter.join(10)


# -- transactions ---------------------------------------------------------------------------


def test_a_tx_that_changes_nothing_writes_nothing(make_store: MakeStore, sql: Sql) -> None:
    store = make_store()
    store.load("a")
    store.load("b")
    assert store.tx(["a", "b"], lambda docs: docs["a"].update(coins=1) is None)
    assert [v.version for v in sql.versions("a")] == [1]
    assert sql.versions("b") == [], "b was not changed and had nothing to save"
    assert store.tx(["a", "b"], lambda docs: True)
    assert [v.version for v in sql.versions("a")] == [1], "a no-op tx writes nothing"
    assert sql.versions("b") == []


# -- your Engine stays yours ---------------------------------------------------------------


@pytest.fixture
def pool_of_one(sessionstore_dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db.resolve_url(sessionstore_dsn), pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


def test_a_user_engine_is_left_as_found_and_a_pool_of_one_works(
    make_store: MakeStore, pool_of_one: sa.Engine
) -> None:
    store = make_store(dsn=pool_of_one, lock_refresh_interval=0.1, pool_size=1)
    store.load("k")
    assert store.update("k", inc)
    # Let the heartbeat run several times on the only pooled connection.
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        store.save("k")
        assert store.update("k", inc)
    store.save("k")
    store.unload("k")
    assert store.peek("k")["coins"] > 1
    with pool_of_one.connect() as conn:
        settings = conn.execute(
            sa.text(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('statement_timeout', 'lock_timeout', 'default_transaction_isolation')"
            )
        ).all()
        assert dict(settings) == {
            "statement_timeout": "0",
            "lock_timeout": "0",
            "default_transaction_isolation": "read committed",
        }
        assert conn.execute(sa.text("SHOW transaction_isolation")).scalar() == "read committed"
        assert conn.in_transaction()  # SQLAlchemy's autobegin: not left in autocommit
