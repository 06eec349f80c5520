"""fleet: 4 processes saving their own keys every second; save latency against one process.

Each process (``multiprocessing``, spawn) has its own Store of one name and
its own keys (2,500; 200 with ``--quick``), loaded with one ``load_many``.
Then, for a fixed time, a pass starts every second (at once if the last one
overran): each key is changed (``update``, untimed) and written with
``store.save(key)``, timed per key; the public API has no many-key save short
of ``unload_many``, so a batch script saves key by key. The baseline is the
same worker alone (one process, the same keys per process and store
settings), run just before in the same run: its median save. After each
run every key's saved count is checked from a fresh Store.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import sessionstore as ss

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Figure, Row, Target
from ._children import expect
from ._raw import chunks

PROCESSES = 4
PERIOD = 1.0
"""Seconds between the starts of two passes."""


def _passes(store: ss.Store, keys: Sequence[str], seconds: float) -> tuple[list[float], int, int]:
    """Update and save every key once a ``PERIOD`` until ``seconds`` are over: each save's
    seconds, the passes started, and how many of them overran the period."""
    clock = time.perf_counter
    latencies: list[float] = []
    deadline = clock() + seconds
    passes = overran = 0
    while clock() < deadline:
        started = clock()
        passes += 1
        for key in keys:
            if clock() >= deadline:
                break
            store.update(key, bump)
            before = clock()
            store.save(key)
            latencies.append(clock() - before)
        spare = started + PERIOD - clock()
        if spare > 0:
            time.sleep(min(spare, max(0.0, deadline - clock())))
        elif clock() < deadline:
            overran += 1  # a whole pass took longer than the period
    return latencies, passes, overran


def _worker(
    name: str,
    options: dict[str, Any],
    keys: list[str],
    seconds: float,
    ready: Queue[Any],
    start: Event,
) -> None:
    """A child process: load its keys, run the passes; latencies and saved counts out."""
    try:
        with ss.Store(name, player_profile(2048), **options) as store:
            store.load_many(keys)
            ready.put(("ready", os.getpid(), None))
            start.wait()
            latencies, passes, overran = _passes(store, keys, seconds)
            coins = {key: int(store.get(key)["coins"]) for key in keys}
            unsaved = sum(1 for key in keys if not store.is_saved(key))
        ready.put(("done", os.getpid(), (latencies, passes, overran, coins, unsaved)))
    except BaseException as exc:
        ready.put(("error", os.getpid(), repr(exc)))
        raise


def _fleet(bench: Bench, processes: int, per_process: int, seconds: float) -> dict[str, Any]:
    """Run ``processes`` workers together; their latencies, passes, and checked counts."""
    context = multiprocessing.get_context("spawn")
    ready: Queue[Any] = context.Queue()
    start = context.Event()
    name = bench.fresh_name()
    keys = [[f"f{p}-{i:05d}" for i in range(per_process)] for p in range(processes)]
    options = bench.store_options()
    workers = [
        context.Process(target=_worker, args=(name, options, own, seconds, ready, start))
        for own in keys
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            expect(ready, "ready", 120.0, "fleet")
        start.set()
        results = [expect(ready, "done", seconds + 120.0, "fleet")[1] for _ in workers]
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
    coins = {key: count for result in results for key, count in result[3].items()}
    _check_saved(bench, name, coins, sum(result[4] for result in results))
    return {
        "latencies": [s for result in results for s in result[0]],
        "passes": [result[1] for result in results],
        "overran": [result[2] for result in results],
    }


def _check_saved(bench: Bench, name: str, coins: dict[str, int], unsaved: int) -> None:
    """Every key's saved document holds the count its process ended with."""
    if unsaved:
        raise AssertionError(f"fleet: {unsaved} keys were left unsaved")
    checker = bench.store(player_profile(2048), name=name)
    keys = sorted(coins)
    wrong = 0
    for batch in chunks(keys, 5_000):
        checker.load_many(batch)
        wrong += sum(1 for key in batch if checker.get(key)["coins"] != coins[key])
        checker.unload_many(batch)
    checker.close()
    if wrong:
        raise AssertionError(f"fleet: {wrong} of {len(keys)} keys lost a saved change")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def run(bench: Bench) -> list[Row]:
    quick = bench.sizes.scale < 1
    per_process, seconds = (200, 3.0) if quick else (2_500, 10.0)
    alone = _fleet(bench, 1, per_process, seconds)
    many = _fleet(bench, PROCESSES, per_process, seconds)
    median = statistics.median(alone["latencies"])
    p99 = _p99(many["latencies"])
    measure = f"{PROCESSES} processes x {per_process:,} keys, saved every {PERIOD:g} s"
    baseline = (
        f"the median save of the same worker alone (1 process, {per_process:,} keys, "
        f"same store settings, {seconds:g} s, this run)"
    )
    note = (
        f"store.save(key) per key, a dirty 2 KB doc; {len(many['latencies']):,} saves, "
        f"{len(many['latencies']) / seconds:,.0f}/s (alone: {len(alone['latencies']):,}, "
        f"{len(alone['latencies']) / seconds:,.0f}/s); passes per process {many['passes']} "
        f"(overran the period: {many['overran']}; alone {alone['passes']}, "
        f"{alone['overran']}); saved counts checked"
    )
    extra = {
        "median_s": statistics.median(many["latencies"]),
        "p99_s": p99,
        "max_s": max(many["latencies"]),
        "alone_median_s": median,
        "alone_p99_s": _p99(alone["latencies"]),
    }
    return [
        Row(
            "fleet",
            f"{measure}: save p99",
            Figure.exact(p99, "s"),
            Figure.exact(median, "s"),
            baseline,
            Figure.exact(p99 / median, "x"),
            Target("<=", 5.0, "≤ 5x"),
            note=note,
            extra=extra,
        ),
        Row(
            "fleet",
            f"{measure}: save median",
            Figure.exact(extra["median_s"], "s"),
            Figure.exact(median, "s"),
            baseline,
            Figure.exact(extra["median_s"] / median, "x"),
            note=f"alone: p99 {extra['alone_p99_s'] * 1e3:.3g} ms; "
            f"fleet: max {extra['max_s'] * 1e3:.3g} ms",
        ),
    ]
