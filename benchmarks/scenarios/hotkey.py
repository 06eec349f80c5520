"""Hot key: 4 threads updating one key; no update may be lost. Throughput, with (b) as info."""

from __future__ import annotations

import threading
from collections.abc import Callable

import sqlalchemy as sa

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, compare
from ..timing import Case
from ._raw import orm_change

THREADS = 4


def _hammer(work: Callable[[], object], per_thread: int, check: Callable[[], int]) -> None:
    """Run ``work`` ``per_thread`` times on each of 4 threads; assert every change counted."""
    before = check()

    def loop() -> None:
        for _ in range(per_thread):
            work()

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = before + THREADS * per_thread - check()
    if lost:
        raise AssertionError(f"hot key: {lost} of {THREADS * per_thread} updates were lost")


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    store.load("hot")
    bench.put_docs({"hot": document})
    ours_n = bench.sizes.hot_updates
    base_n = max(10, ours_n // 50)
    select = sa.select(bench.docs.c.doc["coins"].as_integer()).where(bench.docs.c.key == "hot")

    def orm_coins() -> int:
        with bench.engine.connect() as conn:
            return int(conn.execute(select).scalar_one())

    orm_bump = orm_change(bench, ["hot"], lambda found: bump(found["hot"]))
    row = compare(
        "hotkey",
        f"{THREADS} threads, 1 key",
        Case(
            "sessionstore",
            lambda: _hammer(
                lambda: store.update("hot", bump), ours_n, lambda: int(store.get("hot")["coins"])
            ),
            ops=THREADS * ours_n,
        ),
        Case("orm", lambda: _hammer(orm_bump, base_n, orm_coins), ops=THREADS * base_n),
        repeats=max(3, bench.sizes.repeats // 2),
        baseline_name="(b) the same 4 threads, each change a SELECT .. FOR UPDATE transaction",
        target=None,
        throughput=True,
        note="no lost updates (asserted per round, for both)",
    )
    store.save("hot")
    if store.peek("hot")["coins"] != store.get("hot")["coins"]:
        raise AssertionError("hot key: saved count differs from memory")
    store.unload("hot")
    return [row]
