"""sessionstore: per-key JSON documents in PostgreSQL under an exclusive session lock.

A process ``load``s a key and owns it; it changes the data in memory with
``update``; the library saves in the background, on ``save``, ``unload`` and
``close``, with fenced writes a stale holder can never get past. See
docs/api.md for the contract re-exported here.
"""

from __future__ import annotations

from ._batch import ImportResult, OfflineResult
from ._storage import VersionInfo
from .config import StoreConfig
from .errors import (
    ArgumentTypeError,
    BatchError,
    CorruptDataError,
    InsufficientPrivilegeError,
    InvalidArgumentError,
    InvalidDataError,
    InvalidKeyError,
    KeyNotLoadedError,
    KeysChangedError,
    LoadCancelledError,
    LoadInProgressError,
    LockLostError,
    LockUnavailableError,
    MessageQueueFullError,
    MigrationError,
    SchemaValidationError,
    SessionClosedError,
    SessionStoreError,
    StorageUnavailableError,
    StoreClosedError,
    StoreCloseError,
    TransactionConflictError,
    TransformError,
    VersionNotFoundError,
)
from .frozen import FrozenDict, FrozenList, freeze, thaw
from .migrations import MigrationStep, add_fields, transform
from .store import SessionHandle, Store

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "BatchError",
    "CorruptDataError",
    "FrozenDict",
    "FrozenList",
    "ImportResult",
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
    "MigrationStep",
    "OfflineResult",
    "SchemaValidationError",
    "SessionClosedError",
    "SessionHandle",
    "SessionStoreError",
    "StorageUnavailableError",
    "Store",
    "StoreCloseError",
    "StoreClosedError",
    "StoreConfig",
    "TransactionConflictError",
    "TransformError",
    "VersionInfo",
    "VersionNotFoundError",
    "__version__",
    "add_fields",
    "freeze",
    "thaw",
    "transform",
]
