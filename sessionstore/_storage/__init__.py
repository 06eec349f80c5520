"""The storage layer: every SQL statement of sessionstore, behind one Repository.

Modules, top to bottom: :mod:`.repository` (the Repository a Store uses:
bound to engine, schema, store and holder, with retries), :mod:`.leases`
(the ``locks`` table), :mod:`.files` (``versions``, ``shards``, ``records``
and the fenced write, which also records applied request ids and deletes
delivered messages), :mod:`.messages` (the ``messages`` table),
:mod:`.requests` (reading applied request ids), :mod:`.privileges` (the rights a
Store's role needs and the check of them), :mod:`.sql` (the shared fragments: the lease check,
liveness, channels), :mod:`.codec` (the stored file format, pure) and
:mod:`.types` (the values crossing this boundary). See docs/architecture.md.
"""

from __future__ import annotations

from .codec import FileSettings
from .repository import Repository
from .types import (
    LeaseInfo,
    LoadedKey,
    Message,
    PendingWrite,
    Renewal,
    Retention,
    StoredVersion,
    VersionInfo,
    WriteResult,
)

__all__ = [
    "FileSettings",
    "LeaseInfo",
    "LoadedKey",
    "Message",
    "PendingWrite",
    "Renewal",
    "Repository",
    "Retention",
    "StoredVersion",
    "VersionInfo",
    "WriteResult",
]
