"""Second review: races of load_many and the batch claim, each test failing before its fix."""

from __future__ import annotations

import pytest
from conftest import in_thread, wait_until

import sessionstore as ss
from sessionstore._registry import KeyState


def test_load_many_leaves_earlier_keys_loading_when_a_shared_load_fails(make_store, sql):
    """load_many: begin_load of a later key raises (another thread's load of it failed):
    the keys it already began stay LOADING for ever; loads of them hang."""
    store = make_store(lock_timeout=1.0)
    other = make_store()
    other.load("b")
    sql.steal("b")  # held elsewhere for an hour: the load of "b" will time out
    core = store._open_core()

    t_b, _out_b = in_thread(lambda: store.load("b"), daemon=True)
    wait_until(
        lambda: core.table.get("b") is not None and core.table.get("b").state is KeyState.LOADING,
        2.0,
        "the load of b to start",
    )
    with pytest.raises(ss.LockUnavailableError):
        store.load_many(["a", "b"])  # shares the failed load of "b"
    t_b.join(5)

    # "a" must not be left behind as a LOADING entry nobody will ever finish.
    entry = core.table.get("a")
    t_a, out_a = in_thread(lambda: store.load("a"), daemon=True)
    t_a.join(3.0)
    assert not t_a.is_alive(), f"load('a') hangs: entry left {entry!r}"
    assert out_a == [None]


def test_load_many_leases_not_renewed_while_waiting_for_another_key(make_store, sql):
    """load_many: the leases acquire_many took are not in the registry (no token) while
    _acquire waits for a held key, so the heartbeat never renews them: they expire, another
    process takes them, and load_many still makes the key LIVE here."""
    store = make_store(
        lock_duration=2.0,
        lock_refresh_interval=0.5,
        lock_timeout=8.0,
        on_handoff_request=lambda key: False,  # "a" can only be lost to expiry
    )
    other = make_store(lock_timeout=8.0)
    blocker = make_store()
    blocker.load("b")
    sql.steal("b")
    # The thief's lease on "b" ends in 3.5 s: load_many waits that long for it.
    sql.execute(
        "UPDATE {s}.locks SET expires_at = now() + interval '3.5 seconds' "
        "WHERE store = :store AND key = 'b'"
    )
    t_many, out_many = in_thread(lambda: store.load_many(["a", "b"]), daemon=True)
    wait_until(lambda: sql.lease("a") is not None, 3.0, "load_many to take a")
    assert sql.lease("a").holder == store.holder
    t_other, out_other = in_thread(lambda: other.load("a"), daemon=True)
    t_many.join(10)
    t_other.join(10)
    assert out_many == [None]
    # load_many says "a" is loaded here; the lease must still be ours.
    lease = sql.lease("a")
    assert lease.holder == store.holder, (
        f"'a' is LIVE in store but its lease is held by {lease.holder} "
        f"(other store loaded it too: {out_other})"
    )


def test_update_offline_drops_a_closed_tombstone_with_unsaved_changes(make_store, sql):
    """_claimed: try_claim replaces a CLOSED entry (lease lost with unsaved changes) and
    fail_load then removes it: the 'changes never written' report is gone."""
    store = make_store()
    store.load("k")
    store.update("k", lambda d: d.update(coins=5) or True)
    sql.steal("k")
    with pytest.raises(ss.LockLostError):
        store.save("k")
    with pytest.raises(ss.SessionClosedError):
        store.get("k")  # the tombstone, as documented

    result = store.update_offline(lambda d: True, keys=["k"])
    assert result.held == ["k"]

    # The tombstone must survive: unload() reports the changes that were never written.
    with pytest.raises(ss.SessionClosedError):
        store.unload("k")
