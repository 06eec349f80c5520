"""The key registry: each key this Store knows, in exactly one state.

Owns the life of every key in one place (docs/architecture.md, "Key
states"): an entry per key with its state, its session once loaded, the
lease token (taken before the session exists, so the heartbeat renews it),
who uses it (``session()`` blocks and an explicit ``load()``), and why it
closed. One lock guards every entry; each transition is a method, and
threads that must wait for one (a second loader, a ``get`` during a load, a
load during an unload) wait on the entry's condition::

    (none) --begin_load--> LOADING --finish_load--> LIVE --begin_unload--> UNLOADING
               LOADING --fail_load / cancelled--> (removed)
               LIVE/UNLOADING --close--> CLOSED (kept: calls raise SessionClosedError)
               UNLOADING --end_unload(ok)--> (removed) | --end_unload(failed)--> LIVE

The registry does no I/O and runs no user code; it never holds its lock
across either.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import LoadInProgressError, StoreClosedError

if TYPE_CHECKING:
    from .session import Session

__all__ = ["KeyEntry", "KeyState", "KeyTable", "wake"]


class KeyState(enum.Enum):
    LOADING = "loading"
    LIVE = "live"
    UNLOADING = "unloading"
    CLOSED = "closed"


class KeyEntry:
    """One key's life in this Store. Fields change only under the table's lock."""

    __slots__ = (
        "cancelled",
        "closed_reason",
        "confirmed_at",
        "error",
        "explicit",
        "in_tx",
        "key",
        "loader",
        "session",
        "state",
        "token",
        "user_threads",
        "users",
        "wakeup",
        "wanted_by",
        "wanted_since",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.state = KeyState.LOADING
        self.loader = threading.get_ident()
        self.session: Session | None = None
        self.token: int | None = None
        """The lease token, from the moment the lease is taken."""
        self.confirmed_at = 0.0
        """``time.monotonic()`` of the last renewal while loading (the session takes it over)."""
        self.users = 0
        """Open ``session()`` blocks."""
        self.user_threads: dict[int, int] = {}
        """Open ``session()`` blocks by thread (a nested block never waits for a handoff)."""
        self.wanted_by: str | None = None
        """Another process asked for the key while blocks used it: it goes there when the
        last block exits, and new blocks of this process wait for that."""
        self.wanted_since: int | None = None
        """The ``waiting_since`` of ``wanted_by``'s request (see ``HandoffRequest``)."""
        self.explicit = False
        """Loaded by ``load()``: stays until ``unload()``, whatever the blocks do."""
        self.in_tx = False
        """A ``tx`` holds this key: set under the table's lock (``claim_tx``), cleared
        under the session's condition, which updates wait on."""
        self.error: BaseException | None = None
        """Why the load failed, for the threads that waited for it."""
        self.cancelled: str | None = None
        """Why a running load was cancelled (unload, erase, close)."""
        self.closed_reason: str | None = None
        self.wakeup: threading.Event | None = threading.Event()
        """Set to wake the loader early: a cancel, or a NOTIFY that the key is free.
        Only while loading (an Event costs about 1 KiB: not kept per loaded key)."""

    def __repr__(self) -> str:
        return f"<KeyEntry {self.key!r} {self.state.value} users={self.users}>"


def wake(entry: KeyEntry) -> None:
    """Wake the loader of a loading key (a no-op once it is loaded)."""
    wakeup = entry.wakeup
    if wakeup is not None:
        wakeup.set()


def _earlier(since: int | None, than: int | None) -> bool:
    """Has a request waiting since ``since`` waited longer than one since ``than``?"""
    return since is not None and (than is None or since < than)


class KeyTable:
    """Every key of one Store and their transitions (thread-safe)."""

    def __init__(self, describe: Callable[[str], str]) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[str, KeyEntry] = {}
        self._describe = describe
        self.closed = False

    # -- lookups ----------------------------------------------------------------

    def get(self, key: str) -> KeyEntry | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return sum(1 for e in list(self._entries.values()) if e.state is KeyState.LIVE)

    def entries(self, *states: KeyState) -> list[KeyEntry]:
        """Entries in any of ``states``, in key order."""
        with self._lock:
            found = [e for e in self._entries.values() if e.state in states]
        return sorted(found, key=lambda e: e.key)

    def leases(self) -> list[tuple[KeyEntry, int]]:
        """Every lease this Store holds or is taking: loading, live and unloading keys."""
        with self._lock:
            return [
                (e, e.token)
                for e in self._entries.values()
                if e.token is not None and e.state is not KeyState.CLOSED
            ]

    # -- load -------------------------------------------------------------------

    def begin_load(self, key: str, *, explicit: bool, user: bool) -> tuple[KeyEntry, bool]:
        """Join the key's entry: ``(entry, True)`` if this thread must load it.

        A key being loaded by another thread: wait for that load and share its
        outcome (its error is raised here too). Being unloaded: wait, then
        load afresh. Re-entered on the loading thread: ``LoadInProgressError``.
        """
        with self._lock:
            while True:
                self._check_open()
                entry = self._entries.get(key)
                if entry is None or entry.state is KeyState.CLOSED:
                    entry = KeyEntry(key)
                    self._entries[key] = entry
                    self._use(entry, explicit=explicit, user=user)
                    return entry, True
                if entry.state is KeyState.LOADING:
                    if entry.loader == threading.get_ident():
                        raise LoadInProgressError(f"{self._describe(key)} is already loading")
                    self._wait_while(entry, KeyState.LOADING)
                    if entry.error is not None:
                        raise entry.error
                    continue
                if entry.state is KeyState.UNLOADING:
                    self._wait_while(entry, KeyState.UNLOADING)
                    continue
                if user and entry.wanted_by and threading.get_ident() not in entry.user_threads:
                    # Promised to another process: queue behind it, do not starve it.
                    while entry.state is KeyState.LIVE and entry.wanted_by:
                        self._changed.wait()
                    continue
                self._use(entry, explicit=explicit, user=user)
                return entry, False

    def try_claim(self, key: str) -> KeyEntry | None:
        """A LOADING entry for ``key`` if nothing here uses it, else None (never waits).

        For work over many keys without sessions (offline edits, imports): the
        caller ends it with :meth:`fail_load` (``None``), as ``erase`` does. A
        CLOSED entry counts as used: it may carry changes never written,
        which ``unload`` and ``close`` must still report.
        """
        with self._lock:
            self._check_open()
            if key in self._entries:
                return None
            entry = self._entries[key] = KeyEntry(key)
            return entry

    def wait_loaded(self, key: str) -> KeyEntry | None:
        """The key's entry once no load of it runs (another thread's load: waited for)."""
        with self._lock:
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry.state is KeyState.LOADING
                and entry.loader != threading.get_ident()
            ):
                self._wait_while(entry, KeyState.LOADING)
                if entry.error is not None:
                    raise entry.error
            return self._entries.get(key)

    def lease_taken(self, entry: KeyEntry, token: int) -> bool:
        """Record the lease of a running load; False if the load was cancelled meanwhile."""
        with self._lock:
            entry.token = token
            return entry.cancelled is None

    def finish_load(self, entry: KeyEntry, session: Session) -> bool:
        """LOADING -> LIVE; False if the load was cancelled (the caller releases, fails it)."""
        with self._lock:
            if entry.cancelled is not None or self.closed:
                entry.cancelled = entry.cancelled or "the store was closed"
                return False
            entry.session = session
            entry.state = KeyState.LIVE
            entry.wakeup = None
            self._changed.notify_all()
            return True

    def fail_load(self, entry: KeyEntry, error: BaseException | None) -> None:
        """A load ended without a session: forget the entry, wake its waiters with ``error``.

        ``None`` (an ``erase`` that held the entry): the waiters load afresh.
        """
        with self._lock:
            entry.error = error
            entry.state = KeyState.CLOSED
            entry.closed_reason = "load failed"
            entry.token = None
            self._remove(entry)
            self._changed.notify_all()

    def cancel(self, key: str, reason: str) -> KeyEntry | None:
        """Cancel a running load of ``key``; the entry (to wait for), or None if none runs."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state is not KeyState.LOADING:
                return None
            entry.cancelled = entry.cancelled or reason
        wake(entry)
        return entry

    def wait_settled(self, entry: KeyEntry, timeout: float | None = None) -> bool:
        """Wait until ``entry`` is no longer loading; False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: entry.state is not KeyState.LOADING, timeout)

    # -- users ------------------------------------------------------------------

    def leave(self, entry: KeyEntry) -> tuple[bool, str | None]:
        """A ``session()`` block ended: ``(let the key go?, the holder to hand it to)``.

        The key goes when its last block exits and ``load()`` does not hold
        it, or when another process asked for it meanwhile (then to that one).
        """
        with self._lock:
            entry.users -= 1
            ident = threading.get_ident()
            left = entry.user_threads.get(ident, 0) - 1
            if left > 0:
                entry.user_threads[ident] = left
            else:
                entry.user_threads.pop(ident, None)
            if entry.users > 0:
                return False, None
            if entry.wanted_by:
                return True, entry.wanted_by
            return not entry.explicit, None

    def want(self, entry: KeyEntry, requester: str, waiting_since: int | None = None) -> bool:
        """Another process asks for the key: promise it; False if nothing here will let it go.

        Promised to the asker that has waited longest (the smallest
        ``waiting_since``; among equals, or without one, the first). A key
        that ``session()`` blocks use (or are loading) passes when the last
        block exits; a key being unloaded passes at the end of that unload
        instead of being released, so the asker never races the releaser's
        next load for it (docs/web-backends.md).
        """
        with self._lock:
            state = entry.state
            in_use = state is KeyState.LIVE or state is KeyState.LOADING
            if not (state is KeyState.UNLOADING or (in_use and entry.users > 0)):
                return False
            if entry.wanted_by is None or _earlier(waiting_since, entry.wanted_since):
                entry.wanted_by, entry.wanted_since = requester, waiting_since
            return True

    def unwant(self, entry: KeyEntry) -> None:
        """The promised handoff failed: new blocks may use the key again."""
        with self._lock:
            entry.wanted_by = entry.wanted_since = None
            self._changed.notify_all()

    def drop_explicit(self, entry: KeyEntry) -> bool:
        """``unload()`` of a key: True if no ``session()`` block still uses it."""
        with self._lock:
            entry.explicit = False
            return entry.users <= 0

    # -- transactions ---------------------------------------------------------------

    def claim_tx(self, entries: list[KeyEntry]) -> list[str]:
        """Mark ``entries`` as held by a tx, all or none; the keys already in one."""
        with self._lock:
            busy = [e.key for e in entries if e.in_tx]
            if not busy:
                for entry in entries:
                    entry.in_tx = True
            return busy

    # -- unload and close -------------------------------------------------------

    def begin_unload(
        self, entry: KeyEntry, *, only_unused: bool = False, users_only: bool = False
    ) -> bool:
        """LIVE -> UNLOADING (the caller holds the session's condition); False if not LIVE.

        ``only_unused``: only if no ``session()`` block and no ``load()`` holds
        it now (the last block's exit raced a new one's entry); ``users_only``:
        only if no ``session()`` block uses it (a handoff).
        """
        with self._lock:
            if entry.state is not KeyState.LIVE or self._entries.get(entry.key) is not entry:
                return False
            if (only_unused or users_only) and entry.users > 0:
                return False
            if only_unused and entry.explicit:
                return False
            entry.state = KeyState.UNLOADING
            return True

    def end_unload(self, entry: KeyEntry, *, done: bool, reason: str = "unloaded") -> None:
        """UNLOADING -> removed (``done``) or back to LIVE (the final save failed)."""
        if done:
            self.end_unloads([entry], reason=reason)
            return
        with self._lock:
            if entry.state is KeyState.UNLOADING:
                entry.state = KeyState.LIVE
            # The key stays here: a promise made during the unload is off
            # (blocks that wait for it would otherwise wait forever).
            entry.wanted_by = entry.wanted_since = None
            self._changed.notify_all()

    def end_unloads(self, entries: Sequence[KeyEntry], *, reason: str = "unloaded") -> None:
        """Unloads that are done: UNLOADING (or CLOSED meanwhile, lease lost) -> removed.

        One lock and one wake-up for a whole batch (``close()`` of 10,000 keys).
        """
        with self._lock:
            for entry in entries:
                if entry.state is KeyState.UNLOADING:
                    entry.state = KeyState.CLOSED
                    entry.closed_reason = reason
                if entry.state is KeyState.CLOSED:
                    self._remove(entry)
            self._changed.notify_all()

    def close(self, entry: KeyEntry, reason: str, *, keep: bool = True) -> bool:
        """LIVE/UNLOADING -> CLOSED (lease lost, handed over); False if already closed.

        ``keep``: stay registered, so later calls raise ``SessionClosedError``
        until ``load()`` replaces it or ``unload()`` forgets it.
        """
        with self._lock:
            if entry.state is KeyState.CLOSED or entry.state is KeyState.LOADING:
                return False
            entry.state = KeyState.CLOSED
            entry.closed_reason = reason
            if not keep:
                self._remove(entry)
            self._changed.notify_all()
            return True

    def forget(self, entry: KeyEntry) -> None:
        """Drop a CLOSED entry (``unload()`` of a key whose session had closed)."""
        with self._lock:
            if entry.state is KeyState.CLOSED:
                self._remove(entry)

    def close_all(self) -> list[KeyEntry]:
        """The store closes: refuse new loads, cancel running ones; every entry, key order."""
        with self._lock:
            self.closed = True
            everything = sorted(self._entries.values(), key=lambda e: e.key)
            for entry in everything:
                if entry.state is KeyState.LOADING:
                    entry.cancelled = entry.cancelled or "the store is closing"
                    wake(entry)
            return everything

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._changed.notify_all()

    # -- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise StoreClosedError(f"{self._describe('')} is closed".replace(" key ''", ""))

    @staticmethod
    def _use(entry: KeyEntry, *, explicit: bool, user: bool) -> None:
        if explicit:
            entry.explicit = True
        if user:
            entry.users += 1
            ident = threading.get_ident()
            entry.user_threads[ident] = entry.user_threads.get(ident, 0) + 1

    def _wait_while(self, entry: KeyEntry, state: KeyState) -> None:
        while entry.state is state:
            self._changed.wait()

    def _remove(self, entry: KeyEntry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
