"""First read of a large document: load + first ``get`` + one deep read, against ``orjson.loads``.

A saved document of 30 MB and of 100 MB (quick: 3 MB) is loaded by a Store,
read once with ``get`` and then one value deep inside it is read (an item in
the middle of the inventory list). The baseline is the parser alone:
``orjson.loads`` of the same JSON bytes, already in memory. The frozen view
is built lazily (docs/large-documents.md), so what is left beyond the parse
is the fetch, the zstd decompression and the containers on the path read.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..context import Bench
from ..documents import player_profile
from ..results import Row, Target, compare
from ..timing import Case

_TARGET = Target("<=", 2.0, "≤ 2x orjson.loads")


def run(bench: Bench) -> list[Row]:
    quick = bench.sizes.scale < 1
    sizes = (3 << 20,) if quick else (30 << 20, 100 << 20)
    return [_measure(bench, size) for size in sizes]


def _measure(bench: Bench, size: int) -> Row:
    document = player_profile(size)
    raw = orjson.dumps(document)
    middle = len(document["inventory"]) // 2
    store = bench.store({})
    store.load("big")
    store.update_immutable("big", lambda _: document)
    store.unload("big")

    loaded = [False]

    def unload() -> None:  # untimed, before each read
        if loaded[0]:
            store.unload("big")
            loaded[0] = False

    def first_read() -> Any:
        store.load("big")
        loaded[0] = True
        return store.get("big")["inventory"][middle]["qty"]

    row = compare(
        "large",
        f"first read {len(raw) / 1e6:,.0f} MB",
        Case("sessionstore", first_read, prepare=unload),
        Case("orjson", lambda: orjson.loads(raw)),
        repeats=3,
        baseline_name="orjson.loads of the same JSON bytes, in memory",
        target=_TARGET,
        note="load + first get + one read in the middle of the inventory list; unload untimed",
    )
    unload()
    store.close()
    return row
