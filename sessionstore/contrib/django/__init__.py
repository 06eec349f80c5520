"""Django integration: stores configured in ``settings.SESSIONSTORE``, one per process.

Add the app and configure the stores (the format is in
:mod:`sessionstore.contrib.django.conf`)::

    INSTALLED_APPS += ["sessionstore.contrib.django"]
    SESSIONSTORE = {
        "DATABASE": "default",  # the DSN is built from DATABASES["default"]
        "OPTIONS": {"lock_timeout": 10},
        "STORES": {"players": {"template": {"coins": 0}, "schema": "myapp.schemas.Player"}},
    }

then, in a view::

    from sessionstore.contrib.django import get_store

    with get_store("players").session(f"player:{request.user.pk}") as s:
        s.update(reward)

:func:`get_store` creates a store on its first call in a process, so a
gunicorn master started with ``--preload`` never connects, and a store that
was created before a fork acts in the child as a fresh store of the child's
own (docs/architecture.md, "Processes"). Every store is closed at
interpreter exit (its keys saved, its leases released) by sessionstore
itself. The app adds system checks (:mod:`.checks`) and the
``manage.py sessionstore`` command (the ``sessionstore`` command line with
the DSN and schema of the settings). :func:`prepare`, called from
``wsgi.py``, does the slow part of a store's creation before the first
request (without connecting).

sessionstore writes are not part of ``transaction.atomic()``: a Store has
connections of its own and commits on them. See the docs for what to do
instead.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import sessionstore as ss

__all__ = ["close_stores", "get_store", "prepare"]

_log = logging.getLogger(__name__)

_lock = threading.Lock()
_creating: dict[str, threading.Lock] = {}  # one per store name: creations of a name serialise
_stores: dict[str, ss.Store[Any]] = {}


def get_store(name: str) -> ss.Store[Any]:
    """This process's Store ``name`` of ``settings.SESSIONSTORE["STORES"]``.

    Created on the first call (thread-safe: concurrent first calls build one
    Store), which connects and brings the schema up to date; every later
    call returns the same Store. A Store inherited across ``os.fork()`` is
    kept: sessionstore resets it in the child.

    Raises:
        django.core.exceptions.ImproperlyConfigured: no such store, a dotted
            path that does not import, or no PostgreSQL database to use.
        sessionstore.SessionStoreError: an option is invalid, or the database
            stayed unreachable (``StorageUnavailableError``).
    """
    store = _stores.get(name)
    if store is not None:
        return store
    with _lock:
        creating = _creating.setdefault(name, threading.Lock())
    with creating:
        store = _stores.get(name)
        if store is None:
            store = _create(name)
            with _lock:
                _stores[name] = store
    return store


def _create(name: str) -> ss.Store[Any]:
    from django.conf import settings

    from .conf import Settings

    config = Settings.from_django()
    entry = config.entry(name)  # raises for an unknown store before anything else
    dsn = config.database_dsn(settings.DATABASES) if "dsn" not in entry else None
    store: ss.Store[Any] = ss.Store(**config.store_options(name, dsn))
    _log.debug("created store %r (process %d)", name, os.getpid())
    return store


def prepare() -> None:
    """Do now, without connecting, the slow part of each store's first :func:`get_store`.

    Reads and checks the settings of every store, imports their dotted
    paths, and loads sessionstore's schema revisions (alembic's scripts:
    about half a second in a fresh process). Call it from ``wsgi.py`` after
    ``get_wsgi_application()``: under gunicorn ``--preload`` the master does
    it once for every worker, without it each worker does it as it boots;
    either way no request pays for it. The first ``get_store`` then only
    connects.

    Raises:
        As :func:`get_store`, for the first store whose settings are wrong.
    """
    from django.conf import settings

    from sessionstore import db

    from .conf import Settings

    config = Settings.from_django()
    for name in config.stores:
        entry = config.entry(name)
        dsn = config.database_dsn(settings.DATABASES) if "dsn" not in entry else None
        config.store_config(name, dsn)
    db.head_revision()


def close_stores() -> None:
    """Close this process's stores (keys saved, leases released) and forget them.

    The next :func:`get_store` creates a new Store from the settings then in
    force. Every store is closed even if one fails; the first failure is
    raised, the others logged. Not needed at exit: sessionstore closes its
    stores itself.
    """
    with _lock:
        stores = list(_stores.values())
        _stores.clear()
    failure: BaseException | None = None
    for store in stores:
        try:
            store.close()
        except Exception as exc:
            if failure is None:
                failure = exc
            else:
                _log.exception("closing store %r failed", store.name)
    if failure is not None:
        raise failure


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    """``override_settings`` of SESSIONSTORE or DATABASES: stores are made anew."""
    if setting in ("SESSIONSTORE", "DATABASES"):
        close_stores()


def _after_fork_in_child() -> None:
    # A lock held by another thread of the parent at fork would stay held forever.
    global _lock
    _lock = threading.Lock()
    _creating.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
