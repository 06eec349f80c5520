"""Store: the public facade of sessionstore.

Owns the public API of docs/api.md and nothing behind it: each method checks
its arguments (before any I/O), then delegates to the parts of the store's
core (:mod:`sessionstore._core`): the key registry, the loader, the save
path, transactions, the storage layer. docs/architecture.md describes those
parts, the key states and the threads. All methods are thread-safe.

Lock order, to stay deadlock-free: a key's FIFO turn (several keys: in key
order), then the session's condition, then the registry's lock, which is
never held across I/O or user code.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING
from datetime import datetime
from types import SimpleNamespace, TracebackType
from typing import Any, Generic, Literal

import sqlalchemy as sa
from typing_extensions import TypeVar

from . import _args, _process, db
from ._batch_api import BatchMethods
from ._core import StoreCore
from ._registry import KeyState
from ._storage import VersionInfo
from .config import StoreConfig
from .errors import (
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotLoadedError,
    SessionClosedError,
    StoreClosedError,
    TransformError,
    VersionNotFoundError,
)
from .frozen import JSON, check_key, frozen_view
from .migrations import MigrationStep
from .retry import RetryPolicy
from .schema import SchemaLike
from .session import Session, in_transform

__all__ = ["SessionHandle", "Store"]

T = TypeVar("T", default=Any)
"""The document type of a Store (``Store[Player]``, a TypedDict say); ``Any`` if not given.

Only for type checkers: at run time documents are frozen JSON (``FrozenDict``
and friends), read-only whatever ``T`` says."""

_DEFAULT = SimpleNamespace(
    **{f.name: f.default for f in dataclasses.fields(StoreConfig) if f.default is not MISSING}
)
"""The option defaults, as :class:`StoreConfig` declares them (their one home)."""


class Store(BatchMethods[T], Generic[T]):
    """A named collection of documents kept in PostgreSQL under session locks.

    Every option is described, with its default, by :class:`StoreConfig`
    (and the README's configuration table, made from it). ``Store[Player]``
    types the documents (``get`` returns a ``Player``, ``update`` takes a
    ``Callable[[Player], bool]``) for mypy and IDEs; unparameterised they are
    ``Any``. All methods are
    thread-safe; a Store created before ``os.fork()`` acts in the child as a
    fresh Store (no keys, its own holder id, connections and threads).
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
        dsn: str | sa.URL | sa.Engine | None = None,
        lock_duration: float = _DEFAULT.lock_duration,
        lock_refresh_interval: float = _DEFAULT.lock_refresh_interval,
        lock_timeout: float = _DEFAULT.lock_timeout,
        autosave_interval: float = _DEFAULT.autosave_interval,
        *,
        message_handler: Callable[[str, Any, Any], bool] | None = None,
        on_save: Callable[[str, Any, str], Any] | None = None,
        on_after_save: Callable[[str, Any, int], Any] | None = None,
        max_pending_messages: int = _DEFAULT.max_pending_messages,
        idempotency_retention: int = _DEFAULT.idempotency_retention,
        db_schema: str = _DEFAULT.db_schema,
        max_document_size: int = _DEFAULT.max_document_size,
        retry_timeout: float = _DEFAULT.retry_timeout,
        compression_level: int = _DEFAULT.compression_level,
        compress_threshold: int = _DEFAULT.compress_threshold,
        inline_threshold: int = _DEFAULT.inline_threshold,
        shard_size: int = _DEFAULT.shard_size,
        stream_threshold: int = _DEFAULT.stream_threshold,
        save_batch_size: int = _DEFAULT.save_batch_size,
        pool_size: int = _DEFAULT.pool_size,
        retain_versions: int = _DEFAULT.retain_versions,
        retain_for: float = _DEFAULT.retain_for,
        janitor_interval: float = _DEFAULT.janitor_interval,
        peek_cache_size: int = _DEFAULT.peek_cache_size,
        control_dsn: str | sa.URL | None = _DEFAULT.control_dsn,
        prepared_statements: bool = _DEFAULT.prepared_statements,
        instant_takeover: bool = _DEFAULT.instant_takeover,
        takeover_grace: float = _DEFAULT.takeover_grace,
        view_cache_size: int = _DEFAULT.view_cache_size,
    ) -> None:
        # Every argument goes to StoreConfig, which checks them all before any I/O.
        config = StoreConfig(**{k: v for k, v in locals().items() if k != "self"})
        self.config = config
        """Every option of this Store, validated (:class:`StoreConfig`)."""
        self.name = config.name
        self._lock = threading.Lock()
        self._closed = False
        self._owns_engine = not isinstance(dsn, sa.Engine)
        engine = db.create_engine(config.dsn, pool_size=config.pool_size, autocommit=True)
        if not config.prepared_statements:
            db.disable_prepared_statements(engine)  # before any connection is made
        try:
            db.ensure_schema(engine, config.db_schema, retry=RetryPolicy(config.retry_timeout))
            # Every write is a single autocommit statement, except the streamed
            # write of a large document, which opens its own transaction. A
            # user's Engine gets the setting per connection and back on return.
            self._engine = (
                engine
                if self._owns_engine
                else engine.execution_options(isolation_level="AUTOCOMMIT")
            )
            self._core: StoreCore | None = StoreCore.open(config, self._engine)
        except BaseException:
            if self._owns_engine:
                engine.dispose()
            raise
        _process.register(self)
        self._core.log(logging.DEBUG, None, "store opened")

    # -- the core, per process ---------------------------------------------------

    def _open_core(self) -> StoreCore:
        """This process's core (a forked child opens its own on first use)."""
        _process.check_pid()
        core = self._core
        if core is not None and not self._closed:
            return core
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {self.name!r} is closed")
            if self._core is None:
                self._core = StoreCore.open(self.config, self._engine)
            return self._core

    def _after_fork_in_child(self) -> None:
        """In a forked child: drop the parent's core and connections, without I/O."""
        self._lock = threading.Lock()
        if self._core is not None:
            self._core.abandon()
        self._core = None
        # Forget, never close, the connections pooled in the parent (SQLAlchemy's
        # advice for fork; a user's Engine included: those sockets are the parent's).
        self._engine.dispose(close=False)

    @property
    def holder(self) -> str:
        """This process's holder id for the store (a forked child gets its own)."""
        core = self._core
        return core.holder if core is not None else self._open_core().holder

    @property
    def lock_duration(self) -> float:
        return self.config.lock_duration

    @property
    def lock_refresh_interval(self) -> float:
        return self.config.lock_refresh_interval

    @property
    def lock_timeout(self) -> float:
        return self.config.lock_timeout

    @property
    def autosave_interval(self) -> float:
        return self.config.autosave_interval

    @property
    def takeover_grace(self) -> float:
        return self.config.takeover_grace

    # -- context managers ------------------------------------------------------------

    def __enter__(self) -> Store[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        core = self._core
        if self._closed or core is None:
            state = "closed" if self._closed else "not opened in this process"
            return f"<sessionstore.Store {self.name!r} {state}>"
        return f"<sessionstore.Store {self.name!r} holder={core.holder} {len(core.table)} keys>"

    @contextmanager
    def session(self, key: str) -> Iterator[SessionHandle[T]]:
        """Use ``key`` for the block: loaded on entry, unloaded when the last block exits.

        Blocks on the same key share one lease (any threads, nested or not);
        a key also loaded by :meth:`load` stays loaded until :meth:`unload`.
        """
        core = self._begin("session", key)
        entry = core.loader.load(key, explicit=False, user=True)
        try:
            yield SessionHandle(self, key)
        finally:
            last, handoff_to = core.table.leave(entry)
            if handoff_to is not None:
                error = core.saver.hand_over_now(entry, handoff_to)
                if error is not None:
                    raise error  # the request's change is not saved: it must not succeed
            elif last:
                errors = core.saver.unload([entry], last_user=True)
                if key in errors:
                    raise errors[key]

    # -- helpers ------------------------------------------------------------------------

    def _begin(self, what: str, key: str) -> StoreCore:
        """Checks shared by key calls that may do I/O: open, key, not from a transform."""
        core = self._open_core()
        check_key(key)
        self._refuse_reentry(what)
        return core

    def _refuse_reentry(self, what: str) -> None:
        if in_transform():
            raise TransformError(
                f"store {self.name!r}: {what}() called from inside a transform or validator; "
                "it may only read (get, peek); change the store after it returns"
            )

    def _session(self, key: str) -> Session:
        """The LIVE (or unloading) session of ``key``, waiting for another thread's load."""
        core = self._core
        entry = core.table.get(key) if core is not None else None
        if entry is not None and entry.state is KeyState.LIVE and not self._closed:
            return entry.session  # type: ignore[return-value]
        core = self._open_core()
        check_key(key)
        entry = core.table.wait_loaded(key)
        if entry is None or entry.state is KeyState.LOADING or entry.session is None:
            raise KeyNotLoadedError(f"store {self.name!r} key {key!r} is not loaded")
        if entry.state is KeyState.CLOSED:
            raise SessionClosedError(
                f"store {self.name!r} key {key!r}: session closed ({entry.closed_reason}); "
                "load() it again"
            )
        return entry.session

    # -- load, read, change ----------------------------------------------------------------

    def load(self, key: str) -> None:
        """Take the key's lease, read and migrate its data, and hold it in memory.

        A no-op if the key is already loaded. Another thread loading the same
        key: wait for that load and share its outcome. Waits up to
        ``lock_timeout`` for a key held elsewhere (a live holder is asked to
        hand it over), then raises :class:`LockUnavailableError`. ``unload``,
        ``erase`` or ``close`` meanwhile cancel it (:class:`LoadCancelledError`).

        A stored file that fails its integrity checks fails the load with
        :class:`CorruptDataError`, and the lease is released. The JSON itself
        is parsed here only when a migration, the schema or a changed callback
        needs the data; otherwise the first read parses it.
        """
        self._begin("load", key).loader.load(key, explicit=True, user=False)

    def get(self, key: str) -> T:
        """The key's current data, frozen (read-only). O(1): no copy is made."""
        data: T = self._session(key).data
        return data

    def is_saved(self, key: str) -> bool:
        """True if the key has no changes that are not yet in the database."""
        return self._session(key).saved

    def update(
        self,
        key: str,
        fn: Callable[[T], bool],
        *,
        durable: bool = False,
        idempotency_key: str | None = None,
    ) -> bool:
        """Change the key's data in memory: ``fn(mutable copy) -> True`` commits, ``False`` aborts.

        Durable after the next save (autosave, ``save``, ``unload``, ``close``);
        with ``durable=True``, returns only once a fenced write containing the
        change has committed (concurrent durable updates share writes; an
        error of the write is raised, the change staying in memory, dirty).
        With ``idempotency_key``, a key already applied to this document
        returns ``False`` without calling ``fn`` (docs/idempotency.md).
        """
        _args.check_bool(durable, "durable")
        request_id = _args.check_request_id(idempotency_key)
        session = self._session(key)
        self._refuse_reentry("update")
        committed, change = session.update(fn, request_id)
        core = self._open_core()
        if change is not None:
            core.announce(session, change)
        # A repeat of a request applied here but not yet written waits for
        # that write too: False must never mean "applied" before it is durable.
        repeat = committed is None and session.unsaved_request(request_id)
        if durable and (committed or repeat):
            core.group_commit.commit(session)
        return bool(committed)

    def update_immutable(self, key: str, fn: Callable[[T], T | Literal[False]]) -> bool:
        """Like :meth:`update`, but ``fn(frozen data)`` returns new data or ``False``."""
        session = self._session(key)
        self._refuse_reentry("update_immutable")
        committed, change = session.update_immutable(fn)
        if change is not None:
            self._open_core().announce(session, change)
        return committed

    def tx(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, T]], bool],
        *,
        idempotency_key: str | None = None,
    ) -> bool:
        """Change several loaded keys together, atomically and durably.

        ``fn({key: mutable copy}) -> True`` commits: every key that changed is
        written in one database transaction before ``tx`` returns. ``False``
        aborts; a transform that changed nothing writes nothing. With
        ``idempotency_key`` already applied to any of the keys, returns
        ``False`` without calling ``fn``; committed, every key records it.
        """
        return self._tx(keys, fn, immutable=False, idempotency_key=idempotency_key)

    def tx_immutable(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, T]], Mapping[str, T] | Literal[False]],
        *,
        idempotency_key: str | None = None,
    ) -> bool:
        """Like :meth:`tx`, but ``fn({key: frozen})`` returns ``{key: new data}`` or ``False``."""
        return self._tx(keys, fn, immutable=True, idempotency_key=idempotency_key)

    def _tx(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, Any]], Any],
        *,
        immutable: bool,
        idempotency_key: str | None,
    ) -> bool:
        request_id = _args.check_request_id(idempotency_key)
        core = self._open_core()
        if isinstance(keys, str) or not isinstance(keys, Sequence | set | frozenset):
            raise InvalidKeyError("tx keys must be a list of keys")
        key_list = [check_key(key) for key in keys]
        if not key_list:
            raise InvalidArgumentError("tx needs at least one key")
        if len(set(key_list)) != len(key_list):
            raise InvalidArgumentError(f"tx keys contain duplicates: {key_list}")
        self._refuse_reentry("tx")
        sessions = [self._session(key) for key in sorted(key_list)]
        outcome = core.tx.run(sessions, fn, immutable=immutable, request_id=request_id)
        if outcome is None:
            return False
        # Callbacks run once the keys are free again: they may use them.
        for session, change in outcome:
            core.announce(session, change)
        return True

    def applied(self, key: str, idempotency_key: str) -> bool:
        """Has ``idempotency_key`` been applied to ``key``?

        A key loaded here answers from memory (unsaved applications count);
        any other key from its saved data (no lease needed).
        """
        request_id = _args.check_request_id(idempotency_key)
        if request_id is None:
            raise InvalidArgumentError("idempotency_key must not be None")
        core = self._open_core()
        check_key(key)
        entry = core.table.get(key)
        if entry is not None and entry.state is KeyState.LIVE and entry.session is not None:
            return entry.session.has_applied(request_id)
        return core.repo.applied(key, request_id)

    def send_message(self, key: str, message: JSON) -> int:
        """Send a JSON message to ``key``, held or not, by any process; its id.

        Durable on return. The key's holder runs ``message_handler(key, data,
        message)`` on it at once (woken by NOTIFY); a key nobody holds gets it
        at its next load, in send order (docs/messages.md). Raises
        :class:`MessageQueueFullError` when ``max_pending_messages`` wait.
        """
        core = self._begin("send_message", key)
        return core.messages.send(key, message)

    def stats(self) -> dict[str, Any]:
        """What this Store did in this process, for dashboards (docs/operations.md).

        ``loaded`` and ``dirty`` keys now; since the Store opened here:
        ``saves`` (keys written), ``save_failures`` (keys whose write
        failed), ``lost_leases``, ``handoffs_in`` / ``handoffs_out``,
        ``messages_applied``, ``durable_writes`` / ``durable_keys`` (the
        group commit's writes and the keys they carried); ``save_p50`` /
        ``save_p99``: seconds per write statement over the recent writes.
        """
        core = self._open_core()
        live = [e.session for e in core.table.entries(KeyState.LIVE) if e.session is not None]
        return core.stats.snapshot(len(live), sum(1 for s in live if not s.saved))

    # -- save, unload, close ------------------------------------------------------------

    def save(self, key: str) -> None:
        """Write pending changes of ``key`` now (a no-op if saved)."""
        session = self._session(key)
        self._refuse_reentry("save")
        self._open_core().saver.save(session)

    def unload(self, key: str) -> None:
        """Save pending changes, release the lease and forget the key.

        A running ``load(key)`` is cancelled instead (it raises
        :class:`LoadCancelledError`, its lease released). A key that
        ``session()`` blocks still use stays loaded until the last one exits.
        If the save fails, the key stays loaded with its data and the error is
        raised, so the call can be retried.
        """
        self._begin("unload", key).saver.unload_key(key)

    def close(self) -> None:
        """Cancel running loads, unload every key (errors raised together), stop threads.

        Idempotent, and works from any thread, a callback's included;
        afterwards every other call raises :class:`StoreClosedError`.
        """
        self._refuse_reentry("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            core = self._core
        _process.unregister(self)
        try:
            if core is not None:
                core.close()
        finally:
            if self._owns_engine:
                self._engine.dispose()

    # -- lock-free reads and history --------------------------------------------------------

    def peek(self, key: str, *, max_age: float | None = None) -> T | None:
        """The saved data of any key (frozen, migrated in memory), or None. No lease needed.

        With ``max_age`` (seconds), a result read at most that long ago by this
        store may be returned instead of reading again.
        """
        core = self._open_core()
        check_key(key)
        found: T | None = core.loader.peek(
            key, _args.check_seconds(max_age, "max_age", allow_none=True)
        )
        return found

    def probe_lock_active(self, key: str) -> bool:
        """True if any holder (this process included) has a live lease on ``key``."""
        core = self._open_core()
        check_key(key)
        lease = core.repo.lease_info(key)
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
        core = self._open_core()
        check_key(key)
        _args.check_bool(newest_first, "newest_first")
        since = _args.check_timestamp(since, "since")
        until = _args.check_timestamp(until, "until")
        limit = _args.check_limit(limit)
        return core.repo.list_versions(
            key, newest_first=newest_first, since=since, until=until, limit=limit
        )

    def read_version(self, key: str, version: int) -> tuple[T, VersionInfo]:
        """``(frozen data, info)`` of one saved version, as it was stored (not migrated)."""
        core = self._open_core()
        check_key(key)
        stored = core.repo.read(key, _args.check_version(version, core.describe(key)))
        if stored is None:
            raise VersionNotFoundError(f"store {self.name!r} key {key!r} has no version {version}")
        return frozen_view(stored.raw, stored.context), stored.info

    def restore(self, key: str, version: int) -> None:
        """Make an old version of a loaded key current again, saved as a new version."""
        number = _args.check_version(version, f"store {self.name!r} key {key!r}")
        session = self._session(key)
        self._refuse_reentry("restore")
        core = self._open_core()
        stored = core.repo.read(key, number)
        if stored is None:
            raise VersionNotFoundError(f"store {self.name!r} key {key!r} has no version {version}")
        data, _ = core.loader.migrate(stored.decode(), stored.info.migrations, stored.context)
        change = session.replace(data)
        if change is None:
            session.touch()  # the rollback is in the history even if nothing differs
        core.announce(session, change)
        core.saver.save(session)

    def erase(self, key: str) -> None:
        """Delete the key everywhere: record, every version and shard, and its lease.

        Takes the lease first (waiting like ``load``), so a holder elsewhere is
        respected; a key loaded here is erased with this store's lease; a
        running ``load(key)`` is cancelled.
        """
        self._begin("erase", key).saver.erase(key)

    def prune(self, *, time_budget: float = 1.0) -> int:
        """Delete versions beyond the retention policy, a batch of keys at a time.

        Runs in the background every ``janitor_interval``; callable directly
        (e.g. from a cron job). Returns the number of versions deleted. Only
        one process prunes a store at a time; others return 0 at once.
        """
        core = self._open_core()
        return core.prune(_args.check_seconds(time_budget, "time_budget"))


class SessionHandle(Generic[T]):
    """The key-bound view ``Store.session(key)`` yields."""

    __slots__ = ("key", "store")

    def __init__(self, store: Store[T], key: str) -> None:
        self.store = store
        self.key = key

    def get(self) -> T:
        return self.store.get(self.key)

    def update(
        self,
        fn: Callable[[T], bool],
        *,
        durable: bool = False,
        idempotency_key: str | None = None,
    ) -> bool:
        return self.store.update(self.key, fn, durable=durable, idempotency_key=idempotency_key)

    def applied(self, idempotency_key: str) -> bool:
        return self.store.applied(self.key, idempotency_key)

    def update_immutable(self, fn: Callable[[T], T | Literal[False]]) -> bool:
        return self.store.update_immutable(self.key, fn)

    def save(self) -> None:
        self.store.save(self.key)

    def is_saved(self) -> bool:
        return self.store.is_saved(self.key)

    def __repr__(self) -> str:
        return f"<SessionHandle {self.store.name!r} {self.key!r}>"
