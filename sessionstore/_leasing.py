"""Keeping leases: the heartbeat, and what happens when a lease is lost.

Owns the renewal of every lease this Store holds or is taking (one
statement per ``lock_refresh_interval``, rows locked by someone else skipped
and retried alone, so such a row puts only its own key at risk) and the one
way a key's session ends because its lease is gone: :meth:`Leases.lose`,
which closes the registry entry and tells the application on the callback
lane (``on_lock_lost``), never on the heartbeat's thread.

Also the leases let go lately: a release commits without waiting for the
WAL flush (revision 0006), so a server crash can lose the last ones; when
the control connection comes back, this holder's rows of those keys that
nothing here uses are deleted (:meth:`Leases.release_again`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._background import NotifyLost
from ._registry import KeyEntry, KeyState

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["Leases"]

RELEASED_WINDOW = 10.0
"""Seconds before a drop whose releases are done again after the reconnect. A
crash loses at most the asynchronous commits of its last 3 x
``wal_writer_delay`` (200 ms by default); the window also covers a server
that takes seconds to go down, or a drop seen late."""

_RELEASED_MAX = 100_000
"""At most this many recent releases are kept (at a higher rate the window shrinks)."""


class Leases:
    """The heartbeat, lease loss and recent releases of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        self._released: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=_RELEASED_MAX
        )
        self._released_lock = threading.Lock()

    def release(self, leases: Sequence[tuple[str, int]]) -> None:
        """Release ``leases`` (on a path that must not raise: they expire on their own).

        Each key is remembered for :data:`RELEASED_WINDOW` seconds (and
        while the control connection is down), for :meth:`release_again`.
        """
        core = self._core
        now = time.monotonic()
        down = core.control.down_since if core.control is not None else None
        since = now - RELEASED_WINDOW if down is None else min(now, down) - RELEASED_WINDOW
        with self._released_lock:
            self._forget_before(since)
            self._released.extend((now, key) for key, _ in leases)
        try:
            core.repo.release(leases)
        except Exception as exc:
            core.log(logging.WARNING, None, "releasing %d leases failed: %s", len(leases), exc)

    def release_again(self, dropped_at: float) -> None:
        """The control connection is back: the releases before ``dropped_at``, once more.

        A server crash may have lost them (their commits did not wait for
        the flush): the rows would stay, under this holder, until they
        expire. Not by token (a crash can issue a token again, even to this
        holder): each key is claimed here first, so that no load of it runs,
        and then any row of this holder for it is stale and goes. A key in
        use here (loaded again, loading) is left alone.
        """
        core = self._core
        with self._released_lock:
            self._forget_before(dropped_at - RELEASED_WINDOW)
            keys = sorted({key for _, key in self._released})
        claimed = [entry for key in keys if (entry := core.table.try_claim(key)) is not None]
        if not claimed:
            return
        try:
            gone = core.repo.release_stale([entry.key for entry in claimed])
            if gone:
                core.log(logging.WARNING, None, "released %d leases a crash had kept", gone)
        except Exception as exc:
            core.log(logging.WARNING, None, "releasing stale leases failed: %s", exc)
        finally:
            for entry in claimed:
                core.table.fail_load(entry, None)  # waiting loads start afresh

    def _forget_before(self, since: float) -> None:
        released = self._released
        while released and released[0][0] < since:
            released.popleft()

    def heartbeat(self) -> None:
        """Renew every lease; close the sessions whose lease is gone (scheduler thread)."""
        core = self._core
        held = core.table.leases()
        if not held:
            return
        config = core.config
        started = time.monotonic()
        try:
            renewal = core.repo.renew(
                [(entry.key, token) for entry, token in held],
                config.lock_duration,
                wait=config.lock_refresh_interval / 4,
            )
        except Exception as exc:
            core.log(logging.WARNING, None, "heartbeat failed: %s", exc)
            # Without a renewal we cannot know; past the lease length we can.
            for entry, _ in held:
                self._lose_if_overdue(entry, "lease expired while the database was unreachable")
            return
        for entry, token in held:
            if entry.state is KeyState.LOADING and renewal.renewed.get(entry.key) == token:
                entry.confirmed_at = started  # no session yet: it takes this over
            if entry.state is not KeyState.LIVE or entry.session is None:
                continue  # loading (no session yet) or unloading (released on purpose)
            if renewal.renewed.get(entry.key) == token:
                entry.session.confirm_lease(started)
            elif entry.key in renewal.busy:
                core.log(logging.WARNING, entry.key, "lease row is locked by another session")
                self._lose_if_overdue(entry, "lease could not be renewed (row locked)")
            else:
                self.lose(entry, "lease was not renewed (expired or taken over)")

    def _lose_if_overdue(self, entry: KeyEntry, reason: str) -> None:
        session = entry.session
        if session is not None and session.lease_overdue(self._core.config.lock_duration):
            self.lose(entry, reason)

    def lose(self, entry: KeyEntry, reason: str) -> None:
        """Close a session whose lease is gone; tell the application once, on the lane."""
        core = self._core
        if not core.table.close(entry, reason):
            return
        core.stats.add("lost_leases")
        if entry.session is not None:
            core.rules.views.forget(entry.session)
        core.log(logging.WARNING, entry.key, "lease lost: %s", reason)
        self.tell_lost(entry.key)

    def tell_lost(self, key: str) -> None:
        """``on_lock_lost(key)`` on the callback lane (run here if the lane has stopped)."""
        core = self._core
        if core.config.on_lock_lost is None:
            return
        task = NotifyLost(core, key)
        if not core.lane.submit(task):
            task()
