"""load_many / unload_many of many keys, against (a) the same batches as raw statements.

``load_many`` takes the leases of ``save_batch_size`` (500) keys per statement
and reads them per statement; ``unload_many`` writes the dirty keys' final
saves fenced, a batch per statement, and releases the leases a batch per
statement. The baselines send one raw statement per 500 keys: the lease
INSERT alone, or the documents' upsert alone.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid

import orjson

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import chunks
from ._saved import check_coins

BATCH = 500
"""The store's default ``save_batch_size``: keys per statement, for the baselines too."""


def _lease_sql(bench: Bench) -> str:
    """(a) take the free leases of a batch of keys (a new token each); the keys taken."""
    return (
        f"INSERT INTO {bench.table('locks')} (store, key, holder, token, acquired_at, "
        "expires_at, host, pid, liveness) "
        f"SELECT %s, k.key, %s, nextval('{bench.table('lease_tokens')}'), clock_timestamp(), "
        "clock_timestamp() + make_interval(secs => %s), %s, %s, true "
        "FROM unnest(%b::text[]) AS k(key) ORDER BY k.key "
        "ON CONFLICT (store, key) DO NOTHING RETURNING key, token"
    )


def _load_row(bench: Bench, repeats: int) -> Row:
    count = bench.sizes.many
    store = bench.store(player_profile(2048))
    rounds = itertools.count()
    ours: list[list[str]] = [[]]
    theirs: list[list[str]] = [[]]

    def fresh(prefix: str) -> list[str]:  # keys never seen: each round its own
        return [f"{prefix}{next(rounds):02d}-{i:06d}" for i in range(count)]

    def next_ours() -> None:  # untimed: unload the last round's keys, pick new ones
        if ours[0]:
            store.unload_many(ours[0])
        ours[0] = fresh("lm")

    def load() -> None:
        missing = store.load_many(ours[0])
        if missing:
            raise AssertionError(f"batch: load_many left {len(missing)} keys out")

    raw_store = bench.fresh_name()
    args = (raw_store, uuid.uuid4(), 3600.0, socket.gethostname(), os.getpid())
    with bench.raw(autocommit=True) as conn:
        sql = _lease_sql(bench)

        def next_raw() -> None:  # untimed: drop the last round's leases, pick new keys
            conn.execute(f"DELETE FROM {bench.table('locks')} WHERE store = %s", (raw_store,))
            theirs[0] = fresh("rl")

        def lease() -> None:
            taken = 0
            for batch in chunks(theirs[0], BATCH):
                taken += len(conn.execute(sql, (*args, list(batch)), prepare=True).fetchall())
            if taken != count:
                raise AssertionError(f"batch: the raw INSERT took {taken} of {count} leases")

        row = compare(
            "batch",
            f"load_many of {count:,} new keys",
            Case("sessionstore", load, prepare=next_ours),
            Case("raw", lease, prepare=next_raw),
            repeats=repeats,
            baseline_name=f"(a) psycopg INSERT INTO locks .. SELECT FROM unnest(keys) "
            f"ON CONFLICT DO NOTHING RETURNING key, token (a binary array parameter), one "
            f"autocommit statement per {BATCH} keys",
            target=Target("<=", 3.0, "≤ 3x"),
            note=f"load_many: per {BATCH} keys one lease INSERT and one read (versions, "
            "applied ids, waiting messages); the baseline has no read",
        )
    store.close()
    return row


def _unload_row(bench: Bench, repeats: int) -> Row:
    count = bench.sizes.many
    document = player_profile(2048)
    store = bench.store(document)
    keys = [f"um{i:06d}" for i in range(count)]
    unloads = [0]

    def loaded_and_dirty() -> None:  # untimed: every key loaded and changed in memory
        store.load_many(keys)
        for key in keys:
            store.update(key, bump)

    def unload() -> None:
        store.unload_many(keys)  # a key not saved raises BatchError
        unloads[0] += 1

    theirs = [f"ru{i:06d}" for i in range(count)]
    pending: list[list[str]] = [[]]

    def dirty_raw() -> None:  # the same change, serialised outside the timed region
        bump(document)
        pending[0] = [orjson.dumps({**document, "user_id": i}).decode() for i in range(count)]

    with bench.raw(autocommit=True) as conn:
        sql = (
            f"INSERT INTO {bench.table('docs')} (key, doc) "
            "SELECT u.key, u.doc::jsonb FROM unnest(%b::text[], %b::text[]) AS u(key, doc) "
            "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
        )

        def upsert() -> None:  # %b: binary arrays, no quoting of the JSON
            for names, docs in zip(chunks(theirs, BATCH), chunks(pending[0], BATCH), strict=True):
                conn.execute(sql, (list(names), list(docs)), prepare=True)

        row = compare(
            "batch",
            f"unload_many of {count:,} dirty keys",
            Case("sessionstore", unload, prepare=loaded_and_dirty),
            Case("raw", upsert, prepare=dirty_raw),
            repeats=repeats,
            baseline_name=f"(a) psycopg INSERT INTO docs .. SELECT FROM unnest(keys, docs) "
            f"ON CONFLICT DO UPDATE of the 2 KB JSONB rows (binary array parameters), one "
            f"autocommit statement per {BATCH} keys",
            target=Target("<=", 3.0, "≤ 3x"),
            note=f"unload_many: per {BATCH} keys one fenced versioned write and one lease "
            "release; loading and dirtying are untimed; every key's saved count asserted",
        )
    check_coins(store, keys, 1000 + unloads[0], "unload_many")
    return row


def run(bench: Bench) -> list[Row]:
    # Every round moves every key through the database: as few rounds as hotkey's.
    repeats = max(3, bench.sizes.repeats // 2)
    return [_load_row(bench, repeats), _unload_row(bench, repeats)]
