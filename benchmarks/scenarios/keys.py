"""keys(): iterate every saved key in constant memory, against (a) a server-side cursor.

``store.keys()`` reads keyset pages of 1,000 keys (``key > last ORDER BY key
LIMIT 1000``, one short statement each, no connection held between pages).
The baseline is a psycopg named (server-side) cursor fetching 1,000 rows at
a time over the same ``records`` rows in one transaction. The records are
made by one raw ``INSERT .. SELECT generate_series`` (keys() reads nothing else).
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import psycopg

import sessionstore as ss

from ..context import Bench
from ..results import Figure, Row, Target, compare
from ..timing import Case

PAGE = 1000
MEMORY_LIMIT = 5 << 20
"""Peak traced memory allowed while iterating (bytes): a few pages, whatever the count."""


def _records(bench: Bench, count: int) -> ss.Store:
    """A Store whose ``count`` saved keys exist as ``records`` rows only."""
    store = bench.store({})
    with bench.raw() as conn:
        conn.execute(
            f"INSERT INTO {bench.table('records')} (store, key) "
            "SELECT %s, 'key' || lpad(g::text, 7, '0') FROM generate_series(1, %s) AS g",
            (store.name, count),
        )
        conn.commit()
        conn.execute(f"ANALYZE {bench.table('records')}")
        conn.commit()
    return store


def _counted(store: ss.Store, count: int) -> None:
    listed = store.keys()  # an iterator of pages, not a dict's view
    found = sum(1 for _ in listed)
    if found != count:
        raise AssertionError(f"keys: {found} of {count} keys listed")


def _cursor(conn: psycopg.Connection[Any], sql: str, name: str, count: int) -> None:
    with conn.cursor(name="bench_keys") as cursor:
        cursor.itersize = PAGE
        cursor.execute(sql, (name,))
        found = sum(1 for _ in cursor)
    conn.commit()
    if found != count:
        raise AssertionError(f"keys: the raw cursor listed {found} of {count} keys")


def _peak(store: ss.Store, count: int) -> int:
    """The most Python heap (tracemalloc) iterating every key held at once."""
    _counted(store, count)  # warm: pool, compiled statement, prepared plan
    gc.collect()
    tracemalloc.start()
    try:
        _counted(store, count)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _memory_row(many: ss.Store, count: int, few: ss.Store, few_count: int) -> Row:
    peak, few_peak = _peak(many, count), _peak(few, few_count)
    ratio = peak / few_peak
    return Row(
        "keys",
        f"peak memory iterating {count:,} keys",
        Figure.exact(peak, "B"),
        Figure.exact(few_peak, "B"),
        f"the same iteration over {few_count:,} keys",
        Figure.exact(ratio, "x"),
        Target("<=", 1.5, f"≤ 1.5x, < {MEMORY_LIMIT >> 20} MiB"),
        note="tracemalloc peak (Python heap) over the whole iteration, after a warm-up pass",
        passed=ratio <= 1.5 and peak < MEMORY_LIMIT,
    )


def run(bench: Bench) -> list[Row]:
    count = bench.sizes.many * 10
    few_count = max(count // 10, 2 * PAGE)
    many, few = _records(bench, count), _records(bench, few_count)
    sql = f"SELECT key FROM {bench.table('records')} WHERE store = %s ORDER BY key"
    with bench.raw() as conn:
        row = compare(
            "keys",
            f"iterate {count:,} keys, throughput",
            Case("sessionstore", lambda: _counted(many, count), ops=count),
            Case("raw", lambda: _cursor(conn, sql, many.name, count), ops=count),
            # Each round's gc.collect() alone takes ~0.1 s: few rounds with --quick.
            repeats=3 if bench.sizes.scale < 1 else bench.sizes.repeats,
            baseline_name=f"(a) psycopg named cursor, itersize {PAGE:,}: SELECT key FROM "
            "records WHERE store = %s ORDER BY key, one transaction",
            target=Target(">=", 0.5, "≥ 0.5x"),
            throughput=True,
            note=f"keys(): keyset pages of {PAGE:,} (key > last ORDER BY key LIMIT {PAGE:,}); "
            "ops = keys; the count is asserted",
        )
    return [row, _memory_row(many, count, few, few_count)]
