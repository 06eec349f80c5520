"""Store: the public entry point, tying sessions, leases and files together.

Owns the set of keys this process holds for one store name, the holder id
those leases carry, and the store's threads: one :class:`Scheduler` thread
(heartbeat and autosave timers) and one saver thread that writes autosaves
in batches. Nothing here grows with the number of loaded keys. Every write
goes through :meth:`Store._write`, the fenced write of
:mod:`sessionstore.files`; every database call through :meth:`Store._db`,
which retries transient errors.

Lock order, to stay deadlock-free: a key's FIFO turn (several keys: in key
order), then the session's condition lock, then the store's registry lock,
which is never held across I/O or user code.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import cachetools
import sqlalchemy as sa

from . import db, files, locks
from . import migrations as migrations_module
from .control import ControlConnection, libpq_url
from .errors import (
    InvalidKeyError,
    KeyNotLoadedError,
    KeysChangedError,
    LoadInProgressError,
    LockLostError,
    LockUnavailableError,
    SessionClosedError,
    SessionStoreError,
    StorageUnavailableError,
    StoreClosedError,
    StoreCloseError,
    TransactionConflictError,
    TransformError,
    VersionNotFoundError,
)
from .files import FileSettings, VersionInfo, WriteItem
from .frozen import JSON, check_key, decode, freeze_json, thaw
from .migrations import MigrationStep
from .retry import AttemptWithBackoff, RetryPolicy, with_retries
from .sched import Scheduler
from .schema import SchemaLike, make_validator
from .session import (
    Change,
    Rules,
    Session,
    Snapshot,
    ViewCache,
    in_transform,
    run_transform,
)

__all__ = ["SessionHandle", "Store"]

T = TypeVar("T")
logger = logging.getLogger("sessionstore")

_STORE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except Exception:
            logger.exception("closing store %r at interpreter exit failed", store.name)


def _close_at_exit() -> None:
    """(Re-)register the exit hook so that it runs before hooks registered earlier.

    atexit runs hooks last-in, first-out; the embedded server registers its
    own stop hook when it starts, which is after this module was imported.
    Re-registering on every new Store keeps ours first, so stores still save
    while their database is up.
    """
    atexit.unregister(_close_open_stores)
    atexit.register(_close_open_stores)


class Store:
    """A named collection of documents kept in PostgreSQL under session locks.

    See DESIGN.md §1 for the contract. All methods are thread-safe.

    Args:
        name: store name, 1..64 characters of ``[A-Za-z0-9_.:-]``.
        template: data of a key that was never saved (deep-copied per key).
        schema: validator for every document: a callable returning
            ``bool | (bool, str) | None``, a pydantic model or ``TypeAdapter``,
            or a JSON Schema dict.
        migrations: ordered steps from :func:`add_fields` / :func:`transform`.
        import_legacy_data: ``callable(key) -> data | None`` for keys never
            saved by sessionstore; raising fails the load.
        changed_callbacks: ``callable(key, new, old_or_None)`` after each change.
        on_lock_lost: ``callable(key)`` when a lease is lost or handed over.
        on_handoff_request: ``callable(key) -> bool``: may another process
            take this key now?
        dsn: ``postgresql://`` URL, SQLAlchemy URL or Engine; None uses
            ``$SESSIONSTORE_DSN``, else the embedded server.
        lock_duration: lease length in seconds (database clock).
        lock_refresh_interval: heartbeat period in seconds.
        lock_timeout: how long ``load`` waits for a key held elsewhere.
        autosave_interval: seconds between background saves of dirty keys.
        db_schema: PostgreSQL schema of the tables.
        max_document_size: largest document, in bytes of JSON.
        retry_timeout: how long transient database errors are retried.
        compression_level, compress_threshold, inline_threshold, shard_size,
        stream_threshold: how documents are stored (README, "Configuration").
    """

    def __init__(
        self,
        name: str,
        template: JSON,
        schema: SchemaLike = None,
        migrations: Iterable[MigrationStep] = (),
        import_legacy_data: Callable[[str], JSON] | None = None,
        changed_callbacks: Iterable[Callable[[str, JSON, JSON], Any]] = (),
        on_lock_lost: Callable[[str], Any] | None = None,
        on_handoff_request: Callable[[str], bool] | None = None,
        dsn: str | sa.Engine | None = None,
        lock_duration: float = 90.0,
        lock_refresh_interval: float = 30.0,
        lock_timeout: float = 30.0,
        autosave_interval: float = 300.0,
        *,
        db_schema: str = "sessionstore",
        max_document_size: int = 512 * 1024 * 1024,
        retry_timeout: float = 10.0,
        compression_level: int = 3,
        compress_threshold: int = 1024,
        inline_threshold: int = 256 * 1024,
        shard_size: int = 1024 * 1024,
        stream_threshold: int = 8 * 1024 * 1024,
        save_batch_size: int = 500,
        pool_size: int = 10,
        retain_versions: int = 10,
        retain_for: float = 24 * 3600.0,
        janitor_interval: float = 60.0,
        peek_cache_size: int = 1024,
        control_dsn: str | None = None,
        instant_takeover: bool = True,
        takeover_grace: float = 2.0,
        view_cache_size: int = 256,
    ) -> None:
        if not isinstance(name, str) or not _STORE_NAME.match(name):
            raise ValueError(
                f"store name must be 1..64 characters of [A-Za-z0-9_.:-], got {name!r}"
            )
        if not lock_duration > 0 or not 0 < lock_refresh_interval < lock_duration:
            raise ValueError("need 0 < lock_refresh_interval < lock_duration")
        if lock_timeout < 0 or not autosave_interval > 0 or retry_timeout < 0:
            raise ValueError("lock_timeout and retry_timeout must be >= 0, autosave_interval > 0")
        if max_document_size <= 0 or save_batch_size <= 0 or shard_size <= 0:
            raise ValueError("max_document_size, save_batch_size and shard_size must be positive")
        if retain_versions < 1 or retain_for < 0 or not janitor_interval > 0:
            raise ValueError("need retain_versions >= 1, retain_for >= 0, janitor_interval > 0")
        self.name = name
        self.holder = str(uuid.uuid4())
        self._schema = db.validate_identifier(db_schema)
        self._steps = migrations_module.check_steps(migrations)
        self._rules = Rules(
            name, make_validator(schema), max_document_size, ViewCache(view_cache_size)
        )
        try:
            self._template = self._rules.accept(template, "<template>")
        except SessionStoreError as exc:
            raise type(exc)(f"store {name!r}: template is invalid: {exc}") from exc
        self._import_legacy_data = import_legacy_data
        self._changed_callbacks = tuple(changed_callbacks)
        self._on_lock_lost = on_lock_lost
        self._on_handoff_request = on_handoff_request
        self.lock_duration = float(lock_duration)
        self.lock_refresh_interval = float(lock_refresh_interval)
        self.lock_timeout = float(lock_timeout)
        self.autosave_interval = float(autosave_interval)
        self._retry = RetryPolicy(timeout=retry_timeout)
        self._files = FileSettings(
            compression_level=compression_level,
            compress_threshold=compress_threshold,
            inline_threshold=inline_threshold,
            shard_size=shard_size,
            stream_threshold=stream_threshold,
        )
        self._batch_size = save_batch_size
        self._liveness = bool(instant_takeover)
        self.takeover_grace = float(takeover_grace)
        self._retention = files.Retention(retain_versions, float(retain_for), save_batch_size)
        self._prune_after = ""
        self._peek_cache: cachetools.LRUCache[str, tuple[float, JSON]] = cachetools.LRUCache(
            maxsize=max(1, peek_cache_size)
        )
        self._peek_lock = threading.Lock()

        self._owns_engine = not isinstance(dsn, sa.Engine)
        engine = db.create_engine(dsn, pool_size=pool_size, autocommit=True)
        try:
            db.ensure_schema(engine, self._schema)
        except Exception:
            if self._owns_engine:
                engine.dispose()
            raise
        self._engine_base = engine
        # Every write of the package is a single statement, atomic on its own
        # (autocommit saves the BEGIN and COMMIT round trips), except the
        # streamed write of a large document, which opens its own transaction.
        self._engine = (
            engine if self._owns_engine else engine.execution_options(isolation_level="AUTOCOMMIT")
        )

        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._loading: set[str] = set()
        # Leases taken for a load or erase still in progress: the heartbeat
        # renews them too, though no session exists yet.
        self._acquired: dict[str, int] = {}
        self._tx_keys: set[str] = set()
        self._closed = False
        self._heartbeat_conn: sa.Connection | None = None
        self._autosave_running = threading.Lock()
        self._saver = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sessionstore-save-{name}"
        )
        # Start the saver thread now (executors start threads lazily): a store
        # runs the same three threads from construction to close().
        self._saver.submit(lambda: None)
        conninfo = libpq_url(
            engine.url if control_dsn is None else sa.make_url(db.resolve_url(control_dsn))
        )
        self._control = ControlConnection(
            conninfo,
            self.holder,
            name,
            self._on_handoff_request_notify,
            liveness=self._liveness,
            log_extra=self._log_extra(),
        )
        if not self._control.wait_ready(max(retry_timeout, 5.0)):
            self._control.stop()
            self._saver.shutdown(wait=False)
            if self._owns_engine:
                engine.dispose()
            raise StorageUnavailableError(
                f"store {name!r}: control connection failed: {self._control.last_error}"
            )
        if self._liveness and not self._db(
            "liveness check", lambda conn: locks.holder_alive(conn, self.holder)
        ):
            # e.g. a control_dsn on another server or through a pooler: others
            # could never see us alive, so never offer instant takeover.
            self._log(
                logging.WARNING,
                None,
                "the control connection's advisory lock is not visible to other sessions; "
                "instant takeover is off (leases are taken only when they expire)",
            )
            self._liveness = False
        self._scheduler = Scheduler(f"sessionstore-sched-{name}")
        self._scheduler.every(self.lock_refresh_interval, self._heartbeat)
        self._scheduler.every(self.autosave_interval, self._autosave_tick)
        self._scheduler.every(float(janitor_interval), self._janitor_tick)
        _open_stores.add(self)
        _close_at_exit()
        self._log(logging.DEBUG, None, "store opened")

    # -- context managers --------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._sessions)} keys"
        return f"<sessionstore.Store {self.name!r} holder={self.holder} {state}>"

    @contextmanager
    def session(self, key: str) -> Iterator[SessionHandle]:
        """Load ``key`` for the block and unload it (final save, release) after."""
        self.load(key)
        try:
            yield SessionHandle(self, key)
        finally:
            self.unload(key)

    # -- helpers -------------------------------------------------------------------

    def _log(
        self, level: int, key: str | None, message: str, *args: object, exc_info: bool = False
    ) -> None:
        """Log on ``sessionstore`` with ``store``, ``key`` and ``holder`` on the record."""
        if logger.isEnabledFor(level):
            where = f"store {self.name!r}" + (f" key {key!r}" if key is not None else "")
            logger.log(
                level,
                f"{where}: {message}",
                *args,
                exc_info=exc_info,
                extra=self._log_extra(key),
            )

    def _log_extra(self, key: str | None = None) -> dict[str, object]:
        return {"store": self.name, "key": key, "holder": self.holder}

    def _db(self, what: str, operation: Callable[[sa.Connection], T]) -> T:
        """Run ``operation`` on a pooled autocommit connection, retrying transient errors."""

        def attempt() -> T:
            with self._engine.connect() as conn:
                return operation(conn)

        return with_retries(
            self._retry, f"store {self.name!r}: {what}", attempt, extra=self._log_extra()
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.name!r} is closed")

    def _refuse_reentry(self, what: str) -> None:
        if in_transform():
            raise TransformError(
                f"store {self.name!r}: {what}() called from inside a transform; a transform may "
                "only read (get, peek); do store changes after it returns"
            )

    def _session(self, key: str) -> Session:
        session = self._sessions.get(key)
        if session is None or self._closed:
            self._check_open()
            check_key(key)
            raise KeyNotLoadedError(f"store {self.name!r} key {key!r} is not loaded")
        if session.closed_reason is not None:
            raise SessionClosedError(
                f"store {self.name!r} key {key!r}: session closed ({session.closed_reason}); "
                "load() it again"
            )
        return session

    def _announce(self, session: Session, change: Change | None) -> None:
        """Fire changed callbacks for a committed change (frozen new and old data)."""
        if change is None or not self._changed_callbacks:
            return
        new = session.data if session.encoded is change.new else freeze_json(decode(change.new))
        self._fire_changed(session.key, new, freeze_json(decode(change.old)))

    def _fire_changed(self, key: str, new: JSON, old: JSON) -> None:
        for callback in self._changed_callbacks:
            try:
                callback(key, new, old)
            except Exception:
                self._log(logging.ERROR, key, "changed callback %r raised", callback, exc_info=True)

    def _lose(self, session: Session, reason: str, *, background: bool = False) -> None:
        """Close a session whose lease is gone; tell the application once.

        From the scheduler thread (``background``) the callback runs on the
        saver thread, so that a callback that reloads the key cannot delay
        the heartbeat of every other key.
        """
        if not session.close(reason):
            return
        self._log(logging.WARNING, session.key, "lease lost: %s", reason)
        if not (background and self._submit(lambda: self._tell_lost(session.key))):
            self._tell_lost(session.key)

    def _tell_lost(self, key: str) -> None:
        if self._on_lock_lost is None:
            return
        try:
            self._on_lock_lost(key)
        except Exception:
            self._log(logging.ERROR, key, "on_lock_lost callback raised", exc_info=True)

    @contextmanager
    def _turns(self, sessions: Sequence[Session]) -> Iterator[None]:
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

    # -- load ----------------------------------------------------------------------

    def load(self, key: str) -> None:
        """Take the key's lease, read and migrate its data, and hold it in memory.

        A no-op if the key is already loaded. Waits up to ``lock_timeout`` for a
        key held elsewhere, then raises :class:`LockUnavailableError`.

        A stored file that fails its integrity checks (missing shard, CRC-32,
        zstd frame, size) fails the load with :class:`CorruptDataError`, and
        the lease is released. The JSON itself is parsed here only when a
        migration, the schema or a changed callback needs the data; otherwise
        the first read parses it (and raises :class:`CorruptDataError` if a
        writer other than this package stored JSON that does not parse).
        """
        self._check_open()
        check_key(key)
        self._refuse_reentry("load")
        while True:
            with self._lock:
                existing = self._sessions.get(key)
                if existing is None or existing.closed:
                    if key in self._loading:
                        raise LoadInProgressError(
                            f"store {self.name!r} key {key!r} is already loading"
                        )
                    self._loading.add(key)
                    break
                if not existing.unloading:
                    return
            # An unload or handoff of the key is running: once it is done,
            # load the key afresh (or find it kept, if the unload failed).
            with existing.queue.turn():
                pass
        try:
            session = self._load_session(key)
            with self._lock:
                if self._closed:
                    registered = False
                else:
                    self._sessions[key] = session
                    registered = True
            if not registered:
                self._rules.views.forget(session)
                self._release_quietly([(key, session.token)])
                raise StoreClosedError(f"store {self.name!r} was closed while loading {key!r}")
        finally:
            with self._lock:
                self._loading.discard(key)
                self._acquired.pop(key, None)
        self._log(
            logging.DEBUG, key, "loaded with token %s at version %s", session.token, session.version
        )
        if self._changed_callbacks:
            self._fire_changed(key, session.data, None)

    def _acquire(self, key: str) -> tuple[int, float]:
        """Wait for the key's lease; ``(token, monotonic time of the winning attempt)``.

        While another holder has it: a live holder is asked (NOTIFY) to hand
        it over, about once a second; a dead one (its advisory lock gone) is
        taken over once it has stayed dead for ``takeover_grace``; otherwise
        the lease is taken when it expires, or ``LockUnavailableError`` is
        raised after ``lock_timeout``.
        """
        backoff = AttemptWithBackoff(
            RetryPolicy(timeout=self.lock_timeout, initial_delay=0.005, max_delay=0.25)
        )
        dead: locks.LeaseInfo | None = None
        seen_dead: dict[tuple[str, int], float] = {}
        asked: dict[tuple[str, int], float] = {}
        while True:
            started = time.monotonic()
            token = self._db(
                "acquire lease",
                lambda conn, dead=dead: locks.acquire(  # type: ignore[misc]
                    conn,
                    self._schema,
                    self.name,
                    key,
                    self.holder,
                    self.lock_duration,
                    liveness=self._liveness,
                    dead=dead,
                ),
            )
            if token is not None:
                with self._lock:
                    self._acquired[key] = token
                if dead is not None:
                    self._log(
                        logging.INFO,
                        key,
                        "took over from dead holder %s (%s pid %s)",
                        dead.holder,
                        dead.host,
                        dead.pid,
                    )
                return token, started
            self._check_open()
            dead = None
            holder = self._db(
                "lease info", lambda conn: locks.info(conn, self._schema, self.name, key)
            )
            now = time.monotonic()
            if holder is not None and holder.active:
                lease = (holder.holder, holder.token)
                if holder.liveness and not holder.alive:
                    first = seen_dead.setdefault(lease, now)
                    if now - first >= self.takeover_grace:
                        dead = holder
                        continue
                elif now - asked.get(lease, -1e9) >= 1.0:
                    asked[lease] = now
                    self._db(
                        "request handoff",
                        lambda conn, other=lease[0]: locks.request_handoff(  # type: ignore[misc]
                            conn, other, key
                        ),
                    )
            if not backoff.sleep():
                where = (
                    f" by {holder.host} pid {holder.pid} until {holder.expires_at}"
                    if holder
                    else ""
                )
                raise LockUnavailableError(
                    f"store {self.name!r} key {key!r} is held{where}; "
                    f"gave up after lock_timeout={self.lock_timeout}s"
                )

    def _load_session(self, key: str) -> Session:
        token, acquired_at = self._acquire(key)
        try:
            session = self._read_session(key, token, acquired_at)
            if self._changed_callbacks:
                # The callbacks get the data when the load is done: build its
                # view now, so that JSON that does not parse fails the load.
                session.data  # noqa: B018
            return session
        except BaseException:
            self._release_quietly([(key, token)])
            raise

    def _read_session(self, key: str, token: int, acquired_at: float) -> Session:
        context = f"store {self.name!r} key {key!r}"
        stored = self._db(
            "read", lambda conn: files.read_version(conn, self._schema, self.name, key, None)
        )
        if stored is not None:
            encoded, applied, dirty, _ = self._bring_forward(stored, key)
            version = stored.info.version
        else:
            legacy = None
            if self._import_legacy_data is not None:
                legacy = self._import_legacy_data(key)
            if legacy is not None:
                data, applied, _ = self._migrate(thaw(legacy), (), context)
                encoded = self._rules.accept(data, key)
                version, dirty = 0, True
            else:
                encoded = self._template  # checked against the schema at construction
                applied = tuple(step.name for step in self._steps)
                version, dirty = 0, False
        return Session(
            self._rules,
            key,
            token,
            encoded,
            version,
            applied,
            dirty=dirty,
            lease_confirmed_at=acquired_at,
        )

    def _bring_forward(
        self, stored: files.StoredVersion, key: str
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
        applied = stored.info.migrations
        steps = migrations_module.pending(self._steps, applied, stored.context)
        if steps:
            data, names, _ = self._migrate(stored.decode(), applied, stored.context)
            return self._rules.accept(data, key), names, True, None
        if not self._rules.validates:
            return stored.raw, tuple(applied), False, None
        data = stored.decode()
        self._rules.check(data, stored.raw, key)
        return stored.raw, tuple(applied), False, data

    def _migrate(
        self, data: JSON, applied: Sequence[str], context: str
    ) -> tuple[JSON, tuple[str, ...], bool]:
        migrated, names, ran = migrations_module.apply(self._steps, data, applied, context)
        return migrated, tuple(names), ran

    # -- in-memory reads and changes ---------------------------------------------------

    def get(self, key: str) -> JSON:
        """The key's current data, frozen (read-only). O(1): no copy is made."""
        return self._session(key).data

    def is_saved(self, key: str) -> bool:
        """True if the key has no changes that are not yet in the database."""
        return self._session(key).saved

    def update(self, key: str, fn: Callable[[Any], bool]) -> bool:
        """Change the key's data in memory: ``fn(mutable copy) -> True`` commits, ``False`` aborts.

        Durable after the next save (autosave, ``save``, ``unload``, ``close``).
        """
        session = self._session(key)
        self._refuse_reentry("update")
        committed, change = session.update(fn)
        self._announce(session, change)
        return committed

    def update_immutable(self, key: str, fn: Callable[[Any], Any]) -> bool:
        """Like :meth:`update`, but ``fn(frozen data)`` returns new data or ``False``."""
        session = self._session(key)
        self._refuse_reentry("update_immutable")
        committed, change = session.update_immutable(fn)
        self._announce(session, change)
        return committed

    # -- saving -------------------------------------------------------------------------

    def _write(self, items: Sequence[WriteItem], *, atomic: bool) -> files.WriteResult:
        return self._db(
            "save",
            lambda conn: files.write_versions(
                conn, self._schema, self.name, self.holder, items, atomic=atomic
            ),
        )

    def _save_held(self, sessions: Sequence[Session], *, unloading: bool) -> dict[str, Exception]:
        """Save dirty ``sessions`` in batches; the caller holds their turns. Errors by key."""
        errors: dict[str, Exception] = {}
        pending: list[tuple[Session, Snapshot]] = []
        for session in sessions:
            if session.closed:
                if not session.saved:  # closed (lease lost) with changes never written
                    errors[session.key] = SessionClosedError(
                        f"store {self.name!r} key {session.key!r}: session closed "
                        f"({session.closed_reason}) with changes that were never written"
                    )
                continue
            snapshot = session.snapshot(unloading=unloading)
            if snapshot is not None:
                pending.append((session, snapshot))
        # A large document is written on its own, compressed while it is sent;
        # the others in batches of one statement each.
        groups: list[list[tuple[Session, Snapshot]]] = []
        batched: list[tuple[Session, Snapshot]] = []
        for entry in pending:
            if self._files.streams(len(entry[1].encoded)):
                groups.append([entry])
            else:
                batched.append(entry)
        groups += [
            batched[start : start + self._batch_size]
            for start in range(0, len(batched), self._batch_size)
        ]
        for batch in groups:
            try:
                result = self._write_snapshots(batch)
            except Exception as exc:
                self._log(logging.ERROR, None, "saving %d keys failed: %s", len(batch), exc)
                for session, snap in batch:
                    session.note_attempt(snap.version)
                    errors[session.key] = exc
                continue
            for session, snap in batch:
                if session.key in result.written:
                    session.mark_saved(snap)
                elif session.key in result.lost:
                    self._lose(session, "lease lost before save")
                    errors[session.key] = LockLostError(
                        f"store {self.name!r} key {session.key!r}: lease lost; nothing was written"
                    )
                else:  # pragma: no cover - would mean a version number clash
                    errors[session.key] = SessionStoreError(
                        f"store {self.name!r} key {session.key!r}: version {snap.version} exists"
                    )
        return errors

    def _write_snapshots(self, batch: Sequence[tuple[Session, Snapshot]]) -> files.WriteResult:
        """Write one group of ``_save_held``: a large document alone, streamed, or a batch."""
        if len(batch) == 1 and self._files.streams(len(batch[0][1].encoded)):
            session, snap = batch[0]
            item = WriteItem(
                session.key,
                snap.token,
                snap.version,
                files.EncodedFile.pending(len(snap.encoded)),
                snap.migrations,
                snap.new_record,
            )
            return self._db(
                "save",
                lambda conn: files.write_streamed(
                    conn, self._schema, self.name, self.holder, item, snap.encoded, self._files
                ),
            )
        items = [
            WriteItem(
                session.key,
                snap.token,
                snap.version,
                files.encode_file(snap.encoded, self._files),
                snap.migrations,
                snap.new_record,
            )
            for session, snap in batch
        ]
        return self._write(items, atomic=False)

    def save(self, key: str) -> None:
        """Write pending changes of ``key`` now (a no-op if saved)."""
        session = self._session(key)
        self._refuse_reentry("save")
        with session.queue.turn():
            errors = self._save_held([session], unloading=False)
        if errors:
            raise errors[key]

    def _autosave_tick(self) -> None:
        if self._autosave_running.locked():
            return  # the previous batch is still writing
        self._submit(self._autosave)

    def _submit(self, work: Callable[[], object]) -> bool:
        """Run ``work`` on the saver thread (never on the scheduler: it must stay punctual).

        False if the saver has shut down (the store is closing).
        """
        try:
            self._saver.submit(self._logged, work)
        except RuntimeError:
            return False
        return True

    def _logged(self, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:
            self._log(logging.ERROR, None, "background task %r failed", work, exc_info=True)

    def _janitor_tick(self) -> None:
        self._submit(self.prune)

    def prune(self, *, time_budget: float = 1.0) -> int:
        """Delete versions beyond the retention policy, a batch of keys at a time.

        Runs in the background every ``janitor_interval``; callable directly
        (e.g. from a cron job). Returns the number of versions deleted. Only
        one process prunes a store at a time; others return 0 at once.
        """
        self._check_open()
        deadline = time.monotonic() + time_budget
        total = 0
        while True:
            ours, last_key, pruned = self._db(
                "prune",
                lambda conn: files.prune_versions(
                    conn, self._schema, self.name, self._prune_after, self._retention
                ),
            )
            total += pruned
            if not ours:
                return total
            # Walk the keys round-robin: start over after the last batch.
            self._prune_after = last_key or ""
            if last_key is None or time.monotonic() > deadline:
                if total:
                    self._log(logging.INFO, None, "pruned %d old versions", total)
                return total

    def _autosave(self) -> None:
        with self._autosave_running:
            dirty = sorted(
                (s for s in list(self._sessions.values()) if not s.saved and not s.closed),
                key=lambda s: s.key,
            )
            # Skip keys busy with a save, unload or tx: they are being written anyway.
            taken = [s for s in dirty if s.queue.try_acquire()]
            try:
                errors = self._save_held(taken, unloading=False)
            finally:
                for session in taken:
                    session.queue.release()
            if taken:
                self._log(
                    logging.DEBUG, None, "autosaved %d keys, %d failed", len(taken), len(errors)
                )

    # -- unload and close ---------------------------------------------------------------

    def _release_quietly(self, leases: Sequence[tuple[str, int]]) -> None:
        try:
            self._db(
                "release leases",
                lambda conn: locks.release(conn, self._schema, self.name, self.holder, leases),
            )
        except Exception as exc:  # the leases expire on their own
            self._log(logging.WARNING, None, "releasing %d leases failed: %s", len(leases), exc)

    def _unload_sessions(
        self, sessions: Sequence[Session], *, reason: str = "unloaded", tombstone: bool = False
    ) -> dict[str, Exception]:
        """Final save and release of ``sessions`` (key order); errors by key.

        With ``tombstone`` the closed sessions stay registered, so later calls
        get ``SessionClosedError`` (a handoff) instead of ``KeyNotLoadedError``.
        """
        with self._turns(sessions):
            errors = self._save_held(sessions, unloading=True)
            done = [s for s in sessions if s.key not in errors]
            self._release_quietly([(s.key, s.token) for s in done])
            for session in sessions:
                error = errors.get(session.key)
                if error is not None and not isinstance(error, LockLostError | SessionClosedError):
                    session.abort_unload()  # still loaded, data kept: the caller may retry
                    continue
                session.close(reason)
                if tombstone and session.key not in errors:
                    continue
                with self._lock:
                    if self._sessions.get(session.key) is session:
                        del self._sessions[session.key]
        return errors

    # -- handoff ------------------------------------------------------------------------

    def _on_handoff_request_notify(self, key: str) -> None:
        """Control thread: another process asks for ``key``; decide on the saver thread."""
        self._submit(lambda: self._hand_over(key))

    def _hand_over(self, key: str) -> None:
        session = self._sessions.get(key)
        if session is None or session.closed or self._closed:
            return
        if self._on_handoff_request is not None:
            try:
                allowed = bool(self._on_handoff_request(key))
            except Exception:
                self._log(
                    logging.ERROR, key, "on_handoff_request raised; keeping the key", exc_info=True
                )
                allowed = False
            if not allowed:
                self._log(logging.DEBUG, key, "handoff refused by on_handoff_request")
                return
        errors = self._unload_sessions(
            [session], reason="handed over to another process", tombstone=True
        )
        if key in errors:
            self._log(logging.WARNING, key, "handoff failed, keeping the key: %s", errors[key])
            return
        self._log(logging.INFO, key, "handed over to another process")
        self._tell_lost(key)

    def unload(self, key: str) -> None:
        """Save pending changes, release the lease and forget the key.

        If the save fails, the key stays loaded with its data and the error is
        raised, so the call can be retried.
        """
        self._check_open()
        check_key(key)
        self._refuse_reentry("unload")
        session = self._sessions.get(key)
        if session is None:
            raise KeyNotLoadedError(f"store {self.name!r} key {key!r} is not loaded")
        if session.closed:
            with self._lock:
                if self._sessions.get(key) is session:
                    del self._sessions[key]
            if session.saved:
                return
            raise SessionClosedError(
                f"store {self.name!r} key {key!r}: session closed ({session.closed_reason}) "
                "with changes that were never written"
            )
        errors = self._unload_sessions([session])
        if errors:
            raise errors[key]
        self._log(logging.DEBUG, key, "unloaded")

    def close(self) -> None:
        """Unload every key (errors raised together after all were tried) and stop threads.

        Idempotent; afterwards every other call raises :class:`StoreClosedError`.
        """
        self._refuse_reentry("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_stores.discard(self)
        self._scheduler.stop(timeout=30.0)
        self._saver.shutdown(wait=True)
        with self._lock:
            everything = sorted(self._sessions.values(), key=lambda s: s.key)
        # Sessions closed earlier (lease lost) with changes never written are
        # reported here too: close() must not be the place they vanish.
        sessions = [s for s in everything if not s.closed]
        errors: dict[str, Exception] = {
            s.key: SessionClosedError(
                f"store {self.name!r} key {s.key!r}: session closed ({s.closed_reason}) "
                "with changes that were never written"
            )
            for s in everything
            if s.closed and not s.saved
        }
        for start in range(0, len(sessions), self._batch_size * 4):
            errors.update(self._unload_sessions(sessions[start : start + self._batch_size * 4]))
        with self._lock:
            self._sessions.clear()
        # Last: our leases are released, so nobody needs our proof of life.
        self._control.stop()
        if self._heartbeat_conn is not None:
            with contextlib.suppress(Exception):
                self._heartbeat_conn.close()
            self._heartbeat_conn = None
        if self._owns_engine:
            self._engine_base.dispose()
        self._log(logging.DEBUG, None, "store closed, %d keys failed to unload", len(errors))
        if errors:
            raise StoreCloseError(
                f"store {self.name!r}: {len(errors)} keys could not be unloaded: "
                + ", ".join(sorted(errors)[:10]),
                errors,
            )

    # -- heartbeat --------------------------------------------------------------------

    def _heartbeat(self) -> None:
        # Sessions being unloaded are left out of the loss check: their lease
        # is released on purpose (it is still renewed until then).
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.closed]
            leases = [(s.key, s.token) for s in sessions]
            leases.extend(self._acquired.items())
        held = {s.key: s for s in sessions if not s.unloading}
        if not leases:
            return
        started = time.monotonic()
        try:
            if self._heartbeat_conn is None:
                self._heartbeat_conn = self._engine.connect()
                # A heartbeat stuck behind a lock must not stall the scheduler.
                self._heartbeat_conn.exec_driver_sql(
                    f"SET statement_timeout = {int(self.lock_refresh_interval * 1000)}"
                )
            renewed = locks.renew(
                self._heartbeat_conn,
                self._schema,
                self.name,
                self.holder,
                self.lock_duration,
                leases,
            )
        except Exception as exc:
            self._log(logging.WARNING, None, "heartbeat failed: %s", exc)
            if self._heartbeat_conn is not None:
                try:
                    self._heartbeat_conn.invalidate()
                    self._heartbeat_conn.close()
                except Exception:
                    pass
                self._heartbeat_conn = None
            # Without a renewal we cannot know; past the lease length we can.
            for session in held.values():
                if session.lease_overdue(self.lock_duration):
                    self._lose(
                        session,
                        "lease expired while the database was unreachable",
                        background=True,
                    )
            return
        for key, session in held.items():
            if renewed.get(key) == session.token:
                session.confirm_lease(started)
            elif not session.unloading:
                self._lose(
                    session, "lease was not renewed (expired or taken over)", background=True
                )

    # -- transactions -----------------------------------------------------------------

    def tx(self, keys: Sequence[str], fn: Callable[[dict[str, Any]], bool]) -> bool:
        """Change several loaded keys together, atomically and durably.

        ``fn({key: mutable copy}) -> True`` commits: every key is written in one
        database transaction before ``tx`` returns. ``False`` aborts.
        """
        return self._tx(keys, fn, immutable=False)

    def tx_immutable(
        self, keys: Sequence[str], fn: Callable[[dict[str, Any]], Mapping[str, Any] | bool]
    ) -> bool:
        """Like :meth:`tx`, but ``fn({key: frozen})`` returns ``{key: new data}`` or ``False``."""
        return self._tx(keys, fn, immutable=True)

    def _tx(
        self, keys: Sequence[str], fn: Callable[[dict[str, Any]], Any], *, immutable: bool
    ) -> bool:
        self._check_open()
        if isinstance(keys, str) or not isinstance(keys, Sequence | set | frozenset):
            raise InvalidKeyError("tx keys must be a list of keys")
        key_list = [check_key(key) for key in keys]
        if not key_list:
            raise ValueError("tx needs at least one key")
        if len(set(key_list)) != len(key_list):
            raise ValueError(f"tx keys contain duplicates: {key_list}")
        self._refuse_reentry("tx")
        ordered = sorted(key_list)
        sessions = [self._session(key) for key in ordered]
        with self._lock:
            busy = self._tx_keys.intersection(ordered)
            if busy:
                raise TransactionConflictError(
                    f"store {self.name!r}: keys {sorted(busy)} are already in a running tx"
                )
            self._tx_keys.update(ordered)
        context = f"store {self.name!r} tx {ordered}"
        try:
            with self._turns(sessions):
                begun: list[Session] = []
                try:
                    for session in sessions:
                        session.begin_tx()
                        begun.append(session)
                    outcome = self._tx_held(sessions, fn, immutable=immutable, context=context)
                finally:
                    for session in begun:
                        session.end_tx()
        finally:
            with self._lock:
                self._tx_keys.difference_update(ordered)
        # Callbacks run once the keys are free again: they may use them.
        if outcome is None:
            return False
        if isinstance(outcome, LockLostError):
            for session in sessions:
                if session.key in outcome.keys:
                    self._lose(session, "lease lost before tx")
            raise outcome
        for session, change in outcome:
            self._announce(session, change)
        return True

    def _tx_held(
        self,
        sessions: Sequence[Session],
        fn: Callable[[dict[str, Any]], Any],
        *,
        immutable: bool,
        context: str,
    ) -> list[tuple[Session, Change | None]] | LockLostError | None:
        """Run the transform and the atomic write; the changes, a lost lease, or None (abort)."""
        keys = {s.key for s in sessions}
        if immutable:
            result = run_transform(fn, {s.key: s.data for s in sessions}, lambda: context)
            if result is False:
                return None
            if not isinstance(result, Mapping):
                raise TransformError(
                    f"{context}: transform must return a dict of new data or False"
                )
            proposed = dict(result)
        else:
            work = {s.key: s.decode() for s in sessions}
            verdict = run_transform(fn, work, lambda: context)
            if verdict is False:
                return None
            if verdict is not True:
                raise TransformError(
                    f"{context}: transform must return True or False, not {type(verdict).__name__}"
                )
            proposed = work
        if set(proposed) != keys:
            raise KeysChangedError(
                f"{context}: transform changed the keys: added {sorted(set(proposed) - keys)}, "
                f"removed {sorted(keys - set(proposed))}"
            )
        prepared = {s.key: self._rules.accept(proposed[s.key], s.key) for s in sessions}
        items = [
            WriteItem(
                s.key,
                s.token,
                s.version + 1,
                files.encode_file(prepared[s.key], self._files),
                s.migrations,
                s.version == 0,
            )
            for s in sessions
        ]
        try:
            result_write = self._write(items, atomic=True)
        except Exception:
            for session, item in zip(sessions, items, strict=True):
                session.note_attempt(item.version)
            raise
        if result_write.lost:
            return LockLostError(
                f"{context}: lease lost for {sorted(result_write.lost)}; nothing was written",
                result_write.lost,
            )
        if result_write.written != keys:  # pragma: no cover - version clash
            raise SessionStoreError(f"{context}: the database refused the write")
        return [
            (session, session.commit_written(prepared[session.key], session.version + 1))
            for session in sessions
        ]

    # -- lock-free reads and history ------------------------------------------------------

    def peek(self, key: str, *, max_age: float | None = None) -> JSON:
        """The saved data of any key (frozen, migrated in memory), or None. No lease needed.

        With ``max_age`` (seconds), a result read at most that long ago by this
        store may be returned instead of reading again.
        """
        self._check_open()
        check_key(key)
        if max_age is not None:
            with self._peek_lock:
                cached = self._peek_cache.get(key)
            if cached is not None and time.monotonic() - cached[0] <= max_age:
                return cached[1]
        read_at = time.monotonic()
        stored = self._db(
            "peek", lambda conn: files.read_version(conn, self._schema, self.name, key, None)
        )
        data = None
        if stored is not None:
            encoded, _, _, plain = self._bring_forward(stored, key)
            data = freeze_json(decode(encoded, stored.context) if plain is None else plain)
        with self._peek_lock:
            self._peek_cache[key] = (read_at, data)
        return data

    def probe_lock_active(self, key: str) -> bool:
        """True if any holder (this process included) has a live lease on ``key``."""
        self._check_open()
        check_key(key)
        lease = self._db("probe", lambda conn: locks.info(conn, self._schema, self.name, key))
        return lease is not None and lease.active

    def list_versions(
        self,
        key: str,
        *,
        newest_first: bool = True,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[VersionInfo]:
        """Saved versions of ``key`` (``since`` inclusive, ``until`` exclusive)."""
        self._check_open()
        check_key(key)
        if limit <= 0:
            raise ValueError("limit must be positive")
        return self._db(
            "list versions",
            lambda conn: files.list_versions(
                conn,
                self._schema,
                self.name,
                key,
                newest_first=newest_first,
                since=since,
                until=until,
                limit=limit,
            ),
        )

    def read_version(self, key: str, version: int) -> tuple[JSON, VersionInfo]:
        """``(frozen data, info)`` of one saved version, as it was stored (not migrated)."""
        self._check_open()
        check_key(key)
        stored = self._db(
            "read version",
            lambda conn: files.read_version(conn, self._schema, self.name, key, int(version)),
        )
        if stored is None:
            raise VersionNotFoundError(f"store {self.name!r} key {key!r} has no version {version}")
        return freeze_json(stored.decode()), stored.info

    def restore(self, key: str, version: int) -> None:
        """Make an old version of a loaded key current again, saved as a new version."""
        session = self._session(key)
        self._refuse_reentry("restore")
        stored = self._db(
            "read version",
            lambda conn: files.read_version(conn, self._schema, self.name, key, int(version)),
        )
        if stored is None:
            raise VersionNotFoundError(f"store {self.name!r} key {key!r} has no version {version}")
        data, _, _ = self._migrate(stored.decode(), stored.info.migrations, stored.context)
        change = session.replace(data)
        if change is None:
            session.touch()  # the rollback is in the history even if nothing differs
        self._announce(session, change)
        self.save(key)

    def erase(self, key: str) -> None:
        """Delete the key everywhere: record, every version and shard, and its lease.

        Takes the lease first (waiting like ``load``), so a holder elsewhere is
        respected; a key loaded here is erased with this store's lease.
        """
        self._check_open()
        check_key(key)
        self._refuse_reentry("erase")
        session = self._sessions.get(key)
        if session is not None and not session.closed:
            with session.queue.turn():
                session.snapshot(unloading=True)
                try:
                    self._erase_with(key, session.token)
                except LockLostError:
                    self._lose(session, "lease lost before erase")
                    raise
                except BaseException:
                    session.abort_unload()
                    raise
                session.close("erased")
                with self._lock:
                    if self._sessions.get(key) is session:
                        del self._sessions[key]
            return
        with self._lock:
            if key in self._loading:
                raise LoadInProgressError(f"store {self.name!r} key {key!r} is loading")
            self._loading.add(key)
        try:
            token, _ = self._acquire(key)
            try:
                self._erase_with(key, token)
            except BaseException:
                self._release_quietly([(key, token)])
                raise
        finally:
            with self._lock:
                self._loading.discard(key)
                self._acquired.pop(key, None)
            if session is not None:
                with self._lock:
                    if self._sessions.get(key) is session:
                        del self._sessions[key]

    def _erase_with(self, key: str, token: int) -> None:
        erased = self._db(
            "erase",
            lambda conn: files.erase_key(conn, self._schema, self.name, key, self.holder, token),
        )
        if not erased:
            raise LockLostError(f"store {self.name!r} key {key!r}: lease lost; nothing was erased")
        self._log(logging.INFO, key, "erased")


class SessionHandle:
    """The key-bound view ``Store.session(key)`` yields."""

    __slots__ = ("key", "store")

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    def get(self) -> JSON:
        return self.store.get(self.key)

    def update(self, fn: Callable[[Any], bool]) -> bool:
        return self.store.update(self.key, fn)

    def update_immutable(self, fn: Callable[[Any], Any]) -> bool:
        return self.store.update_immutable(self.key, fn)

    def save(self) -> None:
        self.store.save(self.key)

    def is_saved(self) -> bool:
        return self.store.is_saved(self.key)

    def __repr__(self) -> str:
        return f"<SessionHandle {self.store.name!r} {self.key!r}>"
