"""Keeping leases: the heartbeat, and what happens when a lease is lost.

Owns the renewal of every lease this Store holds or is taking (one
statement per ``lock_refresh_interval``, rows locked by someone else skipped
and retried alone, so such a row puts only its own key at risk) and the one
way a key's session ends because its lease is gone: :meth:`Leases.lose`,
which closes the registry entry and tells the application on the callback
lane (``on_lock_lost``), never on the heartbeat's thread.

Also the leases let go lately: a release commits without waiting for the
WAL flush (revision 0006), so a server crash can lose the last ones; they
are released again, by key and token, when the control connection comes
back (:meth:`Leases.release_again`).
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
"""Seconds of releases done again after a reconnect. A crash loses at most
the asynchronous commits of its last 3 x ``wal_writer_delay`` (200 ms by
default); the window also covers a server that takes seconds to go down."""

_RELEASED_MAX = 100_000
"""At most this many recent releases are kept (at a higher rate the window shrinks)."""


class Leases:
    """The heartbeat, lease loss and recent releases of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        self._released: collections.deque[tuple[float, str, int]] = collections.deque(
            maxlen=_RELEASED_MAX
        )
        self._released_lock = threading.Lock()

    def release(self, leases: Sequence[tuple[str, int]]) -> None:
        """Release ``leases`` (on a path that must not raise: they expire on their own).

        Each is remembered for :data:`RELEASED_WINDOW` seconds, for
        :meth:`release_again`.
        """
        now = time.monotonic()
        with self._released_lock:
            self._forget_before(now - RELEASED_WINDOW)
            self._released.extend((now, key, token) for key, token in leases)
        self._release(leases)

    def release_again(self) -> None:
        """The control connection is back: release once more what was let go lately.

        A server crash may have lost those releases (their commits did not
        wait for the flush): the rows would stay, under this holder, until
        they expire. By key and token, so a lease taken again since (a new
        token) is not touched; a release that did land finds nothing.
        """
        with self._released_lock:
            self._forget_before(time.monotonic() - RELEASED_WINDOW)
            recent = {key: token for _, key, token in self._released}
        if recent:
            self._core.log(logging.INFO, None, "releasing %d recent leases again", len(recent))
            self._release(sorted(recent.items()))

    def _forget_before(self, since: float) -> None:
        released = self._released
        while released and released[0][0] < since:
            released.popleft()

    def _release(self, leases: Sequence[tuple[str, int]]) -> None:
        core = self._core
        try:
            core.repo.release(leases)
        except Exception as exc:
            core.log(logging.WARNING, None, "releasing %d leases failed: %s", len(leases), exc)

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
