"""handoff: one hot key wanted by 3 processes, each a loop of requests (issue 15).

Three real processes (``multiprocessing``, spawn), each with its own Store of
one name on the bench schema, loop for a fixed time over what a gunicorn
request does (docs/web-backends.md, "One session per request"): ``with
store.session(key) as s: s.update(increment)``. Entering the block waits
while another process holds the key (the holder is asked to hand it over, and
does so when its block exits); the exit saves and hands over or releases.
Per acquisition: the wait (from entering ``session()`` to the block's first
line) and the hold (from there to the exit's return: the update, the save,
the handover or release). The counter saved at the end must equal the
acquisitions. The rows' ``extra`` has per-process figures and every sample.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing
import os
import statistics
import time
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import sessionstore as ss

from ..context import Bench
from ..results import Figure, Row, Target
from ._children import expect

PROCESSES = 3
_KEY = "hot"
Acquisition = tuple[float, float, float]
"""``(perf_counter when the key was got, wait s, hold s)``: the clock is system-wide."""


def _increment(document: dict[str, Any]) -> bool:
    document["count"] += 1
    return True


def _requests(
    name: str, options: dict[str, Any], seconds: float, ready: Queue[Any], start: Event
) -> None:
    """A child process: request loops on the hot key for ``seconds``; its acquisitions out."""
    try:
        with ss.Store(name, {"count": 0}, **options) as store:
            store.peek(_KEY)  # opens the pool and the control connection before the clock
            ready.put(("ready", os.getpid(), None))
            start.wait()
            got: list[Acquisition] = []
            clock = time.perf_counter
            deadline = clock() + seconds
            while clock() < deadline:
                asked = clock()
                with store.session(_KEY) as session:
                    entered = clock()
                    session.update(_increment)
                got.append((entered, entered - asked, clock() - entered))
            counters = store.stats()
        handoffs = {stat: counters[stat] for stat in ("handoffs_in", "handoffs_out")}
        ready.put(("done", os.getpid(), (got, handoffs)))
    except BaseException as exc:
        ready.put(("error", os.getpid(), repr(exc)))
        raise


def _run_processes(
    bench: Bench, name: str, seconds: float
) -> dict[int, tuple[list[Acquisition], dict[str, int]]]:
    """Start the processes together; each one's acquisitions and handoff counts, by pid."""
    context = multiprocessing.get_context("spawn")
    ready: Queue[Any] = context.Queue()
    start = context.Event()
    options = bench.store_options(lock_timeout=30.0)
    workers = [
        context.Process(target=_requests, args=(name, options, seconds, ready, start))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in range(PROCESSES):
            expect(ready, "ready", 120.0, "handoff")
        start.set()
        found = dict(expect(ready, "done", seconds + 60.0, "handoff") for _ in range(PROCESSES))
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    return found


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _overtaken(by_pid: dict[int, list[Acquisition]]) -> list[int]:
    """For each acquisition: how many others got the key while it waited (FIFO: at most 1,
    the other waiter; more means someone who asked later got it first)."""
    entered = sorted(got for acquisitions in by_pid.values() for got, _, _ in acquisitions)
    return [
        bisect.bisect_left(entered, got) - bisect.bisect_right(entered, got - wait)
        for acquisitions in by_pid.values()
        for got, wait, _ in acquisitions
    ]


def _summary(by_pid: dict[int, list[Acquisition]], stats: dict[int, Any]) -> dict[str, Any]:
    """Per process: acquisitions, share, wait median / p99 / max, handoffs in and out; how
    often the key went back to the process that had just held it; the overtaking counts."""
    total = sum(len(got) for got in by_pid.values())
    order = sorted((entered, pid) for pid, got in by_pid.items() for entered, _, _ in got)
    again = sum(1 for (_, a), (_, b) in itertools.pairwise(order) if a == b)
    per: dict[str, Any] = {}
    for number, (pid, got) in enumerate(sorted(by_pid.items())):
        waits = [wait for _, wait, _ in got]
        per[f"p{number + 1}"] = {
            "acquisitions": len(got),
            "share": len(got) / total,
            "wait_median_s": statistics.median(waits),
            "wait_p99_s": _p99(waits) if len(waits) > 1 else waits[0],
            "wait_max_s": max(waits),
            **stats[pid],
        }
    overtaken = _overtaken(by_pid)
    return {
        "processes": per,
        "same_holder_again": again / max(1, total - 1),
        "overtaken_max": max(overtaken),
        "overtaken_histogram": dict(sorted(Counter(overtaken).items())),
    }


def _rows(
    by_pid: dict[int, list[Acquisition]], stats: dict[int, Any], seconds: float, count: int
) -> list[Row]:
    waits = [wait for got in by_pid.values() for _, wait, _ in got]
    holds = [hold for got in by_pid.values() for _, _, hold in got]
    summary = _summary(by_pid, stats)
    shares = {name: p["share"] for name, p in summary["processes"].items()}
    measure = f"{PROCESSES} processes, 1 hot key, session() per request"
    note = (
        f"{len(waits):,} acquisitions in {seconds:g} s, saved counter {count:,} (asserted); "
        f"wait median {statistics.median(waits) * 1e3:.3g} ms, max {max(waits) * 1e3:.3g} ms; "
        f"hold median {statistics.median(holds) * 1e3:.3g} ms"
    )
    max_wait, median_hold = max(waits), statistics.median(holds)
    return [
        Row(
            "handoff",
            f"{measure}: wait, p99",
            Figure.exact(_p99(waits), "s"),
            baseline_name="none: absolute target (the issue's)",
            target=Target("<=", 0.05, "< 50 ms", absolute=True),
            note=note,
            extra={**summary, "waits_s": waits, "holds_s": holds},
        ),
        Row(
            "handoff",
            f"{measure}: fairness, max wait / median hold",
            Figure.exact(max_wait, "s"),
            Figure.exact(median_hold, "s"),
            "the median hold (entering the block to the exit's return: update, save, "
            "handover or release)",
            Figure.exact(max_wait / median_hold, "x"),
            Target("<=", 2.0, "≤ 2x"),
        ),
        Row(
            "handoff",
            f"{measure}: share of acquisitions, smallest",
            Figure.exact(min(shares.values()), "share"),
            Figure.exact(1 / PROCESSES, "share"),
            f"a fair share (1/{PROCESSES})",
            Figure.exact(min(shares.values()) * PROCESSES, "x"),
            note=", ".join(f"{name} {share:.0%}" for name, share in shares.items())
            + f"; the key went back to the process that had just held it in "
            f"{summary['same_holder_again']:.0%} of acquisitions; a waiter was overtaken by "
            f"up to {summary['overtaken_max']} later askers (FIFO: 1)",
        ),
    ]


def run(bench: Bench) -> list[Row]:
    seconds = 3.0 if bench.sizes.scale < 1 else 20.0
    name = bench.fresh_name()
    found = _run_processes(bench, name, seconds)
    by_pid = {pid: got for pid, (got, _) in found.items()}
    total = sum(len(got) for got in by_pid.values())
    checker = bench.store({"count": 0}, name=name)
    saved = checker.peek(_KEY)
    count = int(saved["count"]) if saved is not None else 0
    checker.close()
    if count != total:
        raise AssertionError(f"handoff: saved counter {count} after {total} acquisitions")
    return _rows(by_pid, {pid: stats for pid, (_, stats) in found.items()}, seconds, count)
