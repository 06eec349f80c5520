"""Second review: races of the group commit (_durable.py), each test failing before its fix."""

from __future__ import annotations

import contextlib
import threading

from conftest import in_thread, wait_until

import sessionstore as ss


def test_durable_update_of_a_lost_session_reported_written_when_reloaded_key_shares_batch(
    make_store, sql
):
    """_write dedups the batch by key ({key: session}): a waiter whose session S1 lost its
    lease (change never written) and a waiter of the reloaded session S2 of the same key
    share a batch; only S2 is written and S1's waiter is told its change is durable."""
    store = make_store()
    core = store._open_core()
    store.load("x")
    store.load("k")

    release = threading.Event()
    in_flight = threading.Event()
    original = core.saver.save_held
    calls = []

    def slow_save_held(sessions, reason):
        calls.append([s.key for s in sessions])
        if len(calls) == 1:
            in_flight.set()
            release.wait(10)
        return original(sessions, reason)

    core.saver.save_held = slow_save_held  # type: ignore[method-assign]

    def bump(d):
        d["coins"] += 1
        return True

    # A durable write of "x" in flight; T1's durable update of "k" (session S1) queues.
    t_x, _out_x = in_thread(lambda: store.update("x", bump, durable=True), daemon=True)
    assert in_flight.wait(5)
    s1 = core.table.get("k").session
    t1, out1 = in_thread(
        lambda: store.update("k", lambda d: d.update(coins=100) or True, durable=True), daemon=True
    )
    wait_until(lambda: len(core.group_commit._queue) == 1, 5, "T1 to queue")

    # S1's lease is lost (taken over) before its write: its change can never be written.
    sql.steal("k")
    core.leases.heartbeat()
    assert s1.closed and not s1.saved
    with contextlib.suppress(ss.SessionClosedError):
        store.unload("k")  # forget the tombstone (reports the unsaved change)
    sql.execute("DELETE FROM {s}.locks WHERE store = :store AND key = 'k'")
    store.load("k")  # S2, from the database: coins 0
    t2, _out2 = in_thread(lambda: store.update("k", bump, durable=True), daemon=True)
    wait_until(lambda: len(core.group_commit._queue) == 2, 5, "T2 to queue")

    release.set()
    for t in (t_x, t1, t2):
        t.join(10)
    stored = store.peek("k")
    assert stored["coins"] == 1  # S2's change only: S1's coins=100 was lost
    # T1's durable update must not report success for a change that was never written.
    assert out1 and isinstance(out1[0], ss.SessionStoreError), (
        f"durable update of the lost session returned normally ({out1}); stored {stored}"
    )
