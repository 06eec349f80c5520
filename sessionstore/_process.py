"""The process around the Stores: interpreter exit and ``os.fork()``.

Owns the set of open Stores (and their cores) of this process and the moments
when the process itself acts on them:

* at exit every open core is closed (its keys saved, its leases released):
  at interpreter exit (``atexit``), and in ``multiprocessing`` / billiard
  (Celery prefork) children, which end with ``os._exit()`` after running
  their own finalizers, through those finalizers; a core whose Store was
  garbage-collected without ``close()`` is closed too;
* in a child made by ``os.fork()`` (gunicorn ``--preload``, Celery prefork,
  ``multiprocessing`` with fork) every inherited Store is reset to a fresh one
  that has loaded nothing, holds nothing and starts its own connections and
  threads on first use (docs/architecture.md, "Processes"). A fork that skips
  Python's fork hooks (uWSGI without ``lazy-apps``) is caught by a pid check
  on the Store's next call that does I/O. The child never acts for its parent.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref
from typing import Any, Protocol

from ._storage import codec

__all__ = ["check_pid", "register", "track_core", "unregister", "untrack_core"]

logger = logging.getLogger("sessionstore")


class _Closable(Protocol):
    name: str

    def close(self) -> None: ...


class _Tracked(_Closable, Protocol):
    def _after_fork_in_child(self) -> None: ...


class _Core(_Closable, Protocol):
    def abandon(self) -> None: ...


_open: weakref.WeakSet[_Tracked] = weakref.WeakSet()
_cores: set[_Core] = set()  # strong: a core runs threads until closed, Store or not
_pid = os.getpid()


def register(store: _Tracked) -> None:
    """Track an open Store (closed at exit, reset in a forked child)."""
    _open.add(store)
    # atexit runs hooks last-in, first-out; the embedded server registers its
    # own stop hook when it starts, which may be after this module was
    # imported. Re-registering keeps ours first, so stores still save while
    # their database is up.
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)
    _hook_pool_children()


def unregister(store: _Tracked) -> None:
    _open.discard(store)


def track_core(core: _Core) -> None:
    _cores.add(core)


def untrack_core(core: _Core) -> None:
    _cores.discard(core)


def check_pid() -> None:
    """Reset inherited Stores if this process was forked without Python's fork hooks."""
    if os.getpid() != _pid:
        _after_fork_in_child()


def _close_at_exit() -> None:
    check_pid()
    for store in list(_open):
        _close(store)
    for core in list(_cores):  # left by Stores garbage-collected without close()
        _close(core)


def _close(closable: _Closable) -> None:
    try:
        closable.close()
    except Exception:
        logger.exception("closing store %r at exit failed", closable.name)


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    codec.after_fork()
    for core in list(_cores):
        core.abandon()
    _cores.clear()
    for store in list(_open):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Hook:
    """The object ``register_after_fork`` keeps (weakly) for our pool-child hook."""


_hooked: dict[str, _Hook] = {}


def _hook_pool_children() -> None:
    """Close at the exit of multiprocessing / billiard children (they skip ``atexit``).

    Their ``_bootstrap`` clears the finalizers inherited at the fork, then runs
    the after-fork hooks: the hook registers the exit finalizer anew there.
    """
    for name in ("multiprocessing.util", "billiard.util"):
        util: Any = sys.modules.get(name)
        if util is None or name in _hooked:
            continue
        hook = _hooked[name] = _Hook()

        def finalize_at_exit(_: object, util: Any = util) -> None:
            util.Finalize(None, _close_at_exit, exitpriority=100)

        util.register_after_fork(hook, finalize_at_exit)
