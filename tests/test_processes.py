"""Leases across real processes: refusal, a SIGKILLed holder, a SIGSTOPped holder.

Each holder under test is a separate Python process (``subprocess``) that
drives a Store from commands on its stdin and answers one JSON line per
command, so the test decides exactly when it loads, changes, saves, and when
it is killed or frozen. The test process itself is the other party, with a
Store from the ``make_store`` fixture on the same database and schema.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import lock_waiter, wait_until
from holder_child import Child

import sessionstore as ss
from sessionstore import db

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals (SIGKILL, SIGSTOP, SIGCONT)"
)

MakeStore = Callable[..., ss.Store]


@pytest.fixture
def versions(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> Iterator[Callable[[str], list[Any]]]:
    """``versions(key)``: the key's versions in the database, oldest first."""
    engine = sa.create_engine(db.resolve_url(sessionstore_dsn), pool_size=1)
    statement = sa.text(
        f'SELECT version, token, holder::text AS holder FROM "{sessionstore_schema}".versions '
        "WHERE store = :store AND key = :key ORDER BY version"
    )

    def read(key: str) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(statement, {"store": store_name, "key": key}))

    try:
        yield read
    finally:
        engine.dispose()


def lease_token(store: ss.Store, key: str) -> int:
    """The token of the newest version (written under the current lease)."""
    return store.list_versions(key, limit=1)[0].token


def test_key_held_by_another_process_is_refused_until_unloaded(
    make_store: MakeStore, spawn: Callable[..., Child], versions: Callable[[str], list[Any]]
) -> None:
    holder = spawn(refuse_handoff=True)
    holder.ok("load", key="k")
    assert holder.ok("set", key="k", coins=7) is True
    holder.ok("save", key="k")

    other = spawn(lock_timeout=0.5, refuse_handoff=True)
    answer = other.call("load", key="k")
    assert answer["ok"] is False and answer["error"] == "LockUnavailableError", answer

    me = make_store(lock_timeout=0.5, on_handoff_request=lambda key: False)
    assert me.probe_lock_active("k")
    with pytest.raises(ss.LockUnavailableError):
        me.load("k")
    assert [v.holder for v in versions("k")] == [holder.holder]

    holder.ok("unload", key="k")
    assert not me.probe_lock_active("k")
    started = time.monotonic()
    me.load("k")
    assert time.monotonic() - started < 1.0
    assert me.get("k") == {"coins": 7}
    answer = other.call("load", key="k")  # now this process holds it
    assert answer["ok"] is False and answer["error"] == "LockUnavailableError", answer
    assert holder.ok("lost") == []  # an unload is not a lost lease


def test_killed_holder_key_is_taken_over_with_last_acknowledged_save(
    make_store: MakeStore, spawn: Callable[..., Child], versions: Callable[[str], list[Any]]
) -> None:
    holder = spawn(lock_duration=2.0, lock_refresh_interval=0.5, refuse_handoff=True)
    holder.ok("load", key="k")
    assert holder.ok("set", key="k", coins=11) is True
    holder.ok("save", key="k")  # acknowledged: must survive the kill
    assert holder.ok("set", key="k", coins=12) is True  # never saved
    old_token = versions("k")[-1].token

    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait(10.0)
    me = make_store(lock_timeout=8.0)
    started = time.monotonic()
    me.load("k")
    waited = time.monotonic() - started
    assert waited < 2.0 + 3.0, f"took {waited:.1f}s to take over a dead holder's 2s lease"
    assert me.get("k") == {"coins": 11}
    assert me.update("k", lambda d: d.update(coins=13) or True)
    me.save("k")
    rows = versions("k")
    assert [v.version for v in rows] == [1, 2]
    assert rows[-1].token > old_token
    assert me.peek("k") == {"coins": 13}


def test_stopped_holder_is_taken_over_and_cannot_write_after_resuming(
    make_store: MakeStore, spawn: Callable[..., Child], versions: Callable[[str], list[Any]]
) -> None:
    holder = spawn(lock_duration=1.5, lock_refresh_interval=0.3, refuse_handoff=True)
    holder.ok("load", key="k")
    assert holder.ok("set", key="k", coins=1) is True
    holder.ok("save", key="k")
    assert holder.ok("set", key="k", coins=666) is True  # pending when it freezes
    stale_token = versions("k")[-1].token

    os.kill(holder.pid, signal.SIGSTOP)
    try:
        me = make_store(lock_timeout=8.0, on_handoff_request=lambda key: False)
        started = time.monotonic()
        me.load("k")  # the frozen holder is alive (its connections are) but its lease expires
        waited = time.monotonic() - started
        assert waited < 1.5 + 3.0, f"took {waited:.1f}s to take over an expired 1.5s lease"
        assert me.get("k") == {"coins": 1}
        assert me.update("k", lambda d: d.update(coins=50) or True)
        me.save("k")
        new_token = lease_token(me, "k")
        assert new_token > stale_token
        holder.send("save", key="k")  # queued while frozen: the first thing it does after SIGCONT
    finally:
        os.kill(holder.pid, signal.SIGCONT)

    answer = holder.receive()
    assert answer["ok"] is False, f"the stale holder's save was accepted: {answer}"
    # On resume its overdue heartbeat and this save race: whichever reaches the
    # database first learns the lease is gone. The save fails the fence
    # (LockLostError), or finds the session the heartbeat already closed for
    # that reason (SessionClosedError, docs/api.md). The save that is already
    # in flight when the holder freezes is pinned to LockLostError below.
    assert answer["error"] in ("LockLostError", "SessionClosedError"), answer
    if answer["error"] == "SessionClosedError":
        assert "lease" in answer["message"], answer
    wait_until(lambda: holder.ok("lost") == ["k"], 10.0, "on_lock_lost (run on the callback lane)")
    answer = holder.call("save", key="k")
    assert answer["ok"] is False and answer["error"] == "SessionClosedError", answer

    rows = versions("k")
    assert [(v.version, v.token) for v in rows] == [(1, stale_token), (2, new_token)]
    assert all(v.holder != holder.holder for v in rows[1:])
    for row in rows:
        data, _ = me.read_version("k", row.version)
        assert data["coins"] != 666
    assert me.peek("k") == {"coins": 50}
    me.save("k")  # this process still holds the key
    assert me.update("k", lambda d: d.update(coins=51) or True)
    me.save("k")
    assert me.peek("k") == {"coins": 51}

    answer = holder.call("load", key="k")
    assert answer["ok"] is False and answer["error"] == "LockUnavailableError", answer
    me.unload("k")
    holder.ok("load", key="k")
    assert holder.ok("get", key="k") == {"coins": 51}
    wait_until(lambda: holder.ok("lost") == ["k"], 10.0, "on_lock_lost (run on the callback lane)")


def test_save_in_flight_when_the_holder_froze_fails_the_fence(
    make_store: MakeStore,
    spawn: Callable[..., Child],
    versions: Callable[[str], list[Any]],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    """A save sent before SIGSTOP meets the fence after the lease expired: nothing is written.

    A transaction of the test holds the lease row (a no-op UPDATE) so that the
    holder's save waits in the server; the holder is frozen, the lease expires,
    the row is let go (the fence re-checks the new row version on the database
    clock), the test process takes the key over and writes, and only then is
    the holder resumed to read the answer to its save.
    """
    holder = spawn(lock_duration=1.5, lock_refresh_interval=0.3, refuse_handoff=True)
    holder.ok("load", key="k")
    assert holder.ok("set", key="k", coins=1) is True
    holder.ok("save", key="k")
    assert holder.ok("set", key="k", coins=666) is True
    stale_token = versions("k")[-1].token

    s = f'"{sessionstore_schema}"'
    engine = sa.create_engine(db.resolve_url(sessionstore_dsn), pool_size=2)
    params = {"store": store_name, "key": "k"}
    stopped = False
    try:
        blocker = engine.connect()
        assert (
            blocker.execute(
                sa.text(
                    f"UPDATE {s}.locks SET expires_at = expires_at "
                    "WHERE store = :store AND key = :key"
                ),
                params,
            ).rowcount
            == 1
        )
        try:
            holder.send("save", key="k")
            wait_until(
                lambda: lock_waiter(engine, "%write_version%"),
                10.0,
                "the holder's save to reach the fence",
            )
            os.kill(holder.pid, signal.SIGSTOP)
            stopped = True
            expired = sa.text(
                f"SELECT expires_at < clock_timestamp() FROM {s}.locks "
                "WHERE store = :store AND key = :key"
            )

            def lease_expired() -> bool:
                with engine.connect() as conn:
                    return bool(conn.execute(expired, params).scalar())

            wait_until(lease_expired, 10.0, "the frozen holder's lease to expire")
        finally:
            blocker.commit()
            blocker.close()

        me = make_store(lock_timeout=5.0, on_handoff_request=lambda key: False)
        me.load("k")
        assert me.get("k") == {"coins": 1}
        assert me.update("k", lambda d: d.update(coins=50) or True)
        me.save("k")
        new_token = lease_token(me, "k")
    finally:
        if stopped:
            os.kill(holder.pid, signal.SIGCONT)
        engine.dispose()

    answer = holder.receive()
    assert answer["ok"] is False, f"the stale holder's save was accepted: {answer}"
    assert answer["error"] == "LockLostError", answer
    wait_until(lambda: holder.ok("lost") == ["k"], 10.0, "on_lock_lost (run on the callback lane)")
    rows = versions("k")
    assert [(v.version, v.token) for v in rows] == [(1, stale_token), (2, new_token)]
    assert me.peek("k") == {"coins": 50}
