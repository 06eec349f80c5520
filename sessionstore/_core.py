"""StoreCore: the parts of one open Store in one process, and their lifetime.

Owns what a Store has while it is open in this process: its holder id, the
repository (storage layer), the key registry, the rules every document
obeys, the loader, the save path (with its group commit), the transactions
and the messages, and the threads
(scheduler, worker, callback lane, control connection). ``Store`` builds one
at construction and, in a forked child, a fresh one on first use
(docs/architecture.md, "Processes"); :meth:`close` ends it and
:meth:`abandon` drops an inherited one without any I/O.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

import cachetools
import sqlalchemy as sa

from . import _process, db
from . import migrations as migrations_module
from ._background import (
    Autosave,
    HandOver,
    Heartbeat,
    Prune,
    ReleaseAgain,
    SweepMessages,
    Worker,
)
from ._batch import Batches
from ._durable import GroupCommit
from ._leasing import Leases
from ._loading import Loader
from ._messages import Messages
from ._registry import KeyState, KeyTable, wake
from ._saving import Saver
from ._stats import Stats
from ._storage import FileSettings, Repository, Retention
from ._storage.leases import parse_handoff_request
from ._storage.sql import free_channel, holder_channel, message_channel
from ._tx import Transactions
from .control import ControlConnection, libpq_url
from .errors import SessionStoreError, StorageUnavailableError, StoreCloseError
from .frozen import JSON, frozen_view
from .retry import RetryPolicy, describe
from .sched import Scheduler
from .schema import make_validator
from .session import Change, Rules, Session, ViewCache

if TYPE_CHECKING:
    from .config import StoreConfig

__all__ = ["StoreCore"]

logger = logging.getLogger("sessionstore")


class StoreCore:
    """One Store's state and threads in this process (see the module docstring)."""

    def __init__(self, config: StoreConfig, engine: sa.Engine) -> None:
        self.config = config
        self.name = config.name
        self.holder = str(uuid.uuid4())
        self.closing = False
        self.liveness = bool(config.instant_takeover)
        self.steps = migrations_module.check_steps(config.migrations)
        self.rules = Rules(
            config.name,
            make_validator(config.schema),
            config.max_document_size,
            ViewCache(config.view_cache_size),
            config.idempotency_retention,
        )
        self.template = check_template(self.rules, config.template, config.name)
        self.retention = Retention(
            config.retain_versions, float(config.retain_for), config.save_batch_size
        )
        self.repo = Repository(
            engine,
            config.db_schema,
            config.name,
            self.holder,
            retry=RetryPolicy(timeout=config.retry_timeout),
            files_settings=FileSettings(
                compression_level=config.compression_level,
                compress_threshold=config.compress_threshold,
                inline_threshold=config.inline_threshold,
                shard_size=config.shard_size,
                stream_threshold=config.stream_threshold,
            ),
            batch_size=config.save_batch_size,
            request_retention=config.idempotency_retention,
            log_extra=self.log_extra(),
        )
        self.table = KeyTable(self.describe)
        self.peek_cache: cachetools.LRUCache[str, tuple[float, JSON]] | None = (
            cachetools.LRUCache(maxsize=config.peek_cache_size) if config.peek_cache_size else None
        )
        self.peek_lock = threading.Lock()
        self.prune_after = ""
        self.leases = Leases(self)
        self.loader = Loader(self)
        self.saver = Saver(self)
        self.tx = Transactions(self)
        self.group_commit = GroupCommit(self)
        self.stats = Stats()
        self.batches = Batches(self)
        self.messages = Messages(self)
        self.worker = Worker(f"sessionstore-work-{config.name}")
        self.lane = Worker(f"sessionstore-callbacks-{config.name}")
        self.scheduler: Scheduler | None = None
        self.control: ControlConnection | None = None

    # -- opening and closing -----------------------------------------------------

    @classmethod
    def open(cls, config: StoreConfig, engine: sa.Engine) -> StoreCore:
        """A core with its control connection ready and its timers running."""
        core = cls(config, engine)
        try:
            core._start(engine)
        except BaseException:
            core.closing = True
            core._stop_threads()
            raise
        _process.track_core(core)
        return core

    def _start(self, engine: sa.Engine) -> None:
        config = self.config
        # First, and in one statement: a role missing a grant fails here, with
        # every missing privilege named, not later at the call that needs one.
        self.repo.check_privileges()
        url = engine.url if config.control_dsn is None else db.resolve_url(config.control_dsn)
        self.control = ControlConnection(
            libpq_url(url),
            self.holder,
            self.name,
            {
                free_channel(config.db_schema, config.name): self.on_key_free,
                holder_channel(self.holder): self.on_handoff_request,
                message_channel(self.holder): self.messages.on_notify,
            },
            liveness=self.liveness,
            on_reconnect=self.on_control_reconnect,
            log_extra=self.log_extra(),
        )
        if not self.control.wait_ready(max(config.retry_timeout, 5.0)):
            error = self.control.last_error
            password = sa.make_url(url).password  # the control connection's own DSN's
            why = describe(error, [str(password)] if password else []) if error else "timed out"
            raise StorageUnavailableError(f"store {self.name!r}: control connection failed: {why}")
        self._check_control()
        self.scheduler = Scheduler(f"sessionstore-sched-{self.name}")
        self.scheduler.every(config.lock_refresh_interval, Heartbeat(self))
        self.scheduler.every(config.autosave_interval, Autosave(self))
        self.scheduler.every(config.janitor_interval, Prune(self))

    def _check_control(self) -> None:
        """Warn and turn instant takeover off if the control connection is no session of its own.

        Others must see its advisory lock (not so with a control_dsn on another
        server) and it must hear their NOTIFYs. Behind PgBouncer in transaction
        mode the lock does look held (it stays on the server connection that
        took it, lent to others since, whatever becomes of this process), but
        no notification reaches it: only the second test tells.
        """
        assert self.control is not None
        visible = not self.liveness or self.repo.holder_alive()
        # The probe is a handoff request to ourselves, sent through the pool,
        # for a key that does not exist; its payload is "requester key".
        probe = f"probe-{uuid.uuid4().hex}"
        wait = max(2.0, min(self.config.retry_timeout, 5.0))
        if visible and self.control.hears(
            holder_channel(self.holder),
            f"{self.holder} {probe}",
            lambda: self.repo.request_handoff(self.holder, probe),
            wait,
        ):
            return
        self.log(
            logging.WARNING,
            None,
            "the control connection is not a session of its own: %s; give the store a "
            "control_dsn that goes to PostgreSQL directly (docs/scaling.md#pgbouncer). "
            "Instant takeover is off (leases are taken only when they expire), and handoff "
            "requests and message notifications are not heard",
            "its advisory lock is not visible to other sessions"
            if not visible
            else f"it did not hear a notification sent from the pool within {wait:g} s "
            "(a pool in transaction mode, such as PgBouncer, in between?)",
        )
        self.liveness = False

    def close(self) -> None:
        """Cancel loads, stop the timers and the worker, unload every key, stop the rest.

        Works from any thread, callbacks included: a thread of this core is
        never joined by itself (the lane ends after the callback returns).
        """
        self.closing = True
        _process.untrack_core(self)
        entries = self.table.close_all()
        if self.scheduler is not None:
            self.scheduler.stop(timeout=30.0)
        self.worker.stop(timeout=60.0)
        deadline = time.monotonic() + self.config.retry_timeout + 5.0
        me = threading.get_ident()
        for entry in entries:
            # Not a load of this very thread (close() from import_legacy_data, say).
            if entry.state is KeyState.LOADING and entry.loader != me:
                self.table.wait_settled(entry, max(0.0, deadline - time.monotonic()))
            elif entry.state is KeyState.UNLOADING and entry.session is not None:
                with entry.session.queue.turn():
                    pass  # another thread's final save: done, or the key is LIVE again
        errors = self.saver.unload_all(self.table.entries(*KeyState))
        self.table.clear()
        self._release_unclaimed()
        self.lane.stop(timeout=30.0)
        if self.control is not None:
            self.control.stop()
        self.log(logging.DEBUG, None, "store closed, %d keys failed to unload", len(errors))
        if errors:
            raise StoreCloseError(
                f"store {self.name!r}: {len(errors)} keys could not be unloaded: "
                + ", ".join(sorted(errors)[:10]),
                errors,
            )

    def _release_unclaimed(self) -> None:
        """Leases handed to us that no load here will take now: free them for the askers."""
        try:
            self.repo.release_unclaimed_all()
        except Exception as exc:  # they expire within the handover's reserve anyway
            self.log(logging.WARNING, None, "releasing unclaimed leases failed: %s", exc)

    def _stop_threads(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(timeout=5.0)
        self.worker.stop(timeout=5.0)
        self.lane.stop(timeout=5.0)
        if self.control is not None:
            self.control.stop()

    def abandon(self) -> None:
        """In a forked child: forget this core (the parent's) without any I/O.

        Its threads did not survive the fork; its keys, leases and sockets are
        the parent's. Nothing is saved, released or closed: the objects are
        dropped (psycopg does not close a connection inherited across a fork
        when it is garbage-collected).
        """
        self.closing = True
        self.table = KeyTable(self.describe)

    # -- notifications (control thread: must return at once) ----------------------

    def on_key_free(self, key: str) -> None:
        """A key of this store was released or handed over: wake a loader waiting for it."""
        entry = self.table.get(key)
        if entry is not None and entry.state is KeyState.LOADING:
            wake(entry)

    def on_handoff_request(self, payload: str) -> None:
        request = parse_handoff_request(payload)
        if request is not None and not self.closing:
            self.worker.submit(HandOver(self, request))

    def on_control_reconnect(self, dropped_at: float) -> None:
        """Back after a drop: messages announced meanwhile were not heard; look for them.

        A drop may be a server restart, which may have lost the lease
        releases of the moments before ``dropped_at``: they are done again.
        """
        if self.closing:
            return
        self.worker.submit(ReleaseAgain(self, dropped_at))
        if self.config.message_handler is not None:
            self.worker.submit(SweepMessages(self))

    def release_quietly(self, leases: list[tuple[str, int]]) -> None:
        """Release leases on a path that must not raise (they expire on their own)."""
        self.leases.release(leases)

    # -- changed callbacks (the caller's thread: they may use the store) ---------

    def announce(self, session: Session, change: Change | None) -> None:
        """Fire changed callbacks for a committed change (frozen new and old data)."""
        if change is None or not self.config.changed_callbacks:
            return
        new = session.data if session.encoded is change.new else frozen_view(change.new)
        self.fire_changed(session.key, new, frozen_view(change.old))

    def fire_changed(self, key: str, new: JSON, old: JSON) -> None:
        for callback in self.config.changed_callbacks:
            try:
                callback(key, new, old)
            except Exception:
                self.log(logging.ERROR, key, "changed callback %r raised", callback, exc_info=True)

    # -- maintenance ----------------------------------------------------------------

    def prune(self, time_budget: float = 1.0) -> int:
        """Delete versions beyond the retention policy, a batch of keys at a time."""
        deadline = time.monotonic() + time_budget
        total = 0
        while True:
            ours, last_key, pruned = self.repo.prune(self.prune_after, self.retention)
            total += pruned
            if not ours:
                return total
            # Walk the keys round-robin: start over after the last batch.
            self.prune_after = last_key or ""
            if last_key is None or time.monotonic() > deadline:
                if total:
                    self.log(logging.INFO, None, "pruned %d old versions", total)
                return total

    # -- naming and logging ------------------------------------------------------------

    def describe(self, key: str | None) -> str:
        """``store 'x' key 'y'``, for messages."""
        return f"store {self.name!r}" + (f" key {key!r}" if key else "")

    def log(
        self, level: int, key: str | None, message: str, *args: object, exc_info: bool = False
    ) -> None:
        """Log on ``sessionstore`` with ``store``, ``key`` and ``holder`` on the record."""
        if logger.isEnabledFor(level):
            logger.log(
                level,
                f"{self.describe(key)}: {message}",
                *args,
                exc_info=exc_info,
                extra=self.log_extra(key),
            )

    def log_extra(self, key: str | None = None) -> dict[str, object]:
        return {"store": self.name, "key": key, "holder": self.holder}

    def __repr__(self) -> str:
        return f"<StoreCore {self.name!r} holder={self.holder}>"


def check_template(rules: Rules, template: JSON, name: str) -> bytes:
    """The template's JSON bytes, checked against the schema once, at construction."""
    try:
        return rules.accept(template, "<template>")
    except SessionStoreError as exc:
        raise type(exc)(f"store {name!r}: template is invalid: {exc}") from exc
