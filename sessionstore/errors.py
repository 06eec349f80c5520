"""Every exception sessionstore raises.

Owns the exception hierarchy of docs/api.md ("Errors") and nothing else: all classes
subclass :class:`SessionStoreError`; errors caused by bad input also subclass
``ValueError`` or ``TypeError`` so generic handlers keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from typing_extensions import Self

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    from builtins import ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import ExceptionGroup

__all__ = [
    "ArgumentTypeError",
    "BatchError",
    "CorruptDataError",
    "InsufficientPrivilegeError",
    "InvalidArgumentError",
    "InvalidDataError",
    "InvalidKeyError",
    "KeyNotLoadedError",
    "KeysChangedError",
    "LoadCancelledError",
    "LoadInProgressError",
    "LockLostError",
    "LockUnavailableError",
    "MessageQueueFullError",
    "MigrationError",
    "SchemaValidationError",
    "SessionClosedError",
    "SessionStoreError",
    "StorageUnavailableError",
    "StoreCloseError",
    "StoreClosedError",
    "TransactionConflictError",
    "TransformError",
    "VersionNotFoundError",
]


class SessionStoreError(Exception):
    """Base class of every error raised by sessionstore."""


class StoreClosedError(SessionStoreError):
    """The store was closed; no call but ``close()`` is allowed any more."""


class KeyNotLoadedError(SessionStoreError, LookupError):
    """The key is not loaded by this store (``load(key)`` it first)."""


class LoadInProgressError(SessionStoreError):
    """``load(key)`` was re-entered on the thread that is loading that key.

    (From a callback run by that load, say.) Another thread's ``load`` of the
    same key waits for the running one instead, and shares its outcome.
    """


class LoadCancelledError(SessionStoreError):
    """The ``load(key)`` was cancelled by ``unload(key)``, ``erase(key)`` or ``close()``.

    Its lease, if it had been taken, was released; a later ``load(key)`` works.
    """


class SessionClosedError(SessionStoreError):
    """The key's session was closed (lease lost or handed over).

    ``load(key)`` again reloads it from the database.
    """


class LockUnavailableError(SessionStoreError):
    """``load`` could not get the key's lease within ``lock_timeout``."""


class LockLostError(SessionStoreError):
    """The lease was lost before the write; nothing was written.

    ``keys`` names the keys whose lease was found lost.
    """

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = frozenset(keys)


class SchemaValidationError(SessionStoreError, ValueError):
    """Data failed the store's schema; nothing changed."""


class TransformError(SessionStoreError):
    """A transform raised, returned the wrong type, or re-entered the store.

    The original exception, if any, is chained as ``__cause__``; nothing changed.
    """


class TransactionConflictError(SessionStoreError):
    """A key of this ``tx`` is already part of a running ``tx``."""


class KeysChangedError(SessionStoreError, ValueError):
    """A ``tx`` transform added or removed keys of its mapping; nothing changed."""


class MigrationError(SessionStoreError):
    """A migration step raised, or stored data carries migrations unknown here."""


class VersionNotFoundError(SessionStoreError, LookupError):
    """The requested version does not exist or was pruned."""


class CorruptDataError(SessionStoreError):
    """Stored bytes failed their checksum, lost a shard, or do not decode."""


class StorageUnavailableError(SessionStoreError):
    """The database stayed unreachable through every retry."""


class InsufficientPrivilegeError(StorageUnavailableError, PermissionError):
    """The database role lacks a privilege the call needs (SQLSTATE 42501).

    Its message names the role, the privilege and the object (``DELETE on
    table sessionstore.versions``), or, for a schema behind the newest
    revision that the role may not upgrade, both revisions and the command
    to run as the schema's owner. Never retried: a grant does not appear by
    waiting. A :class:`StorageUnavailableError` too (the database refused
    the statement), so handlers of that keep working, and a
    ``PermissionError``. ``missing`` lists what the check at ``Store()``
    start found missing (``"DELETE on table sessionstore.versions"`` ...),
    empty when only the server's message is known.
    """

    def __init__(self, message: str, missing: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


class MessageQueueFullError(SessionStoreError):
    """``send_message`` to a key that already has ``max_pending_messages`` waiting."""


class InvalidKeyError(SessionStoreError, ValueError, TypeError):
    """The key is not a str of 1..512 UTF-8 bytes without NUL."""


class InvalidDataError(SessionStoreError, ValueError, TypeError):
    """The data is not storable JSON (or is larger than ``max_document_size``)."""


class InvalidArgumentError(SessionStoreError, ValueError):
    """A call or a Store option got a bad value (negative size, NaN seconds, ...).

    Raised at the call, before any I/O.
    """


class ArgumentTypeError(SessionStoreError, TypeError):
    """A call or a Store option got a value of the wrong type; raised before any I/O."""


class BatchError(ExceptionGroup, SessionStoreError):
    """A call over many keys failed for some; ``errors`` maps each key to its error.

    An ``ExceptionGroup`` too, so ``except*`` can pick out the kinds.
    """

    errors: dict[str, Exception]

    def __new__(cls, message: str, errors: dict[str, Exception]) -> Self:
        self = super().__new__(cls, message, list(errors.values()))
        self.errors = dict(errors)
        return self

    def __init__(self, message: str, errors: dict[str, Exception]) -> None:
        super().__init__(message, list(errors.values()))

    def derive(self, excs: Sequence[Exception]) -> ExceptionGroup[Exception]:  # type: ignore[override]
        return ExceptionGroup(self.message, list(excs))


class StoreCloseError(BatchError):
    """``close()`` could not unload some keys; ``errors`` maps each key to its error."""
