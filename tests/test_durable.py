"""Durable updates and group commit (docs/durable.md).

``update(..., durable=True)`` returns only once a fenced write containing
the change has committed; concurrent durable updates share writes; a failed
write raises and leaves the change in memory, dirty.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Sql, terminate_app

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def test_a_durable_update_is_visible_to_another_store_when_it_returns(
    make_store: MakeStore,
) -> None:
    holder, reader = make_store(), make_store()
    holder.load("k")
    for expected in range(1, 6):
        assert holder.update("k", inc, durable=True) is True
        assert holder.is_saved("k")
        assert reader.peek("k") == {"coins": expected, "inventory": []}


def test_a_plain_update_is_not_written_until_a_save(make_store: MakeStore) -> None:
    """The contrast that makes the test above mean something."""
    holder, reader = make_store(), make_store()
    holder.load("k")
    holder.update("k", inc)
    assert not holder.is_saved("k")
    assert reader.peek("k") is None


def test_an_aborted_durable_update_writes_nothing(make_store: MakeStore, sql: Sql) -> None:
    holder = make_store()
    holder.load("k")
    assert holder.update("k", lambda d: False, durable=True) is False
    assert sql.versions("k") == []


def test_sixteen_threads_of_durable_increments_on_200_keys_are_exact(
    make_store: MakeStore,
) -> None:
    holder, reader = make_store(), make_store()
    keys = [f"k{i:03}" for i in range(200)]
    for key in keys:
        holder.load(key)
    rounds = 50
    start = threading.Barrier(16)

    def work(thread: int) -> None:
        start.wait()
        for step in range(rounds):
            for key in keys[thread::16]:
                assert holder.update(key, inc, durable=True)
            del step

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(16)))
    for key in keys:
        assert holder.is_saved(key)
        assert reader.peek(key)["coins"] == rounds
    sizes = holder._open_core().group_commit.batch_sizes
    assert sum(size * count for size, count in sizes.items()) >= 1
    assert max(sizes) > 1, f"concurrent durable updates never shared a write: {sizes}"


def test_a_durable_update_after_the_lease_was_stolen_raises_lock_lost(
    make_store: MakeStore, sql: Sql
) -> None:
    holder = make_store()
    holder.load("k")
    holder.update("k", inc, durable=True)
    assert sql.steal("k") == 1
    with pytest.raises(ss.LockLostError):
        holder.update("k", inc, durable=True)
    assert [v.version for v in sql.versions("k")] == [1]


def test_a_failed_durable_write_raises_and_keeps_the_change_dirty(
    make_store: MakeStore, sql: Sql, own_engine: tuple[sa.Engine, dict[str, bool], str]
) -> None:
    """The database is unreachable: the durable update raises, its change stays in memory."""
    engine, state, app = own_engine
    holder = make_store(dsn=engine, retry_timeout=0.5, lock_duration=15.0)
    holder.load("k")
    holder.update("k", inc, durable=True)
    state["down"] = True
    try:
        terminate_app(sql, app)
        with pytest.raises(ss.StorageUnavailableError):
            holder.update("k", inc, durable=True)
        assert holder.get("k")["coins"] == 2
        assert not holder.is_saved("k")
    finally:
        state["down"] = False
    holder.save("k")
    assert make_store().peek("k")["coins"] == 2
