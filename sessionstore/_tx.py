"""Multi-key transactions: several loaded keys changed together, atomically.

Owns ``tx`` / ``tx_immutable`` (docs/architecture.md, "The save path"): the keys' FIFO
turns are taken in key order, their updates blocked (registry entry
``in_tx``), the transform run on copies, every result checked against the
schema, and the keys that changed (or still had unsaved changes) written in
one fenced statement, all or nothing, before the call returns. A transform
that changed nothing writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._saving import turns
from ._storage import PendingWrite
from .errors import (
    KeysChangedError,
    LockLostError,
    SessionStoreError,
    TransactionConflictError,
    TransformError,
)
from .session import Change, Session, run_transform

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["Transactions"]

Outcome = list[tuple[Session, Change | None]]


class Transactions:
    """The ``tx`` path of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core

    def run(
        self,
        sessions: Sequence[Session],
        fn: Callable[[Any], Any],
        *,
        immutable: bool,
        request_id: str | None = None,
    ) -> Outcome | None:
        """Run a tx over ``sessions`` (key order); the changes made, or None if aborted.

        With ``request_id`` already applied to any of the keys, ``fn`` is not
        run and the answer is None; committed, every key records it.
        """
        core = self._core
        context = f"store {core.name!r} tx {[s.key for s in sessions]}"
        busy = core.table.claim_tx([s.entry for s in sessions])
        if busy:
            raise TransactionConflictError(f"{context}: keys {busy} are already in a running tx")
        try:
            with turns(sessions):
                for session in sessions:
                    session.check_open()
                if request_id is not None and any(s.has_applied(request_id) for s in sessions):
                    return None
                outcome = self._held(
                    sessions, fn, immutable=immutable, context=context, request_id=request_id
                )
        finally:
            for session in sessions:
                session.end_tx()
        if isinstance(outcome, LockLostError):
            for session in sessions:
                if session.key in outcome.keys:
                    core.leases.lose(session.entry, "lease lost before tx")
            raise outcome
        return outcome

    def _propose(
        self,
        sessions: Sequence[Session],
        fn: Callable[[Any], Any],
        *,
        immutable: bool,
        context: str,
    ) -> dict[str, Any] | None:
        """The transform's new data by key, or None if it aborted."""
        keys = {s.key for s in sessions}
        if immutable:
            result = run_transform(fn, {s.key: s.data for s in sessions}, lambda: context)
            if result is False:
                return None
            if not isinstance(result, Mapping):
                raise TransformError(
                    f"{context}: transform must return a dict of new data or False"
                )
            proposed = dict(result)
        else:
            proposed = {s.key: s.decode() for s in sessions}
            verdict = run_transform(fn, proposed, lambda: context)
            if verdict is False:
                return None
            if verdict is not True:
                raise TransformError(
                    f"{context}: transform must return True or False, not {type(verdict).__name__}"
                )
        if set(proposed) != keys:
            raise KeysChangedError(
                f"{context}: transform changed the keys: added {sorted(set(proposed) - keys)}, "
                f"removed {sorted(keys - set(proposed))}"
            )
        return proposed

    def _held(
        self,
        sessions: Sequence[Session],
        fn: Callable[[Any], Any],
        *,
        immutable: bool,
        context: str,
        request_id: str | None,
    ) -> Outcome | LockLostError | None:
        """Transform and atomic write; the changes, a lost lease, or None (aborted)."""
        proposed = self._propose(sessions, fn, immutable=immutable, context=context)
        if proposed is None:
            return None
        core = self._core
        prepared = {s.key: core.rules.accept(proposed[s.key], s.key) for s in sessions}
        # Keys whose data changed, or that carry unsaved changes the transform
        # saw; with an idempotency key, all of them (each records it).
        writing = [
            s
            for s in sessions
            if request_id is not None or prepared[s.key] != s.encoded or not s.saved
        ]
        if not writing:
            return [(s, None) for s in sessions]
        for s in writing:
            prepared[s.key] = core.saver.on_save_proposed(s, prepared[s.key], "tx")
        pending: list[PendingWrite] = []
        for s in writing:
            write = s.pending_write(prepared[s.key], request_id)
            assert write is not None, "a write of given data is never empty"
            pending.append(write)
        started = time.perf_counter()
        try:
            result = self._core.repo.write(pending, atomic=True)
        except Exception:
            core.stats.wrote(time.perf_counter() - started, 0, len(pending))
            for session, write in zip(writing, pending, strict=True):
                session.note_attempt(write.version)
            raise
        core.stats.wrote(time.perf_counter() - started, len(result.written), 0)
        written = {s.key for s in writing}
        if result.lost:
            return LockLostError(
                f"{context}: lease lost for {sorted(result.lost)}; nothing was written",
                result.lost,
            )
        if result.written != written:  # pragma: no cover - version clash
            raise SessionStoreError(f"{context}: the database refused the write")
        writes = {write.key: write for write in pending}
        outcome: Outcome = []
        for s in sessions:
            write = writes.get(s.key)
            outcome.append((s, None if write is None else s.commit_written(write, request_id)))
            if write is not None:
                core.saver.after_save(write)
        return outcome
