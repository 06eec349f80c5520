"""export_jsonl / import_jsonl of many keys, against (a) a raw COPY dump and load.

``export_jsonl`` reads the newest version of ``save_batch_size`` (500) keys
per statement, in key order (keys() pages), and writes one line per key with
the stored JSON bytes as they are. ``import_jsonl`` parses the lines of a
batch, claims and leases their keys (one statement), reads what exists (one),
writes the new versions fenced (one) and releases the leases (one). The
baselines are COPY of the same rows out of and into a ``(key, doc jsonb)``
table, in memory (``BytesIO``) like the store's.
"""

from __future__ import annotations

import io
from typing import Any

import psycopg

import sessionstore as ss

from ..context import Bench
from ..documents import player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import raw_table
from ._saved import raw_rows, save_offline

CHUNK = 1 << 16
"""Bytes per read of the dump in the raw COPY FROM (as from a file)."""


def _exported(store: ss.Store, count: int) -> bytes:
    out = io.BytesIO()
    if store.export_jsonl(out) != count:
        raise AssertionError("export: not every key was exported")
    return out.getvalue()


def _copied_out(conn: psycopg.Connection[Any], table: str) -> bytes:
    out = io.BytesIO()
    with conn.cursor().copy(f"COPY {table} (key, doc) TO STDOUT") as copy:
        for data in copy:
            out.write(data)
    conn.commit()
    return out.getvalue()


def _export_row(
    bench: Bench,
    conn: psycopg.Connection[Any],
    store: ss.Store,
    table: str,
    sizes: tuple[int, int],
    repeats: int,
) -> Row:
    count = bench.sizes.many
    return compare(
        "export",
        f"export_jsonl of {count:,} 2 KB docs, throughput",
        Case("sessionstore", lambda: _exported(store, count), ops=count),
        Case("raw", lambda: _copied_out(conn, table), ops=count),
        repeats=repeats,
        baseline_name=f"(a) psycopg COPY (key, doc) TO STDOUT of the same {count:,} JSONB "
        "rows into a BytesIO",
        target=Target(">=", 0.5, "≥ 0.5x"),
        throughput=True,
        note=f"{sizes[0] / 1e6:.1f} MB of JSON lines vs {sizes[1] / 1e6:.1f} MB of COPY "
        "text; ops = keys; the export in key order, the COPY in table order",
    )


def _import_row(
    bench: Bench, conn: psycopg.Connection[Any], exported: bytes, dumped: bytes, repeats: int
) -> Row:
    count = bench.sizes.many
    target = raw_table(bench, "import_docs")
    into: list[ss.Store] = []

    def fresh_store() -> None:  # untimed: an empty store (a new name), opened
        for done in into:
            done.close()
        into[:] = [bench.store(player_profile(2048))]
        into[0]._open_core()

    def import_() -> None:
        result = into[0].import_jsonl(io.BytesIO(exported))
        if result.imported != count or result.skipped or result.held or result.failed:
            raise AssertionError(f"import: {result.imported} of {count} keys imported")

    def copy_in() -> None:
        dump = io.BytesIO(dumped)
        with conn.cursor().copy(f"COPY {target} (key, doc) FROM STDIN") as copy:
            while data := dump.read(CHUNK):
                copy.write(data)
        conn.commit()

    def emptied() -> None:  # untimed: the table as new
        conn.execute(f"TRUNCATE {target}")
        conn.commit()

    return compare(
        "export",
        f"import_jsonl of {count:,} 2 KB docs into an empty store, throughput",
        Case("sessionstore", import_, prepare=fresh_store, ops=count),
        Case("raw", copy_in, prepare=emptied, ops=count),
        repeats=repeats,
        baseline_name=f"(a) psycopg COPY (key, doc) FROM STDIN of the same {count:,} rows "
        f"(the COPY text, {CHUNK >> 10} KiB writes) into an empty JSONB table with its "
        "primary key, one transaction",
        target=Target(">=", 0.5, "≥ 0.5x"),
        throughput=True,
        note="import_jsonl: per 500 lines parse, claim, lease INSERT, read of what exists, "
        "fenced versioned write, release; ops = keys",
    )


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    keys = [f"ex{i:06d}" for i in range(bench.sizes.many)]
    save_offline(store, keys)  # untimed: saved, and no process holds them
    source = raw_table(bench, "export_docs", raw_rows(document, keys))
    # Every round moves every key through the database: as few rounds as hotkey's.
    repeats = max(3, bench.sizes.repeats // 2)
    with bench.raw() as conn:
        # What both imports read: the export of the store, the COPY dump of the table.
        exported, dumped = _exported(store, len(keys)), _copied_out(conn, source)
        sizes = (len(exported), len(dumped))
        return [
            _export_row(bench, conn, store, source, sizes, repeats),
            _import_row(bench, conn, exported, dumped, repeats),
        ]
