"""load + unload of a key never seen, against (a) one prepared autocommit upsert of a new row."""

from __future__ import annotations

import itertools

import orjson

from ..context import Bench
from ..documents import player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import RAW_UPSERT, raw_upsert


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    encoded = orjson.dumps(document)
    store = bench.store(document)
    ours_keys = (f"new{i}" for i in itertools.count())
    raw_keys = (f"load{i}" for i in itertools.count())

    def load_unload() -> None:
        key = next(ours_keys)
        store.load(key)
        store.unload(key)

    with bench.raw(autocommit=True) as conn:
        upsert = raw_upsert(bench, conn)
        inner = bench.sizes.inner(100)
        return [
            compare(
                "load+unload",
                "new key",
                Case("sessionstore", load_unload, inner=inner),
                Case("raw", lambda: upsert(next(raw_keys), encoded), inner=inner),
                repeats=bench.sizes.repeats,
                baseline_name=f"{RAW_UPSERT}, a new 2 KB row (INSERT .. ON CONFLICT DO "
                "UPDATE, the JSON as %b)",
                target=Target("<=", 3.0, "≤ 3x"),
                note="load: lease INSERT + version read; unload of an unchanged key: "
                "lease DELETE, no save",
            )
        ]
