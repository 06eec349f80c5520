"""Run every benchmark scenario against sessionstore and its baselines; print the table.

    python -m benchmarks.run [--quick] [--only save,get] [--json PATH] [--png PATH]
                             [--dsn URL] [--strict]

Starts the embedded PostgreSQL (or uses ``--dsn`` / ``$SESSIONSTORE_DSN``),
creates a throwaway schema, runs the scenarios, prints the table, writes the
JSON and the chart, and drops the schema. Exits 0 even when a target is missed
(``--strict`` makes a FAIL row exit 1); a scenario that crashes exits 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .context import Bench, Sizes, opened
from .results import Row, draw_chart, format_table, to_json
from .scenarios import SCENARIOS

RESULTS = Path(__file__).parent / "results"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (CI: checks that it runs)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help=f"run only these (comma separated, repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="results JSON (default: benchmarks/results/latest[-quick].json)",
    )
    parser.add_argument(
        "--png",
        type=Path,
        metavar="PATH",
        help="chart PNG (default: next to the JSON); needs the 'bench' extra",
    )
    parser.add_argument("--no-png", action="store_true", help="do not draw the chart")
    parser.add_argument("--dsn", help="PostgreSQL URL (default: $SESSIONSTORE_DSN, else embedded)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.only = [name.strip() for value in args.only for name in value.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    return args


def _run_all(bench: Bench, names: Sequence[str]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    crashed: list[str] = []
    for name in names:
        started = time.perf_counter()
        print(f"[{name}] ...", end=" ", flush=True)
        try:
            found = SCENARIOS[name](bench)
        except Exception:
            crashed.append(name)
            print("CRASHED")
            traceback.print_exc()
            continue
        rows += found
        print(f"{time.perf_counter() - started:.1f} s", flush=True)
    return rows, crashed


def _meta(args: argparse.Namespace, bench: Bench, wall: float, sizes: Sizes) -> dict[str, Any]:
    return {
        "mode": "quick" if args.quick else "full",
        "wall_time_s": round(wall, 2),
        "sizes": sizes.__dict__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "server": bench.server_info(),
        "schema": bench.schema,
        "figures": "median over repeats; spread = interquartile range (q1, q3); "
        "ratio = per-round paired ratio (sessionstore / baseline, update: throughput)",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    sizes = Sizes.choose(args.quick)
    names = args.only or list(SCENARIOS)
    suffix = "-quick" if args.quick else ""
    json_path: Path = args.json or RESULTS / f"latest{suffix}.json"
    png_path: Path = args.png or json_path.with_suffix(".png")
    started = time.perf_counter()
    with opened(args.dsn, sizes) as bench:
        print(
            f"sessionstore benchmarks ({'quick' if args.quick else 'full'}), schema {bench.schema}",
            flush=True,
        )
        rows, crashed = _run_all(bench, names)
        wall = time.perf_counter() - started
        meta = _meta(args, bench, wall, sizes)
    print()
    print(format_table(rows))
    print(f"\nwall time {wall:.1f} s")
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(to_json(rows, meta), indent=2, ensure_ascii=False) + "\n")
    print(f"results: {json_path}")
    if not args.no_png:
        title = (
            f"sessionstore vs baselines ({meta['mode']} run, {meta['cpus']} CPUs, "
            f"PostgreSQL {meta['server']['server_version']})"
        )
        note = draw_chart(rows, png_path, title)
        print(note or f"chart: {png_path}")
    failed = [row for row in rows if row.verdict == "FAIL"]
    if failed:
        print(
            f"{len(failed)} target(s) missed: "
            + "; ".join(f"{r.scenario}: {r.measure}" for r in failed)
        )
    if crashed:
        print(f"scenarios crashed: {', '.join(crashed)}")
        return 2
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
