"""The operator facade: what the ``sessionstore`` command line does to one store.

Owns :class:`Admin`, bound to an engine, a schema and a store name. Its
read-only views (the saved keys, a stored version as it was written, the
versions of a key, the leases with their holders, the audit log) and the
audited :meth:`Admin.unlock` go straight to the storage layer, with the
package's retries, and need no template, no migrations and no lease: they
work on any store whatever code wrote it. The operations that need the
key's lease (:meth:`Admin.restore`, :meth:`Admin.erase`) and
:meth:`Admin.send` open a :class:`~sessionstore.Store` for the call, as any
process would (a key held elsewhere is asked to hand over). No SQL lives
here: it is in :mod:`sessionstore._storage` (``files``, ``admin``).
"""

from __future__ import annotations

import getpass
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa

from . import _args, db
from ._pages import pages
from ._storage import StoredVersion, VersionInfo, files
from ._storage import admin as sql
from ._storage.admin import AuditRow, LockRow, Unlocked
from .errors import (
    InvalidArgumentError,
    SessionStoreError,
    StorageUnavailableError,
    VersionNotFoundError,
)
from .frozen import JSON, check_key
from .retry import RetryPolicy, sqlstate_of, with_retries
from .store import Store

__all__ = ["Admin", "AuditRow", "LockRow", "NotLockedError", "SchemaNotReadyError", "Unlocked"]

T = TypeVar("T")

_MISSING_OBJECT = ("42P01", "3F000")  # undefined_table, invalid_schema_name


class NotLockedError(SessionStoreError, LookupError):
    """``unlock`` of a key that has no lease row: nothing to unlock."""


class SchemaNotReadyError(SessionStoreError):
    """The schema does not exist, or lacks a table of a newer revision (``db upgrade``)."""


def actor() -> str:
    """Who acts, for the audit log: ``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name, no passwd entry (a bare container)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


class Admin:
    """One store seen by an operator: read anything, unlock, and a few leased operations."""

    def __init__(
        self, engine: sa.Engine, schema: str, store: str, *, retry: RetryPolicy | None = None
    ) -> None:
        self.engine = db.check_engine(engine)
        self.schema = db.validate_schema_name(schema, "schema")
        self.store = _args.check_store_name(store, "store")
        self.retry = retry if retry is not None else RetryPolicy()
        password = engine.url.password
        self._secrets = [str(password)] if password else []
        self._owns_engine = False

    @classmethod
    def connect(cls, dsn: str | sa.URL | sa.Engine | None, schema: str, store: str) -> Admin:
        """An Admin on ``dsn``: an Engine is used as is; otherwise a small engine of its own.

        An engine it made is disposed of by :meth:`close`.
        """
        if isinstance(dsn, sa.Engine):
            return cls(dsn, schema, store)
        engine = db.create_engine(dsn, pool_size=2, application_name="sessionstore-cli")
        try:
            admin = cls(engine, schema, store)
        except BaseException:
            engine.dispose()
            raise
        admin._owns_engine = True
        return admin

    def close(self) -> None:
        """Dispose of the engine if :meth:`connect` made it."""
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self, key: str | None = None) -> str:
        """``store 'players'`` or ``store 'players' key 'alice'``, for messages."""
        return f"store {self.store!r}" + ("" if key is None else f" key {key!r}")

    def _run(self, what: str, operation: Callable[[sa.Connection], T]) -> T:
        """``operation`` on a fresh connection, with retries; a missing table says so."""

        def attempt() -> T:
            with self.engine.connect() as conn:
                return operation(conn)

        try:
            return with_retries(
                self.retry,
                f"{self.describe()}: {what}",
                attempt,
                secrets=self._secrets,
                unprepare=lambda: db.disable_prepared_statements(self.engine),
            )
        except StorageUnavailableError as exc:
            if exc.__cause__ is None or sqlstate_of(exc.__cause__) not in _MISSING_OBJECT:
                raise
            raise SchemaNotReadyError(
                f"schema {self.schema!r} is not created or not at the newest revision "
                f"({what} failed: {exc}); run `sessionstore db upgrade --schema {self.schema}`"
            ) from exc

    # -- read-only -------------------------------------------------------------------

    def keys(self, prefix: str | None = None, *, page: int = 1000) -> Iterator[str]:
        """The saved keys in key order (starting with ``prefix``), read a page at a time."""

        def fetch(after: str) -> list[str]:
            return self._run(
                "list keys",
                lambda c: files.keys_page(c, self.schema, self.store, after, prefix, page),
            )

        return pages(fetch, lambda key: key, "", page)

    def count_keys(self, prefix: str | None = None) -> int:
        """How many saved keys (starting with ``prefix``) the store has."""
        return self._run("count keys", lambda c: sql.count_keys(c, self.schema, self.store, prefix))

    def read(self, key: str, version: int | None = None) -> StoredVersion:
        """The newest version of ``key`` (or ``version``), as stored: not migrated.

        Raises:
            VersionNotFoundError: the key was never saved, or has no such version.
        """
        check_key(key)
        if version is not None:
            version = _args.check_version(version, self.describe(key))
        stored = self._run(
            "read", lambda c: files.read_version(c, self.schema, self.store, key, version)
        )
        if stored is None:
            what = "has no saved data" if version is None else f"has no version {version}"
            raise VersionNotFoundError(f"{self.describe(key)} {what}")
        return stored

    def versions(self, key: str, *, limit: int = 100) -> list[VersionInfo]:
        """The newest ``limit`` saved versions of ``key``, newest first."""
        check_key(key)
        limit = _args.check_limit(limit)
        return self._run(
            "list versions",
            lambda c: files.list_versions(
                c,
                self.schema,
                self.store,
                key,
                newest_first=True,
                since=None,
                until=None,
                limit=limit,
            ),
        )

    def locks(self, key: str | None = None, *, page: int = 500) -> Iterator[LockRow]:
        """The lease rows (or ``key``'s), in key order, read a page at a time."""
        if key is not None:
            check_key(key)

        def fetch(after: str) -> list[LockRow]:
            return self._run(
                "list leases",
                lambda c: sql.locks_page(
                    c, schema=self.schema, store=self.store, key=key, after=after, limit=page
                ),
            )

        return pages(fetch, lambda row: row.key, "", page)

    def audit(self, key: str | None = None, *, page: int = 500) -> Iterator[AuditRow]:
        """The audit rows of the store (or of ``key``), oldest first, a page at a time."""
        if key is not None:
            check_key(key)

        def fetch(after: int) -> list[AuditRow]:
            return self._run(
                "read the audit log",
                lambda c: sql.audit_page(
                    c, schema=self.schema, store=self.store, key=key, after=after, limit=page
                ),
            )

        return pages(fetch, lambda row: row.id, 0, page)

    # -- the audited steal -------------------------------------------------------------

    def unlock(
        self, key: str, reason: str, *, who: str | None = None, lock_wait: float = 5.0
    ) -> Unlocked:
        """Take ``key``'s lease from its holder, fenced and logged in ``audit``.

        The holder's next save raises ``LockLostError`` and its heartbeat
        calls ``on_lock_lost``; any process may load the key at once.
        ``who`` defaults to :func:`actor`.

        Raises:
            NotLockedError: the key has no lease row.
        """
        check_key(key)
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidArgumentError("an unlock needs a reason (free text)")
        by = who if who is not None else actor()
        stolen = self._run(
            "unlock",
            lambda c: sql.unlock(
                c,
                self.schema,
                self.store,
                key,
                reason=reason.strip(),
                actor=by,
                holder=str(uuid.uuid4()),
                host=socket.gethostname(),
                pid=os.getpid(),
                lock_wait=lock_wait,
            ),
        )
        if stolen is None:
            raise NotLockedError(f"{self.describe(key)} is not locked: nothing to unlock")
        return stolen

    # -- with a Store ------------------------------------------------------------------

    @contextmanager
    def open_store(self, **options: Any) -> Iterator[Store[Any]]:
        """A Store of this name on this engine and schema (template ``{}``, no migrations)."""
        store: Store[Any] = Store(
            self.store, template={}, dsn=self.engine, db_schema=self.schema, **options
        )
        try:
            yield store
        finally:
            store.close()

    def restore(
        self, key: str, version: int, *, store: Store[Any] | None = None, lock_timeout: float = 10.0
    ) -> int:
        """Make ``version`` current again, saved as a new version; that new version's number.

        Checks that the version exists before it takes the lease (a typo never
        disturbs a live holder), then loads the key, restores and unloads it.
        ``store``: the application's own Store (its migrations apply);
        otherwise one without migrations, which refuses data that carries some.
        """
        self.read(key, version)  # VersionNotFoundError before any lease is asked for
        if store is not None:
            return _restore_with(store, key, version)
        with self.open_store(lock_timeout=lock_timeout) as own:
            return _restore_with(own, key, version)

    def erase(self, key: str, *, lock_timeout: float = 10.0) -> None:
        """Delete the key everywhere (record, versions, lease), under its lease."""
        check_key(key)
        with self.open_store(lock_timeout=lock_timeout) as store:
            store.erase(key)

    def send(self, key: str, message: JSON) -> int:
        """Send ``message`` to ``key`` (held or not); the message's id."""
        check_key(key)
        with self.open_store() as store:
            return store.send_message(key, message)


def _restore_with(store: Store[Any], key: str, version: int) -> int:
    store.load(key)
    try:
        store.restore(key, version)
        newest = store.list_versions(key, limit=1)
    finally:
        store.unload(key)
    return newest[0].version
