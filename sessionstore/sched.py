"""The Scheduler: one thread that runs every timed maintenance task of a Store.

Owns timing only (modelled on psycopg_pool's scheduler): tasks are plain
callables entered with a delay; a task that must repeat enters itself again.
Heavy work (saving many documents) is handed by its task to a worker so that
the heartbeat is never late behind it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Scheduler"]

logger = logging.getLogger("sessionstore")


@dataclass(order=True)
class _Entry:
    when: float
    seq: int
    task: Callable[[], None] = field(compare=False)


class Scheduler:
    """Runs callables at monotonic times on one daemon thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._queue: list[_Entry] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def enter(self, delay: float, task: Callable[[], None]) -> None:
        """Run ``task`` on the scheduler thread ``delay`` seconds from now."""
        with self._cond:
            if self._stopped:
                return
            self._seq += 1
            heapq.heappush(self._queue, _Entry(time.monotonic() + delay, self._seq, task))
            self._cond.notify()

    def every(self, interval: float, task: Callable[[], None]) -> None:
        """Run ``task`` every ``interval`` seconds (first run after one interval)."""

        def repeat() -> None:
            try:
                task()
            finally:
                self.enter(interval, repeat)

        self.enter(interval, repeat)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the running task, if any; drop the rest. Idempotent."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._queue:
                        wait = self._queue[0].when - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stopped:
                    return
                entry = heapq.heappop(self._queue)
            try:
                entry.task()
            except Exception:
                logger.exception("scheduled task %r failed", entry.task)
