"""load + unload of a key never seen, against (a) one raw upsert + commit of a new row."""

from __future__ import annotations

import itertools

import orjson

from ..context import Bench
from ..documents import player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import raw_upsert


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    encoded = orjson.dumps(document).decode()
    store = bench.store(document)
    ours_keys = (f"new{i}" for i in itertools.count())
    raw_keys = (f"load{i}" for i in itertools.count())

    def load_unload() -> None:
        key = next(ours_keys)
        store.load(key)
        store.unload(key)

    with bench.raw() as conn:
        upsert = raw_upsert(bench, conn)
        inner = bench.sizes.inner(100)
        return [
            compare(
                "load+unload",
                "new key",
                Case("sessionstore", load_unload, inner=inner),
                Case("raw", lambda: upsert(next(raw_keys), encoded), inner=inner),
                repeats=bench.sizes.repeats,
                baseline_name="(a) psycopg upsert of a new 2 KB JSONB row + commit",
                target=Target("<=", 4.0, "≤ 4x"),
                note="load: lease INSERT + version read; unload of an unchanged key: "
                "lease DELETE, no save",
            )
        ]
