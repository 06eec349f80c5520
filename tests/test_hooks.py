"""Save hooks (docs/save-hooks.md): ``on_save`` before each write, ``on_after_save`` after.

Every reason is observed in the situation that produces it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Sql, wait_until

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


class Hooks:
    """Records what the hooks saw; ``on_save`` stamps the reason into the data."""

    def __init__(self) -> None:
        self.before: list[tuple[str, str]] = []
        self.after: list[tuple[str, Any, int]] = []
        self.after_threads: set[str] = set()
        self.lock = threading.Lock()

    def on_save(self, key: str, data: dict[str, Any], reason: str) -> None:
        with self.lock:
            self.before.append((key, reason))
        data["last_reason"] = reason

    def on_after_save(self, key: str, data: Any, version: int) -> None:
        with self.lock:
            self.after.append((key, data, version))
            self.after_threads.add(threading.current_thread().name)

    def reasons(self, key: str) -> list[str]:
        with self.lock:
            return [reason for k, reason in self.before if k == key]

    def options(self) -> dict[str, Any]:
        return {"on_save": self.on_save, "on_after_save": self.on_after_save}


def inc(data: dict[str, Any]) -> bool:
    data["coins"] += 1
    return True


def test_save_durable_unload_and_close_reasons_and_changes_go_into_the_write(
    make_store: MakeStore,
) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    reader = make_store()
    store.load("k")
    store.update("k", inc)
    store.save("k")
    assert reader.peek("k")["last_reason"] == "save"
    store.update("k", inc, durable=True)
    assert reader.peek("k")["last_reason"] == "durable"
    store.save("k")  # nothing pending: no write, no hook
    assert hooks.reasons("k") == ["save", "durable"]
    store.unload("k")  # the last save runs the hook even with nothing pending
    assert hooks.reasons("k") == ["save", "durable", "unload"]
    assert reader.peek("k")["last_reason"] == "unload"
    store.load("k")
    store.close()
    assert hooks.reasons("k")[-1] == "close"
    assert reader.peek("k")["last_reason"] == "close"


def test_autosave_reason(make_store: MakeStore) -> None:
    hooks = Hooks()
    store = make_store(autosave_interval=0.2, **hooks.options())
    store.load("k")
    store.update("k", inc)
    wait_until(lambda: "autosave" in hooks.reasons("k"), 5.0, "an autosave")
    wait_until(lambda: store.is_saved("k"), 5.0, "the autosave to finish")
    assert make_store().peek("k")["last_reason"] == "autosave"


def test_tx_reason_and_its_changes_are_in_the_atomic_write(make_store: MakeStore) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    store.load("a")
    store.load("b")

    def move(docs: dict[str, Any]) -> bool:
        docs["a"]["coins"] -= 1
        docs["b"]["coins"] += 1
        return True

    assert store.tx(["a", "b"], move)
    assert sorted(hooks.before) == [("a", "tx"), ("b", "tx")]
    reader = make_store()
    assert reader.peek("a") == {"coins": -1, "inventory": [], "last_reason": "tx"}
    assert store.get("b") == {"coins": 1, "inventory": [], "last_reason": "tx"}
    assert store.is_saved("a") and store.is_saved("b")


def test_handoff_reason(make_store: MakeStore) -> None:
    hooks = Hooks()
    a = make_store(**hooks.options())
    b = make_store(lock_timeout=10.0)
    a.load("k")
    b.load("k")  # a is asked and hands the key over
    assert hooks.reasons("k") == ["handoff"]
    assert b.get("k")["last_reason"] == "handoff"


def test_session_exit_is_an_unload(make_store: MakeStore) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    with store.session("k") as s:
        s.update(inc)
    assert hooks.reasons("k") == ["unload"]


def test_a_hook_that_raises_is_dropped_and_the_write_goes_on(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: str, data: dict[str, Any], reason: str) -> None:
        data["half"] = "done"
        raise RuntimeError("hook bug")

    store = make_store(on_save=broken)
    store.load("k")
    store.update("k", inc)
    with caplog.at_level("ERROR", logger="sessionstore"):
        store.save("k")
    assert "on_save (save) failed" in caplog.text
    assert make_store().peek("k") == {"coins": 1, "inventory": []}
    assert store.get("k") == {"coins": 1, "inventory": []}


def test_a_hook_that_breaks_the_schema_is_dropped(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    def negative(key: str, data: dict[str, Any], reason: str) -> None:
        data["coins"] = -100

    store = make_store(on_save=negative, schema=lambda d: d["coins"] >= 0)
    store.load("k")
    store.update("k", inc)
    with caplog.at_level("ERROR", logger="sessionstore"):
        store.save("k")
    assert "on_save (save) failed" in caplog.text
    assert make_store().peek("k")["coins"] == 1


def test_a_hook_that_calls_the_store_gets_transform_error(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store: ss.Store

    def reentrant(key: str, data: dict[str, Any], reason: str) -> None:
        store.update(key, inc)

    store = make_store(on_save=reentrant)
    store.load("k")
    store.update("k", inc)
    with caplog.at_level("ERROR", logger="sessionstore"):
        store.save("k")  # no deadlock: the hook's call is refused
    assert any(r.exc_info and isinstance(r.exc_info[1], ss.TransformError) for r in caplog.records)
    assert store.is_saved("k")


def test_after_save_sees_the_data_as_saved_and_its_version(make_store: MakeStore) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    store.load("k")
    store.update("k", inc)
    store.save("k")
    store.update("k", inc)
    store.save("k")
    wait_until(lambda: len(hooks.after) == 2, 5.0, "both after-save calls")
    (k1, data1, v1), (k2, data2, v2) = hooks.after
    assert (k1, v1, k2, v2) == ("k", 1, "k", 2)
    assert data1 == {"coins": 1, "inventory": [], "last_reason": "save"}
    assert data2["coins"] == 2
    with pytest.raises(TypeError):
        data2["coins"] = 3  # frozen
    assert all(name.startswith("sessionstore-callbacks-") for name in hooks.after_threads)
    versions = [info.version for info in store.list_versions("k", newest_first=False)]
    assert versions == [1, 2]


def test_after_save_runs_for_the_saves_of_close(make_store: MakeStore) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    for key in ("a", "b"):
        store.load(key)
        store.update(key, inc)
    store.close()  # the lane runs what was queued before it stops
    assert sorted((k, v) for k, _, v in hooks.after) == [("a", 1), ("b", 1)]


def test_on_save_does_not_run_for_a_lost_lease(make_store: MakeStore, sql: Sql) -> None:
    hooks = Hooks()
    store = make_store(**hooks.options())
    store.load("k")
    store.update("k", inc)
    sql.steal("k")
    with pytest.raises(ss.LockLostError):
        store.save("k")
    assert hooks.after == []
