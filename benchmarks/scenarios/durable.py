"""Durable updates: 16 threads sharing group commits against (b); one thread against (a).

``update(key, fn, durable=True)`` returns once a fenced write containing the
change committed. From many threads the writes are shared: while one is in
flight the others queue, and the next write carries them all. The batch sizes
reached are reported with the row (``GroupCommit.batch_sizes``).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

import sessionstore as ss
from sessionstore import db

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import RAW_UPSERT, orm_change, raw_dirty_upsert_case

THREADS = 16


def _bump_all(found: dict[str, Any]) -> None:
    for document in found.values():
        bump(document)


def _in_threads(work: Callable[[int], object], per_thread: int, done: list[int]) -> None:
    """``work(thread)`` ``per_thread`` times on each of 16 threads; ``done[thread]`` counts."""
    errors: list[BaseException] = []

    def loop(thread: int) -> None:
        try:
            for _ in range(per_thread):
                work(thread)
                done[thread] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _own_keys(keys: list[str]) -> list[Iterator[str]]:
    """Thread i cycles through keys i, i + 16, i + 32, ...: no two threads share a key."""
    return [itertools.cycle(keys[i::THREADS]) for i in range(THREADS)]


def _batches(counts: Counter[int]) -> dict[str, Any]:
    """Writes, mean and max keys per write, and the histogram (size -> writes)."""
    writes = sum(counts.values())
    updates = sum(size * n for size, n in counts.items())
    return {
        "writes": writes,
        "mean": updates / writes if writes else 0.0,
        "max": max(counts, default=0),
        "histogram": {str(size): counts[size] for size in sorted(counts)},
    }


def _check(store: ss.Store, keys: list[str], before: int, done: int) -> None:
    """Every durable update is counted in memory, and every key is saved."""
    coins = sum(int(store.get(key)["coins"]) for key in keys)
    if coins != before + done:
        raise AssertionError(f"durable: {before + done - coins} updates lost")
    unsaved = [key for key in keys if not store.is_saved(key)]
    if unsaved:
        raise AssertionError(f"durable: {len(unsaved)} keys not saved after durable updates")


def _orm_total(bench: Bench, keys: list[str]) -> int:
    docs = bench.docs
    total = sa.select(sa.func.sum(docs.c.doc["coins"].as_integer())).where(docs.c.key.in_(keys))
    with bench.engine.connect() as conn:
        return int(conn.execute(total).scalar_one())


def _compare_threads(
    bench: Bench, store: ss.Store, keys: list[str], done: tuple[list[int], list[int]]
) -> Row:
    """16 threads of durable updates against 16 threads of (b), on their own keys."""
    engine = sa.create_engine(db.resolve_url(bench.dsn), pool_size=THREADS)
    try:
        orm = {key: orm_change(bench, [key], _bump_all, engine) for key in keys}
        ours_keys, orm_keys = _own_keys(keys), _own_keys(keys)
        ours_n = bench.sizes.inner(40)
        orm_n = max(2, ours_n // 6)
        return compare(
            "durable",
            f"{THREADS} threads over {len(keys):,} keys, each durable on return",
            Case(
                "sessionstore",
                lambda: _in_threads(
                    lambda t: store.update(next(ours_keys[t]), bump, durable=True),
                    ours_n,
                    done[0],
                ),
                ops=THREADS * ours_n,
            ),
            Case(
                "orm",
                lambda: _in_threads(lambda t: orm[next(orm_keys[t])](), orm_n, done[1]),
                ops=THREADS * orm_n,
            ),
            repeats=max(3, bench.sizes.repeats // 2),  # as hotkey: every round is costly
            baseline_name=f"(b) the same {THREADS} threads, each change a SQLAlchemy "
            f"engine.begin(): SELECT doc FOR UPDATE, UPDATE, COMMIT (a pool of {THREADS})",
            target=Target(">=", 5.0, "≥ 5x"),
            throughput=True,
        )
    finally:
        engine.dispose()


def _threads_row(bench: Bench) -> Row:
    document = player_profile(2048)
    keys = [f"dur{i:05d}" for i in range(bench.sizes.inner(1_000))]
    store = bench.store(document)
    bench.load_many(store, keys)
    bench.put_docs(dict.fromkeys(keys, document))
    stats = store._open_core().group_commit.batch_sizes
    before = Counter(stats)
    done = ([0] * THREADS, [0] * THREADS)
    row = _compare_threads(bench, store, keys, done)
    start = int(document["coins"]) * len(keys)
    _check(store, keys, start, sum(done[0]))
    if _orm_total(bench, keys) != start + sum(done[1]):
        raise AssertionError("durable: the baseline lost updates")
    batches = _batches(stats - before)
    row.extra["group_commit_batches"] = batches
    row.note = (
        f"group commit: {batches['writes']:,} writes, mean batch {batches['mean']:.1f}, "
        f"max {batches['max']} keys (all rounds); counts and saved state asserted"
    )
    store.close()  # releases the leases in bulk
    return row


def _one_thread_row(bench: Bench) -> Row:
    document = player_profile(2048)
    store = bench.store(document)
    store.load("solo")
    with bench.raw(autocommit=True) as conn:
        inner = bench.sizes.inner(100)
        row = compare(
            "durable",
            "update, 1 thread",
            Case(
                "sessionstore",
                lambda: store.update("solo", bump, durable=True),
                inner=inner,
            ),
            raw_dirty_upsert_case(bench, conn, "solo", document, inner),
            # Every round's gc.collect() alone takes ~0.1 s: few rounds with --quick.
            repeats=3 if bench.sizes.scale < 1 else bench.sizes.repeats,
            baseline_name=f"{RAW_UPSERT} (INSERT .. ON CONFLICT DO UPDATE, the JSON as %b)",
            target=Target("<=", 1.5, "≤ 1.5x"),
            note="times the change, its encoding and its write; the baseline serialises "
            "outside its timed region",
        )
    if not store.is_saved("solo"):
        raise AssertionError("durable: a durable update returned unsaved")
    store.unload("solo")
    return row


def run(bench: Bench) -> list[Row]:
    return [_threads_row(bench), _one_thread_row(bench)]
