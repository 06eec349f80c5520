"""save: write a dirty ~2 KB document, against (a) one raw upsert + commit."""

from __future__ import annotations

import orjson

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import raw_upsert


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    store.load("p1")
    with bench.raw() as conn:
        upsert = raw_upsert(bench, conn)
        pending = [orjson.dumps(document).decode()]

        def dirty_raw() -> None:  # the same change, serialised outside the timed region
            bump(document)
            pending[0] = orjson.dumps(document).decode()

        inner = bench.sizes.inner(200)
        row = compare(
            "save",
            "dirty 2 KB doc",
            Case(
                "sessionstore",
                lambda: store.save("p1"),
                prepare=lambda: store.update("p1", bump),
                inner=inner,
            ),
            Case("raw", lambda: upsert("p1", pending[0]), prepare=dirty_raw, inner=inner),
            repeats=bench.sizes.repeats,
            baseline_name="(a) psycopg INSERT .. ON CONFLICT DO UPDATE of a JSONB row + commit",
            target=Target("<=", 1.5, "≤ 1.5x"),
        )
    store.unload("p1")
    return [row]
