"""Leases, fencing, heartbeat, autosave, close and per-key order on a real PostgreSQL.

Every test here runs against the throwaway server of the ``sessionstore_dsn``
fixture and checks what the library promises in docs/api.md and docs/architecture.md from the
outside: through the public API and by reading (or tampering with) the
``locks`` and ``versions`` tables in SQL. Nothing is mocked. Where a test
needs to stall or break something it does it the way it happens in
production: a heartbeat that stops running, a lease row changed under the
holder, a row lock held by another transaction, connections terminated by
the server, a server that cannot be reached.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Sql, in_thread, on_citus, terminate_app, terminate_control, wait_until

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


def refuse_handoff(key: str) -> bool:
    """on_handoff_request of a holder that keeps its keys (the default hands them over)."""
    return False


# -- helpers ------------------------------------------------------------------------------


def set_coins(value: int) -> Callable[[dict[str, Any]], bool]:
    def fn(data: dict[str, Any]) -> bool:
        data["coins"] = value
        return True

    return fn


def add_coin(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def raises_session_closed(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ss.SessionClosedError:
        return True
    return False


# -- contention ----------------------------------------------------------------------------


def test_second_holder_waits_lock_timeout_then_loads_after_unload(make_store: MakeStore) -> None:
    a = make_store(on_handoff_request=refuse_handoff)
    b = make_store(lock_timeout=1.0, on_handoff_request=refuse_handoff)
    a.load("k")
    assert a.update("k", set_coins(42))
    a.save("k")
    assert a.probe_lock_active("k")
    assert b.probe_lock_active("k")

    started = time.monotonic()
    with pytest.raises(ss.LockUnavailableError):
        b.load("k")
    waited = time.monotonic() - started
    assert 0.9 <= waited < 3.0, f"load gave up after {waited:.2f}s, lock_timeout is 1s"
    with pytest.raises(ss.KeyNotLoadedError):
        b.get("k")
    assert a.get("k")["coins"] == 42  # the holder is untouched by the failed attempt

    a.unload("k")
    assert not a.probe_lock_active("k")
    assert not b.probe_lock_active("k")

    started = time.monotonic()
    b.load("k")
    assert time.monotonic() - started < 0.5, "a free key must be loaded at once"
    assert b.get("k") == {"coins": 42, "inventory": []}
    assert b.probe_lock_active("k")
    assert a.probe_lock_active("k")
    with pytest.raises(ss.LockUnavailableError):
        a.load("k")  # and now the first store is the one refused


def test_waiting_load_wins_as_soon_as_the_key_is_released(make_store: MakeStore) -> None:
    a = make_store(on_handoff_request=refuse_handoff)
    b = make_store(lock_timeout=8.0)
    a.load("k")
    assert a.update("k", set_coins(7))
    outcome: dict[str, Any] = {}

    def load_b() -> None:
        started = time.monotonic()
        try:
            b.load("k")
            outcome["ok"] = time.monotonic() - started
        except Exception as exc:  # reported below
            outcome["error"] = exc

    waiter = threading.Thread(target=load_b)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "b.load must wait while a holds the key"
    released = time.monotonic()
    a.unload("k")
    waiter.join(8.0)
    assert not waiter.is_alive()
    assert "error" not in outcome, outcome
    assert time.monotonic() - released < 2.5, "the waiting load should win soon after release"
    assert b.get("k")["coins"] == 7


def test_live_holder_hands_over_by_default(make_store: MakeStore, sql: Sql) -> None:
    lost: list[str] = []
    a = make_store(on_lock_lost=lost.append)  # default on_handoff_request: yes
    b = make_store(lock_timeout=5.0)
    a.load("k")
    assert a.update("k", set_coins(3))  # unsaved: the handoff must save it first
    token_a = sql.lease("k").token
    started = time.monotonic()
    b.load("k")
    assert time.monotonic() - started < 3.0
    assert b.get("k")["coins"] == 3
    assert sql.lease("k").token > token_a
    wait_until(lambda: lost, 2.0, "on_lock_lost after the handoff")
    assert lost == ["k"]
    with pytest.raises(ss.SessionClosedError):
        a.get("k")
    assert [v.token for v in sql.versions("k")] == [token_a]


# -- lease expiry while the holder is stalled --------------------------------------------


def test_stalled_holder_loses_lease_to_new_holder_and_writes_nothing(
    make_store: MakeStore, sql: Sql
) -> None:
    lost: list[str] = []
    # A refuses handoff requests: a stalled holder does not answer them either.
    a = make_store(
        lock_duration=1.0,
        lock_refresh_interval=0.5,
        on_lock_lost=lost.append,
        on_handoff_request=refuse_handoff,
    )
    b = make_store(lock_timeout=6.0, on_handoff_request=refuse_handoff)
    a.load("k")
    assert a.update("k", set_coins(1))
    a.save("k")
    token_a = sql.lease("k").token
    assert a.update("k", set_coins(666))  # pending when the holder stalls
    # Stall A: its heartbeat (the only thing that renews its leases) stops running.
    a._core.scheduler.stop()

    started = time.monotonic()
    b.load("k")  # waits for A's lease to expire on the database clock
    assert time.monotonic() - started < 4.0
    token_b = sql.lease("k").token
    assert token_b > token_a
    assert b.get("k")["coins"] == 1
    assert b.update("k", set_coins(100))
    b.save("k")

    with pytest.raises(ss.LockLostError):
        a.save("k")
    # on_lock_lost runs on the callback lane (docs/architecture.md, "Threads"): just after.
    wait_until(lambda: lost == ["k"], 5, "on_lock_lost")
    for call in (
        lambda: a.get("k"),
        lambda: a.update("k", add_coin),
        lambda: a.save("k"),
        lambda: a.is_saved("k"),
    ):
        with pytest.raises(ss.SessionClosedError):
            call()
    assert lost == ["k"], "on_lock_lost must fire exactly once"

    versions = sql.versions("k")
    assert [(v.version, v.token) for v in versions] == [(1, token_a), (2, token_b)]
    for info in a.list_versions("k"):
        data, _ = a.read_version("k", info.version)
        assert data["coins"] != 666, f"the stale holder's data reached version {info.version}"
    assert b.get("k")["coins"] == 100
    assert a.peek("k")["coins"] == 100
    assert sql.lease("k").token == token_b

    with pytest.raises(ss.LockUnavailableError):
        a.load("k")  # B still holds it
    b.unload("k")
    a.load("k")  # a closed session can be loaded again
    assert a.get("k") == {"coins": 100, "inventory": []}
    assert sql.lease("k").token > token_b
    assert lost == ["k"]


def test_expired_lease_fails_the_fence_even_if_nobody_took_over(
    make_store: MakeStore, sql: Sql
) -> None:
    lost: list[str] = []
    a = make_store(lock_duration=1.0, lock_refresh_interval=0.5, on_lock_lost=lost.append)
    a.load("k")
    assert a.update("k", set_coins(3))
    a.save("k")
    assert a.update("k", set_coins(4))
    a._core.scheduler.stop()
    wait_until(lambda: not a.probe_lock_active("k"), 4.0, "a's lease to expire")

    with pytest.raises(ss.LockLostError):
        a.save("k")
    wait_until(lambda: lost == ["k"], 5, "on_lock_lost (on the callback lane)")
    assert [v.version for v in sql.versions("k")] == [1]
    assert a.peek("k")["coins"] == 3


# -- heartbeat -----------------------------------------------------------------------------


def test_heartbeat_keeps_the_lease_alive_past_its_duration(make_store: MakeStore, sql: Sql) -> None:
    lost: list[str] = []
    a = make_store(
        lock_duration=2.0,
        lock_refresh_interval=0.3,
        on_lock_lost=lost.append,
        on_handoff_request=refuse_handoff,
    )
    b = make_store(lock_timeout=0.0)
    a.load("k")
    first = sql.lease("k")
    deadline = time.monotonic() + 4.0
    refusals = 0
    while time.monotonic() < deadline:
        with pytest.raises(ss.LockUnavailableError):
            b.load("k")
        refusals += 1
        lease = sql.lease("k")
        assert lease.active, "the lease lapsed while its holder was alive"
        assert lease.token == first.token
        time.sleep(0.25)
    assert refusals >= 8
    last = sql.lease("k")
    moved = (last.expires_at - first.expires_at).total_seconds()
    assert moved > 3.0, f"expires_at moved only {moved:.2f}s in 4s of heartbeats"
    assert lost == []
    assert a.update("k", set_coins(5))
    a.save("k")  # still ours: the fenced write passes
    assert [v.token for v in sql.versions("k")] == [first.token]


@pytest.mark.parametrize("how", ["steal", "delete", "retoken", "expire"])
def test_heartbeat_detects_a_lease_taken_away(make_store: MakeStore, sql: Sql, how: str) -> None:
    lost: list[str] = []
    a = make_store(lock_refresh_interval=0.2, on_lock_lost=lost.append)
    a.load("k1")
    a.load("k2")
    assert a.update("k1", set_coins(9))
    assert a.update("k2", set_coins(8))
    if how == "steal":  # another holder, new token
        changed = sql.steal("k1")
    elif how == "delete":
        changed = sql.execute("DELETE FROM {s}.locks WHERE store = :store AND key = 'k1'")
    elif how == "retoken":  # same holder id, newer token: detection must be by (key, token)
        token = sql.scalar("SELECT nextval('{s}.lease_tokens')")
        changed = sql.execute(
            "UPDATE {s}.locks SET token = :token WHERE store = :store AND key = 'k1'",
            token=token,
        )
    else:
        changed = sql.execute(
            "UPDATE {s}.locks SET expires_at = now() - interval '1 s' "
            "WHERE store = :store AND key = 'k1'"
        )
    assert changed == 1

    wait_until(lambda: lost, 3.0, "on_lock_lost")
    assert lost == ["k1"]
    wait_until(lambda: raises_session_closed(lambda: a.get("k1")), 1.0, "k1's session to close")
    with pytest.raises(ss.SessionClosedError):
        a.update("k1", add_coin)
    with pytest.raises(ss.SessionClosedError):
        a.save("k1")

    assert a.get("k2")["coins"] == 8  # other keys are untouched
    a.save("k2")
    time.sleep(0.6)  # three more heartbeats
    assert lost == ["k1"], "on_lock_lost must fire once per lost lease"
    assert sql.versions("k1") == [], "nothing of the lost key may be written"
    assert [v.version for v in sql.versions("k2")] == [1]
    if how == "steal":
        with pytest.raises(ss.LockUnavailableError):
            a.load("k1")


# -- fencing tokens ------------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_across_reloads_and_takeovers(
    make_store: MakeStore, sql: Sql
) -> None:
    a = make_store(lock_timeout=3.0)
    b = make_store(lock_timeout=3.0)
    lease_tokens: list[int] = []
    for step, holder in enumerate([a, b, a, a, b, b]):
        holder.load("k")
        lease_tokens.append(sql.lease("k").token)
        assert holder.update("k", set_coins(step + 1))  # 0 would be no change
        holder.save("k")
        holder.unload("k")
    # Takeover of an expired lease (no unload by the previous holder).
    a.load("k")
    lease_tokens.append(sql.lease("k").token)
    assert a.update("k", set_coins(100))
    a.save("k")
    sql.execute(
        "UPDATE {s}.locks SET expires_at = now() - interval '1 s' "
        "WHERE store = :store AND key = 'k'"
    )
    b.load("k")
    lease_tokens.append(sql.lease("k").token)
    assert b.update("k", set_coins(101))
    b.save("k")

    assert all(x < y for x, y in itertools.pairwise(lease_tokens)), lease_tokens
    listed = b.list_versions("k", newest_first=False)
    assert [v.version for v in listed] == list(range(1, 9))
    assert [v.token for v in listed] == lease_tokens
    assert [v.token for v in b.list_versions("k")] == lease_tokens[::-1]


# -- autosave ------------------------------------------------------------------------------


def test_autosave_writes_without_an_explicit_save(make_store: MakeStore) -> None:
    a = make_store(autosave_interval=0.3)
    lazy = make_store(autosave_interval=60.0)
    a.load("auto")
    lazy.load("manual")
    assert a.update("auto", set_coins(5))
    assert lazy.update("manual", set_coins(5))
    wait_until(lambda: a.is_saved("auto"), 5.0, "autosave of the first change")
    assert a.peek("auto")["coins"] == 5
    assert a.update("auto", set_coins(6))
    wait_until(
        lambda: (a.peek("auto") or {}).get("coins") == 6, 5.0, "autosave of the second change"
    )
    assert a.is_saved("auto")
    assert [v.version for v in a.list_versions("auto", newest_first=False)] == [1, 2]
    # Nothing was saved for a store whose autosave is not due, so the saves above were autosaves.
    assert not lazy.is_saved("manual")
    assert lazy.peek("manual") is None


# -- close ---------------------------------------------------------------------------------


def test_close_saves_and_releases_many_keys(make_store: MakeStore, sql: Sql) -> None:
    a = make_store(autosave_interval=300.0)
    keys = [f"k{i:04d}" for i in range(2000)]

    def load_and_update(key: str) -> None:
        a.load(key)
        assert a.update(key, set_coins(int(key[1:]) + 1))  # never the template's 0

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(load_and_update, keys))
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 2000
    assert sql.scalar("SELECT count(*) FROM {s}.versions WHERE store = :store") == 0

    a.close()
    assert (
        sql.scalar(
            "SELECT count(DISTINCT key) FROM {s}.versions "
            "WHERE store = :store AND holder = :holder",
            holder=a.holder,
        )
        == 2000
    )
    assert sql.scalar("SELECT count(*) FROM {s}.locks WHERE store = :store") == 0
    a.close()  # idempotent
    for call in (lambda: a.load("x"), lambda: a.get("k0001"), lambda: a.peek("k0001")):
        with pytest.raises(ss.StoreClosedError):
            call()

    reader = make_store()
    for key in keys[::97]:
        assert reader.peek(key) == {"coins": int(key[1:]) + 1, "inventory": []}


def test_close_raises_store_close_error_for_a_stolen_lease(make_store: MakeStore, sql: Sql) -> None:
    lost: list[str] = []
    # Long heartbeat interval: close() is the first to meet the stolen lease.
    a = make_store(lock_duration=60.0, lock_refresh_interval=30.0, on_lock_lost=lost.append)
    keys = [f"k{i:02d}" for i in range(30)]
    for i, key in enumerate(keys):
        a.load(key)
        assert a.update(key, set_coins(i + 1))
    assert sql.steal("k07") == 1

    with pytest.raises(ss.StoreCloseError) as caught:
        a.close()
    error = caught.value
    assert isinstance(error, ss.SessionStoreError)
    assert "k07" in str(error)
    assert set(error.errors) == {"k07"}
    assert isinstance(error.errors["k07"], ss.LockLostError)
    assert lost == ["k07"]
    a.close()  # idempotent, and quiet the second time

    reader = make_store()
    for i, key in enumerate(keys):
        if key != "k07":
            assert reader.peek(key) == {"coins": i + 1, "inventory": []}
    assert reader.peek("k07") is None
    remaining = sql.rows("SELECT key, holder::text AS holder FROM {s}.locks WHERE store = :store")
    assert [(r.key, r.holder != a.holder) for r in remaining] == [("k07", True)]


def test_close_reports_a_key_lost_before_close_with_unsaved_changes(
    make_store: MakeStore, sql: Sql
) -> None:
    """unload() of such a key raises SessionClosedError; close() must not drop it silently."""
    lost: list[str] = []
    a = make_store(lock_refresh_interval=0.2, on_lock_lost=lost.append)
    for key in ("k1", "k2", "k3"):
        a.load(key)
        assert a.update(key, set_coins(1))
    assert sql.steal("k2") == 1
    wait_until(lambda: lost, 3.0, "the heartbeat to notice the stolen lease")

    with pytest.raises(ss.StoreCloseError) as caught:
        a.close()
    assert set(caught.value.errors) == {"k2"}
    assert "k2" in str(caught.value)
    assert isinstance(caught.value.errors["k2"], ss.SessionClosedError | ss.LockLostError)
    reader = make_store()
    assert reader.peek("k1")["coins"] == 1
    assert reader.peek("k3")["coins"] == 1
    assert reader.peek("k2") is None


# -- threads -------------------------------------------------------------------------------


def test_thread_count_does_not_grow_with_loaded_keys(make_store: MakeStore) -> None:
    before = set(threading.enumerate())
    a = make_store(autosave_interval=0.2)
    keys = [f"k{i:03d}" for i in range(500)]

    def load_update_and_wait_saved(batch: list[str]) -> int:
        for key in batch:
            a.load(key)
            assert a.update(key, add_coin)
        wait_until(lambda: all(a.is_saved(key) for key in batch), 10.0, "autosave")
        time.sleep(0.3)  # let a heartbeat and an autosave tick run with these keys loaded
        return threading.active_count()

    with_5 = load_update_and_wait_saved(keys[:5])
    with_500 = load_update_and_wait_saved(keys[5:])
    mine = [t for t in threading.enumerate() if t not in before]
    assert len(mine) <= 4, f"a store runs {len(mine)} threads: {[t.name for t in mine]}"
    assert with_500 == with_5, f"{with_5} threads with 5 keys, {with_500} with 500"

    a.close()
    for thread in mine:
        thread.join(5.0)
    assert [t.name for t in mine if t.is_alive()] == []


# -- per-key order -------------------------------------------------------------------------


def test_concurrent_update_and_save_on_one_key_lose_nothing(
    make_store: MakeStore, sql: Sql
) -> None:
    a = make_store()
    a.load("k")
    threads, per_thread = 8, 40
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(per_thread):
                assert a.update("k", add_coin)
                a.save("k")
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30.0)
    assert failures == []
    total = threads * per_thread
    assert a.get("k")["coins"] == total
    assert a.is_saved("k")
    versions = [v.version for v in sql.versions("k")]
    assert versions == list(range(1, len(versions) + 1))
    assert 1 <= len(versions) <= total

    a.unload("k")
    b = make_store()
    b.load("k")
    assert b.get("k")["coins"] == total


def test_a_blocked_save_does_not_hold_up_other_keys(make_store: MakeStore, sql: Sql) -> None:
    a = make_store(lock_duration=30.0, lock_refresh_interval=10.0)
    a.load("k1")
    a.load("k2")
    assert a.update("k1", set_coins(1))
    assert a.update("k2", set_coins(2))
    blocker = sql.lock_row_for_update("k1")
    try:
        saver, outcome = in_thread(lambda: a.save("k1"))
        wait_until(lambda: sql.lock_waiters() >= 1, 5.0, "save(k1) to wait on the row lock")
        started = time.monotonic()
        a.save("k2")
        assert time.monotonic() - started < 1.0
        assert a.is_saved("k2")
        assert saver.is_alive(), "save(k1) should still be blocked"
        assert not a.is_saved("k1")
        assert a.update("k1", add_coin)  # memory changes do not wait for the save
        assert a.peek("k2")["coins"] == 2
        assert a.peek("k1") is None
    finally:
        blocker.commit()
        blocker.close()
    saver.join(10.0)
    assert not saver.is_alive()
    assert outcome == [None]
    assert a.peek("k1")["coins"] == 1
    a.save("k1")
    assert a.peek("k1")["coins"] == 2


# -- unload during concurrent updates -----------------------------------------------------


def test_updates_during_unload_are_refused_and_committed_ones_are_saved(
    make_store: MakeStore, sql: Sql
) -> None:
    a = make_store(lock_duration=30.0, lock_refresh_interval=10.0)
    a.load("k")
    for _ in range(5):
        assert a.update("k", add_coin)
    blocker = sql.lock_row_for_update("k")  # holds the unload inside its final save
    committed = 5
    try:
        unloader, outcome = in_thread(lambda: a.unload("k"))
        deadline = time.monotonic() + 5.0
        while True:
            try:
                if a.update("k", add_coin):
                    committed += 1
            except ss.SessionClosedError:
                break
            assert time.monotonic() < deadline, "updates were still accepted during unload"
            time.sleep(0.005)
        assert unloader.is_alive(), "the unload should still be waiting on the row lock"
        with pytest.raises(ss.SessionClosedError):
            a.update("k", add_coin)
    finally:
        blocker.commit()
        blocker.close()
    unloader.join(10.0)
    assert outcome == [None]
    with pytest.raises((ss.SessionClosedError, ss.KeyNotLoadedError)):
        a.update("k", add_coin)
    assert a.peek("k")["coins"] == committed
    assert sql.lease("k") is None


def test_unload_racing_many_updaters_loses_no_committed_update(make_store: MakeStore) -> None:
    a = make_store()
    a.load("k")
    counts: list[int] = []
    refusals: list[type[BaseException]] = []
    others: list[BaseException] = []

    def updater() -> None:
        mine = 0
        try:
            while True:
                if a.update("k", add_coin):
                    mine += 1
        except (ss.SessionClosedError, ss.KeyNotLoadedError) as exc:
            refusals.append(type(exc))
        except BaseException as exc:
            others.append(exc)
        counts.append(mine)

    threads = [threading.Thread(target=updater) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: a.get("k")["coins"] >= 200, 5.0, "updates to run")
    a.unload("k")
    for t in threads:
        t.join(5.0)
    assert others == []
    assert len(counts) == 4 and len(refusals) == 4
    assert sum(counts) >= 200
    assert a.peek("k")["coins"] == sum(counts)


# -- database connection failures ---------------------------------------------------------


def test_terminated_connections_are_retried_transparently(
    make_store: MakeStore, sql: Sql, own_engine: tuple[sa.Engine, dict[str, bool], str]
) -> None:
    engine, _, app = own_engine
    a = make_store(dsn=engine)
    a.load("k")
    assert a.update("k", set_coins(1))
    a.save("k")
    assert a.update("k", set_coins(2))
    terminate_app(sql, app)
    a.save("k")
    assert a.is_saved("k")
    assert a.peek("k")["coins"] == 2
    terminate_app(sql, app)
    a.load("k2")
    assert a.get("k2")["coins"] == 0


def test_save_while_database_unreachable_keeps_the_session_dirty(
    make_store: MakeStore, sql: Sql, own_engine: tuple[sa.Engine, dict[str, bool], str]
) -> None:
    engine, state, app = own_engine
    a = make_store(dsn=engine, retry_timeout=1.0, lock_duration=15.0, lock_refresh_interval=1.0)
    reader = make_store()
    a.load("k")
    assert a.update("k", set_coins(1))
    a.save("k")
    assert a.update("k", set_coins(2))

    state["down"] = True
    try:
        terminate_app(sql, app)
        with pytest.raises(ss.StorageUnavailableError):
            a.save("k")
        assert not a.is_saved("k")
        assert a.get("k")["coins"] == 2
        with pytest.raises(ss.StorageUnavailableError):
            a.unload("k")
        # Still loaded, data kept: the unload can be retried.
        assert not a.is_saved("k")
        assert a.update("k", add_coin)
        assert a.get("k")["coins"] == 3
        assert reader.peek("k")["coins"] == 1
    finally:
        state["down"] = False
    a.save("k")
    assert a.is_saved("k")
    assert reader.peek("k")["coins"] == 3
    a.unload("k")
    assert sql.lease("k") is None


def test_close_waits_for_a_running_save_and_loses_nothing(
    make_store: Callable[..., ss.Store], sql: Any
) -> None:
    a = make_store(lock_duration=30.0, lock_refresh_interval=10.0)
    a.load("k")
    a.load("j")
    assert a.update("k", set_coins(1))
    assert a.update("j", set_coins(2))
    blocker = sql.lock_row_for_update("k")
    try:
        saver, saved = in_thread(lambda: a.save("k"))
        wait_until(lambda: sql.lock_waiters() >= 1, 5.0, "save(k) to wait on the row lock")
        closer, closed = in_thread(a.close)
        time.sleep(0.3)
        assert closer.is_alive(), "close() must wait for the save of k that holds its turn"
    finally:
        blocker.commit()
        blocker.close()
    saver.join(10.0)
    closer.join(10.0)
    assert saved == [None] and closed == [None]
    reader = make_store()
    assert reader.peek("k")["coins"] == 1 and reader.peek("j")["coins"] == 2
    assert not reader.probe_lock_active("k") and not reader.probe_lock_active("j")


def test_a_load_takes_the_lease_and_reads_in_one_statement(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, sql: Sql
) -> None:
    """Revision 0005: the lease, the newest version, the applied ids and the
    waiting messages come back from one call (one round trip), all of them right.

    On Citus the read stays a statement of its own (one routed statement,
    where the function would make one round trip per table to the worker)."""
    import psycopg

    writer = make_store({"coins": 0})
    writer.load("k")
    writer.update("k", set_coins(7), idempotency_key="rcpt-1")
    writer.unload("k")
    writer.send_message("k", {"gift": 1})
    gifts: list[Any] = []

    def handle(key: str, data: Any, message: Any) -> bool:
        gifts.append(message)
        return True

    store = make_store({"coins": 0}, message_handler=handle)
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    loader = threading.get_ident()

    def counting(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == loader:
            sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    store.load("k")
    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    # Then, as the call said messages wait, the load fetches them: nothing else.
    citus = on_citus(sql.engine)
    assert len(sent) == 2 + citus, sent
    assert "lease_acquire_read" in sent[0]
    if citus:
        assert "FROM (SELECT 1) AS one LEFT JOIN LATERAL" in sent[1], sent[1]
    assert sent[-1].startswith("SELECT id") and ".messages WHERE" in sent[-1], sent[-1]
    assert store.get("k") == {"coins": 7}
    assert store.update("k", set_coins(8), idempotency_key="rcpt-1") is False
    wait_until(lambda: gifts == [{"gift": 1}], 10.0, "the waiting message to be delivered")


# -- releases without the flush (revision 0006) -------------------------------------------


def test_a_release_commits_without_waiting_for_the_flush(make_store: MakeStore, sql: Sql) -> None:
    """Revision 0006: without a synchronous standby (and not on Citus) the
    release's transaction commits with synchronous_commit off."""
    a = make_store()
    a.load("k")
    token = sql.lease("k").token
    with sql.engine.begin() as conn:
        released = conn.execute(
            sql.text(
                "SELECT {s}.lease_release_one_async(:store, CAST(:holder AS uuid), :key, "
                ":token, 'unused')"
            ),
            {"store": sql.store, "holder": a.holder, "key": "k", "token": token},
        ).scalar()
        setting = conn.execute(sa.text("SHOW synchronous_commit")).scalar()
    assert released is True and sql.lease("k") is None
    assert setting == ("on" if on_citus(sql.engine) else "off")


def test_releases_lost_in_a_crash_are_done_again_when_the_control_connection_is_back(
    make_store: MakeStore, sql: Sql
) -> None:
    """A crash may lose the last releases (their commits did not wait for the
    flush): once its control connection reconnects, the store deletes its own
    rows of the keys it released before the drop, whatever their token (a
    crash may issue one again); a key it took again since keeps its lease."""
    a = make_store(instant_takeover=True)
    a.load("lost")
    a.load("again")
    a.unload("lost")
    a.unload("again")
    a.load("again")  # in use again: left alone
    # What a crash that lost the releases of "lost" leaves: a row of a's,
    # with a token of an earlier lease (the last release's was lost too).
    sql.execute(
        "INSERT INTO {s}.locks (store, key, holder, token, acquired_at, expires_at, host, pid, "
        "liveness) VALUES (:store, 'lost', CAST(:holder AS uuid), :token, now(), "
        "now() + interval '1 hour', 'h', 1, false)",
        holder=a.holder,
        token=sql.scalar("SELECT nextval('{s}.lease_tokens')"),
    )
    terminate_control(sql, a.holder)
    wait_until(lambda: sql.lease("lost") is None, 10.0, "the lost release to be done again")
    assert sql.lease("again").holder == a.holder
    assert a.update("again", set_coins(3))
    a.save("again")
    b = make_store(lock_timeout=1.0)
    b.load("lost")
    assert b.get("lost")["coins"] == 0
