"""update_offline over many saved keys, against (a) a raw batch job making the same change.

``update_offline(fn)`` pages through the store's saved keys and, per batch of
500, claims them, takes their leases (one statement), reads them (one),
runs ``fn`` on each, writes the changed ones fenced (one) and releases the
leases (one). The baseline is the batch job one writes with raw psycopg:
per 500 rows one transaction that reads them ``FOR UPDATE`` in key order,
changes them in Python with the same ``fn`` (orjson both ways) and writes
them back with one ``UPDATE .. FROM unnest``.
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import raw_table
from ._saved import check_coins, raw_rows, save_offline

BATCH = 500


def _raw_job(conn: psycopg.Connection[Any], table: str, count: int) -> None:
    """Every row of ``table``, 500 per transaction: read FOR UPDATE, bump, write back."""
    select = f"SELECT key, doc::text FROM {table} WHERE key > %s ORDER BY key LIMIT %s FOR UPDATE"
    update = (
        f"UPDATE {table} AS t SET doc = u.doc::jsonb "
        "FROM unnest(%b::text[], %b::text[]) AS u(key, doc) WHERE t.key = u.key"
    )
    after, done = "", 0
    while True:
        rows = conn.execute(select, (after, BATCH), prepare=True).fetchall()
        if not rows:
            conn.commit()
            break
        keys, documents = [], []
        for key, text in rows:
            document = orjson.loads(text)
            if bump(document):
                keys.append(key)
                documents.append(orjson.dumps(document).decode())
        done += conn.execute(update, (keys, documents), prepare=True).rowcount
        conn.commit()
        after = rows[-1][0]
    if done != count:
        raise AssertionError(f"offline: the raw job updated {done} of {count} rows")


def run(bench: Bench) -> list[Row]:
    count = bench.sizes.many
    document = player_profile(2048)
    store = bench.store(document)
    keys = [f"off{i:06d}" for i in range(count)]
    save_offline(store, keys)  # untimed: saved, and no process holds them
    table = raw_table(bench, "offline_docs", raw_rows(document, keys))
    jobs = [0]

    def offline() -> None:
        result = store.update_offline(bump, batch_size=BATCH)
        if result.updated != count or result.held or result.failed:
            raise AssertionError(
                f"offline: {result.updated} of {count} updated, {len(result.held)} held, "
                f"{len(result.failed)} failed"
            )
        jobs[0] += 1

    with bench.raw() as conn:
        row = compare(
            "offline",
            f"update_offline of {count:,} saved 2 KB docs, throughput",
            Case("sessionstore", offline, ops=count),
            Case("raw", lambda: _raw_job(conn, table, count), ops=count),
            # Every round rewrites every key: as few rounds as hotkey's.
            repeats=max(3, bench.sizes.repeats // 2),
            baseline_name=f"(a) psycopg, per {BATCH} rows one transaction: SELECT doc::text "
            f".. WHERE key > last ORDER BY key LIMIT {BATCH} FOR UPDATE, orjson loads, the "
            "same fn, orjson dumps, UPDATE .. FROM unnest(keys, docs) (binary array parameters), "
            "COMMIT",
            target=Target(">=", 0.3, "≥ 0.3x"),
            throughput=True,
            note=f"update_offline(bump): keys() pages, then per {BATCH} keys claim, lease "
            "INSERT, read, fn + schema check + encode, fenced versioned write, release; "
            "ops = keys; every key's count asserted",
        )
    check_coins(store, keys, 1000 + jobs[0], "offline")
    return [row]
