"""The batch half of the ``Store`` facade: the methods of docs/batch.md.

Owns the public signatures and argument checks of ``keys``,
``update_offline``, ``export_jsonl`` and ``import_jsonl``, which ``Store``
inherits; the work itself is :mod:`sessionstore._batch`'s. Split from
``store.py`` so that each file of the facade stays readable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

from . import _args
from ._batch import ImportResult, OfflineResult
from .errors import ArgumentTypeError, BatchError
from .frozen import check_key

if TYPE_CHECKING:
    from ._core import StoreCore

__all__ = ["BatchMethods"]

T = TypeVar("T", default=Any)


class BatchMethods(Generic[T]):
    """Work over many keys (mixed into :class:`~sessionstore.Store`)."""

    def _open_core(self) -> StoreCore:  # pragma: no cover - Store's
        raise NotImplementedError

    def _refuse_reentry(self, what: str) -> None:  # pragma: no cover - Store's
        raise NotImplementedError

    def keys(self, prefix: str | None = None) -> Iterator[str]:
        """Every saved key (optionally those starting with ``prefix``), in key order.

        Streamed a page at a time: memory stays constant however many keys
        there are. Keys are read as the iterator advances.
        """
        if prefix is not None and not isinstance(prefix, str):
            raise ArgumentTypeError(f"prefix must be a str or None, not {type(prefix).__name__}")
        return self._open_core().batches.keys(prefix)

    def load_many(self, keys: Iterable[str], *, skip_unavailable: bool = False) -> list[str]:
        """Load many keys with batched lease and read statements; the keys not loaded.

        All or none: a key held elsewhere is waited for as ``load`` waits (a
        live holder is asked to hand it over), and if one stays unavailable
        the call raises :class:`LockUnavailableError` and keeps none of its
        keys. With ``skip_unavailable=True``, keys held elsewhere are not
        waited for: the rest load, and the held ones are returned.
        """
        _args.check_bool(skip_unavailable, "skip_unavailable")
        wanted = sorted({check_key(key) for key in _args.check_keys(keys)})
        self._refuse_reentry("load_many")
        return self._open_core().loader.load_many(wanted, skip_unavailable=skip_unavailable)

    def unload_many(self, keys: Iterable[str]) -> None:
        """Unload many keys: batched final saves and releases.

        Keys not loaded raise :class:`KeyNotLoadedError` before anything is
        done. Keys whose final save failed stay loaded with their data, and
        :class:`BatchError` names them (``errors``: key -> error).
        """
        wanted = sorted({check_key(key) for key in _args.check_keys(keys)})
        self._refuse_reentry("unload_many")
        core = self._open_core()
        errors = core.saver.unload_many(wanted)
        if errors:
            raise BatchError(
                f"{core.describe(None)}: {len(errors)} keys could not be unloaded: "
                + ", ".join(sorted(errors)[:10]),
                errors,
            )

    def update_offline(
        self,
        fn: Callable[[T], bool] | None,
        keys: Iterable[str] | None = None,
        *,
        prefix: str | None = None,
        batch_size: int = 500,
        progress: Callable[[int], Any] | None = None,
    ) -> OfflineResult:
        """Edit keys no live process holds, a batch at a time; ``fn=None``: migrate only.

        Each batch takes the leases of its keys (keys held anywhere, this
        process included, are skipped and listed in ``held``), reads and
        migrates them, applies ``fn(mutable copy) -> bool`` as ``update``
        would, writes the changed ones fenced, and releases the leases.
        ``keys`` (any iterable) or every saved key (``prefix`` narrows
        them); ``progress(done)`` is called after each batch. A key that
        fails goes to ``failed`` and the run goes on; run it again to retry.
        """
        _args.check_callable(fn, "fn")
        _args.check_callable(progress, "progress")
        size = _args.check_int(batch_size, "batch_size", minimum=1, maximum=100_000)
        self._refuse_reentry("update_offline")
        return self._open_core().batches.update_offline(fn, keys, prefix, size, progress)

    def export_jsonl(self, fp: IO[Any], keys: Iterable[str] | None = None) -> int:
        """Write every saved key (or ``keys``) as JSON lines; the number of lines.

        Each line is ``{"key", "version", "migrations", "data"}``: the newest
        version as stored (not migrated), so an import restores it exactly.
        ``fp`` may be a text or a binary file.
        """
        core = self._open_core()
        return core.batches.export_jsonl(fp, keys, core.config.save_batch_size)

    def import_jsonl(self, fp: IO[Any], *, overwrite: bool = False) -> ImportResult:
        """Write the keys of an export; keys held anywhere are skipped (``held``).

        Keys that already exist are skipped (``skipped``) unless
        ``overwrite``, which saves the imported data as a new version; so an
        interrupted import can be run again.
        """
        _args.check_bool(overwrite, "overwrite")
        self._refuse_reentry("import_jsonl")
        core = self._open_core()
        return core.batches.import_jsonl(fp, overwrite, core.config.save_batch_size)
