"""Durable updates: ``update(..., durable=True)`` returns once its change is written.

Owns the group commit (docs/durable.md). A durable update commits in memory
as any update does, then waits here for a fenced write that contains it.
While one write is in flight, the durable updates that arrive (from any
thread, for any keys) queue up; when it finishes, one of them leads the
next write for all that queued, one statement for the batch, as
PostgreSQL's own WAL flush does. The leader first waits (at most a
millisecond) for the callers of the last write cycle to queue again, so
the batches do not split into two alternating halves; a lone caller writes
at once, with no delay.
Each waiter gets its key's outcome: written, or the error of the write
(``LockLostError``, ``StorageUnavailableError``), with the change left in
memory, dirty, for the next save.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._saving import turns

if TYPE_CHECKING:
    from ._core import StoreCore
    from .session import Session

__all__ = ["GroupCommit"]

_COLLECT_FOR = 0.001
"""Longest a leader waits for the callers of the last write cycle (seconds)."""


class _Waiter:
    """One durable update waiting for its write."""

    __slots__ = ("done", "error", "seq", "session")

    def __init__(self, session: Session, seq: int) -> None:
        self.session = session
        self.seq = seq
        self.done = False
        self.error: Exception | None = None


class GroupCommit:
    """Writes durable updates in shared batches (one per Store core)."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Waiter] = []
        self._writing = False
        self._collecting = False
        self._active = 1
        """Durable callers seen in the last write cycle: the next leader waits for them."""
        self.batch_sizes: Counter[int] = Counter()
        """How many keys each group-commit write carried (size -> writes), for stats."""

    def commit(self, session: Session) -> None:
        """Return once a write containing the session's current changes committed."""
        waiter = _Waiter(session, session.change_seq)
        with self._cond:
            self._queue.append(waiter)
            if self._collecting:
                self._cond.notify_all()
            while not waiter.done:
                if not self._writing:
                    self._writing = True
                    self._collect()
                    batch, self._queue = self._queue, []
                    break
                self._cond.wait()
            else:
                return self._outcome(waiter)
        try:
            self._write(batch)
        finally:
            with self._cond:
                self._writing = False
                self._active = len(batch) + len(self._queue)
                # Interrupted (KeyboardInterrupt): the others go in the next batch.
                self._queue[:0] = [w for w in batch if not w.done]
                self._cond.notify_all()
        self._outcome(waiter)

    def _collect(self) -> None:
        """Leader, lock held: wait briefly for the callers of the last cycle to queue.

        Callers whose write just finished are back within a fraction of a
        millisecond; without this wait they would form the next batch but
        one, and the batches would alternate between two halves. A lone
        caller (the last cycle had one) never waits.
        """
        if len(self._queue) >= self._active:
            return
        deadline = time.monotonic() + _COLLECT_FOR
        self._collecting = True
        try:
            while len(self._queue) < self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
        finally:
            self._collecting = False

    def _write(self, batch: Sequence[_Waiter]) -> None:
        # One session per key: a closed one (its lease lost, the key loaded
        # again since) is not written; its waiters are judged on their own.
        by_key: dict[str, Session] = {}
        for waiter in batch:
            if not waiter.session.closed:
                by_key[waiter.session.key] = waiter.session
        sessions = [by_key[key] for key in sorted(by_key)]
        self.batch_sizes[len(sessions)] += 1
        self._core.stats.add("durable_writes")
        self._core.stats.add("durable_keys", len(sessions))
        with turns(sessions):
            errors = self._core.saver.save_held(sessions, "durable")
        saver = self._core.saver
        for waiter in batch:
            session = waiter.session
            # Each waiter by its own session: written (now, or by an earlier
            # save such as autosave), else the error that kept it unwritten.
            if session.saved_seq < waiter.seq:
                written_here = by_key.get(session.key) is session
                waiter.error = (errors.get(session.key) if written_here else None) or (
                    saver.unsaved_error(session)
                )
            waiter.done = True

    @staticmethod
    def _outcome(waiter: _Waiter) -> None:
        if waiter.error is not None:
            raise waiter.error
