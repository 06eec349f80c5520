"""Session: one loaded key's in-memory state and the transforms that change it.

Owns what a process knows about a key it holds: the frozen current data and
its encoded JSON, the lease token, the newest version written, the names of
applied migrations, and whether there are unsaved changes (a change counter
against a saved counter). It runs ``update`` and ``update_immutable``
entirely in memory under the session's condition lock, so transforms of one
key are serialised and see each other's results. Whether the key may still
change is its registry entry's state (:mod:`sessionstore._registry`), read
here under the same condition. Saving, unloading and transactions are driven
by the save path; they take the session's FIFO turn
(:class:`~sessionstore.queue.KeyQueue`) and use :meth:`Session.pending_write`
/ :meth:`Session.mark_saved`. No I/O happens here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._registry import KeyEntry, KeyState
from ._storage.types import PendingWrite
from .errors import InvalidDataError, SessionClosedError, TransformError
from .frozen import decode, encode, encode_with_copy, frozen_view
from .queue import KeyQueue
from .schema import Validator, accept_any

__all__ = [
    "Change",
    "Rules",
    "Session",
    "ViewCache",
    "in_transform",
    "run_transform",
    "user_code",
]

_local = threading.local()


def in_transform() -> bool:
    """True while this thread runs a user transform (re-entry must be refused)."""
    return getattr(_local, "depth", 0) > 0


def user_code(fn: Callable[..., Any], *args: Any) -> Any:
    """Call user code that runs while a key is held for a change (a transform, a
    schema validator): store calls from it are refused (``in_transform``), as
    they would wait for the very key it is changing."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        return fn(*args)
    finally:
        _local.depth -= 1


def run_transform(fn: Callable[..., Any], argument: Any, context: Callable[[], str]) -> Any:
    """Call a user transform; anything it raises becomes :class:`TransformError`.

    ``context`` names what is being changed, for the message (built only on error).
    Deep recursion in the transform is an error of the transform, like any other.
    """
    try:
        return user_code(fn, argument)
    except TransformError:
        raise
    except Exception as exc:
        raise TransformError(f"{context()}: transform raised {exc!r}") from exc


class ViewCache:
    """Caps how many sessions of a store keep decoded copies of their data.

    A session always keeps its JSON bytes; its frozen view (built by the
    first ``get`` after a change) and its spare copy (left by ``update``)
    cost several times that in Python objects. Only the ``size`` sessions
    that most recently gained one keep them; older ones drop them and
    rebuild on demand. First in, first out, so a ``get`` that finds its view
    takes no lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._members: OrderedDict[int, Session] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, session: Session) -> None:
        if session.cached:  # read without the lock: a stale True only skips a re-admit
            return
        with self._lock:
            if session.cached:
                return
            session.cached = True
            self._members[id(session)] = session
            while len(self._members) > self.size:
                _, oldest = self._members.popitem(last=False)
                oldest.cached = False
                oldest.drop_views()

    def forget(self, session: Session) -> None:
        with self._lock:
            if self._members.pop(id(session), None) is not None:
                session.cached = False


@dataclass(frozen=True)
class Rules:
    """What every change of a store's documents must satisfy, and its shared caches."""

    store: str
    validator: Validator
    max_document_size: int
    views: ViewCache
    request_retention: int = 1000
    """Applied idempotency keys remembered per key (``idempotency_retention``)."""

    @property
    def validates(self) -> bool:
        """Is there a schema to check (else any JSON is valid)?"""
        return self.validator is not accept_any

    def check(self, value: Any, encoded: bytes, key: str) -> None:
        """Schema and size checks of data already encoded (so known to be JSON)."""
        if self.validator is not accept_any:
            user_code(self.validator, value, f"store {self.store!r} key {key!r}")
        if len(encoded) > self.max_document_size:
            raise InvalidDataError(
                f"store {self.store!r} key {key!r}: document is {len(encoded)} bytes of JSON; "
                f"max_document_size is {self.max_document_size}"
            )

    def accept(self, value: Any, key: str) -> bytes:
        """Check new data (JSON, schema, size); its JSON bytes."""
        encoded = encode(value)
        self.check(value, encoded, key)
        return encoded


class Change(NamedTuple):
    """A committed change, as JSON bytes before and after (a tuple: cheap on the hot path)."""

    old: bytes
    new: bytes


class Session:
    """The state of one loaded key. Created by the Store after the lease is taken."""

    __slots__ = (
        "__weakref__",
        "_spare",
        "_view",
        "cached",
        "change_seq",
        "cond",
        "encoded",
        "entry",
        "key",
        "lease_confirmed_at",
        "migrations",
        "mutex",
        "new_messages",
        "new_requests",
        "queue",
        "requests",
        "rules",
        "saved_seq",
        "seen_message",
        "stored_requests",
        "token",
        "version",
    )

    def __init__(
        self,
        rules: Rules,
        entry: KeyEntry,
        key: str,
        token: int,
        encoded: bytes,
        version: int,
        migrations: tuple[str, ...],
        *,
        dirty: bool,
        lease_confirmed_at: float,
        requests: Sequence[str] = (),
    ) -> None:
        self.rules = rules
        self.entry = entry
        """The key's registry entry: its state says whether it may still change."""
        self.key = key
        self.token = token
        self.encoded = encoded
        """The current data as JSON bytes: the source of truth."""
        # (encoded, frozen view of it): valid while ``encoded`` is that object.
        # One tuple, so readers need no lock: a transform may call get().
        self._view: tuple[bytes, Any] | None = None
        # A private decoded copy equal to ``encoded`` that nobody else can
        # reach: the next update hands it to its transform instead of decoding
        # again (the validation in encode_with_copy produced it for free).
        self._spare: Any = None
        self.cached = False
        """In the store's ViewCache (guarded by the cache's lock)."""
        self.version = version
        """Newest version in the database (0: none yet)."""
        self.migrations = migrations
        # The condition's own lock, taken directly on the update path: entering
        # a Condition is a Python-level call (0.4 µs more per update, measured).
        self.mutex = threading.Lock()
        self.cond = threading.Condition(self.mutex)
        self.queue = KeyQueue(self.cond)
        self.change_seq = 1 if dirty else 0
        self.saved_seq = 0
        self.lease_confirmed_at = lease_confirmed_at
        """``time.monotonic()`` when the lease was last known good."""
        # Idempotency keys applied (saved and not yet), oldest first; None: none yet.
        self.requests: dict[str, None] | None = dict.fromkeys(requests) if requests else None
        self.new_requests: list[str] | None = None
        """Applied since the last save, in order: the next write stores them."""
        self.stored_requests = len(requests)
        """How many applied ids the database holds for the key (as far as we know)."""
        self.new_messages: list[int] | None = None
        """Messages applied since the last save: the next write deletes them."""
        self.seen_message = 0
        """The newest message id handled here (applied, declined or failed)."""

    # -- state ---------------------------------------------------------------

    @property
    def data(self) -> Any:
        """The current data, frozen; built on first use after each change, then shared."""
        encoded = self.encoded
        view = self._view
        if view is not None and view[0] is encoded:
            return view[1]
        frozen = frozen_view(encoded, lambda: f"{self._context()} version {self.version}")
        self._view = (encoded, frozen)
        self.rules.views.admit(self)
        return frozen

    def decode(self, encoded: bytes | None = None) -> Any:
        """A new plain copy of the current data (or of ``encoded``).

        Raises :class:`CorruptDataError` for loaded bytes that do not parse:
        a load checks the stored file's integrity but parses it only when it
        needs the data (see ``Store.load``).
        """
        return decode(
            self.encoded if encoded is None else encoded,
            lambda: f"{self._context()} version {self.version}",
        )

    def drop_views(self) -> None:
        """Forget the decoded copies (they are rebuilt from ``encoded`` on demand)."""
        self._view = None
        self._spare = None

    def _set(self, encoded: bytes, spare: Any = None) -> None:
        """Replace the current data (caller holds ``cond``)."""
        self.encoded = encoded
        self._view = None
        self._spare = spare
        if spare is not None:
            self.rules.views.admit(self)

    @property
    def closed(self) -> bool:
        return self.entry.state is KeyState.CLOSED

    @property
    def closed_reason(self) -> str | None:
        return self.entry.closed_reason if self.closed else None

    @property
    def saved(self) -> bool:
        return self.saved_seq == self.change_seq

    def _context(self) -> str:
        return f"store {self.rules.store!r} key {self.key!r}"

    def check_open(self) -> None:
        state = self.entry.state
        if state is KeyState.CLOSED:
            raise SessionClosedError(
                f"{self._context()}: session closed ({self.entry.closed_reason}); load() it again"
            )
        if state is KeyState.UNLOADING:
            raise SessionClosedError(f"{self._context()}: session is being unloaded")

    def _wait_for_tx(self) -> None:
        while self.entry.in_tx:
            self.cond.wait()

    # -- in-memory changes ----------------------------------------------------

    def _commit(self, value: Any) -> Change | None:
        """Accept ``value`` as the new data; the change made, or None if unchanged."""
        encoded, copy = encode_with_copy(value)
        # Byte equality: 1 == 1.0 == True in Python, but not in the stored JSON.
        if encoded == self.encoded:
            self._spare = copy
            self.rules.views.admit(self)
            return None
        self.rules.check(value, encoded, self.key)
        change = Change(self.encoded, encoded)
        self._set(encoded, copy)
        self.change_seq += 1
        return change

    def update(
        self,
        fn: Callable[[Any], Any],
        request_id: str | None = None,
        message_id: int | None = None,
    ) -> tuple[bool | None, Change | None]:
        """Run a mutating transform; ``(committed, the change or None if nothing changed)``.

        With ``request_id`` (an idempotency key) already applied, ``fn`` is not
        run and ``committed`` is None; committed, the id is recorded with
        the change (a save is due even if the data did not change). With
        ``message_id`` (``fn`` applies that message), the message is marked
        handled and, committed, recorded for deletion by the next write:
        under the same lock as the change, so no save can take the change
        without the deletion.
        """
        with self.mutex:
            self._wait_for_tx()
            self.check_open()
            if request_id is not None and self.has_applied(request_id):
                return None, None
            if message_id is not None:
                self.seen_message = max(self.seen_message, message_id)
            work = self._spare if self._spare is not None else self.decode()
            self._spare = None  # the transform may change it, commit or not
            verdict = run_transform(fn, work, self._context)
            if verdict is False:
                return False, None
            if verdict is not True:
                raise TransformError(
                    f"{self._context()}: transform must return True or False, "
                    f"not {type(verdict).__name__}"
                )
            change = self._commit(work)
            if request_id is not None:
                self._record(request_id, changed=change is not None)
            if message_id is not None:
                self._record_message(message_id, changed=change is not None)
            return True, change

    def apply_hook(self, hook: Callable[[Any], Any]) -> Change | None:
        """Run a save hook on a mutable copy (turn held, any state); its change, if any.

        Raises what the hook raised (as :class:`TransformError`) or what the
        checks of its result raised; then nothing changes.
        """
        with self.mutex:
            work = self._spare if self._spare is not None else self.decode()
            self._spare = None
            run_transform(hook, work, self._context)
            return self._commit(work)

    # -- idempotency keys and messages ---------------------------------------------

    def has_applied(self, request_id: str) -> bool:
        requests = self.requests
        return requests is not None and request_id in requests

    def unsaved_request(self, request_id: str | None) -> bool:
        """Was ``request_id`` applied here but not yet written?"""
        new = self.new_requests
        return request_id is not None and new is not None and request_id in new

    def _record(self, request_id: str, *, changed: bool) -> None:
        """Remember an applied id (caller holds ``cond``); a write is due for it."""
        if self.requests is None:
            self.requests = {}
        self.requests[request_id] = None
        if self.new_requests is None:
            self.new_requests = []
        self.new_requests.append(request_id)
        if not changed:
            self.change_seq += 1

    def _record_message(self, message_id: int, *, changed: bool) -> None:
        """An applied message: the next write deletes its row (caller holds ``cond``)."""
        if self.new_messages is None:
            self.new_messages = []
        self.new_messages.append(message_id)
        if not changed:
            self.change_seq += 1

    def skip_message(self, message_id: int) -> None:
        """A message whose handler failed stays waiting; not offered again in this session."""
        with self.cond:
            self.seen_message = max(self.seen_message, message_id)

    def update_immutable(self, fn: Callable[[Any], Any]) -> tuple[bool, Change | None]:
        """Run a copy-on-write transform; ``(committed, the change or None if nothing changed)``."""
        with self.mutex:
            self._wait_for_tx()
            self.check_open()
            result = run_transform(fn, self.data, self._context)
            if result is False:
                return False, None
            if result is True or result is None:
                raise TransformError(
                    f"{self._context()}: immutable transform must return new data or False, "
                    f"not {result!r}"
                )
            return True, self._commit(result)

    def replace(self, value: Any) -> Change | None:
        """Set new data outside a transform (restore); the change, None if unchanged."""
        with self.cond:
            self._wait_for_tx()
            self.check_open()
            return self._commit(value)

    # -- saving ---------------------------------------------------------------

    def pending_write(
        self, encoded: bytes | None = None, request_id: str | None = None
    ) -> PendingWrite | None:
        """What a save writes now (the data as of the newest change), or None if saved.

        The write carries the idempotency keys applied and the messages
        handled since the last save. A ``tx`` passes the data it proposes
        (``encoded``, always written) and its own idempotency key.
        """
        with self.cond:
            if encoded is None and self.saved_seq == self.change_seq:
                return None
            requests: Sequence[str] = self.new_requests or ()
            if request_id is not None:
                requests = (*requests, request_id)
            retention = self.rules.request_retention
            return PendingWrite(
                self.key,
                self.change_seq,
                self.encoded if encoded is None else encoded,
                self.migrations,
                self.version + 1,
                self.token,
                self.version == 0,
                tuple(requests),
                tuple(self.new_messages or ()),
                self.stored_requests + len(requests) > retention + max(16, retention // 8),
            )

    def mark_saved(self, snapshot: PendingWrite) -> None:
        with self.cond:
            self._written(snapshot)

    def _written(self, snapshot: PendingWrite) -> None:
        """``snapshot`` is in the database (caller holds ``cond``)."""
        self.saved_seq = max(self.saved_seq, snapshot.seq)
        self.version = snapshot.version
        if snapshot.requests:
            if self.new_requests:
                # Updates only append, and writes of a key never overlap: the
                # first ones are the ones written.
                del self.new_requests[: len(snapshot.requests)]
            self.stored_requests += len(snapshot.requests)
        if snapshot.messages and self.new_messages:
            del self.new_messages[: len(snapshot.messages)]
        if snapshot.prune_requests:
            self._forget_old_requests(len(snapshot.requests))

    def _forget_old_requests(self, written: int) -> None:
        """The write pruned the stored ids to the retention (plus those it wrote): so here."""
        retention = self.rules.request_retention
        self.stored_requests = min(self.stored_requests - written, retention) + written
        requests = self.requests
        if requests is None:
            return
        keep = retention + written + len(self.new_requests or ())
        for request_id in list(requests)[: max(0, len(requests) - keep)]:
            del requests[request_id]

    def note_attempt(self, version: int) -> None:
        """A write of ``version`` failed without an answer: it may or may not exist.

        Later writes use higher numbers, so they can never be mistaken for it
        (the newest version is current, so a gap is harmless).
        """
        with self.cond:
            self.version = max(self.version, version)

    def touch(self) -> None:
        """Mark the session dirty without a change (the next save writes a version)."""
        with self.cond:
            self.check_open()
            self.change_seq += 1

    # -- transactions -----------------------------------------------------------

    def end_tx(self) -> None:
        """The tx that claimed this key (``KeyTable.claim_tx``) is over: updates go on."""
        with self.cond:
            self.entry.in_tx = False
            self.cond.notify_all()

    def commit_written(self, snapshot: PendingWrite, request_id: str | None) -> Change | None:
        """Take data a tx has already made durable; the change, None if unchanged."""
        with self.cond:
            encoded = snapshot.encoded
            change = Change(self.encoded, encoded) if encoded != self.encoded else None
            self._set(encoded)
            if request_id is not None:  # written with it: recorded, then marked written
                self._record(request_id, changed=True)
            self.change_seq += 1
            self._written(snapshot)
            self.saved_seq = self.change_seq
            return change

    def confirm_lease(self, at: float) -> None:
        self.lease_confirmed_at = max(self.lease_confirmed_at, at)

    def lease_overdue(self, duration: float) -> bool:
        return time.monotonic() - self.lease_confirmed_at > duration
