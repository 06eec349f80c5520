"""Per-key order: a FIFO turn for each session's saves, unload and tx.

Owns :class:`KeyQueue`. Operations on one key take a turn in the order they
asked for it (a ticket lock), and run in the calling thread: ordering needs
no thread per key, and different keys never wait for each other. Code that
takes the turns of several keys takes them in key order, so two such
operations can never deadlock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["KeyQueue"]


class KeyQueue:
    """A first-come, first-served lock: turns are granted in request order."""

    __slots__ = ("_abandoned", "_cond", "_next", "_serving")

    def __init__(self, cond: threading.Condition | None = None) -> None:
        # May share the owner's condition (one per session instead of two):
        # every waiter re-checks its own predicate, so shared wake-ups are safe.
        self._cond = cond if cond is not None else threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def acquire(self) -> None:
        """Wait for this caller's turn."""
        with self._cond:
            ticket = self._next
            self._next += 1
            try:
                while self._serving != ticket:
                    self._cond.wait()
            except BaseException:  # e.g. KeyboardInterrupt: give the turn up, in order
                self._abandoned.add(ticket)
                self._skip_abandoned()
                raise

    def _skip_abandoned(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
            self._cond.notify_all()

    def try_acquire(self) -> bool:
        """Take the turn only if nobody holds it or waits for it."""
        with self._cond:
            if self._next != self._serving:
                return False
            self._next += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._skip_abandoned()
            self._cond.notify_all()

    @contextmanager
    def turn(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
