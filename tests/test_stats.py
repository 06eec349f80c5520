"""``Store.stats()``: what a Store did in this process (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Sql, wait_until

import sessionstore as ss

MakeStore = Callable[..., ss.Store]

KEYS = {
    "loaded",
    "dirty",
    "saves",
    "save_failures",
    "lost_leases",
    "handoffs_in",
    "handoffs_out",
    "messages_applied",
    "save_p50",
    "save_p99",
    "durable_writes",
    "durable_keys",
}


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def test_a_new_store_has_every_stat_at_zero(store: ss.Store) -> None:
    stats = store.stats()
    assert set(stats) == KEYS
    assert all(value == 0 for value in stats.values()), stats


def test_saves_dirty_and_latency(store: ss.Store) -> None:
    for key in ("a", "b", "c"):
        store.load(key)
        store.update(key, inc)
    assert store.stats()["loaded"] == 3 and store.stats()["dirty"] == 3
    store.save("a")
    store.update("b", inc, durable=True)
    stats = store.stats()
    assert stats["saves"] == 2 and stats["dirty"] == 1
    assert stats["durable_writes"] == 1 and stats["durable_keys"] == 1
    assert 0 < stats["save_p50"] <= stats["save_p99"]
    assert store.tx(["a", "c"], lambda docs: inc(docs["a"]) and inc(docs["c"]))
    assert store.stats()["saves"] == 4


def test_lost_leases_and_handoffs(make_store: MakeStore, sql: Sql) -> None:
    a, b = make_store(), make_store(lock_timeout=10.0)
    a.load("k")
    b.load("k")  # a hands it over
    assert b.stats()["handoffs_in"] == 1
    # a counts its handover after the commit b's load waits for: a moment later
    wait_until(lambda: a.stats()["handoffs_out"] == 1, 5.0, "a's handoffs_out")
    b.update("k", inc)
    sql.steal("k")
    with pytest.raises(ss.LockLostError):
        b.save("k")
    stats = b.stats()
    assert stats["lost_leases"] == 1 and stats["loaded"] == 0


def test_messages_applied(make_store: MakeStore) -> None:
    holder = make_store(message_handler=lambda key, data, message: inc(data))
    holder.load("k")
    make_store().send_message("k", {"coin": 1})
    wait_until(lambda: holder.stats()["messages_applied"] == 1, 5.0, "the message")


def test_the_prometheus_collector_exposes_the_stats(make_store: MakeStore) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from sessionstore.contrib.prometheus import StoreCollector

    store = make_store()
    store.load("k")
    store.update("k", inc)
    store.save("k")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()
    name = store.name
    assert f'sessionstore_saves_total{{store="{name}"}} 1.0' in text
    assert f'sessionstore_loaded{{store="{name}"}} 1.0' in text
    assert f'sessionstore_dirty{{store="{name}"}} 0.0' in text
    assert "# TYPE sessionstore_save_p99 gauge" in text
    store.close()
    assert "sessionstore_saves_total{" not in generate_latest(registry).decode()


def test_save_failures_are_counted(make_store: MakeStore, sql: Sql, own_engine: Any) -> None:
    from conftest import terminate_app

    engine, state, app = own_engine
    store = make_store(dsn=engine, retry_timeout=0.5, lock_duration=15.0)
    store.load("k")
    store.update("k", inc)
    state["down"] = True
    try:
        terminate_app(sql, app)
        with pytest.raises(ss.StorageUnavailableError):
            store.save("k")
    finally:
        state["down"] = False
    stats = store.stats()
    assert stats["save_failures"] == 1 and stats["saves"] == 0 and stats["dirty"] == 1
