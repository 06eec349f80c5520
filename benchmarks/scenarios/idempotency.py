"""Idempotency keys: what an id costs an in-memory update, and a save, at full retention.

``update(key, fn, idempotency_key=id)`` records the id with the change; the
save writes it into ``applied_requests`` with the version, and keeps the newest
``idempotency_retention`` (1,000) per key, pruning the older ones in the same
statement every so often (amortised: once ~1/8 of the retention is over).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import sessionstore as ss

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case

RETAINED = 1_000
PRUNE_PERIOD = RETAINED // 8
"""Saves between two prunes of a key's ids: a write drops the oldest once the key holds
1/8 more than the retention (``Session.pending_write``). A full run's sample is one period."""


def _ids(prefix: str, count: int) -> Iterator[str]:
    """Unique ids, made before the timed region."""
    return iter([f"{prefix}-{i:07d}" for i in range(count)])


def _update_row(bench: Bench, repeats: int) -> Row:
    store = bench.store(player_profile(2048))
    store.load("idem")
    store.load("plain")
    inner = bench.sizes.inner(5_000)
    ids = _ids("rcpt", inner * (repeats + 1))
    row = compare(
        "idempotency",
        "update with a new idempotency key, throughput",
        Case(
            "sessionstore",
            lambda: store.update("idem", bump, idempotency_key=next(ids)),
            inner=inner,
        ),
        Case("plain", lambda: store.update("plain", bump), inner=inner),
        repeats=repeats,
        baseline_name="store.update(key, fn) of the same Store without an id",
        target=Target(">=", 0.8, "≥ 0.8x"),
        throughput=True,
        note="both in memory (durable at the next save); ids unique, made untimed",
    )
    if store.update("idem", bump, idempotency_key="rcpt-0000000"):
        raise AssertionError("idempotency: a repeated id was applied again")
    store.close()
    return row


def _retained_count(bench: Bench, store: str, key: str) -> int:
    sql = f"SELECT count(*) FROM {bench.table('applied_requests')} WHERE store = %s AND key = %s"
    with bench.raw(autocommit=True) as conn:
        found: Any = conn.execute(sql, (store, key)).fetchone()
        return int(found[0])


def _fill(bench: Bench, store: ss.Store, key: str) -> int:
    """Apply ``RETAINED`` ids to ``key``, saving after each (a quick run: after every 10)."""
    per_save = 1 if bench.sizes.scale >= 1 else 10
    for i in range(RETAINED):
        store.update(key, bump, idempotency_key=f"old-{i:05d}")
        if (i + 1) % per_save == 0:
            store.save(key)
    return _retained_count(bench, store.name, key)


def _keys_without_ids(bench: Bench, store: ss.Store) -> list[str]:
    """Keys saved once, without ids: the baseline takes them in turn, so each keeps few."""
    keys = [f"fresh{i:04d}" for i in range(bench.sizes.inner(200))]
    bench.load_many(store, keys)
    for key in keys:
        store.update(key, bump)
        store.save(key)
    return keys


def _save_row(bench: Bench, repeats: int) -> Row:
    store = bench.store(player_profile(2048))
    store.load("retained")
    retained = _fill(bench, store, "retained")
    if retained != RETAINED:
        raise AssertionError(f"idempotency: {retained} ids stored, expected {RETAINED}")
    fresh = _keys_without_ids(bench, store)
    inner = bench.sizes.inner(PRUNE_PERIOD)
    ids = _ids("new", 2 * inner * (repeats + 1))
    fresh_keys = itertools.cycle(fresh)

    def update_save(key: str) -> None:
        store.update(key, bump, idempotency_key=next(ids))
        store.save(key)

    row = compare(
        "idempotency",
        f"save of a key with {RETAINED:,} retained ids",
        Case("sessionstore", lambda: update_save("retained"), inner=inner),
        Case("no ids", lambda: update_save(next(fresh_keys)), inner=inner),
        repeats=repeats,
        baseline_name="the same update + save (with a new id) of keys without ids before; "
        f"{len(fresh)} keys in turn, each ending with at most "
        f"{math.ceil(inner * (repeats + 1) / len(fresh))}",
        target=Target("<=", 1.2, "≤ 1.2x"),
    )
    stored = _retained_count(bench, store.name, "retained")
    row.extra["retained_ids_at_end"] = stored
    row.note = (
        f"update(key, fn, idempotency_key=new id) + save(key), {inner} per sample; every "
        f"{PRUNE_PERIOD}th save also drops the ids beyond the newest {RETAINED:,} "
        f"({stored:,} stored at the end)"
    )
    store.close()
    return row


def run(bench: Bench) -> list[Row]:
    # Each round's gc.collect() alone takes ~0.1 s: few rounds with --quick, and for
    # the row that writes as few as hotkey's.
    repeats = 3 if bench.sizes.scale < 1 else bench.sizes.repeats
    costly = max(3, bench.sizes.repeats // 2)
    return [_update_row(bench, repeats), _save_row(bench, costly)]
