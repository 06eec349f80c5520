"""Citus: the layout, single-shard routing, 2PC across workers, tokens, a frozen holder.

These run only against a Citus coordinator (``-m citus`` with
``$SESSIONSTORE_TEST_DSN`` pointing at one: the "Citus" step of ``.ci/run``
builds a 3-node cluster); the rest of the suite runs there too, on the same
cluster. See docs/scaling.md#citus.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Sql, wait_until
from holder_child import Child

import sessionstore as ss

pytestmark = pytest.mark.citus

TABLES = ("locks", "records", "versions", "shards", "applied_requests", "messages", "audit")


@pytest.fixture(autouse=True)
def citus(sql: Sql) -> Iterator[None]:
    """These tests are about Citus: the test database must be a Citus coordinator."""
    assert sql.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'citus'") == 1, (
        "tests marked citus need $SESSIONSTORE_TEST_DSN on a Citus coordinator (.ci/run's step)"
    )
    yield


def set_coins(value: int) -> Callable[[dict[str, Any]], bool]:
    def change(data: dict[str, Any]) -> bool:
        data["coins"] = value
        return True

    return change


def _counters(sql: Sql) -> tuple[int, int]:
    """Citus' executions on this database so far: (single-shard, multi-shard)."""
    row = sql.rows(
        "SELECT query_execution_single_shard AS one, query_execution_multi_shard AS many "
        "FROM citus_stat_counters WHERE name = current_database()"
    )[0]
    return int(row.one), int(row.many)


def _executions(sql: Sql, action: Callable[[], Any]) -> tuple[int, int]:
    before = _counters(sql)
    action()
    after = _counters(sql)
    return after[0] - before[0], after[1] - before[1]


def _worker_of(sql: Sql, key: str) -> int:
    """The port of the worker holding ``key``'s shard of ``locks`` (and of every table)."""
    return int(
        sql.scalar(
            "SELECT nodeport FROM citus_shards WHERE table_name = CAST(:t AS regclass) "
            "AND shardid = get_shard_id_for_distribution_column("
            "CAST(:t AS regclass), CAST(:key AS text))",
            t=f"{sql.schema}.locks",
            key=key,
        )
    )


def _keys_on_two_workers(sql: Sql) -> tuple[str, str]:
    seen: dict[int, str] = {}
    for n in range(200):
        key = f"player-{n}"
        seen.setdefault(_worker_of(sql, key), key)
        if len(seen) == 2:
            first, second = sorted(seen.values())
            return first, second
    raise AssertionError("all keys landed on one worker: is this a cluster of two workers?")


def test_tables_are_distributed_by_key_and_co_located(sql: Sql) -> None:
    rows = sql.rows(
        "SELECT CAST(logicalrelid AS text) AS name, colocationid, "
        "column_to_column_name(logicalrelid, partkey) AS column "
        "FROM pg_dist_partition WHERE CAST(logicalrelid AS text) LIKE :prefix",
        prefix=f"{sql.schema}.%",
    )
    assert sorted(row.name for row in rows) == sorted(f"{sql.schema}.{t}" for t in TABLES)
    assert {row.column for row in rows} == {"key"}
    assert len({row.colocationid for row in rows}) == 1
    # The write is delegated to the key's worker: distributed by its key argument.
    (write,) = sql.rows(
        "SELECT d.distribution_argument_index AS arg, d.colocationid FROM pg_dist_object d "
        "JOIN pg_proc p ON p.oid = d.objid WHERE d.classid = CAST('pg_proc' AS regclass) "
        "AND p.pronamespace = CAST(:schema AS regnamespace) AND p.proname = 'write_version'",
        schema=sql.schema,
    )
    assert write.arg == 2 and write.colocationid == rows[0].colocationid


def test_single_key_statements_touch_one_shard(
    make_store: Callable[..., ss.Store], sql: Sql
) -> None:
    store = make_store(lock_refresh_interval=60.0, lock_duration=120.0)
    store.load("k")
    for coins in (1, 2, 3):
        assert store.update("k", set_coins(coins))
        assert _executions(sql, lambda: store.save("k")) == (1, 0)
    assert _executions(sql, lambda: store.peek("k")) == (1, 0)
    assert _executions(sql, lambda: store.update("k", set_coins(4), durable=True)) == (1, 0)
    store.unload("k")
    one, many = _executions(sql, lambda: store.load("k"))
    assert many == 0 and one >= 1
    assert store.get("k")["coins"] == 4


def test_tx_across_two_workers_is_atomic(make_store: Callable[..., ss.Store], sql: Sql) -> None:
    first, second = _keys_on_two_workers(sql)
    assert _worker_of(sql, first) != _worker_of(sql, second)
    store = make_store()
    store.load_many([first, second])
    store.tx([first, second], lambda d: d[first].update(coins=10) or True)

    def move(docs: dict[str, Any]) -> bool:
        docs[first]["coins"] -= 3
        docs[second]["coins"] += 3
        return True

    assert store.tx([first, second], move)
    assert store.peek(first)["coins"] == 7 and store.peek(second)["coins"] == 3
    # One lease gone on one worker: neither worker's key is written.
    before = {k: len(store.list_versions(k)) for k in (first, second)}
    sql.steal(second)
    with pytest.raises(ss.LockLostError):
        store.tx([first, second], move)
    assert {k: len(store.list_versions(k)) for k in (first, second)} == before
    assert store.peek(first)["coins"] == 7


def test_tokens_strictly_increase_across_workers(
    make_store: Callable[..., ss.Store], sql: Sql
) -> None:
    first, second = _keys_on_two_workers(sql)
    store = make_store()
    tokens = []
    for _ in range(3):
        for key in (first, second):
            store.load(key)
            tokens.append(sql.lease(key).token)
            store.unload(key)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_a_frozen_holder_never_blocks_a_takeover_past_its_lease_and_the_grace(
    spawn: Callable[..., Child], make_store: Callable[..., ss.Store], sql: Sql
) -> None:
    """A holder frozen (SIGSTOP) during saves holds no lease row lock: once its
    lease expires the key is taken within takeover_grace + 1 s, every time."""
    grace = 0.5
    for round_ in range(4):
        key = f"frozen-{round_}"
        holder = spawn(lock_duration=2.0, lock_refresh_interval=0.5, takeover_grace=grace)
        holder.ok("load", key=key)
        holder.ok("set", key=key, coins=round_ + 1)
        holder.ok("save", key=key)
        holder.ok("set", key=key, coins=100)
        holder.send("save", key=key)  # in flight, or done, or not begun when it stops
        time.sleep(0.01 * round_)
        os.kill(holder.proc.pid, signal.SIGSTOP)
        try:
            left = float(
                sql.scalar(
                    "SELECT extract(epoch FROM expires_at - clock_timestamp()) "
                    "FROM {s}.locks WHERE store = :store AND key = :key",
                    key=key,
                )
            )
            other = make_store(lock_timeout=30.0, takeover_grace=grace)
            started = time.monotonic()
            other.load(key)
            took = time.monotonic() - started
            assert took <= max(left, 0.0) + grace + 1.0, (round_, took, left)
            assert other.get(key)["coins"] in (round_ + 1, 100)
            other.unload(key)
        finally:
            os.kill(holder.proc.pid, signal.SIGCONT)
        holder.receive()  # the save sent before the freeze: written, or fenced
        # Resumed, the old holder learns it lost the key (heartbeat or fence).
        wait_until(lambda h=holder, k=key: k in h.ok("lost"), 10.0, f"on_lock_lost of {key}")


def test_peek_and_keys_see_every_worker(make_store: Callable[..., ss.Store], sql: Sql) -> None:
    first, second = _keys_on_two_workers(sql)
    store = make_store()
    for n, key in enumerate((first, second)):
        store.load(key)
        store.update(key, set_coins(n + 5))
        store.unload(key)
    assert sorted(store.keys()) == sorted([first, second])
    assert [store.peek(k)["coins"] for k in (first, second)] == [5, 6]
