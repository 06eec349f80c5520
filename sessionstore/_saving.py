"""The save path: every write of a key's data goes through :meth:`Saver.save_held`.

Owns how in-memory changes become versions: each session gives its
:class:`~sessionstore._storage.PendingWrite`, the repository writes them
fenced (batched or streamed, it decides) and answers per key, and the
outcome is applied here: saved, lease lost (the session closes), or failed
(the key stays dirty; autosave tries again). Around it, the ways a key is
written: ``save``, autosave, ``unload`` (a final save, then release), the
last user's exit of ``session()``, a handoff (a final save, then the lease
passes to the process that asked), and ``close``. Callers hold the keys'
FIFO turns (several keys: in key order), so writes of one key never overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._background import AfterSave
from ._registry import KeyEntry, KeyState
from ._storage import PendingWrite
from ._storage.leases import HandoffRequest
from .errors import (
    KeyNotLoadedError,
    LoadInProgressError,
    LockLostError,
    SessionClosedError,
    SessionStoreError,
)
from .frozen import decode
from .session import Session, run_transform

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["LAST_SAVES", "Saver", "turns"]

LAST_SAVES = frozenset({"unload", "close", "handoff"})
"""Save reasons that mean the key's last save in this process (ProfileStore's OnLastSave)."""


@contextmanager
def turns(sessions: Sequence[Session]) -> Iterator[None]:
    """Hold the FIFO turns of ``sessions`` (already in key order)."""
    taken = 0
    try:
        for session in sessions:
            session.queue.acquire()
            taken += 1
        yield
    finally:
        for session in sessions[:taken]:
            session.queue.release()


class Saver:
    """The save path of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        self._autosave_running = threading.Lock()

    # -- the one save path -------------------------------------------------------

    def save_held(self, sessions: Sequence[Session], reason: str) -> dict[str, Exception]:
        """Write the pending changes of ``sessions`` (turns held); errors by key.

        ``reason`` says why (``save``, ``autosave``, ``durable``, ``unload``,
        ``close``, ``handoff``): the ``on_save`` hook gets it, just before
        the write (and, for the last three, the key's last save here, even
        with nothing pending). Each write carries the key's data, the
        idempotency keys it applied and the messages it handled.
        """
        core = self._core
        errors: dict[str, Exception] = {}
        pending = []
        last = reason in LAST_SAVES
        for session in sessions:
            if session.closed:
                if not session.saved:  # closed (lease lost) with changes never written
                    errors[session.key] = self.unsaved_error(session)
                continue
            if core.config.on_save is not None and (last or not session.saved):
                self._run_on_save(session, reason)
            write = session.pending_write()
            if write is not None:
                pending.append((session, write))
        if not pending:
            return errors
        started = time.perf_counter()
        result = core.repo.write([write for _, write in pending], atomic=False)
        core.stats.wrote(time.perf_counter() - started, len(result.written), len(result.failed))
        for session, write in pending:
            key = session.key
            if key in result.written:
                session.mark_saved(write)
                self.after_save(write)
            elif key in result.lost:
                core.leases.lose(session.entry, f"lease lost before {reason}")
                errors[key] = LockLostError(
                    f"{core.describe(key)}: lease lost; nothing was written", [key]
                )
            elif key in result.failed:
                session.note_attempt(write.version)
                errors[key] = result.failed[key]
            else:  # pragma: no cover - would mean a version number clash
                errors[key] = SessionStoreError(
                    f"{core.describe(key)}: version {write.version} exists"
                )
        if result.failed:
            core.log(
                logging.ERROR,
                None,
                "%s of %d keys failed: %s",
                reason,
                len(result.failed),
                next(iter(result.failed.values())),
            )
        return errors

    def _run_on_save(self, session: Session, reason: str) -> None:
        """The ``on_save`` hook on a mutable copy; its changes, if valid, join the write."""
        hook = self._core.config.on_save
        assert hook is not None
        try:
            session.apply_hook(lambda data: hook(session.key, data, reason))
        except Exception as exc:
            self._hook_failed(session.key, reason, exc)

    def on_save_proposed(self, session: Session, encoded: bytes, reason: str) -> bytes:
        """The ``on_save`` hook on data about to be written but not yet in memory (a tx)."""
        core = self._core
        hook = core.config.on_save
        if hook is None:
            return encoded
        try:
            work = decode(encoded)
            run_transform(
                lambda data: hook(session.key, data, reason),
                work,
                lambda: core.describe(session.key),
            )
            return core.rules.accept(work, session.key)
        except Exception as exc:
            self._hook_failed(session.key, reason, exc)
            return encoded

    def _hook_failed(self, key: str, reason: str, error: Exception) -> None:
        """The write goes on without the hook's changes; the error is logged, not raised."""
        self._core.log(
            logging.ERROR,
            key,
            "on_save (%s) failed, its changes were dropped: %s",
            reason,
            error,
            exc_info=True,
        )

    def after_save(self, write: PendingWrite) -> None:
        """``on_after_save(key, data as saved, version)``, on the callback lane."""
        core = self._core
        if core.config.on_after_save is not None:
            core.lane.submit(AfterSave(core, write.key, write.encoded, write.version))

    def unsaved_error(self, session: Session) -> SessionClosedError:
        return SessionClosedError(
            f"{self._core.describe(session.key)}: session closed ({session.closed_reason}) "
            "with changes that were never written"
        )

    # -- save and autosave ------------------------------------------------------------

    def save(self, session: Session) -> None:
        with session.queue.turn():
            errors = self.save_held([session], "save")
        if errors:
            raise errors[session.key]

    def autosave_running(self) -> bool:
        return self._autosave_running.locked()

    def autosave(self) -> None:
        """Save every dirty key not busy with another write (worker thread)."""
        with self._autosave_running:
            dirty = [
                e.session
                for e in self._core.table.entries(KeyState.LIVE)
                if e.session is not None and not e.session.saved
            ]
            # Skip keys busy with a save, unload or tx: they are being written anyway.
            taken = [s for s in dirty if s.queue.try_acquire()]
            try:
                errors = self.save_held(taken, "autosave")
            finally:
                for session in taken:
                    session.queue.release()
            if taken:
                self._core.log(
                    logging.DEBUG, None, "autosaved %d keys, %d failed", len(taken), len(errors)
                )
            # Keys that only session() blocks used, whose last block's final save
            # failed: saved now, so let them go (nobody else would).
            idle = [
                e
                for e in self._core.table.entries(KeyState.LIVE)
                if e.users <= 0 and not e.explicit and e.session is not None and e.session.saved
            ]
            if idle:
                self.unload(idle, last_user=True)

    # -- unload ---------------------------------------------------------------------

    def unload_key(self, key: str) -> None:
        """``Store.unload``: cancel its load, or forget it closed, or its final save and release.

        A key that ``session()`` blocks still use stays until the last exits.
        """
        core = self._core
        first = True
        while True:
            entry = core.table.get(key)
            if entry is None:
                if first:
                    raise KeyNotLoadedError(f"{core.describe(key)} is not loaded")
                return  # another thread's unload of it finished
            first = False
            if entry.state is KeyState.LOADING:
                if self.cancel_load(entry, "unload() was called"):
                    return
            elif entry.state is KeyState.CLOSED:
                core.table.forget(entry)
                if entry.session is not None and not entry.session.saved:
                    raise self.unsaved_error(entry.session)
                return
            elif entry.state is KeyState.UNLOADING and entry.session is not None:
                with entry.session.queue.turn():
                    pass  # another thread's unload: look again once it is done
            else:
                if core.table.drop_explicit(entry):
                    errors = self.unload([entry], last_user=True)
                    if key in errors:
                        raise errors[key]
                return

    def unload_many(self, keys: Sequence[str]) -> dict[str, Exception]:
        """``Store.unload_many``: every key's final save and release, in batches; errors."""
        core = self._core
        missing = [key for key in keys if core.table.get(key) is None]
        if missing:
            raise KeyNotLoadedError(f"{core.describe(None)}: keys {missing[:10]} are not loaded")
        errors: dict[str, Exception] = {}
        live: list[KeyEntry] = []
        for key in keys:
            entry = core.table.get(key)
            if entry is None or entry.state is not KeyState.LIVE:
                try:
                    self.unload_key(key)  # loading, closed or unloading: one by one
                except KeyNotLoadedError:
                    pass  # another thread's unload finished meanwhile
                except SessionStoreError as exc:
                    errors[key] = exc
            elif core.table.drop_explicit(entry):
                live.append(entry)
        step = core.config.save_batch_size
        for start in range(0, len(live), step):
            errors.update(self.unload(live[start : start + step], last_user=True))
        return errors

    def cancel_load(self, entry: KeyEntry, reason: str) -> bool:
        """Cancel a running load and wait for it; False if it had finished already."""
        core = self._core
        if entry.loader == threading.get_ident():
            raise LoadInProgressError(f"{core.describe(entry.key)} is loading")
        if core.table.cancel(entry.key, reason) is None:
            return False
        core.table.wait_settled(entry)
        return True

    def unload(
        self,
        entries: Sequence[KeyEntry],
        *,
        reason: str = "unload",
        last_user: bool = False,
        handoff_to: str | None = None,
    ) -> dict[str, Exception]:
        """Final save and release (or handover) of LIVE ``entries`` (key order); errors by key.

        ``last_user``: only keys no ``session()`` block or ``load()`` holds any
        more. A key whose final save failed stays LIVE with its data (the
        caller may retry); one whose lease was lost is forgotten.
        """
        core = self._core
        sessions = [e.session for e in entries if e.session is not None]
        errors: dict[str, Exception] = {}
        with turns(sessions):
            started: list[Session] = []
            for session in sessions:
                with session.cond:
                    if core.table.begin_unload(
                        session.entry, only_unused=last_user, users_only=handoff_to is not None
                    ):
                        started.append(session)
                    elif last_user and self._lost_unsaved(session):
                        errors[session.key] = self.unsaved_error(session)
            finished = False
            try:
                errors.update(self.save_held(started, "handoff" if handoff_to else reason))
                done = [s for s in started if s.key not in errors]
                self._let_go(done, handoff_to)
                self._finish_unloads(started, errors, tombstone=handoff_to is not None)
                finished = True
            finally:
                if not finished:  # interrupted (KeyboardInterrupt): keep them loaded
                    for session in started:
                        core.table.end_unload(session.entry, done=False)
        return errors

    def _lost_unsaved(self, session: Session) -> bool:
        """The last block out found its key's session closed with changes never written:
        forget the key and report it (it must not surface only at ``close()``)."""
        entry = session.entry
        if entry.state is not KeyState.CLOSED or session.saved:
            return False
        self._core.table.forget(entry)
        return True

    def _let_go(self, done: Sequence[Session], handoff_to: str | None) -> None:
        """Release the leases of ``done``, or hand each over to the process it is promised to.

        ``handoff_to`` (one session): the handoff asked for; otherwise a
        process that asked while the key was in use or being unloaded
        (``wanted_by``) gets it, and the rest are released.
        """
        released: list[tuple[str, int]] = []
        failing = False  # after one handover fails (the database is away), only release
        for session in done:
            requester = handoff_to or session.entry.wanted_by
            if requester is None or failing:
                released.append((session.key, session.token))
                continue
            handed = self._handed_over(session, requester)
            if handed is None:
                failing = True
            if not handed:
                released.append((session.key, session.token))
        self._core.release_quietly(released)

    def _handed_over(self, session: Session, requester: str) -> bool | None:
        """Pass ``session``'s lease to ``requester``; False: not done (release it); None: failed."""
        core = self._core
        reserve = min(core.config.lock_duration, max(1.0, 2 * core.config.takeover_grace))
        try:
            handed = core.repo.hand_over(session.key, session.token, requester, reserve)
        except SessionStoreError as exc:
            core.log(logging.WARNING, session.key, "handover failed, releasing: %s", exc)
            return None
        if handed:
            core.stats.add("handoffs_out")
            core.log(logging.INFO, session.key, "handed over to another process")
        return handed

    def _finish_unloads(
        self, started: Sequence[Session], errors: dict[str, Exception], *, tombstone: bool
    ) -> None:
        """After the final saves: failed ones stay LIVE (data kept, the caller may
        retry); the rest go (a handoff's stays as a tombstone: SessionClosedError)."""
        core = self._core
        gone: list[KeyEntry] = []
        for session in started:
            error = errors.get(session.key)
            if error is not None and not isinstance(error, LockLostError | SessionClosedError):
                core.table.end_unload(session.entry, done=False)
                continue
            core.rules.views.forget(session)
            if tombstone and error is None:
                core.table.close(session.entry, "handed over to another process")
            else:
                gone.append(session.entry)
        core.table.end_unloads(gone)

    def unload_all(self, entries: Sequence[KeyEntry]) -> dict[str, Exception]:
        """``close()``: every key, in batches; closed keys with unsaved changes reported."""
        errors: dict[str, Exception] = {
            e.key: self.unsaved_error(e.session)
            for e in entries
            if e.state is KeyState.CLOSED and e.session is not None and not e.session.saved
        }
        live = [e for e in entries if e.state is KeyState.LIVE]
        step = self._core.config.save_batch_size * 4
        for start in range(0, len(live), step):
            errors.update(self.unload(live[start : start + step], reason="close"))
        return errors

    # -- handoff -----------------------------------------------------------------------

    def may_hand_over(self, key: str) -> bool:
        """Is ``key`` LIVE here with no ``session()`` block using it right now?"""
        entry = self._core.table.get(key)
        return entry is not None and entry.state is KeyState.LIVE and entry.users <= 0

    def hand_over(self, request: HandoffRequest) -> None:
        """Final save, then the lease passes to ``requester`` (worker thread).

        A key that ``session()`` blocks are using goes when the last exits
        (new blocks wait meanwhile); a lease handed to this process that it
        never took (its loader gave up) is released for the asker.
        """
        core, key = self._core, request.key
        entry = core.table.get(key)
        if entry is None:
            core.repo.release_unclaimed(key)
            return
        if core.table.want(entry, request.requester, request.waiting_since):
            return
        if self.may_hand_over(key):
            self.hand_over_now(entry, request.requester)

    def hand_over_now(self, entry: KeyEntry, requester: str) -> Exception | None:
        """Final save, then the lease to ``requester``; the save's error (the key kept), or None."""
        core = self._core
        errors = self.unload([entry], handoff_to=requester)
        error = errors.get(entry.key)
        if error is not None:
            core.table.unwant(entry)
            core.log(logging.WARNING, entry.key, "handoff failed, keeping the key: %s", error)
            return error
        if entry.state is KeyState.CLOSED:
            core.leases.tell_lost(entry.key)
        return None

    # -- erase -------------------------------------------------------------------------

    def erase(self, key: str) -> None:
        """Delete the key everywhere, under its lease (this store's, or taken for it)."""
        core = self._core
        entry = core.table.get(key)
        if entry is not None and entry.state is KeyState.LOADING:
            self.cancel_load(entry, "erase() was called")
            entry = core.table.get(key)
        if entry is not None and entry.session is not None and entry.state is KeyState.LIVE:
            if self._erase_live(entry, entry.session):
                return
            entry = core.table.get(key)  # unloaded or lost meanwhile: erase it as not held
        if entry is not None and entry.state is KeyState.CLOSED:
            core.table.forget(entry)
        # Not held here: take its lease as a load would (concurrent loads wait).
        entry = core.loader.lease_for(key)
        try:
            self._erase_with(key, entry.token)
        except BaseException:
            try:
                core.release_quietly([(key, entry.token or 0)])
            finally:
                core.table.fail_load(entry, None)
            raise
        core.table.fail_load(entry, None)

    def _erase_live(self, entry: KeyEntry, session: Session) -> bool:
        """Erase a key held here under its own lease; False if it is no longer LIVE."""
        core = self._core
        with session.queue.turn():
            with session.cond:
                if not core.table.begin_unload(entry):
                    return False
            try:
                self._erase_with(entry.key, session.token)
            except LockLostError:
                core.leases.lose(entry, "lease lost before erase")
                core.table.forget(entry)
                raise
            except BaseException:
                core.table.end_unload(entry, done=False)
                raise
            core.rules.views.forget(session)
            core.table.end_unload(entry, done=True, reason="erased")
        return True

    def _erase_with(self, key: str, token: int | None) -> None:
        core = self._core
        if token is None or not core.repo.erase(key, token):
            raise LockLostError(f"{core.describe(key)}: lease lost; nothing was erased", [key])
        core.log(logging.INFO, key, "erased")
