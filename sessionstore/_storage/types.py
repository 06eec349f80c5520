"""The values that cross the storage layer's boundary.

Owns the shapes the rest of the package hands to the storage layer and gets
back: :class:`PendingWrite` (the one pending-write type every save, unload,
handoff and ``tx`` produces), :class:`WriteResult` (an outcome per key),
what a lease row and a renewal say, and what a stored version is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..frozen import decode

__all__ = [
    "LeaseInfo",
    "LoadedKey",
    "Message",
    "PendingWrite",
    "Renewal",
    "Retention",
    "StoredVersion",
    "VersionInfo",
    "WriteResult",
]


@dataclass(frozen=True)
class PendingWrite:
    """One key's next version: the data as of change ``seq``, to be written fenced."""

    key: str
    seq: int
    """The session's change counter this write makes durable."""
    encoded: bytes
    """The document's JSON bytes."""
    migrations: Sequence[str]
    version: int
    token: int
    new_record: bool
    requests: Sequence[str] = ()
    """Idempotency keys applied since the last save: stored with this version."""
    messages: Sequence[int] = ()
    """Ids of messages whose effect this version carries: deleted with its write."""
    prune_requests: bool = False
    """Also drop the key's applied ids beyond the newest ``idempotency_retention``."""


@dataclass(frozen=True)
class LoadedKey:
    """What a load reads in one statement: the newest version and the key's bookkeeping."""

    stored: StoredVersion | None
    requests: Sequence[str]
    """The newest applied idempotency keys, newest first (up to the retention)."""
    has_messages: bool
    """Are messages waiting for the key?"""


@dataclass(frozen=True)
class Message:
    """A message sent to a key (``Store.send_message``), as the holder receives it."""

    id: int
    body: Any


@dataclass
class WriteResult:
    """What became of each key of a write: written, lease lost, or failed (error)."""

    written: set[str] = field(default_factory=set)
    """Keys whose version is now in the database."""
    lost: set[str] = field(default_factory=set)
    """Keys whose lease failed the fence: nothing was written for them."""
    failed: dict[str, Exception] = field(default_factory=dict)
    """Keys whose write raised (the database stayed unavailable, say): unknown outcome."""

    def merge(self, other: WriteResult) -> None:
        self.written |= other.written
        self.lost |= other.lost
        self.failed.update(other.failed)


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a key, as stored in its lease row."""

    holder: str
    token: int
    expires_at: datetime
    active: bool
    host: str
    pid: int
    liveness: bool
    """The holder keeps an advisory lock while alive (instant takeover applies)."""
    alive: bool
    """The holder's advisory lock is held right now."""


@dataclass(frozen=True)
class Renewal:
    """The answer of one heartbeat statement."""

    renewed: dict[str, int]
    """Leases extended now, ``{key: token}``."""
    busy: frozenset[str]
    """Leases still ours but row-locked by someone else: not renewed, not lost (yet)."""


@dataclass(frozen=True)
class VersionInfo:
    """One saved version of a key, as listed by ``Store.list_versions``."""

    version: int
    created_at: datetime
    size: int
    """Raw JSON size in bytes."""
    stored_size: int
    """Bytes on disk after compression."""
    migrations: tuple[str, ...]
    token: int
    """Fencing token of the lease that wrote it."""
    codec: str
    shard_count: int


@dataclass(frozen=True)
class StoredVersion:
    """A version read back: its info and its JSON bytes (integrity verified)."""

    info: VersionInfo
    raw: bytes
    """The document's JSON bytes, checksum verified."""
    context: str
    """``store ... key ... version N``, for error messages."""

    def decode(self) -> Any:
        """The document as plain data; :class:`CorruptDataError` if the JSON does not parse."""
        return decode(self.raw, self.context)


@dataclass(frozen=True)
class Retention:
    """Which versions the janitor keeps: the newest ``keep`` and all younger than ``age`` s."""

    keep: int = 10
    age: float = 24 * 3600.0
    batch: int = 500
