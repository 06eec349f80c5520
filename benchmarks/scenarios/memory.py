"""Many loaded sessions: threads do not grow with sessions; memory per session is bounded.

Memory is traced with tracemalloc while a Store loads N sessions of a 1 KB and
of an 8 KB document; bytes per session ``= slope x JSON size + constant`` is
fitted through the two points, for three states: just loaded, after a
``get`` of every key (the frozen view exists), after an ``update`` of every
key (the private decoded copy exists too).
"""

from __future__ import annotations

import gc
import tracemalloc
from functools import partial
from typing import Any

from ..context import Bench
from ..documents import bump, json_size, player_profile
from ..results import Figure, Row, Target

CONSTANT_LIMIT = 4096
SMALL, LARGE = 1024, 8192


def _threads(bench: Bench) -> Row:
    return threads_row(bench, bench.many_store(), bench.sizes.many)


def threads_row(bench: Bench, store: Any, count: int) -> Row:
    """Threads of ``store`` (holding ``count`` keys) against the same code holding 100."""
    few_store = bench.store(player_profile(2048))
    bench.load_many(few_store, (f"t{i}" for i in range(100)))
    few = bench.threads_of(few_store)
    few_store.close()
    many = bench.threads_of(store)
    return Row(
        "sessions",
        f"threads of a Store, {count:,} vs 100 keys",
        Figure.exact(len(many), "threads"),
        Figure.exact(len(few), "threads"),
        "the same Store code holding 100 keys",
        Figure.exact(len(many) / len(few) if few else float("inf"), "x"),
        Target("<=", 1.0, "equal"),
        note=f"threads named after the store: {', '.join(many)}",
        passed=len(many) == len(few),
    )


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _seed(bench: Bench, name: str, document: dict[str, Any], keys: list[str]) -> None:
    """Save a distinct document under every key, as an earlier process would have."""
    store = bench.store(document, name=name)
    bench.load_many(store, keys)
    for number, key in enumerate(keys):
        store.update(key, partial(_number, number))
    store.close()


def _number(number: int, document: dict[str, Any]) -> bool:
    document["user_id"] = number
    return True


def _per_session(bench: Bench, size: int) -> tuple[int, dict[str, float]]:
    """(document JSON size, bytes per session in each state), loading saved documents."""
    document = player_profile(size)
    keys = [f"m{i}" for i in range(bench.sizes.memory_sessions)]
    name = bench.fresh_name()
    _seed(bench, name, document, keys)
    tracemalloc.start()
    try:
        store = bench.store(document, name=name)
        for key in ("warm0", "warm1", "warm2"):  # pools, caches, compiled SQL: not per session
            store.load(key)
            store.get(key)
            store.update(key, bump)
        base = _traced()
        bench.load_many(store, keys)
        found = {"loaded": (_traced() - base) / len(keys)}
        for key in keys:
            store.get(key)
        found["+get"] = (_traced() - base) / len(keys)
        for key in keys:
            store.update(key, bump)
        found["+get+update"] = (_traced() - base) / len(keys)
        store.close()
    finally:
        tracemalloc.stop()
    return json_size(document), found


def _memory(bench: Bench) -> list[Row]:
    small_json, small = _per_session(bench, SMALL)
    large_json, large = _per_session(bench, LARGE)
    rows = []
    for state in small:
        slope = (large[state] - small[state]) / (large_json - small_json)
        constant = small[state] - slope * small_json
        rows.append(
            Row(
                "sessions",
                f"memory/session {state}: slope {slope:.2f}x, const {constant:,.0f} B",
                Figure.exact(large[state], "B"),
                Figure.exact(large_json, "B"),
                f"the document's JSON size ({large_json:,} B; at {small_json:,} B: "
                f"{small[state]:,.0f} B/session)",
                Figure.exact(slope, "x"),
                Target("<=", 3.0, f"slope ≤ 3x, const ≤ {CONSTANT_LIMIT // 1024} KiB"),
                note=f"tracemalloc, {bench.sizes.memory_sessions:,} sessions per size, "
                "documents loaded from the database",
                extra={
                    "slope": slope,
                    "constant": constant,
                    "small": small[state],
                    "large": large[state],
                },
                passed=slope <= 3.0 and constant <= CONSTANT_LIMIT,
            )
        )
    return rows


def run(bench: Bench) -> list[Row]:
    return [_threads(bench), *_memory(bench)]
