"""Large documents (issue 5): save and load MB/s against plain zstd and a raw bytea row.

For each size the same JSON bytes are (1) saved / loaded by sessionstore,
(2) compressed / decompressed by plain ``zstandard`` with the store's
settings, and (3) inserted / selected as one compressed ``bytea`` row by raw
psycopg. The target is at least half the throughput of the slower of (2)
and (3): the library must be bound by zstd and the socket, not by Python.
Throughput is MB of raw JSON per second.

One more row (issue 15) is a latency: ``load`` of a saved 1 KiB document
against a raw select of its row by primary key (autocommit, prepared).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson
import zstandard

from ..context import Bench
from ..documents import player_profile
from ..results import Figure, Row, Target, compare
from ..timing import Case, Spread, interleave, paired

_TARGET = Target(">=", 0.5, "≥ 0.5x slower of zstd, raw")
_THREADED = 8 * 1024 * 1024  # the store's threaded_compression_threshold


def _row(
    scenario: str,
    label: str,
    megabytes: float,
    spreads: list[Spread],
    names: str,
    target: Target | None,
) -> Row:
    ours, zstd_t, raw_t = spreads
    rate = [s.map(lambda t: megabytes / t) for s in spreads]
    ratio = Spread.of(
        [
            (megabytes / a) / min(megabytes / b, megabytes / c)
            for a, b, c in zip(ours.samples, zstd_t.samples, raw_t.samples, strict=True)
        ]
    )
    return Row(
        scenario,
        label,
        Figure.of(rate[0], "MB/s"),
        Figure.of(rate[1] if rate[1].median < rate[2].median else rate[2], "MB/s"),
        names + f" (zstd {rate[1].median:.0f} MB/s, raw {rate[2].median:.0f} MB/s)",
        Figure.of(ratio, "x"),
        target,
    )


def run(bench: Bench) -> list[Row]:
    quick = bench.sizes.scale < 1
    sizes = (1024, 1 << 20, 10 << 20) if quick else (1024, 1 << 20, 100 << 20)
    # The target is about large documents: at 1 KiB and 1 MB a save or load is
    # a round trip and a lease check, which plain zstd and one bytea row skip.
    rows = [
        row
        for size in sizes
        for row in _measure(bench, size, _TARGET if size == sizes[-1] else None)
    ]
    return [*rows, _load_saved(bench)]


def _load_saved(bench: Bench) -> Row:
    """``load`` of a saved 1 KiB document (its unload untimed) against a raw select of its row.

    The raw row holds the same JSON bytes in ``docs_bytea``; the select is one
    prepared statement on an autocommit connection, its result in binary.
    """
    document = player_profile(1024)
    raw = orjson.dumps(document)
    store = bench.store({})
    store.load("small")
    store.update_immutable("small", lambda _: document)
    store.save("small")  # stays loaded: the first prepare unloads it
    select = f"SELECT doc FROM {bench.table('docs_bytea')} WHERE key = %s"
    with bench.raw(autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {bench.table('docs_bytea')} (key, doc) VALUES (%s, %b)", ("small", raw)
        )

        def raw_select() -> None:
            found = conn.execute(select, ("small",), prepare=True, binary=True).fetchone()
            if found is None or len(found[0]) != len(raw):
                raise AssertionError("raw select: the row is missing")

        inner = bench.sizes.inner(200)
        row = compare(
            "large",
            f"load of a saved {len(raw) / 1024:,.0f} KiB doc",
            Case(
                "sessionstore",
                lambda: store.load("small"),
                prepare=lambda: store.unload("small"),
                inner=inner,
            ),
            Case("raw", raw_select, inner=inner),
            repeats=bench.sizes.repeats,
            baseline_name="(a) psycopg autocommit prepared SELECT doc of the same JSON bytes "
            "(a bytea row) by primary key, binary result",
            target=Target("<=", 3.0, "≤ 3x"),
            note="times load only (the lease and the version read; the JSON is parsed by "
            "the first get, not here); the unload before each load is untimed",
        )
    if store.get("small") != document:
        raise AssertionError("load of a saved document: wrong data")
    store.close()
    return row


def _measure(bench: Bench, size: int, target: Target | None) -> list[Row]:
    rows: list[Row] = []
    document = player_profile(size)
    raw = orjson.dumps(document)
    megabytes = len(raw) / 1e6
    label = f"{len(raw) / 1024:,.0f} KiB" if size < (1 << 20) else f"{megabytes:,.0f} MB"
    threads = -1 if len(raw) >= _THREADED else 0
    compressor = zstandard.ZstdCompressor(level=3, threads=threads)
    decompressor = zstandard.ZstdDecompressor()
    compressed = compressor.compress(raw)
    store = bench.store({})
    store.load("big")
    store.update_immutable("big", lambda _: document)
    inner = 1 if size >= (1 << 20) else bench.sizes.inner(200)
    repeats = 3 if size >= (10 << 20) else bench.sizes.repeats
    with bench.raw(autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE blob (k int PRIMARY KEY, b bytea)")
        conn.execute("ALTER TABLE blob ALTER COLUMN b SET STORAGE EXTERNAL")

        def raw_insert() -> None:
            conn.execute("DELETE FROM blob")
            conn.execute("INSERT INTO blob VALUES (1, %b)", (compressed,))

        def dirty() -> None:
            # A change of a few bytes: the save writes the whole document.
            store.update("big", lambda d: d.update(rev=d.get("rev", 0) + 1) or True)

        saves = interleave(
            [
                Case("sessionstore", lambda: store.save("big"), prepare=dirty, inner=inner),
                Case("zstd", lambda: compressor.compress(raw), inner=inner),
                Case("raw", raw_insert, inner=inner),
            ],
            repeats=repeats,
        )
        rows.append(
            _row(
                "large",
                f"save {label}",
                megabytes,
                saves,
                "slower of zstd compress, raw INSERT of the compressed bytea",
                target,
            )
        )
        store.unload("big")
        raw_insert()

        def load_unload() -> None:
            store.load("big")
            store.unload("big")

        loads = interleave(
            [
                Case("sessionstore", load_unload, inner=inner),
                Case("zstd", lambda: decompressor.decompress(compressed), inner=inner),
                Case(
                    "raw",
                    lambda: conn.execute("SELECT b FROM blob", binary=True).fetchone(),
                    inner=inner,
                ),
            ],
            repeats=repeats,
        )
        rows.append(
            _row(
                "large",
                f"load {label}",
                megabytes,
                loads,
                "slower of zstd decompress, raw SELECT of the compressed bytea",
                target,
            )
        )
        if target is not None:
            rows.append(_against_zstd("save", label, megabytes, saves, 0.8))
            rows.append(_against_zstd("load", label, megabytes, loads, 0.9))
            rows.extend(_memory(store, label, len(raw), dirty))
    store.close()
    return rows


def _against_zstd(
    what: str, label: str, megabytes: float, spreads: list[Spread], floor: float
) -> Row:
    """The same samples as the ``what`` row, against plain zstd alone (issue 15's targets)."""
    ours, zstd_t, _ = spreads
    verb = "compress" if what == "save" else "decompress"
    return Row(
        "large",
        f"{what} {label} vs zstd",
        Figure.of(ours.map(lambda t: megabytes / t), "MB/s"),
        Figure.of(zstd_t.map(lambda t: megabytes / t), "MB/s"),
        f"plain zstd {verb} of the same bytes, in memory (the row above, its samples)",
        Figure.of(paired(zstd_t, ours, lambda z, a: z / a), "x"),
        Target(">=", floor, f"≥ {floor}x zstd"),
    )


def _peak(call: Callable[[], object]) -> int:
    """The most Python heap (tracemalloc) ``call`` held at once beyond what there was before."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _memory(store: Any, label: str, size: int, dirty: Callable[[], None]) -> list[Row]:
    """Peak memory of one load and one save of the largest document, over its JSON size."""
    loading = _peak(lambda: store.load("big"))  # keeps the JSON: at least 1x
    dirty()
    saving = _peak(lambda: store.save("big"))  # the session's JSON is already held
    store.unload("big")
    name = (
        "the document's JSON; tracemalloc (Python heap: document bytes, zstd output, "
        "shards), not zstd's or libpq's own C buffers"
    )
    return [
        Row(
            "large",
            f"memory: {what} {label}",
            Figure.exact(peak, "B"),
            Figure.exact(size, "B"),
            name,
            Figure.exact(peak / size, "x"),
            Target("<=", 2.0, "≤ 2x the JSON"),
        )
        for what, peak in (("load", loading), ("save", saving))
    ]
