"""Repository: every database call of one Store, bound to its identity.

Owns the binding of the storage layer to one engine, schema, store name and
holder id, and the retry policy around each call (transient errors are
retried with backoff, then surface as ``StorageUnavailableError``; nothing
raw escapes). It also decides how a batch of pending writes goes out (large
documents streamed one by one, the rest batched, one statement per batch)
and returns an outcome per key: the save path's last step.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa

from ..db import disable_prepared_statements
from ..errors import InsufficientPrivilegeError
from ..retry import RetryPolicy, with_retries
from . import files, leases, messages, privileges, requests
from .codec import EncodedFile, FileSettings, encode_file
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

__all__ = ["Repository"]

T = TypeVar("T")


class Repository:
    """The storage layer as one Store sees it (thread-safe: a connection per call)."""

    def __init__(
        self,
        engine: sa.Engine,
        schema: str,
        store: str,
        holder: str,
        *,
        retry: RetryPolicy,
        files_settings: FileSettings,
        batch_size: int,
        request_retention: int,
        log_extra: Mapping[str, object],
    ) -> None:
        self.engine = engine
        self.schema = schema
        self.store = store
        self.holder = holder
        self.retry = retry
        self.files = files_settings
        self.batch_size = batch_size
        self.request_retention = request_retention
        self._log_extra = log_extra

    def run(self, what: str, operation: Callable[[sa.Connection], T]) -> T:
        """Run ``operation`` on a pooled autocommit connection, retrying transient errors.

        A prepared statement the server lost (a pooler in between) turns them
        off for the engine's connections, and the operation is retried.
        """

        def attempt() -> T:
            with self.engine.connect() as conn:
                return operation(conn)

        try:
            return with_retries(
                self.retry,
                f"store {self.store!r}: {what}",
                attempt,
                extra=self._log_extra,
                unprepare=lambda: disable_prepared_statements(self.engine),
            )
        except InsufficientPrivilegeError as exc:
            # The server names the object, not the privilege: the check names both.
            raise privileges.explain(self.engine, self.schema, exc) from exc.__cause__

    def check_privileges(self) -> None:
        """Raise :class:`InsufficientPrivilegeError` listing every privilege the role lacks."""
        privileges.check_privileges(
            self.engine, self.schema, retry=self.retry, what=f"store {self.store!r}"
        )

    # -- leases -----------------------------------------------------------------

    def acquire(
        self, key: str, duration: float, *, liveness: bool, dead: LeaseInfo | None
    ) -> int | None:
        return self.run(
            "acquire lease",
            lambda conn: leases.acquire(
                conn,
                self.schema,
                self.store,
                key,
                self.holder,
                duration,
                liveness=liveness,
                dead=dead,
            ),
        )

    def acquire_for_load(
        self, key: str, duration: float, *, liveness: bool, dead: LeaseInfo | None
    ) -> tuple[int, Callable[[], LoadedKey] | None] | None:
        """:meth:`acquire` and :meth:`read_for_load` in one call; None if not taken.

        The read comes back as a call that checks the stored file (it may raise
        :class:`CorruptDataError`: the caller holds the lease then)."""
        return self.run(
            "acquire lease",
            lambda conn: files.acquire_for_load(
                conn,
                self.schema,
                self.store,
                key,
                self.holder,
                duration,
                liveness=liveness,
                dead=dead,
                retention=self.request_retention,
            ),
        )

    def acquire_many(
        self, keys: Sequence[str], duration: float, *, liveness: bool
    ) -> dict[str, int]:
        return self.run(
            "acquire leases",
            lambda c: leases.acquire_many(
                c, self.schema, self.store, keys, self.holder, duration, liveness=liveness
            ),
        )

    def lease_info(self, key: str) -> LeaseInfo | None:
        return self.run("lease info", lambda c: leases.info(c, self.schema, self.store, key))

    def holder_alive(self) -> bool:
        return self.run(
            "liveness check", lambda c: leases.holder_alive(c, self.schema, self.holder)
        )

    def request_handoff(self, other: str, key: str, waiting_since: int | None = None) -> None:
        self.run(
            "request handoff",
            lambda c: leases.request_handoff(c, other, key, self.holder, waiting_since),
        )

    def renew(self, held: Iterable[tuple[str, int]], duration: float, wait: float) -> Renewal:
        """One heartbeat; not retried (the next beat is the retry)."""
        with self.engine.connect() as conn:
            return leases.renew_all(
                conn, self.schema, self.store, self.holder, duration, held, wait=wait
            )

    def release(self, held: Sequence[tuple[str, int]]) -> None:
        if held:
            self.run(
                "release leases",
                lambda c: leases.release(c, self.schema, self.store, self.holder, held),
            )

    def release_stale(self, keys: Sequence[str]) -> int:
        return self.run(
            "release stale leases",
            lambda c: leases.release_stale(c, self.schema, self.store, self.holder, keys),
        )

    def release_unclaimed(self, key: str) -> None:
        self.run(
            "release unclaimed lease",
            lambda c: leases.release_unclaimed(c, self.schema, self.store, self.holder, key),
        )

    def release_unclaimed_all(self) -> int:
        return self.run(
            "release unclaimed leases",
            lambda c: leases.release_unclaimed_all(c, self.schema, self.store, self.holder),
        )

    def hand_over(self, key: str, token: int, to: str, reserve: float) -> bool:
        return self.run(
            "hand over",
            lambda c: leases.hand_over(
                c, self.schema, self.store, self.holder, key, token, to, reserve
            ),
        )

    # -- files ------------------------------------------------------------------

    def read(self, key: str, version: int | None = None) -> StoredVersion | None:
        return self.run(
            "read", lambda c: files.read_version(c, self.schema, self.store, key, version)
        )

    def read_for_load(self, key: str) -> LoadedKey:
        return self.run(
            "read",
            lambda c: files.read_for_load(c, self.schema, self.store, key, self.request_retention),
        )

    def read_many(self, keys: Sequence[str]) -> dict[str, StoredVersion | None]:
        return self.run("read", lambda c: files.read_many(c, self.schema, self.store, keys))

    def read_many_for_load(self, keys: Sequence[str]) -> dict[str, LoadedKey]:
        return self.run(
            "read",
            lambda c: files.read_many_for_load(
                c,
                self.schema,
                self.store,
                keys,
                self.request_retention,
                messages.waiting(c, self.schema, self.store, keys),
            ),
        )

    def keys_page(self, after: str, prefix: str | None, limit: int) -> list[str]:
        return self.run(
            "list keys",
            lambda c: files.keys_page(c, self.schema, self.store, after, prefix, limit),
        )

    def list_versions(
        self,
        key: str,
        *,
        newest_first: bool,
        since: datetime | None,
        until: datetime | None,
        limit: int,
    ) -> list[VersionInfo]:
        return self.run(
            "list versions",
            lambda c: files.list_versions(
                c,
                self.schema,
                self.store,
                key,
                newest_first=newest_first,
                since=since,
                until=until,
                limit=limit,
            ),
        )

    def erase(self, key: str, token: int) -> bool:
        return self.run(
            "erase",
            lambda c: files.erase_key(c, self.schema, self.store, key, self.holder, token),
        )

    def prune(self, after: str, retention: Retention) -> tuple[bool, str | None, int]:
        return self.run(
            "prune",
            lambda c: files.prune_versions(c, self.schema, self.store, after, retention),
        )

    # -- requests and messages ----------------------------------------------------

    def applied(self, key: str, request_id: str) -> bool:
        return self.run(
            "applied", lambda c: requests.applied(c, self.schema, self.store, key, request_id)
        )

    def send_message(self, key: str, body: str, max_pending: int) -> int | None:
        nonce = str(uuid.uuid4())  # one per call: its retries are the same send
        return self.run(
            "send message",
            lambda c: messages.send(c, self.schema, self.store, key, body, max_pending, nonce),
        )

    def pending_messages(self, key: str, after: int, limit: int) -> list[Message]:
        return self.run(
            "read messages",
            lambda c: messages.pending(c, self.schema, self.store, key, after, limit),
        )

    def keys_with_messages(self, keys: Sequence[str]) -> set[str]:
        return self.run(
            "find messages", lambda c: messages.waiting(c, self.schema, self.store, keys)
        )

    # -- the write --------------------------------------------------------------

    def write(self, pending: Sequence[PendingWrite], *, atomic: bool) -> WriteResult:
        """Write pending versions fenced; an outcome per key.

        ``atomic`` (a ``tx``): one statement, all or nothing; an error is
        raised. Otherwise each large document (``stream_threshold``) is
        streamed on its own and the rest go in batches of ``batch_size``,
        one statement each; a batch that fails is reported in ``failed``
        and the others still go.
        """
        if atomic:
            return self._write_batch(pending, atomic=True)
        result = WriteResult()
        small = [p for p in pending if not self.files.streams(len(p.encoded))]
        groups = [[p] for p in pending if self.files.streams(len(p.encoded))]
        step = self.batch_size
        groups += [small[at : at + step] for at in range(0, len(small), step)]
        for group in groups:
            try:
                if len(group) == 1 and self.files.streams(len(group[0].encoded)):
                    outcome = self._write_streamed(group[0])
                else:
                    outcome = self._write_batch(group, atomic=False)
            except Exception as exc:
                outcome = WriteResult(failed={p.key: exc for p in group})
            result.merge(outcome)
        return result

    def _write_batch(self, pending: Sequence[PendingWrite], *, atomic: bool) -> WriteResult:
        items = [_item(p, encode_file(p.encoded, self.files)) for p in pending]
        return self.run(
            "save",
            lambda c: files.write_versions(
                c,
                self.schema,
                self.store,
                self.holder,
                items,
                atomic=atomic,
                retention=self.request_retention,
            ),
        )

    def _write_streamed(self, pending: PendingWrite) -> WriteResult:
        item = _item(pending, EncodedFile.pending(len(pending.encoded)))
        return self.run(
            "save",
            lambda c: files.write_streamed(
                c,
                self.schema,
                self.store,
                self.holder,
                item,
                pending.encoded,
                self.files,
                self.request_retention,
            ),
        )


def _item(pending: PendingWrite, file: EncodedFile) -> files.WriteItem:
    return files.WriteItem(
        pending.key,
        pending.token,
        pending.version,
        file,
        pending.migrations,
        pending.new_record,
        pending.requests,
        pending.messages,
        pending.prune_requests,
    )
