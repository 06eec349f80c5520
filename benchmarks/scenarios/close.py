"""close() with many dirty sessions, against (a) one raw batched upsert (COPY + INSERT)."""

from __future__ import annotations

import orjson

import sessionstore as ss

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case


def run(bench: Bench) -> list[Row]:
    many = bench.sizes.many
    document = player_profile(2048)
    keys = [f"c{i:06d}" for i in range(many)]
    current: list[ss.Store] = []

    def loaded_and_dirty() -> None:  # untimed: a fresh Store holding every key, all dirty
        store = bench.store(document)
        bench.load_many(store, keys)
        for key in keys:
            store.update(key, bump)
        current[:] = [store]

    rows = [(key, orjson.dumps({**document, "coins": i}).decode()) for i, key in enumerate(keys)]
    with bench.raw() as conn:
        conn.execute("CREATE TEMP TABLE incoming (key text, doc text) ON COMMIT DELETE ROWS")
        conn.commit()

        def raw_batch() -> None:
            with conn.cursor() as cursor:
                with cursor.copy("COPY incoming (key, doc) FROM STDIN") as copy:
                    for item in rows:
                        copy.write_row(item)
                cursor.execute(
                    f"INSERT INTO {bench.table('docs')} (key, doc) "
                    "SELECT key, doc::jsonb FROM incoming "
                    "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
                )
            conn.commit()

        return [
            compare(
                "close",
                f"{many:,} dirty sessions",
                Case("sessionstore", lambda: current[0].close(), prepare=loaded_and_dirty),
                Case("raw", raw_batch),
                repeats=bench.sizes.close_repeats,
                warmup=0,
                baseline_name=f"(a) psycopg COPY of {many:,} 2 KB docs into a temp table + "
                "INSERT .. ON CONFLICT DO UPDATE, one transaction",
                target=Target("<=", 3.0, "≤ 3x"),
                note="close = versioned saves in batches + lease release + thread/pool shutdown",
            )
        ]
