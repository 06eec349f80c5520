"""Work over many keys: listing, offline edits, export and import.

Owns the batch jobs of docs/batch.md: ``keys`` (saved keys in key order, a
page at a time), ``update_offline`` (edit or migrate keys no live process
holds), ``export_jsonl`` and ``import_jsonl``. Each batch claims its keys in
this Store's registry (so a local ``load`` of one of them waits), takes their
leases in one statement (keys held anywhere are skipped, never waited for),
reads them in one statement, writes the results fenced in one statement,
and releases the leases: a lease taken meanwhile by anyone else fences the
write (the key is reported, nothing is written under another holder). A key
that fails is reported and never stops the run; an interrupted run can be
run again. Memory is bounded by the batch, not by the store.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, TYPE_CHECKING, Any

import orjson

from ._pages import pages
from ._registry import KeyEntry
from ._storage import PendingWrite, StoredVersion
from .errors import InvalidDataError, LockLostError, SessionStoreError, TransformError
from .frozen import check_key, decode, encode_parsed
from .session import run_transform

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["Batches", "ImportResult", "OfflineResult"]

_PAGE = 1000
"""Keys per page of ``keys()``."""


@dataclass
class OfflineResult:
    """What ``update_offline`` did: counts, and the keys it skipped or failed on."""

    updated: int = 0
    """Keys written (changed by ``fn``, or migrated)."""
    unchanged: int = 0
    """Keys read and left as they were (``fn`` returned False or changed nothing)."""
    held: list[str] = field(default_factory=list)
    """Keys a live process (this one included) held: skipped; run again later."""
    failed: dict[str, Exception] = field(default_factory=dict)
    """Keys whose read, migration, transform or write failed, with the error."""


@dataclass
class ImportResult:
    """What ``import_jsonl`` did."""

    imported: int = 0
    skipped: list[str] = field(default_factory=list)
    """Keys that already exist (without ``overwrite``)."""
    held: list[str] = field(default_factory=list)
    failed: dict[str, Exception] = field(default_factory=dict)


@dataclass
class _Claimed:
    """The keys of one batch this Store holds the leases of."""

    entries: dict[str, KeyEntry]
    tokens: dict[str, int]
    held: list[str]


class Batches:
    """The many-key jobs of one Store core."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core

    # -- listing ------------------------------------------------------------------

    def keys(self, prefix: str | None) -> Iterator[str]:
        """Saved keys in key order, a page at a time (bounded memory)."""
        repo = self._core.repo
        return pages(lambda after: repo.keys_page(after, prefix, _PAGE), lambda k: k, "", _PAGE)

    # -- claiming a batch -------------------------------------------------------------

    @contextmanager
    def _claimed(self, keys: Sequence[str]) -> Iterator[_Claimed]:
        """Claim, lease, yield, then release a batch; keys used anywhere go to ``held``."""
        core = self._core
        entries: dict[str, KeyEntry] = {}
        held: list[str] = []
        for key in sorted(set(keys)):
            entry = core.table.try_claim(key)
            if entry is None:
                held.append(key)
            else:
                entries[key] = entry
        tokens: dict[str, int] = {}
        try:
            if entries:
                tokens = core.repo.acquire_many(
                    list(entries), core.config.lock_duration, liveness=core.liveness
                )
            for key in sorted(set(entries) - set(tokens)):
                held.append(key)
            for key, token in tokens.items():
                core.table.lease_taken(entries[key], token)  # renewed by the heartbeat
            yield _Claimed(entries, tokens, sorted(held))
        finally:
            try:
                core.release_quietly(sorted(tokens.items()))
            finally:
                for entry in entries.values():
                    core.table.fail_load(entry, None)  # waiting loads start afresh

    # -- offline edits ----------------------------------------------------------------

    def update_offline(
        self,
        fn: Callable[[Any], Any] | None,
        keys: Iterable[str] | None,
        prefix: str | None,
        batch_size: int,
        progress: Callable[[int], Any] | None,
    ) -> OfflineResult:
        result = OfflineResult()
        source = iter(keys) if keys is not None else self.keys(prefix)
        done = 0
        while batch := [check_key(key) for key in islice(source, batch_size)]:
            self._offline_batch(batch, fn, result)
            done += len(batch)
            if progress is not None:
                progress(done)
        return result

    def _offline_batch(
        self, batch: Sequence[str], fn: Callable[[Any], Any] | None, result: OfflineResult
    ) -> None:
        core = self._core
        with self._claimed(batch) as claimed:
            result.held += claimed.held
            stored = core.repo.read_many(list(claimed.tokens)) if claimed.tokens else {}
            pending: list[PendingWrite] = []
            for key, token in claimed.tokens.items():
                try:
                    write = self._offline_one(key, token, stored.get(key), fn)
                except SessionStoreError as exc:
                    result.failed[key] = exc
                    continue
                if write is None:
                    result.unchanged += 1
                else:
                    pending.append(write)
            self._write(pending, result.failed)
            result.updated += len(pending) - sum(1 for p in pending if p.key in result.failed)

    def _offline_one(
        self, key: str, token: int, stored: StoredVersion | None, fn: Callable[[Any], Any] | None
    ) -> PendingWrite | None:
        """One key's new version, or None if it stays as it is."""
        core = self._core
        plain: Any = None
        if stored is not None:
            encoded, names, migrated, plain = core.loader.bring_forward(stored, key)
            applied, version = list(names), stored.info.version
        elif fn is None:
            return None  # never saved: nothing to migrate
        else:
            encoded, applied, version = core.template, [s.name for s in core.steps], 0
            migrated = True  # a new key: written if fn commits
        if fn is not None:
            data = decode(encoded) if plain is None else plain
            if not _run(fn, data, lambda: core.describe(key)):
                return None
            changed = core.rules.accept(data, key)
            migrated = (migrated and stored is not None) or changed != encoded
            encoded = changed
        if not migrated:
            return None
        return PendingWrite(key, 0, encoded, applied, version + 1, token, version == 0)

    def _write(self, pending: Sequence[PendingWrite], failed: dict[str, Exception]) -> None:
        if not pending:
            return
        outcome = self._core.repo.write(pending, atomic=False)
        for key in outcome.lost:
            failed[key] = LockLostError(
                f"{self._core.describe(key)}: lease taken meanwhile; nothing was written", [key]
            )
        failed.update(outcome.failed)

    # -- export and import -----------------------------------------------------------

    def export_jsonl(self, fp: IO[Any], keys: Iterable[str] | None, batch_size: int) -> int:
        """One line per saved key: ``{"key", "version", "migrations", "data"}``; lines written."""
        binary = _is_binary(fp)
        source = iter(keys) if keys is not None else self.keys(None)
        written = 0
        while batch := [check_key(key) for key in islice(source, batch_size)]:
            for key, stored in self._core.repo.read_many(batch).items():
                if stored is None:
                    continue
                line = _export_line(key, stored)
                fp.write(line if binary else line.decode())
                written += 1
        return written

    def import_jsonl(self, fp: IO[Any], overwrite: bool, batch_size: int) -> ImportResult:
        """Write the keys of an export; keys held anywhere are skipped, existing ones too."""
        result = ImportResult()
        lines = iter(fp)
        number = 0
        while chunk := list(islice(lines, batch_size)):
            records: dict[str, tuple[bytes, list[str]]] = {}
            for line in chunk:
                number += 1
                if line.strip():
                    key, raw, migrations = _parse_line(line, number)
                    records[key] = (raw, migrations)
            self._import_batch(records, overwrite, result)
        return result

    def _import_batch(
        self, records: dict[str, tuple[bytes, list[str]]], overwrite: bool, result: ImportResult
    ) -> None:
        with self._claimed(list(records)) as claimed:
            result.held += claimed.held
            existing = self._core.repo.read_many(list(claimed.tokens)) if claimed.tokens else {}
            pending = []
            for key, token in claimed.tokens.items():
                current = existing.get(key)
                if current is not None and not overwrite:
                    result.skipped.append(key)
                    continue
                raw, migrations = records[key]
                version = 0 if current is None else current.info.version
                pending.append(
                    PendingWrite(key, 0, raw, migrations, version + 1, token, not version)
                )
            self._write(pending, result.failed)
            result.imported += sum(1 for p in pending if p.key not in result.failed)


def _run(fn: Callable[[Any], Any], data: Any, context: Callable[[], str]) -> bool:
    """The offline transform, held to ``update``'s rules (True commits, False aborts)."""
    verdict = run_transform(fn, data, context)
    if verdict is not True and verdict is not False:
        raise TransformError(
            f"{context()}: transform must return True or False, not {type(verdict).__name__}"
        )
    return verdict


def _is_binary(fp: IO[Any]) -> bool:
    return isinstance(fp, io.RawIOBase | io.BufferedIOBase) or "b" in getattr(fp, "mode", "")


def _export_line(key: str, stored: StoredVersion) -> bytes:
    """The stored JSON bytes go into the line as they are (no decode and re-encode)."""
    head = orjson.dumps(
        {"key": key, "version": stored.info.version, "migrations": list(stored.info.migrations)}
    )
    return head[:-1] + b',"data":' + stored.raw + b"}\n"


def _parse_line(line: str | bytes, number: int) -> tuple[str, bytes, list[str]]:
    """``(key, data as JSON bytes, migrations)`` of one export line."""
    try:
        record = orjson.loads(line)
        key = check_key(record["key"])
        migrations = record.get("migrations", [])
        if not isinstance(migrations, list) or not all(isinstance(m, str) for m in migrations):
            raise TypeError("migrations must be a list of names")
        return key, encode_parsed(record["data"]), migrations
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidDataError(f"line {number} is not an export line: {exc}") from exc
