"""The process around the Stores: interpreter exit and ``os.fork()``.

Owns the set of open Stores of this process and the two moments when the
process itself acts on them: at interpreter exit every open Store is closed
(its keys saved, its leases released), and in a child made by ``os.fork()``
(gunicorn ``--preload``, Celery prefork, ``multiprocessing`` with fork) every
inherited Store is reset to a fresh one that has loaded nothing, holds
nothing and starts its own connections and threads on first use
(docs/architecture.md, "Processes"). The child never acts for its parent.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import Protocol

__all__ = ["register", "unregister"]

logger = logging.getLogger("sessionstore")


class _Tracked(Protocol):
    name: str

    def close(self) -> None: ...

    def _after_fork_in_child(self) -> None: ...


_open: weakref.WeakSet[_Tracked] = weakref.WeakSet()


def register(store: _Tracked) -> None:
    """Track an open Store (closed at exit, reset in a forked child)."""
    _open.add(store)
    # atexit runs hooks last-in, first-out; the embedded server registers its
    # own stop hook when it starts, which may be after this module was
    # imported. Re-registering keeps ours first, so stores still save while
    # their database is up.
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)


def unregister(store: _Tracked) -> None:
    _open.discard(store)


def _close_at_exit() -> None:
    for store in list(_open):
        try:
            store.close()
        except Exception:
            logger.exception("closing store %r at interpreter exit failed", store.name)


def _after_fork_in_child() -> None:
    for store in list(_open):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
