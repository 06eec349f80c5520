"""Background work: the worker threads and the named tasks they run.

Owns the threads a Store runs besides the control connection's, and what
runs on them (modelled on psycopg_pool's scheduler and its task classes):

* the :class:`~sessionstore.sched.Scheduler` thread fires timed tasks:
  :class:`Heartbeat` (renew every lease; runs right there, it is one
  statement), :class:`Autosave` and :class:`Prune` (handed to the worker);
* the **worker** (:class:`Worker` named ``sessionstore-work-*``) writes:
  autosave batches, pruning, handovers (:class:`HandOver`);
* the **callback lane** (a second :class:`Worker`, ``sessionstore-callbacks-*``)
  runs user callbacks triggered in the background (:class:`NotifyLost`,
  :class:`AskHandoff`, :class:`AfterSave`, :class:`DeliverMessages`), so a
  slow or blocking callback never stalls the heartbeat, autosave or another
  key's handoff.

Every task holds a weak reference to the store's core: a task left in a queue
never keeps a dropped store alive, and finds nothing to do once it is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ._storage.leases import HandoffRequest
from .frozen import frozen_view

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = [
    "AfterSave",
    "AskHandoff",
    "Autosave",
    "DeliverMessages",
    "HandOver",
    "Heartbeat",
    "NotifyLost",
    "Prune",
    "ReleaseAgain",
    "SweepMessages",
    "Task",
    "Worker",
]

logger = logging.getLogger("sessionstore")


class Task(Protocol):
    def __call__(self) -> None: ...


class _Stop:
    """Queued last by :meth:`Worker.stop`: the worker ends after the tasks before it."""

    def __call__(self) -> None:  # pragma: no cover - never run
        raise AssertionError


class Worker:
    """One daemon thread running queued tasks in order until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> bool:
        """Queue ``task``; False once the worker was told to stop."""
        if self._stopped:
            return False
        self._queue.put(task)
        return True

    def is_current(self) -> bool:
        """Is the calling thread this worker's?"""
        return threading.current_thread() is self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then end. Waits unless called from the worker itself."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(_Stop())
        if not self.is_current() and self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("%s: still busy after %ss; left running", self.name, timeout)

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if isinstance(task, _Stop):
                return
            try:
                task()
            except Exception:
                logger.exception("%s: task %r failed", self.name, task)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<Worker {self.name} {state}>"


class _CoreTask:
    """A task bound weakly to a store's core."""

    __slots__ = ("_core",)

    def __init__(self, core: StoreCore) -> None:
        self._core: Callable[[], StoreCore | None] = weakref.ref(core)

    def core(self) -> StoreCore | None:
        core = self._core()
        return None if core is None or core.closing else core

    def __repr__(self) -> str:
        core = self._core()
        name = core.name if core is not None else "<gone>"
        return f"<{type(self).__name__} store={name!r}>"


class Heartbeat(_CoreTask):
    """Renew every lease of the store in one statement; lose the ones that are gone."""

    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.leases.heartbeat()


class Autosave(_CoreTask):
    """Save every dirty key (on the worker, so the scheduler stays punctual)."""

    def __call__(self) -> None:
        core = self.core()
        if core is not None and not core.saver.autosave_running():
            core.worker.submit(_RunAutosave(core))


class _RunAutosave(_CoreTask):
    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.saver.autosave()
            core.messages.sweep()  # in case a NOTIFY was missed


class SweepMessages(_CoreTask):
    """On the worker: find messages for held keys whose NOTIFY was missed (a reconnect)."""

    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.messages.sweep()


class ReleaseAgain(_CoreTask):
    """On the worker: release again the leases let go before a drop (see _leasing)."""

    __slots__ = ("dropped_at",)

    def __init__(self, core: StoreCore, dropped_at: float) -> None:
        super().__init__(core)
        self.dropped_at = dropped_at

    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.leases.release_again(self.dropped_at)


class Prune(_CoreTask):
    """Delete versions beyond the retention policy (on the worker)."""

    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.worker.submit(_RunPrune(core))


class _RunPrune(_CoreTask):
    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.prune()


class HandOver(_CoreTask):
    """Another process asked for ``key``: ask the application (on the lane), then hand over."""

    __slots__ = ("asked", "key", "request")

    def __init__(self, core: StoreCore, request: HandoffRequest, *, asked: bool = False) -> None:
        super().__init__(core)
        self.request = request
        self.key = request.key
        self.asked = asked

    def __call__(self) -> None:
        core = self.core()
        if core is None:
            return
        if core.table.get(self.key) is None:
            # Not ours here (any more): maybe a lease handed to us after our
            # load gave up, which goes back for the asker whatever the
            # application would have said about a key it does not hold.
            core.repo.release_unclaimed(self.key)
        elif core.config.on_handoff_request is not None and not self.asked:
            core.lane.submit(AskHandoff(core, self.request))
        else:
            core.saver.hand_over(self.request)

    def __repr__(self) -> str:
        return f"<HandOver key={self.key!r} to={self.request.requester}>"


class AskHandoff(HandOver):
    """On the lane: may ``key`` go? If so, the handover itself runs on the worker."""

    def __call__(self) -> None:
        core = self.core()
        if core is None or not core.saver.may_hand_over(self.key):
            return
        callback = core.config.on_handoff_request
        assert callback is not None
        try:
            allowed = bool(callback(self.key))
        except Exception:
            core.log(
                logging.ERROR, self.key, "on_handoff_request raised; keeping the key", exc_info=True
            )
            return
        if not allowed:
            core.log(logging.DEBUG, self.key, "handoff refused by on_handoff_request")
            return
        core.worker.submit(HandOver(core, self.request, asked=True))


class NotifyLost(_CoreTask):
    """On the lane: tell the application a key is no longer ours (``on_lock_lost``)."""

    __slots__ = ("key",)

    def __init__(self, core: StoreCore, key: str) -> None:
        super().__init__(core)
        self.key = key

    def core(self) -> StoreCore | None:
        return self._core()  # delivered even while the store closes: nothing is dropped

    def __call__(self) -> None:
        core = self.core()
        callback = None if core is None else core.config.on_lock_lost
        if core is None or callback is None:
            return
        try:
            callback(self.key)
        except Exception:
            core.log(logging.ERROR, self.key, "on_lock_lost callback raised", exc_info=True)

    def __repr__(self) -> str:
        return f"<NotifyLost key={self.key!r}>"


class AfterSave(_CoreTask):
    """On the lane: ``on_after_save(key, data as saved, version)`` after a write committed."""

    __slots__ = ("encoded", "key", "version")

    def __init__(self, core: StoreCore, key: str, encoded: bytes, version: int) -> None:
        super().__init__(core)
        self.key = key
        self.encoded = encoded
        self.version = version

    def core(self) -> StoreCore | None:
        return self._core()  # the saves of close() are reported too

    def __call__(self) -> None:
        core = self.core()
        callback = None if core is None else core.config.on_after_save
        if core is None or callback is None:
            return
        try:
            callback(self.key, frozen_view(self.encoded), self.version)
        except Exception:
            core.log(logging.ERROR, self.key, "on_after_save raised", exc_info=True)

    def __repr__(self) -> str:
        return f"<AfterSave key={self.key!r} version={self.version}>"


class DeliverMessages(_CoreTask):
    """On the lane: run ``message_handler`` on the messages waiting for a held key."""

    __slots__ = ("key",)

    def __init__(self, core: StoreCore, key: str) -> None:
        super().__init__(core)
        self.key = key

    def __call__(self) -> None:
        core = self.core()
        if core is not None:
            core.messages.deliver(self.key)

    def __repr__(self) -> str:
        return f"<DeliverMessages key={self.key!r}>"
