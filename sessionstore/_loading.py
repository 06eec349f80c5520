"""Loading a key: wait for its lease, read its file, bring its data forward.

Owns the load steps of docs/architecture.md ("Loading"): lease (waiting for a key
held elsewhere: a live holder is asked to hand it over, a dead one is taken
over once its advisory lock stayed gone for the whole ``takeover_grace``,
an expired lease is simply taken), record and file (integrity checked), the
legacy import or the template, pending migrations, the schema, the new
:class:`~sessionstore.session.Session` (with the key's applied idempotency
keys, read in the same statement), and the messages waiting for the key
(:mod:`sessionstore._messages`). The wait sleeps on the key's registry
entry, so a NOTIFY that the key is free, or a cancellation, wakes it at once.
The registry transitions of a load are made here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import migrations as migrations_module
from ._registry import KeyEntry, KeyState
from ._storage import LeaseInfo, LoadedKey, StoredVersion
from .errors import LoadCancelledError, LoadInProgressError, LockUnavailableError
from .frozen import JSON, frozen_view, thaw
from .retry import AttemptWithBackoff, RetryPolicy
from .session import Session

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["Loader"]

_ASK_EVERY = 0.1
"""Seconds between handoff requests to the same live holder: a request it
could not promise (its own load of the key was still in flight) costs at
most this long, one NOTIFY per waiter and interval."""


class Loader:
    """The load path of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core

    def load(self, key: str, *, explicit: bool, user: bool) -> KeyEntry:
        """The key's LIVE entry: loaded now by this thread, or shared with another's load."""
        core = self._core
        entry, mine = core.table.begin_load(key, explicit=explicit, user=user)
        if not mine:
            return entry
        try:
            token, acquired_at, read = self._acquire(entry, read=True)
        except BaseException as exc:
            core.table.fail_load(entry, exc)
            raise
        return self._finish(entry, token, acquired_at, None, read)

    def _finish(
        self,
        entry: KeyEntry,
        token: int,
        acquired_at: float,
        loaded: LoadedKey | None,
        read: Callable[[], LoadedKey] | None = None,
    ) -> KeyEntry:
        """From the lease taken to LIVE: read (unless ``loaded``), build the session.

        ``read``: the data the lease call brought back, checked here (where a
        failure releases the lease); else it is read now.
        """
        core, key = self._core, entry.key
        try:
            if not core.table.lease_taken(entry, token):
                raise self._cancelled(entry)
            if loaded is None:
                loaded = read() if read is not None else core.repo.read_for_load(key)
            session = self._read_session(entry, token, acquired_at, loaded)
            if core.config.changed_callbacks:
                # The callbacks get the data when the load is done: build its
                # view now, so that JSON that does not parse fails the load.
                session.data  # noqa: B018
            if not core.table.finish_load(entry, session):
                core.rules.views.forget(session)
                raise self._cancelled(entry)
        except BaseException as exc:
            try:
                core.release_quietly([(key, token)])
            finally:
                core.messages.forget(key)
                core.table.fail_load(entry, exc)
            raise
        session.confirm_lease(entry.confirmed_at)  # renewed by the heartbeat while loading
        core.messages.loaded(key)
        core.log(logging.DEBUG, key, "loaded with token %s at version %s", token, session.version)
        if core.config.changed_callbacks:
            core.fire_changed(key, session.data, None)
        return entry

    def load_many(self, keys: Sequence[str], *, skip_unavailable: bool) -> list[str]:
        """Load ``keys`` (sorted, unique) with batched lease and read statements.

        Keys held elsewhere: waited for one by one (a live holder is asked to
        hand over), and if one stays unavailable none of this call's keys is
        kept (its error is raised); with ``skip_unavailable``, not waited for
        but returned. A key whose data fails to load fails the call the same way.
        """
        core = self._core
        mine: list[KeyEntry] = []
        taken: dict[str, tuple[KeyEntry, int, float]] = {}
        unavailable: list[KeyEntry] = []
        try:
            for key in keys:  # may wait for, and raise, another thread's load of a key
                entry, is_mine = core.table.begin_load(key, explicit=True, user=False)
                if is_mine:
                    mine.append(entry)
            step = core.config.save_batch_size
            for start in range(0, len(mine), step):
                chunk = mine[start : start + step]
                self._take_many(chunk, taken, unavailable, wait=not skip_unavailable)
        except BaseException as exc:
            core.release_quietly([(key, token) for key, (_, token, _) in taken.items()])
            for entry in mine:
                core.table.fail_load(entry, exc)
            raise
        for entry in unavailable:
            core.table.fail_load(entry, None)
        self._finish_many(list(taken.values()))
        return [entry.key for entry in unavailable]

    def _take_many(
        self,
        entries: Sequence[KeyEntry],
        taken: dict[str, tuple[KeyEntry, int, float]],
        unavailable: list[KeyEntry],
        *,
        wait: bool,
    ) -> None:
        core = self._core
        started = time.monotonic()
        tokens = core.repo.acquire_many(
            [e.key for e in entries], core.config.lock_duration, liveness=core.liveness
        )
        missing = []
        for entry in entries:
            token = tokens.get(entry.key)
            if token is not None:
                self._took(entry, token, started, taken)
            else:
                missing.append(entry)
        for entry in missing:
            if wait:
                token, acquired_at, _ = self._acquire(entry)  # LockUnavailableError: none kept
                self._took(entry, token, acquired_at, taken)
            else:
                unavailable.append(entry)

    def _took(
        self,
        entry: KeyEntry,
        token: int,
        acquired_at: float,
        taken: dict[str, tuple[KeyEntry, int, float]],
    ) -> None:
        """Record a lease at once, so the heartbeat renews it while other keys are awaited."""
        taken[entry.key] = (entry, token, acquired_at)
        if not self._core.table.lease_taken(entry, token):
            raise self._cancelled(entry)

    def _finish_many(self, taken: Sequence[tuple[KeyEntry, int, float]]) -> None:
        """Read the taken keys in batches and make them LIVE; on a failure, undo them all."""
        core = self._core
        done: list[KeyEntry] = []
        step = core.config.save_batch_size
        try:
            for start in range(0, len(taken), step):
                chunk = taken[start : start + step]
                loaded = core.repo.read_many_for_load([entry.key for entry, _, _ in chunk])
                for entry, token, acquired_at in chunk:
                    done.append(self._finish(entry, token, acquired_at, loaded[entry.key]))
        except BaseException:
            # The key that failed released its own lease; the rest still wait here.
            rest = [item for item in taken if item[0].state is KeyState.LOADING]
            self._undo(done, rest)
            raise

    def _undo(self, done: Sequence[KeyEntry], rest: Sequence[tuple[KeyEntry, int, float]]) -> None:
        """A ``load_many`` that fails keeps none of its keys."""
        core = self._core
        core.release_quietly([(entry.key, token) for entry, token, _ in rest])
        for entry, _, _ in rest:
            core.table.fail_load(entry, None)
        for entry in done:
            core.table.drop_explicit(entry)
        core.saver.unload(list(done), last_user=True)

    def lease_for(self, key: str) -> KeyEntry:
        """A LOADING entry holding the key's lease, for work without a session (erase).

        The caller ends it with ``table.fail_load(entry, None)``: loads that
        waited for it then start afresh.
        """
        core = self._core
        entry, mine = core.table.begin_load(key, explicit=False, user=False)
        if not mine:
            raise LoadInProgressError(f"{core.describe(key)} was loaded meanwhile")
        try:
            token, _, _ = self._acquire(entry)
        except BaseException as exc:
            core.table.fail_load(entry, exc)
            raise
        if not core.table.lease_taken(entry, token):
            error = self._cancelled(entry)
            try:
                core.release_quietly([(key, token)])
            finally:
                core.table.fail_load(entry, error)
            raise error
        return entry

    def _cancelled(self, entry: KeyEntry) -> LoadCancelledError:
        reason = entry.cancelled or "the store was closed"
        return LoadCancelledError(f"{self._core.describe(entry.key)}: load cancelled ({reason})")

    # -- the lease ------------------------------------------------------------------

    def _acquire(
        self, entry: KeyEntry, *, read: bool = False
    ) -> tuple[int, float, Callable[[], LoadedKey] | None]:
        """Wait for the key's lease; ``(token, monotonic time of the winning attempt, data)``.

        With ``read``, the winning attempt also reads what the load needs
        (one call: ``repo.acquire_for_load``); else the data is None.
        """
        core, key, config = self._core, entry.key, self._core.config
        backoff = AttemptWithBackoff(
            RetryPolicy(timeout=config.lock_timeout, initial_delay=0.005, max_delay=0.25)
        )
        dead: LeaseInfo | None = None
        seen_dead: dict[tuple[str, int], float] = {}
        asked: dict[tuple[str, int], float] = {}
        since: int | None = None  # the first lease in our way: our place in the queue
        wakeup = entry.wakeup
        assert wakeup is not None, "a loading entry has its wakeup event"
        while True:
            wakeup.clear()  # before the check: a cancel right after it still wakes us
            if entry.cancelled is not None:
                raise self._cancelled(entry)
            started = time.monotonic()
            token, loaded = self._try_acquire(key, dead, read)
            if token is not None:
                self._won(key, dead, asked=bool(asked))
                return token, started, loaded
            dead = None
            holder = core.repo.lease_info(key)
            now = time.monotonic()
            if holder is not None and holder.active:
                lease = (holder.holder, holder.token)
                if holder.liveness and not holder.alive:
                    # Dead only if its lock stayed gone for the whole grace.
                    if now - seen_dead.setdefault(lease, now) >= config.takeover_grace:
                        dead = holder
                        continue
                else:
                    seen_dead.pop(lease, None)  # seen alive: the grace starts over
                    since = since or holder.token
                    if now - asked.get(lease, -1e9) >= _ASK_EVERY:
                        asked[lease] = now
                        core.repo.request_handoff(holder.holder, key, since)
            delay = backoff.next_delay()
            if delay is None:
                raise self._unavailable(key, holder)
            wakeup.wait(delay)  # a NOTIFY that the key is free, or a cancel, wakes it

    def _won(self, key: str, dead: LeaseInfo | None, *, asked: bool) -> None:
        """The lease is ours: count a handoff in, or log the takeover of ``dead``."""
        core = self._core
        if asked and dead is None:
            core.stats.add("handoffs_in")  # given up by a live holder we asked
        if dead is not None:
            core.log(
                logging.INFO,
                key,
                "took over from dead holder %s (%s pid %s)",
                dead.holder,
                dead.host,
                dead.pid,
            )

    def _unavailable(self, key: str, holder: LeaseInfo | None) -> LockUnavailableError:
        core = self._core
        where = f" by {holder.host} pid {holder.pid} until {holder.expires_at}" if holder else ""
        return LockUnavailableError(
            f"{core.describe(key)} is held{where}; "
            f"gave up after lock_timeout={core.config.lock_timeout}s"
        )

    def _try_acquire(
        self, key: str, dead: LeaseInfo | None, read: bool
    ) -> tuple[int | None, Callable[[], LoadedKey] | None]:
        """One attempt at the lease (and, with ``read``, the load's read in the same call)."""
        core, duration = self._core, self._core.config.lock_duration
        if not read:
            return core.repo.acquire(key, duration, liveness=core.liveness, dead=dead), None
        taken = core.repo.acquire_for_load(key, duration, liveness=core.liveness, dead=dead)
        return taken if taken is not None else (None, None)

    # -- the data -------------------------------------------------------------------

    def _read_session(
        self, entry: KeyEntry, token: int, acquired_at: float, loaded: LoadedKey
    ) -> Session:
        core, key = self._core, entry.key
        stored = loaded.stored
        if stored is not None:
            encoded, applied, dirty, _ = self.bring_forward(stored, key)
            version = stored.info.version
        else:
            legacy = None
            if core.config.import_legacy_data is not None:
                legacy = core.config.import_legacy_data(key)
            if legacy is not None:
                data, applied = self.migrate(thaw(legacy), (), core.describe(key))
                encoded = core.rules.accept(data, key)
                version, dirty = 0, True
            else:
                encoded = core.template  # checked against the schema at construction
                applied = tuple(step.name for step in core.steps)
                version, dirty = 0, False
        session = Session(
            core.rules,
            entry,
            key,
            token,
            encoded,
            version,
            applied,
            dirty=dirty,
            lease_confirmed_at=acquired_at,
            requests=loaded.requests[::-1],  # oldest first
        )
        if loaded.has_messages:
            core.messages.apply_at_load(session)  # before the changed callbacks, in order
        return session

    def peek(self, key: str, max_age: float | None) -> JSON | None:
        """``Store.peek``: the saved data brought forward (frozen), or None; no lease.

        With ``max_age``, a result this store read at most that long ago may
        be returned from the peek cache instead.
        """
        core = self._core
        cache = core.peek_cache
        if max_age is not None and cache is not None:
            with core.peek_lock:
                cached = cache.get(key)
            if cached is not None and time.monotonic() - cached[0] <= max_age:
                return cached[1]
        read_at = time.monotonic()
        stored = core.repo.read(key)
        data = None
        if stored is not None:
            # Decoded afresh: ``plain`` went through the validator (user code),
            # and a view takes ownership of what it wraps.
            encoded, _, _, _ = self.bring_forward(stored, key)
            data = frozen_view(encoded, stored.context)
        if cache is not None:
            with core.peek_lock:
                cache[key] = (read_at, data)
        return data

    def bring_forward(
        self, stored: StoredVersion, key: str
    ) -> tuple[bytes, tuple[str, ...], bool, JSON | None]:
        """A stored version through pending migrations and the schema.

        Returns ``(json bytes, applied migrations, migrated?, plain data or
        None)``. The JSON is parsed only when a migration or the schema needs
        the data (it is then returned, unless a migration changed it). A
        stored file's integrity is verified by the read (shard count, CRC-32,
        zstd frame, exact size) and its JSON round-tripped when this package
        encoded it, so parsing it again here would only repeat, at several
        times the cost of the whole load, what the first ``get`` does anyway.
        """
        core = self._core
        applied = stored.info.migrations
        steps = migrations_module.pending(core.steps, applied, stored.context)
        if steps:
            data, names = self.migrate(stored.decode(), applied, stored.context)
            return core.rules.accept(data, key), names, True, None
        if not core.rules.validates:
            return stored.raw, tuple(applied), False, None
        data = stored.decode()
        core.rules.check(data, stored.raw, key)
        return stored.raw, tuple(applied), False, data

    def migrate(
        self, data: JSON, applied: Sequence[str], context: str
    ) -> tuple[JSON, tuple[str, ...]]:
        migrated, names, _ = migrations_module.apply(self._core.steps, data, applied, context)
        return migrated, tuple(names)
