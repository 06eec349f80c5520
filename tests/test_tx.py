"""Multi-key transactions: all-or-nothing, durable on return, never duplicating an item."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from conftest import wait_until

import sessionstore as ss


def _transfer(src: str, dst: str, amount: int) -> Any:
    def fn(docs: dict[str, Any]) -> bool:
        if docs[src]["coins"] < amount:
            return False
        docs[src]["coins"] -= amount
        docs[dst]["coins"] += amount
        return True

    return fn


def _versions(store: ss.Store, key: str) -> int:
    return len(store.list_versions(key, limit=10_000))


def test_tx_commits_all_keys_durably_before_returning(make_store: Any) -> None:
    store = make_store()
    other = make_store(name=store.name + "x")  # a reader that shares nothing
    store.load("a")
    store.load("b")
    store.update("a", lambda d: d.update(coins=10) or True)
    assert store.tx(["a", "b"], _transfer("a", "b", 4)) is True
    assert store.get("a")["coins"] == 6 and store.get("b")["coins"] == 4
    assert store.is_saved("a") and store.is_saved("b")
    # Durable on return: visible to a lock-free reader at once, pending update included.
    assert store.peek("a")["coins"] == 6 and store.peek("b")["coins"] == 4
    assert other.peek("a") is None


def test_tx_abort_and_errors_change_nothing(make_store: Any) -> None:
    store = make_store()
    for key in ("a", "b"):
        store.load(key)
    store.update("a", lambda d: d.update(coins=5) or True)
    store.save("a")
    before = (_versions(store, "a"), _versions(store, "b"))

    assert store.tx(["a", "b"], lambda docs: False) is False

    def boom(docs: dict[str, Any]) -> bool:
        docs["a"]["coins"] = 999
        raise RuntimeError("no")

    with pytest.raises(ss.TransformError) as caught:
        store.tx(["a", "b"], boom)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(ss.TransformError):
        store.tx(["a", "b"], lambda docs: "yes")

    def add_key(docs: dict[str, Any]) -> bool:
        docs["c"] = {"coins": 1, "inventory": []}
        return True

    def drop_key(docs: dict[str, Any]) -> bool:
        del docs["b"]
        return True

    with pytest.raises(ss.KeysChangedError):
        store.tx(["a", "b"], add_key)
    with pytest.raises(ss.KeysChangedError):
        store.tx(["a", "b"], drop_key)

    def bad_data(docs: dict[str, Any]) -> bool:
        docs["b"]["coins"] = float("nan")
        return True

    with pytest.raises(ss.InvalidDataError):
        store.tx(["a", "b"], bad_data)
    assert store.get("a")["coins"] == 5 and store.get("b")["coins"] == 0
    assert (_versions(store, "a"), _versions(store, "b")) == before


def test_tx_schema_applies_to_every_key(make_store: Any) -> None:
    store = make_store(schema=lambda d: (d["coins"] >= 0, "coins must not be negative"))
    store.load("a")
    store.load("b")
    with pytest.raises(ss.SchemaValidationError, match="negative"):
        store.tx(["a", "b"], _transfer_unchecked("a", "b", 3))
    assert store.get("a")["coins"] == 0 and store.get("b")["coins"] == 0


def _transfer_unchecked(src: str, dst: str, amount: int) -> Any:
    def fn(docs: dict[str, Any]) -> bool:
        docs[src]["coins"] -= amount
        docs[dst]["coins"] += amount
        return True

    return fn


def test_tx_input_errors(make_store: Any) -> None:
    store = make_store()
    store.load("a")
    with pytest.raises(ss.KeyNotLoadedError):
        store.tx(["a", "missing"], lambda docs: True)
    with pytest.raises(ValueError, match="duplicates"):
        store.tx(["a", "a"], lambda docs: True)
    with pytest.raises(ValueError):
        store.tx([], lambda docs: True)
    with pytest.raises(ss.InvalidKeyError):
        store.tx(["a", ""], lambda docs: True)


def test_tx_immutable(make_store: Any) -> None:
    store = make_store()
    store.load("a")
    store.load("b")
    store.update("a", lambda d: d.update(coins=3) or True)

    def move(docs: dict[str, Any]) -> dict[str, Any]:
        with pytest.raises(TypeError):
            docs["a"]["coins"] = 0
        return {
            "a": {**docs["a"], "coins": docs["a"]["coins"] - 1},
            "b": {**docs["b"], "coins": docs["b"]["coins"] + 1},
        }

    assert store.tx_immutable(["a", "b"], move) is True
    assert (store.peek("a")["coins"], store.peek("b")["coins"]) == (2, 1)
    assert store.tx_immutable(["a", "b"], lambda docs: False) is False
    with pytest.raises(ss.KeysChangedError):
        store.tx_immutable(["a", "b"], lambda docs: {"a": docs["a"]})
    with pytest.raises(ss.TransformError):
        store.tx_immutable(["a", "b"], lambda docs: True)


def test_tx_fires_changed_callbacks_after_commit(make_store: Any) -> None:
    seen: list[tuple[str, Any, Any]] = []
    store = make_store(changed_callbacks=[lambda key, new, old: seen.append((key, new, old))])
    store.load("a")
    store.load("b")
    seen.clear()
    store.update("a", lambda d: d.update(coins=2) or True)
    seen.clear()

    def move(docs: dict[str, Any]) -> bool:
        assert seen == []  # nothing fires before the commit
        docs["a"]["coins"] -= 2
        docs["b"]["coins"] += 2
        return True

    assert store.tx(["a", "b"], move)
    assert sorted((key, new["coins"], old["coins"]) for key, new, old in seen) == [
        ("a", 0, 2),
        ("b", 2, 0),
    ]


def test_second_tx_on_a_key_conflicts_and_updates_wait(make_store: Any) -> None:
    store = make_store()
    for key in ("a", "b", "c"):
        store.load(key)
    inside = threading.Event()
    release = threading.Event()
    results: dict[str, Any] = {}

    def slow(docs: dict[str, Any]) -> bool:
        inside.set()
        assert release.wait(10)
        docs["a"]["coins"] += 1
        return True

    runner = threading.Thread(target=lambda: results.update(tx=store.tx(["a", "b"], slow)))
    runner.start()
    assert inside.wait(10)
    with pytest.raises(ss.TransactionConflictError):
        store.tx(["b", "c"], lambda docs: True)
    assert store.tx(["c"], lambda docs: True) is True  # disjoint keys run

    updater = threading.Thread(target=lambda: results.update(update=store.update("a", _add_coin)))
    updater.start()
    time.sleep(0.2)
    assert updater.is_alive()  # waits for the tx
    release.set()
    runner.join(10)
    updater.join(10)
    assert results == {"tx": True, "update": True}
    assert store.get("a")["coins"] == 2  # the update ran after the tx, on its result


def _add_coin(d: dict[str, Any]) -> bool:
    d["coins"] += 1
    return True


def test_lease_stolen_during_tx_writes_nothing(
    make_store: Any, sessionstore_dsn: str, sessionstore_schema: str
) -> None:
    lost: list[str] = []
    store = make_store(on_lock_lost=lost.append)
    store.load("a")
    store.load("b")
    store.update("a", lambda d: d.update(coins=10) or True)
    store.save("a")
    before = (_versions(store, "a"), _versions(store, "b"))

    def steal_then_move(docs: dict[str, Any]) -> bool:
        with psycopg.connect(sessionstore_dsn, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{sessionstore_schema}".locks SET holder = %s, '
                "token = token + 1000000 WHERE store = %s AND key = 'b'",
                (uuid.uuid4(), store.name),
            )
        docs["a"]["coins"] -= 5
        docs["b"]["coins"] += 5
        return True

    with pytest.raises(ss.LockLostError):
        store.tx(["a", "b"], steal_then_move)
    assert (_versions(store, "a"), _versions(store, "b")) == before
    assert store.peek("a")["coins"] == 10
    assert store.get("a")["coins"] == 10  # memory unchanged too
    wait_until(lambda: lost == ["b"], 5.0, "on_lock_lost (on the callback lane)")
    with pytest.raises(ss.SessionClosedError):
        store.get("b")


def test_conservation_under_concurrent_transfers(make_store: Any) -> None:
    keys = [f"acct{i}" for i in range(6)]
    store = make_store(autosave_interval=0.2)
    for key in keys:
        store.load(key)
        store.update(key, lambda d: d.update(coins=1000) or True)
    rng = random.Random(1234)
    seeds = [rng.randrange(1 << 30) for _ in range(4)]
    outcome = {"commits": 0, "aborts": 0, "errors": 0, "conflicts": 0}
    guard = threading.Lock()

    def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(60):
            src, dst = local.sample(keys, 2)
            amount = local.randrange(1, 50)
            roll = local.random()

            def fn(
                docs: dict[str, Any],
                src: str = src,
                dst: str = dst,
                amount: int = amount,
                roll: float = roll,
            ) -> bool:
                docs[src]["coins"] -= amount
                docs[dst]["coins"] += amount
                if roll < 0.1:
                    raise KeyError("random transform error")
                return roll >= 0.2  # 10 % abort

            while True:  # a conflict is retried, as an application would
                try:
                    committed = store.tx([src, dst], fn)
                except ss.TransactionConflictError:
                    kind = "conflicts"
                except ss.TransformError:
                    kind = "errors"
                else:
                    kind = "commits" if committed else "aborts"
                with guard:
                    outcome[kind] += 1
                if kind != "conflicts":
                    break

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "transfers deadlocked"
    assert outcome["commits"] + outcome["aborts"] + outcome["errors"] == 4 * 60
    assert outcome["commits"] > 20 and outcome["errors"] > 0 and outcome["aborts"] > 0
    assert sum(store.get(key)["coins"] for key in keys) == 6000
    store.close()
    reader = make_store()
    assert sum(reader.peek(key)["coins"] for key in keys) == 6000


def test_opposite_order_transactions_never_deadlock(make_store: Any) -> None:
    """Opposite-order transactions, saves, updates and autosave over the same keys."""
    store = make_store(autosave_interval=0.05)
    for key in ("a", "b"):
        store.load(key)
    stop = time.monotonic() + 3
    counts = {"ab": 0, "ba": 0, "conflicts": 0, "saves": 0}

    def run(keys: list[str], slot: str) -> None:
        rng = random.Random(slot)
        while time.monotonic() < stop:
            try:
                assert store.tx(keys, _transfer_unchecked(keys[0], keys[1], 1))
                counts[slot] += 1
            except ss.TransactionConflictError:
                counts["conflicts"] += 1
            # A conflict is immediate (no waiting), so a thread looping without
            # a pause would always find the keys busy: pause like a real caller.
            time.sleep(rng.random() * 0.002)

    def churn() -> None:
        while time.monotonic() < stop:
            for key in ("a", "b"):
                store.update(key, lambda d: d.update(touched=d.get("touched", 0) + 1) or True)
                store.save(key)
                counts["saves"] += 1

    threads = [
        threading.Thread(target=run, args=(["a", "b"], "ab")),
        threading.Thread(target=run, args=(["b", "a"], "ba")),
        threading.Thread(target=churn),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "deadlock"
    assert counts["ab"] > 0 and counts["ba"] > 0 and counts["saves"] > 0
    expected = counts["ba"] - counts["ab"]
    assert store.get("a")["coins"] == expected
    assert store.get("a")["coins"] + store.get("b")["coins"] == 0
    store.save("a")
    store.save("b")
    assert store.peek("a")["coins"] + store.peek("b")["coins"] == 0


CHILD = textwrap.dedent(
    """
    import os, random, sys
    import sessionstore as ss

    dsn, schema, name, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    keys = ["p0", "p1", "p2", "p3"]
    store = ss.Store(name, {"coins": 0, "sent": {}, "received": {}}, dsn=dsn,
                     db_schema=schema, lock_duration=1.0, lock_refresh_interval=0.3,
                     lock_timeout=10.0, autosave_interval=60.0)
    for key in keys:
        store.load(key)
    rng = random.Random(seed)
    print("ready", flush=True)
    while True:
        src, dst = rng.sample(keys, 2)
        amount = rng.randrange(1, 20)
        def fn(docs, src=src, dst=dst, amount=amount):
            docs[src]["coins"] -= amount
            docs[dst]["coins"] += amount
            docs[src]["sent"][dst] = docs[src]["sent"].get(dst, 0) + 1
            docs[dst]["received"][src] = docs[dst]["received"].get(src, 0) + 1
            return True
        store.tx([src, dst], fn)
    """
)


def test_kill_9_during_transactions_leaves_each_transfer_whole(
    make_store: Any, sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> None:
    keys = ["p0", "p1", "p2", "p3"]
    rng = random.Random(99)
    for round_ in range(3):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                sessionstore_dsn,
                sessionstore_schema,
                store_name,
                str(rng.randrange(1 << 30)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3 + rng.random() * 0.7)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        # Recover: a new holder takes the keys once the dead holder's leases expire.
        store = make_store(template={"coins": 0, "sent": {}, "received": {}}, lock_timeout=10.0)
        for key in keys:
            store.load(key)
        docs = {key: store.get(key) for key in keys}
        assert sum(doc["coins"] for doc in docs.values()) == 0, f"round {round_}"
        transfers = 0
        for src in keys:
            for dst in keys:
                if src != dst:
                    sent = docs[src]["sent"].get(dst, 0)
                    assert sent == docs[dst]["received"].get(src, 0), (round_, src, dst)
                    transfers += sent
        assert transfers > 0
        store.close()
