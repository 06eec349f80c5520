"""Review of the key lifecycle (registry, loading, saving, close): each test forces one
interleaving with row locks, a failing trigger, blocking hooks or a wrapped call, and
fails on the code as reviewed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Sql, in_thread, lock_waiters_like, wait_until

import sessionstore as ss
from sessionstore._registry import KeyState

MakeStore = Callable[..., ss.Store]


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def daemon(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException | None]]:
    return in_thread(call, daemon=True)


def write_waiting(sql: Sql) -> bool:
    """A fenced write of versions is waiting for a row lock."""
    return bool(lock_waiters_like(sql.engine, "%write_version%"))


@pytest.fixture
def failing_writes(sql: Sql) -> Iterator[Callable[[], None]]:
    """Call it to make every later INSERT of a version of this test's store fail (P0001).

    The trigger is created up front (CREATE TRIGGER would wait for a write in flight);
    arming it flips a flag the trigger reads when it fires.
    """
    fn = f'"{sql.schema}".review_fail_{sql.store}'
    flags = f"review_flag_{sql.store}"
    trigger = f"review_fail_{sql.store}"
    sql.execute(f"CREATE TABLE {{s}}.{flags} (armed boolean NOT NULL)")
    sql.execute(f"INSERT INTO {{s}}.{flags} VALUES (false)")
    sql.execute(
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f'BEGIN IF (SELECT armed FROM "{sql.schema}".{flags}) THEN '
        "RAISE EXCEPTION 'review: write refused'; END IF; RETURN NEW; END $$"
    )
    sql.execute(
        f"CREATE TRIGGER {trigger} BEFORE INSERT ON {{s}}.versions FOR EACH ROW "
        f"WHEN (NEW.store = '{sql.store}') EXECUTE FUNCTION {fn}()"
    )

    def arm() -> None:
        sql.execute(f"UPDATE {{s}}.{flags} SET armed = true")

    yield arm
    sql.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {{s}}.versions")
    sql.execute(f"DROP FUNCTION IF EXISTS {fn}()")
    sql.execute(f"DROP TABLE IF EXISTS {{s}}.{flags}")


def block_final_save(store: ss.Store, sql: Sql, key: str) -> sa.Connection:
    """Hold the key's lease row locked: its next fenced write waits for it."""
    return sql.lock_row_for_update(key)


# -- close() racing another thread's unload ---------------------------------------------


# A trigger on versions: Citus refuses triggers on distributed tables.
@pytest.mark.plain_postgres
def test_close_during_another_threads_failing_unload_reports_or_waits(
    make_store: MakeStore, sql: Sql, failing_writes: Callable[[], None]
) -> None:
    """close() skips UNLOADING entries: it returns success while another thread's final
    save is still in flight; when that save then fails the key goes back to LIVE in a
    table close() already cleared: data lost, lease never released, nobody told close()."""
    store = make_store()
    store.load("k")
    store.update("k", inc)
    row = block_final_save(store, sql, "k")
    unloader, unload_outcome = daemon(lambda: store.unload("k"))
    wait_until(lambda: write_waiting(sql), 5, "the final save to wait for the row lock")
    failing_writes()
    closer, close_outcome = daemon(store.close)
    closer.join(3)
    closed_early = not closer.is_alive()
    row.rollback()
    row.close()
    unloader.join(10)
    closer.join(10)
    assert unload_outcome and isinstance(unload_outcome[0], ss.StorageUnavailableError)
    assert not closed_early or close_outcome[0] is not None, (
        "close() returned while another thread's final save was still running"
    )
    assert isinstance(close_outcome[0], ss.StoreCloseError), (
        f"the key's unsaved change was dropped and close() said nothing: {close_outcome}"
    )


# -- unload() of a key another thread is unloading ----------------------------------------


# A trigger on versions: Citus refuses triggers on distributed tables.
@pytest.mark.plain_postgres
def test_unload_of_an_unloading_key_whose_save_fails_does_not_report_success(
    make_store: MakeStore, sql: Sql, failing_writes: Callable[[], None]
) -> None:
    """Store.unload on an UNLOADING entry just waits for the turn and returns: if the
    other unload's save failed, the key is still loaded and dirty, yet unload() said OK."""
    store = make_store()
    store.load("k")
    store.update("k", inc)
    row = block_final_save(store, sql, "k")
    first, first_outcome = daemon(lambda: store.unload("k"))
    wait_until(lambda: write_waiting(sql), 5, "the first unload's save to wait")
    failing_writes()
    entry = store._core.table.get("k")  # type: ignore[union-attr]
    assert entry is not None and entry.state is KeyState.UNLOADING
    second, second_outcome = daemon(lambda: store.unload("k"))
    queue = entry.session.queue  # type: ignore[union-attr]
    wait_until(lambda: queue._next - queue._serving >= 2, 5, "the second unload to queue")
    row.rollback()
    row.close()
    first.join(10)
    second.join(10)
    assert first_outcome and isinstance(first_outcome[0], ss.StorageUnavailableError)
    still_loaded = store._core.table.get("k") is not None  # type: ignore[union-attr]
    assert not (second_outcome == [None] and still_loaded and not store.is_saved("k")), (
        "unload() returned success, but the key is still loaded with unsaved changes"
    )


# -- unload() racing the completion of a load ----------------------------------------------


def test_unload_racing_the_end_of_a_load_unloads_the_key(make_store: MakeStore, sql: Sql) -> None:
    """Store.unload reads state LOADING without the lock, then cancel() finds the load
    finished (LIVE) and returns None: unload() returns, the key stays loaded and leased."""
    entered, release = threading.Event(), threading.Event()

    def legacy(key: str) -> Any:
        entered.set()
        assert release.wait(10)
        return {"coins": 7, "inventory": []}

    store = make_store(import_legacy_data=legacy)
    loader, load_outcome = daemon(lambda: store.load("k"))
    assert entered.wait(5)
    table = store._core.table  # type: ignore[union-attr]
    real_cancel = table.cancel

    def cancel_after_the_load_finished(key: str, reason: str) -> Any:
        release.set()  # the load completes between the state check and the cancel
        wait_until(lambda: table.get(key).state is KeyState.LIVE, 5, "the load to finish")
        return real_cancel(key, reason)

    table.cancel = cancel_after_the_load_finished  # type: ignore[method-assign]
    store.unload("k")
    loader.join(10)
    assert load_outcome == [None]
    assert table.get("k") is None, "unload() returned but the key is still loaded"
    assert sql.lease("k") is None, "unload() returned but the lease is still held"


# -- session() exit after the lease was lost -------------------------------------------------


def test_session_exit_after_lease_lost_with_unsaved_changes_raises(
    make_store: MakeStore, sql: Sql
) -> None:
    """The last session() block exits silently when the heartbeat had already closed the
    key (lease lost) with unsaved changes; the same loss found by the final save raises
    LockLostError. Store.unload() raises for the same state."""
    store = make_store(lock_duration=2.0, lock_refresh_interval=0.2)
    with pytest.raises(ss.SessionStoreError), store.session("k") as s:
        s.update(inc)
        sql.steal("k")
        wait_until(
            lambda: store._core.table.get("k").state is KeyState.CLOSED,  # type: ignore[union-attr]
            5,
            "the heartbeat to close the session",
        )


# -- a BaseException during the final save ----------------------------------------------------


def test_keyboard_interrupt_in_final_save_does_not_wedge_the_key(make_store: MakeStore) -> None:
    """Saver.unload has no try/finally between begin_unload and _finish_unload: a
    KeyboardInterrupt (or SystemExit) in the save leaves the entry UNLOADING forever;
    every later load() of the key waits forever in begin_load."""
    store = make_store()
    store.load("k")
    store.update("k", inc)
    core = store._core
    assert core is not None
    real_write = core.repo.write
    calls = []

    def interrupted(pending: Any, *, atomic: bool) -> Any:
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real_write(pending, atomic=atomic)

    core.repo.write = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        store.unload("k")
    reloader, _ = daemon(lambda: store.load("k"))
    reloader.join(5)
    assert not reloader.is_alive(), (
        f"load() hangs: the key is stuck in {core.table.get('k').state}"  # type: ignore[union-attr]
    )


def test_keyboard_interrupt_while_releasing_a_failed_load_does_not_wedge_the_key(
    make_store: MakeStore,
) -> None:
    """Loader.load calls release_quietly then fail_load with no finally: a BaseException
    from the release leaves the entry LOADING forever (waiters in begin_load never wake)."""

    def legacy(key: str) -> Any:
        raise RuntimeError("legacy import broke")

    store = make_store(import_legacy_data=legacy)
    core = store._core
    assert core is not None
    real_release = core.repo.release

    def interrupted(held: Any) -> None:
        core.repo.release = real_release  # type: ignore[method-assign]
        raise KeyboardInterrupt

    core.repo.release = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        store.load("k")
    again, _ = daemon(lambda: store.load("k"))
    again.join(5)
    assert not again.is_alive(), "load() hangs: the failed load's entry is stuck LOADING"


# -- erase() racing the last session() exit ----------------------------------------------------


def test_erase_queued_behind_an_unload_erases(make_store: MakeStore, sql: Sql) -> None:
    """Saver.erase sees LIVE and queues for the key's turn behind an unload; that unload
    removes the entry; begin_unload then fails and erase() raises SessionClosedError
    although the key is now simply not loaded here (it should take the lease and erase)."""
    store = make_store()
    store.load("k")
    store.update("k", inc)
    entry = store._core.table.get("k")  # type: ignore[union-attr]
    assert entry is not None and entry.session is not None
    queue = entry.session.queue
    row = block_final_save(store, sql, "k")
    saver, save_outcome = daemon(lambda: store.save("k"))  # holds the turn, waits on the row
    wait_until(lambda: write_waiting(sql), 5, "the save to wait for the row lock")
    unloader, unload_outcome = daemon(lambda: store.unload("k"))
    wait_until(lambda: queue._next - queue._serving >= 2, 5, "unload to queue for the turn")
    eraser, erase_outcome = daemon(lambda: store.erase("k"))
    wait_until(lambda: queue._next - queue._serving >= 3, 5, "erase to queue for the turn")
    row.rollback()
    row.close()
    for thread in (saver, unloader, eraser):
        thread.join(10)
    assert save_outcome == [None] and unload_outcome == [None]
    assert erase_outcome == [None], f"erase() failed: {erase_outcome}"
    assert store.peek("k") is None, "the key's data survived erase()"


# -- close() from a hook running on the loading thread ---------------------------------------


def test_close_from_import_legacy_data_does_not_wait_for_its_own_load(
    make_store: MakeStore,
) -> None:
    """close() waits up to retry_timeout + 5 s for every LOADING entry, its caller's own
    load included (a close() from import_legacy_data or a migration step)."""
    timings: list[float] = []
    holder: list[ss.Store] = []

    def legacy(key: str) -> Any:
        started = time.monotonic()
        holder[0].close()
        timings.append(time.monotonic() - started)
        return {"coins": 1, "inventory": []}

    store = make_store(import_legacy_data=legacy, retry_timeout=2.0)
    holder.append(store)
    with pytest.raises(ss.SessionStoreError):
        store.load("k")
    assert timings and timings[0] < 2.0, f"close() from the load's own hook took {timings}"


# -- heartbeat: a slow load's renewals are not recorded ----------------------------------------


def test_heartbeat_after_a_slow_load_does_not_lose_a_freshly_renewed_lease(
    make_store: MakeStore, sql: Sql
) -> None:
    """The heartbeat renews LOADING leases but records nothing (no session yet); the
    session starts with lease_confirmed_at = acquire time. After a load longer than
    lock_duration, one busy renewal (row locked a moment) closes the key although its
    lease was renewed < lock_refresh_interval ago and is valid in the database."""
    release = threading.Event()
    lost: list[str] = []

    def legacy(key: str) -> Any:
        assert release.wait(10)
        return {"coins": 1, "inventory": []}

    store = make_store(
        import_legacy_data=legacy,
        lock_duration=2.0,
        lock_refresh_interval=0.5,
        on_lock_lost=lost.append,
    )
    loader, load_outcome = daemon(lambda: store.load("k"))
    first = wait_until(lambda: sql.lease("k"), 5, "the lease to be taken")
    # Wait until the heartbeat renewed the LOADING lease past lock_duration.
    wait_until(
        lambda: (sql.lease("k").expires_at - first.expires_at).total_seconds() > 2.2,
        6,
        "the heartbeat to renew the loading lease for more than lock_duration",
    )
    release.set()
    loader.join(5)
    assert load_outcome == [None]
    row = sql.lock_row_for_update("k")  # one renewal finds the row busy
    try:
        wait_until(lambda: sql.lock_waiters() > 0, 3, "the heartbeat to wait for the row")
        wait_until(lambda: sql.lock_waiters() == 0, 3, "the renewal to give up (busy)")
        time.sleep(0.1)
    finally:
        row.rollback()
        row.close()
    assert sql.lease("k").active
    assert lost == [], "a lease renewed moments ago was declared lost"
    store.get("k")
