"""Idempotency keys: a request applied once is never applied twice (docs/idempotency.md).

In one process here; across processes (unload/reload elsewhere, ``kill -9``
after a durable apply, handoff) in test_save_path_processes.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Sql

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


def add(amount: int, calls: list[int] | None = None) -> Callable[[dict[str, Any]], bool]:
    def fn(data: dict[str, Any]) -> bool:
        if calls is not None:
            calls.append(amount)
        data["coins"] += amount
        return True

    return fn


def test_a_repeated_request_is_not_applied_and_fn_not_called(store: ss.Store) -> None:
    store.load("k")
    calls: list[int] = []
    assert store.update("k", add(5, calls), idempotency_key="rcpt-1") is True
    assert store.update("k", add(5, calls), idempotency_key="rcpt-1") is False
    assert calls == [5]
    assert store.get("k")["coins"] == 5
    assert store.applied("k", "rcpt-1")
    assert not store.applied("k", "rcpt-2")
    assert store.update("k", add(1, calls), idempotency_key="rcpt-2") is True
    assert store.get("k")["coins"] == 6


def test_an_aborted_request_is_not_recorded(store: ss.Store) -> None:
    store.load("k")
    assert store.update("k", lambda d: False, idempotency_key="r") is False
    assert not store.applied("k", "r")
    assert store.update("k", add(2), idempotency_key="r") is True


def test_a_request_that_changes_nothing_is_still_recorded_and_saved(
    make_store: MakeStore, sql: Sql
) -> None:
    store = make_store()
    store.load("k")
    store.save("k")
    assert store.update("k", lambda d: True, idempotency_key="noop") is True
    assert not store.is_saved("k"), "the applied id must be written"
    store.save("k")
    assert make_store().applied("k", "noop")


def test_applied_ids_survive_unload_and_reload(make_store: MakeStore) -> None:
    a = make_store()
    a.load("k")
    a.update("k", add(3), idempotency_key="rcpt-9")
    a.unload("k")
    b = make_store()
    assert b.applied("k", "rcpt-9")  # not loaded: from the database
    b.load("k")
    assert b.applied("k", "rcpt-9")
    assert b.update("k", add(3), idempotency_key="rcpt-9") is False
    assert b.get("k")["coins"] == 3


def test_ids_are_per_key(store: ss.Store) -> None:
    store.load("a")
    store.load("b")
    assert store.update("a", add(1), idempotency_key="same")
    assert store.update("b", add(1), idempotency_key="same")


def test_an_unsaved_id_is_not_in_the_database_until_saved(make_store: MakeStore) -> None:
    a, other = make_store(), make_store()
    a.load("k")
    a.update("k", add(1), idempotency_key="r")
    assert not other.applied("k", "r")
    a.save("k")
    assert other.applied("k", "r")


def test_a_durable_repeat_of_an_unsaved_request_waits_for_its_write(
    make_store: MakeStore,
) -> None:
    """False ("already applied") must not be answered before the application is durable."""
    a, other = make_store(), make_store()
    a.load("k")
    assert a.update("k", add(1), idempotency_key="r") is True  # memory only
    assert a.update("k", add(1), durable=True, idempotency_key="r") is False
    assert other.applied("k", "r")
    assert other.peek("k")["coins"] == 1


def test_tx_with_an_idempotency_key_records_it_on_every_key(make_store: MakeStore) -> None:
    a = make_store()
    a.load("x")
    a.load("y")
    calls = []

    def move(docs: dict[str, Any]) -> bool:
        calls.append(1)
        docs["x"]["coins"] -= 1
        docs["y"]["coins"] += 1
        return True

    assert a.tx(["x", "y"], move, idempotency_key="move-1") is True
    assert a.tx(["x", "y"], move, idempotency_key="move-1") is False
    assert len(calls) == 1
    other = make_store()
    assert other.applied("x", "move-1") and other.applied("y", "move-1")
    assert a.update("y", add(10), idempotency_key="move-1") is False
    # Recorded on one key is enough to refuse the whole tx.
    a.load("z")
    assert a.tx(["x", "z"], move, idempotency_key="move-1") is False
    assert len(calls) == 1


def test_tx_with_an_idempotency_key_writes_even_if_nothing_changed(
    make_store: MakeStore,
) -> None:
    a = make_store()
    a.load("x")
    a.load("y")
    assert a.tx(["x", "y"], lambda docs: True, idempotency_key="t") is True
    assert make_store().applied("x", "t")


def test_retention_keeps_the_newest_ids(make_store: MakeStore, sql: Sql) -> None:
    a = make_store(idempotency_retention=20)
    a.load("k")
    for i in range(100):
        a.update("k", add(1), idempotency_key=f"r{i:03}")
        a.save("k")
    stored = sql.rows(
        "SELECT request_id FROM {s}.applied_requests WHERE store = :store AND key = 'k'"
    )
    ids = sorted(row.request_id for row in stored)
    # Pruned in batches: at least the newest 20, never far beyond.
    assert 20 <= len(ids) <= 20 + 16 + 1, len(ids)
    assert ids[-20:] == [f"r{i:03}" for i in range(80, 100)]
    a.unload("k")
    b = make_store(idempotency_retention=20)
    b.load("k")
    assert b.applied("k", "r099") and b.applied("k", "r080")
    assert not b.applied("k", "r000")


def test_erase_forgets_applied_ids(make_store: MakeStore) -> None:
    a = make_store()
    a.load("k")
    a.update("k", add(1), idempotency_key="r")
    a.save("k")
    a.erase("k")
    assert not a.applied("k", "r")


@pytest.mark.parametrize(
    "bad, error",
    [
        ("", ss.InvalidArgumentError),
        ("a\x00b", ss.InvalidArgumentError),
        ("x" * 513, ss.InvalidArgumentError),
        (7, ss.ArgumentTypeError),
        (b"bytes", ss.ArgumentTypeError),
    ],
)
def test_bad_idempotency_keys_are_refused_before_anything_happens(
    store: ss.Store, bad: Any, error: type[Exception]
) -> None:
    store.load("k")
    calls: list[int] = []
    with pytest.raises(error):
        store.update("k", add(1, calls), idempotency_key=bad)
    with pytest.raises(error):
        store.tx(["k"], lambda docs: True, idempotency_key=bad)
    with pytest.raises(error):
        store.applied("k", bad)
    assert calls == []
    assert isinstance(error("x"), ss.SessionStoreError)


def test_durable_must_be_a_bool(store: ss.Store) -> None:
    store.load("k")
    with pytest.raises(ss.ArgumentTypeError):
        store.update("k", add(1), durable=1)  # type: ignore[arg-type]
    assert store.get("k")["coins"] == 0
