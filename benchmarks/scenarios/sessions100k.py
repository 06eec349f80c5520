"""100,000 sessions in one Store (issue 15): heartbeat, memory per session, threads.

One Store loads ``sizes.huge`` saved, distinct 2 KB documents (100,000; 5,000
with ``--quick``) with ``load_many``, a batch of 5,000 keys per call, while
tracemalloc counts the bytes each session adds (loaded, after a ``get`` of
every key, after an ``update`` of every key). Then, holding them all, one
renew of every lease is timed against (a) a raw UPDATE of the same rows, and
the Store's threads are counted against a Store holding 100 keys. The 10,000
rows of ``heartbeat`` and ``memory`` stay as they are.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence

import sessionstore as ss

from ..context import Bench
from ..documents import bump, json_size, player_profile
from ..results import Figure, Row, Target
from ._raw import chunks
from ._saved import save_offline
from .heartbeat import autocommit_engine, renew_row
from .memory import threads_row

SIZE = 2048
BATCH = 5_000
"""Keys per ``load_many`` call."""
SLOPE, CONSTANT = 3.0, 2048
"""The target: bytes per session at most ``SLOPE`` x its JSON size + ``CONSTANT``."""


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _load_traced(bench: Bench, name: str, keys: Sequence[str]) -> tuple[ss.Store, dict[str, float]]:
    """A Store of ``name`` holding ``keys``; bytes per session in each state (tracemalloc)."""
    tracemalloc.start()
    try:
        store = bench.store(player_profile(SIZE), name=name)
        for key in ("warm0", "warm1", "warm2"):  # pools, caches, compiled SQL: not per session
            store.load(key)
            store.get(key)
            store.update(key, bump)
            store.unload(key)
        base = _traced()
        for batch in chunks(keys, BATCH):
            store.load_many(batch)
        found = {"loaded": (_traced() - base) / len(keys)}
        for key in keys:
            store.get(key)
        found["+get"] = (_traced() - base) / len(keys)
        for key in keys:
            store.update(key, bump)
        found["+get+update"] = (_traced() - base) / len(keys)
    finally:
        tracemalloc.stop()
    return store, found


def _memory_rows(per_session: dict[str, float], size: int, count: int) -> list[Row]:
    """One row per state: bytes per session against ``SLOPE`` x JSON + ``CONSTANT``."""
    limit = SLOPE * size + CONSTANT
    return [
        Row(
            "sessions",
            f"memory/session {state}, {count:,} sessions",
            Figure.exact(value, "B"),
            Figure.exact(size, "B"),
            f"the document's JSON size ({size:,} B); limit {SLOPE:g}x + "
            f"{CONSTANT // 1024} KiB = {limit:,.0f} B",
            Figure.exact(value / size, "x"),
            Target("<=", SLOPE, f"≤ {SLOPE:g}x JSON + {CONSTANT // 1024} KiB"),
            note=f"tracemalloc, {count:,} distinct saved documents loaded by load_many "
            f"({BATCH:,} keys per call)",
            extra={"bytes_per_session": value, "limit": limit},
            passed=value <= limit,
        )
        for state, value in per_session.items()
    ]


def run(bench: Bench) -> list[Row]:
    count = bench.sizes.huge
    document = player_profile(SIZE)
    keys = [f"h{i:06d}" for i in range(count)]
    name = bench.fresh_name()
    seeder = bench.store(document, name=name)
    save_offline(seeder, keys)  # distinct saved documents, as an earlier process left them
    seeder.close()
    store, per_session = _load_traced(bench, name, keys)
    rows = _memory_rows(per_session, json_size(document), count)
    engine = autocommit_engine(bench)
    try:
        with engine.connect() as conn, bench.raw(autocommit=True) as raw:
            # Each sample renews all leases once; a round costs seconds at 100,000.
            renew = renew_row(bench, store, conn, raw, inner=1, repeats=5)
    finally:
        engine.dispose()
    rows.insert(0, renew)
    rows.append(threads_row(bench, store, count))
    store.close()
    return rows
