"""The ``sessionstore`` command line.

Owns the commands, their arguments, what they print and their exit codes;
the work is done by :class:`sessionstore._admin.Admin` (the read-only
views, the audited unlock, restore, erase, send) and by
:class:`~sessionstore.Store` (export, import, migrate)::

    sessionstore keys STORE [--prefix P]                 the saved keys
    sessionstore peek STORE KEY [--version N]            stored data (as written, not migrated)
    sessionstore versions STORE KEY [--limit N]          the saved versions of a key
    sessionstore restore STORE KEY VERSION [--app M:A]   make an old version current again
    sessionstore locks STORE [KEY]                       leases: holder, host, pid, alive, last save
    sessionstore unlock STORE KEY --reason TEXT          audited steal: the holder is fenced
    sessionstore audit STORE [KEY]                       the audit log (unlocks)
    sessionstore send STORE KEY JSON                     send a message to a key
    sessionstore erase STORE KEY [--yes]                 delete a key everywhere
    sessionstore export STORE [-o FILE]                  every key as JSON lines
    sessionstore import STORE FILE [--overwrite]         write the keys of an export
    sessionstore migrate --app MODULE:ATTR               apply pending migrations to every key
    sessionstore db upgrade / db current                 the database schema
    sessionstore demo                                    the two-process demo of the README

Every command that reaches a store takes ``--dsn`` (default
``$SESSIONSTORE_DSN``, else the embedded server) and ``--schema`` (default
``sessionstore``); ``--json`` prints JSON instead of tables: one document,
or one JSON object per line for lists (keys, versions, locks, audit). The
read-only commands, ``unlock``, ``send`` and ``erase`` need no template or
migrations of the application: they work on any store. ``migrate`` (and
``restore --app``) import the application's Store, as ``flask --app``
imports an app.

Exit codes: 0 done, 1 the operation failed (the database refused or is
unreachable, a key is not found or held elsewhere), 2 bad usage. Either way
one line ``sessionstore: error: ...`` on standard error, never a traceback
and never a password.

Built with click: it is what Flask's command line uses (``flask
sessionstore`` mirrors these commands), and ``click.progressbar`` shows
the progress of long work (export, import, migrate) without a second
dependency.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from datetime import datetime, timezone
from typing import IO, Any, TypeVar, cast

import click

from . import _args, db
from ._admin import Admin
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidKeyError,
    MigrationError,
    SessionStoreError,
)
from .frozen import check_key
from .store import Store

__all__ = ["argv_for", "cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

_SECRETS: set[str] = set()
"""Passwords of the DSNs this run used: masked in every message it prints."""


# -- arguments ----------------------------------------------------------------------------


def _checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of the package's checks: its error is bad usage (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except (InvalidArgumentError, ArgumentTypeError, InvalidKeyError) as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _positive(value: int) -> int:
    if value < 1:
        raise InvalidArgumentError(f"{value} is not a version (versions count from 1)")
    return value


def _json_text(value: str) -> str:
    """``value`` if it parses as JSON (kept as text: the command parses it)."""
    try:
        json.loads(value)
    except ValueError as exc:
        raise InvalidArgumentError(f"not JSON: {exc}") from None
    return value


_STORE = click.argument("store", callback=_checked(lambda v: _args.check_store_name(v, "store")))
_KEY = click.argument("key", callback=_checked(check_key))
_OPTIONAL_KEY = click.argument("key", required=False, callback=_checked(check_key))


def _target(fn: F) -> F:
    """``--dsn``, ``--schema`` and ``--json``: the options of every command on a store."""
    fn = click.option("--json", "as_json", is_flag=True, help="print JSON (lists: one per line)")(
        fn
    )
    return _db_options(fn)


def _db_options(fn: F) -> F:
    fn = click.option(
        "--schema",
        default=db.DEFAULT_SCHEMA,
        show_default=True,
        callback=_checked(lambda v: db.validate_schema_name(v, "schema")),
        help="schema holding the tables",
    )(fn)
    return _dsn_option(fn)


def _dsn_option(fn: F) -> F:
    return click.option(
        "--dsn",
        default=None,
        metavar="DSN",
        help="postgresql:// or SQLAlchemy URL (default: $SESSIONSTORE_DSN, else embedded server)",
    )(fn)


# -- output -------------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    """A timestamp for tables: UTC, to the second."""
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data: dataclasses as dicts, times as ISO text, errors as text."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return value


def _emit(value: Any) -> None:
    """One JSON document (or line) on standard output."""
    click.echo(json.dumps(_plain(value), ensure_ascii=False))


def _outcome(as_json: bool, record: dict[str, Any], text: str) -> int:
    """A command's outcome: ``record`` as JSON with ``--json``, else ``text``; exit code 0."""
    if as_json:
        _emit(record)
    else:
        click.echo(text)
    return 0


def _note(message: str) -> None:
    """A line for the operator on standard error (standard output stays data)."""
    click.echo(message, err=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], page: int = 500) -> int:
    """Rows in aligned columns; the number of rows.

    Widths come from the first ``page`` rows (later rows stream out as they
    come, wider values pushing their line out); the last column is not padded.
    """
    source = iter(rows)
    first = [[str(cell) for cell in row] for _, row in zip(range(page), source, strict=False)]
    if not first:
        return 0
    widths = [max(len(h), *(len(r[i]) for r in first)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells[:-1], widths, strict=False)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    click.echo(line(headers))
    for row in first:
        click.echo(line(row))
    count = len(first)
    for rest in source:
        click.echo(line([str(cell) for cell in rest]))
        count += 1
    return count


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on standard error; yields ``update(done)`` (a running total)."""
    with click.progressbar(
        length=max(total, 1), label=label, file=click.get_text_stream("stderr")
    ) as bar:

        def update(done: int) -> None:
            step = min(done, total) - bar.pos
            if step > 0:
                bar.update(step)

        yield update


# -- the commands ---------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Per-key JSON documents in PostgreSQL under leases: look, fix, move, migrate."""


@contextmanager
def _admin(dsn: Any, schema: str, store: str) -> Iterator[Admin]:
    """An :class:`~sessionstore._admin.Admin` on the store (its password kept out of messages)."""
    with Admin.connect(dsn, schema, store) as admin:
        if admin.engine.url.password:
            _SECRETS.add(str(admin.engine.url.password))
        yield admin


@cli.command("keys")
@_STORE
@click.option("--prefix", default=None, help="only keys starting with this text")
@_target
def keys_command(
    store: str, prefix: str | None, dsn: str | None, schema: str, as_json: bool
) -> int:
    """List the saved keys of STORE, in key order."""
    count = 0
    with _admin(dsn, schema, store) as admin:
        for key in admin.keys(prefix):
            _emit({"key": key}) if as_json else click.echo(key)
            count += 1
    if not count and not as_json:
        _note(
            f"store {store!r} has no saved keys" + (f" starting with {prefix!r}" if prefix else "")
        )
    return 0


@cli.command("peek")
@_STORE
@_KEY
@click.option(
    "--version", type=int, default=None, callback=_checked(_positive), help="this version"
)
@_target
def peek_command(
    store: str, key: str, version: int | None, dsn: str | None, schema: str, as_json: bool
) -> int:
    """Print the stored data of KEY (newest, or --version N) as written: not migrated."""
    with _admin(dsn, schema, store) as admin:
        stored = admin.read(key, version)
    info, data = stored.info, stored.decode()
    if as_json:
        _emit({"store": store, "key": key, **_plain(info), "data": data})
        return 0
    migrations = ", ".join(info.migrations) or "none"
    _note(
        f"store {store!r} key {key!r} version {info.version}, saved {_when(info.created_at)}, "
        f"{info.size} bytes, migrations: {migrations}"
    )
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


@cli.command("versions")
@_STORE
@_KEY
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_target
def versions_command(
    store: str, key: str, limit: int, dsn: str | None, schema: str, as_json: bool
) -> int:
    """List the saved versions of KEY, newest first."""
    with _admin(dsn, schema, store) as admin:
        found = admin.versions(key, limit=limit)
    if as_json:
        for info in found:
            _emit(info)
        return 0
    headers = ("VERSION", "SAVED", "SIZE", "STORED", "CODEC", "SHARDS", "TOKEN", "MIGRATIONS")
    rows = (
        (v.version, _when(v.created_at), v.size, v.stored_size, v.codec, v.shard_count, v.token,
         ", ".join(v.migrations) or "-")
        for v in found
    )  # fmt: skip
    if not _table(headers, rows):
        _note(f"store {store!r} key {key!r} has no saved versions")
    return 0


def _lock_cells(row: Any) -> tuple[object, ...]:
    alive = ("yes" if row.alive else "no") if row.liveness else "-"
    return (
        row.key,
        row.holder,
        row.host or "-",
        row.pid,
        row.token,
        _when(row.acquired_at),
        _when(row.expires_at),
        "held" if row.active else "expired",
        alive,
        _when(row.last_save),
    )


@cli.command("locks")
@_STORE
@_OPTIONAL_KEY
@_target
def locks_command(store: str, key: str | None, dsn: str | None, schema: str, as_json: bool) -> int:
    """List the leases of STORE (or of KEY): holder, host, pid, since, expiry, alive, last save.

    ALIVE is whether the holding process still holds its proof of life (a
    session advisory lock): "no" with STATE "held" means a dead holder
    whose lease has not expired yet ("-": the holder keeps none).
    """
    with _admin(dsn, schema, store) as admin:
        rows = admin.locks(key)
        if as_json:
            for row in rows:
                _emit(row)
            return 0
        headers = ("KEY", "HOLDER", "HOST", "PID", "TOKEN", "SINCE", "EXPIRES", "STATE",
                   "ALIVE", "LAST SAVE")  # fmt: skip
        if not _table(headers, (_lock_cells(row) for row in rows)):
            _note(f"{admin.describe(key)}: no leases")
    return 0


@cli.command("unlock")
@_STORE
@_KEY
@click.option("--reason", required=True, help="why (kept in the audit log)")
@_target
def unlock_command(
    store: str, key: str, reason: str, dsn: str | None, schema: str, as_json: bool
) -> int:
    """Take KEY's lease from its holder, audited: the holder is fenced, the key free at once.

    The holder's next save fails (LockLostError, nothing written) and its
    heartbeat reports the lease lost (on_lock_lost); any process may load
    the key immediately. Unsaved changes of the holder are lost.
    """
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="'--reason'")
    with _admin(dsn, schema, store) as admin:
        done = admin.unlock(key, reason)
    if as_json:
        _emit({"store": store, **_plain(done)})
        return 0
    state = ("alive" if done.was_alive else "not alive") + (
        ", lease live" if done.was_active else ", lease expired"
    )
    click.echo(f"unlocked store {store!r} key {key!r} (audit id {done.audit_id})")
    click.echo(
        f"  was held by {done.old_holder} ({done.old_host or '-'} pid {done.old_pid}, {state}) "
        f"at token {done.old_token}"
    )
    click.echo(
        f"  new token {done.new_token}: that holder's next save fails; the key may be loaded now"
    )
    return 0


@cli.command("audit")
@_STORE
@_OPTIONAL_KEY
@_target
def audit_command(store: str, key: str | None, dsn: str | None, schema: str, as_json: bool) -> int:
    """List the audit log of STORE (or of KEY), oldest first: who unlocked what, and why."""
    with _admin(dsn, schema, store) as admin:
        rows = admin.audit(key)
        if as_json:
            for row in rows:
                _emit(row)
            return 0
        headers = ("ID", "AT", "KEY", "ACTION", "ACTOR", "OLD HOLDER", "TOKENS", "REASON")
        cells = (
            (r.id, _when(r.at), r.key, r.action, r.actor,
             f"{r.old_holder} ({r.old_host or '-'} pid {r.old_pid})",
             f"{r.old_token} -> {r.new_token}", r.reason)
            for r in rows
        )  # fmt: skip
        if not _table(headers, cells):
            _note(f"{admin.describe(key)}: nothing in the audit log")
    return 0


# -- commands that take the key's lease, or write ------------------------------------------

_LOCK_TIMEOUT = click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="seconds to wait for a key held elsewhere (its holder is asked to hand it over)",
)


@cli.command("send")
@_STORE
@_KEY
@click.argument("message", metavar="JSON", callback=_checked(_json_text))
@_target
def send_command(
    store: str, key: str, message: str, dsn: str | None, schema: str, as_json: bool
) -> int:
    """Send the message JSON to KEY; its holder applies it at once, else its next load does."""
    with _admin(dsn, schema, store) as admin:
        message_id = admin.send(key, json.loads(message))
    return _outcome(
        as_json,
        {"store": store, "key": key, "message_id": message_id},
        f"sent message {message_id} to store {store!r} key {key!r}",
    )


@cli.command("erase")
@_STORE
@_KEY
@click.option("--yes", "-y", is_flag=True, help="do not ask (asked only on a terminal)")
@_LOCK_TIMEOUT
@_target
def erase_command(
    store: str,
    key: str,
    yes: bool,
    lock_timeout: float,
    dsn: str | None,
    schema: str,
    as_json: bool,
) -> int:
    """Delete KEY everywhere: its data, every version, its messages and its lease.

    Takes the lease first, like a load: a holder elsewhere is asked to hand
    the key over; one that refuses keeps it (exit code 1).
    """
    if not yes and sys.stdin.isatty():
        click.confirm(f"erase store {store!r} key {key!r} and all its versions?", abort=True)
    with _admin(dsn, schema, store) as admin:
        admin.erase(key, lock_timeout=lock_timeout)
    return _outcome(
        as_json, {"store": store, "key": key, "erased": True}, f"erased store {store!r} key {key!r}"
    )


@cli.command("restore")
@_STORE
@_KEY
@click.argument("version", type=int, callback=_checked(_positive))
@click.option(
    "--app",
    "app",
    default=None,
    metavar="MODULE:ATTR",
    help="use the application's Store (its migrations apply; --dsn and --schema are its own)",
)
@_LOCK_TIMEOUT
@_target
def restore_command(
    store: str,
    key: str,
    version: int,
    app: str | None,
    lock_timeout: float,
    dsn: str | None,
    schema: str,
    as_json: bool,
) -> int:
    """Make VERSION of KEY current again (saved as a new version), under the key's lease."""
    user_store = _load_store(app, store) if app is not None else None
    try:
        if user_store is not None:
            dsn, schema = _store_target(user_store)
        with _admin(dsn, schema, store) as admin:
            newest = admin.restore(key, version, store=user_store, lock_timeout=lock_timeout)
    except MigrationError as exc:
        if user_store is not None:
            raise
        raise MigrationError(
            f"{exc} (run with --app MODULE:ATTR to restore with the application's migrations)"
        ) from exc
    finally:
        if user_store is not None:
            user_store.close()
    if as_json:
        _emit({"store": store, "key": key, "restored": version, "version": newest})
    else:
        click.echo(
            f"restored store {store!r} key {key!r} to version {version} (now version {newest})"
        )
    return 0


# -- many keys: export, import, migrate -------------------------------------------------------


class _CountingWriter(io.BufferedIOBase):
    """A binary file that reports each line written (the progress of an export)."""

    def __init__(self, target: IO[bytes], on_line: Callable[[int], None]) -> None:
        super().__init__()
        self._target = target
        self._on_line = on_line
        self._lines = 0

    @classmethod
    def around(cls, target: IO[bytes], on_line: Callable[[int], None]) -> IO[bytes]:
        """A counting writer around ``target``, typed as the file it stands for."""
        return cast("IO[bytes]", cls(target, on_line))

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        written = self._target.write(data)
        self._lines += bytes(data).count(b"\n")
        self._on_line(self._lines)
        return written if written is not None else len(data)

    def flush(self) -> None:
        self._target.flush()


def _export_to(path: str, write: Callable[[IO[bytes]], int]) -> int:
    """``write`` into ``path`` through a temporary file, renamed into place once complete."""
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as fp:
            count = write(fp)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return count


@cli.command("export")
@_STORE
@click.option(
    "-o", "--output", default=None, type=click.Path(dir_okay=False), help="file (default: stdout)"
)
@_target
def export_command(
    store: str, output: str | None, dsn: str | None, schema: str, as_json: bool
) -> int:
    """Write every saved key of STORE as JSON lines, each key's newest version as stored.

    Lines are {"key", "version", "migrations", "data"}; `sessionstore import`
    writes them back. With -o, the file appears only once complete.
    """
    with _admin(dsn, schema, store) as admin, admin.open_store() as opened:
        if output is None:
            count = opened.export_jsonl(click.get_binary_stream("stdout"))
        else:
            total = admin.count_keys()
            with _progress(total, f"exporting store {store!r}") as update:
                count = _export_to(
                    output, lambda fp: opened.export_jsonl(_CountingWriter.around(fp, update))
                )
    summary = {"store": store, "exported": count, "file": output}
    if output is not None and as_json:
        _emit(summary)
    else:
        where = output if output is not None else "standard output"
        (click.echo if output is not None else _note)(
            f"exported {count} keys of store {store!r} to {where}"
        )
    return 0


class _ReadingLines:
    """Lines of a binary file, reporting the bytes read so far (the progress of an import)."""

    def __init__(self, source: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._source = source
        self._on_bytes = on_bytes

    def __iter__(self) -> Iterator[bytes]:
        done = 0
        for line in self._source:
            done += len(line)
            self._on_bytes(done)
            yield line


def _result_lines(result: Any) -> list[str]:
    """A batch job's result for people: its counts and lists, the failures one per line."""
    plain = _plain(result)
    if not isinstance(plain, dict):
        return [str(result)]
    parts, failures = [], []
    for name, value in plain.items():
        if isinstance(value, dict):
            failures += [f"  {name} {key}: {error}" for key, error in value.items()]
            parts.append(f"{name} {len(value)}")
        elif isinstance(value, list):
            shown = ", ".join(map(str, value[:10])) + (" ..." if len(value) > 10 else "")
            parts.append(f"{name} {len(value)}" + (f" ({shown})" if value else ""))
        else:
            parts.append(f"{name} {value}")
    return ["; ".join(parts), *failures]


def _report(title: str, result: Any, as_json: bool) -> int:
    """Print a batch job's result; exit code 1 if some key failed."""
    failed = getattr(result, "failed", None)
    if as_json:
        _emit(result)
    else:
        lines = _result_lines(result)
        click.echo(f"{title}: {lines[0]}")
        for line in lines[1:]:
            click.echo(line)
        if getattr(result, "held", None):
            _note("held keys were skipped (a live process holds them): run again later")
    return 1 if failed else 0


@cli.command("import")
@_STORE
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--overwrite", is_flag=True, help="replace keys that exist (saved as a new version)")
@_target
def import_command(
    store: str, file: str, overwrite: bool, dsn: str | None, schema: str, as_json: bool
) -> int:
    """Write the keys of an export FILE ("-": stdin) into STORE; existing keys are kept.

    Keys held by a live process are skipped and reported; run it again to
    finish an interrupted import (keys already imported are skipped).
    """
    with _admin(dsn, schema, store) as admin, admin.open_store() as opened:
        if file == "-":
            result = opened.import_jsonl(click.get_binary_stream("stdin"), overwrite=overwrite)
        else:
            with open(file, "rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                with _progress(size, f"importing into store {store!r}") as update:
                    lines: Any = _ReadingLines(fp, update)
                    result = opened.import_jsonl(lines, overwrite=overwrite)
    return _report(f"imported into store {store!r}", result, as_json)


def _import_attr(spec: str) -> Any:
    """``MODULE:ATTR`` imported (the current directory first on the path, as flask does)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:ATTR, not {spec!r}", param_hint="'--app'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        value: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}", param_hint="'--app'"
        ) from None
    for part in attr.split("."):
        if not hasattr(value, part):
            raise click.BadParameter(f"{module_name!r} has no {attr!r}", param_hint="'--app'")
        value = getattr(value, part)
    return value


def _load_store(spec: str, name: str | None = None) -> Store[Any]:
    """The application's Store: ``MODULE:ATTR`` is a Store or a function returning one."""
    value = _import_attr(spec)
    if not isinstance(value, Store) and callable(value):
        value = value()
    if not isinstance(value, Store):
        raise click.BadParameter(
            f"{spec} is of type {type(value).__name__}, not a sessionstore.Store or a "
            "function returning one",
            param_hint="'--app'",
        )
    if name is not None and value.name != name:
        value.close()
        raise click.BadParameter(
            f"{spec} is store {value.name!r}, not {name!r}", param_hint="'--app'"
        )
    return value


def _store_target(store: Store[Any]) -> tuple[Any, str]:
    """The DSN (or Engine) and schema a Store was made with."""
    return store.config.dsn, store.config.db_schema


@cli.command("migrate")
@click.option("--app", "app", required=True, metavar="MODULE:ATTR", help="the application's Store")
@click.option("--prefix", default=None, help="only keys starting with this text")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=500, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def migrate_command(app: str, prefix: str | None, batch_size: int, as_json: bool) -> int:
    """Apply the Store's pending migrations to every saved key that no process holds.

    MODULE:ATTR names the application's Store, or a function that returns
    one (as `flask --app` names an app); its DSN and schema are used. Held
    keys are skipped and listed: run it again later. Exit code 1 if a key
    failed.
    """
    store = _load_store(app)
    try:
        dsn, schema = _store_target(store)
        with _admin(dsn, schema, store.name) as admin:
            total = admin.count_keys(prefix)
        with _progress(total, f"migrating store {store.name!r}") as update:
            result = store.update_offline(
                None, prefix=prefix, batch_size=batch_size, progress=update
            )
    finally:
        store.close()
    return _report(f"migrated store {store.name!r}", result, as_json)


# -- the database schema, the demo --------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The database schema: create, upgrade, show the revision."""


def _schema_command(dsn: str | None, schema: str, upgrade: bool) -> int:
    engine = db.create_engine(dsn, pool_size=1, application_name="sessionstore-cli")
    if engine.url.password:
        _SECRETS.add(str(engine.url.password))
    try:
        where = f"{db.display_url(engine.url)} schema {schema}"
        if upgrade:
            db.ensure_schema(engine, schema)
            click.echo(f"{where}: at revision {db.current_revision(engine, schema)}")
            return 0
        revision = db.current_revision(engine, schema)
        click.echo(f"{where}: {'not created' if revision is None else f'at revision {revision}'}")
        return 0 if revision is not None else 1
    finally:
        engine.dispose()


@db_group.command("upgrade")
@_db_options
def db_upgrade_command(dsn: str | None, schema: str) -> int:
    """Create the schema, or upgrade it to the newest revision."""
    return _schema_command(dsn, schema, upgrade=True)


@db_group.command("current")
@_db_options
def db_current_command(dsn: str | None, schema: str) -> int:
    """Print the schema's revision (exit code 1: not created)."""
    return _schema_command(dsn, schema, upgrade=False)


@cli.command("demo")
@_dsn_option
def demo_command(dsn: str | None) -> int:
    """Run the two-process demo of the README."""
    from . import demo

    return demo.main(dsn)


# -- running it ---------------------------------------------------------------------------------


def _error(message: object) -> None:
    """The one line of a failure, on standard error, passwords masked."""
    text = " ".join(str(message).split()) or "failed"
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    click.echo(f"sessionstore: error: {text}", err=True)


def _click_error(exc: click.ClickException) -> int:
    """A click error (bad usage: 2; a file that cannot be opened: 1) as one line."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
    if no_args is not None and isinstance(exc, no_args):
        click.echo(exc.format_message(), err=True)  # the help itself (click >= 8.2)
        return 2
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
    _error(message)
    return exc.exit_code


def _run(args: list[str]) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .retry import describe

    try:
        result = cli.main(args=args, prog_name="sessionstore", standalone_mode=False)
    except click.ClickException as exc:
        return _click_error(exc)
    except click.Abort:
        _error("aborted")
        return 1
    except (InvalidArgumentError, ArgumentTypeError, InvalidKeyError) as exc:
        _error(exc)  # a bad DSN, argument or name: bad usage
        return 2
    except SessionStoreError as exc:
        _error(exc)  # not found, held elsewhere, lost, the database refused or is unreachable
        return 1
    except ImportError as exc:
        _error(exc)  # the embedded server is needed but not installed
        return 2
    except SQLAlchemyError as exc:
        _error(describe(exc, _SECRETS))
        return 1
    except OSError as exc:
        _error(exc)
        return 1
    return result if isinstance(result, int) else 0


LOG_LEVEL_ENV = "SESSIONSTORE_LOG_LEVEL"
"""Environment variable: the level of the library's log lines the command line prints."""


def _log_to_stderr() -> None:
    """As the console script (logging not configured): print only the library's errors.

    Python would otherwise print every warning (each retry of an unreachable
    server, say) through its last-resort handler; the failure itself is the
    one ``sessionstore: error:`` line. ``$SESSIONSTORE_LOG_LEVEL=INFO`` shows more.
    """
    logger = logging.getLogger("sessionstore")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("sessionstore: %(levelname)s: %(message)s"))
    try:
        handler.setLevel(os.environ.get(LOG_LEVEL_ENV, "ERROR").upper())
    except ValueError:
        handler.setLevel(logging.ERROR)
    logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Without ``argv`` (the console script, ``python -m sessionstore.cli``) the
    library's log lines below ERROR are not printed; a process that passes
    ``argv`` (``flask sessionstore``, ``manage.py sessionstore``) keeps its
    own logging as it is.
    """
    if argv is None:
        _log_to_stderr()
    try:
        return _run(list(argv) if argv is not None else sys.argv[1:])
    except BrokenPipeError:
        # `sessionstore keys players | head`: the reader left. Nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


# -- the command tree for the integrations --------------------------------------------------------


def argv_for(path: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """The command line that runs the command at ``path`` with parsed ``values``.

    For integrations that mirror a command with the same parameters and run
    it through :func:`main` (``flask sessionstore``): options first, then
    ``--`` and the arguments (so that an argument starting with ``-``, a
    negative JSON number say, stays an argument). Flags are given when set,
    other options when not None.
    """
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group), f"{name!r} under a command"
        found = command.commands.get(name)
        if found is None:
            raise KeyError(f"no command {' '.join(path)!r}")
        command = found
    options: list[str] = []
    arguments: list[str] = []
    for param in command.params:
        value = values.get(param.name or "")
        if isinstance(param, click.Argument):
            if value is not None:
                arguments.append(str(value))
        elif isinstance(param, click.Option) and value not in (None, False):
            options += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return [*path, *options, *(["--", *arguments] if arguments else [])]


def _parser() -> argparse.ArgumentParser:
    """The command tree as an argparse parser: commands, options and arguments; no actions.

    For code that inspects the command line with argparse rather than
    click: the Django command finds with it which options (``--dsn``,
    ``--schema``) a command takes. Parsing and running stay click's.
    """
    parser = argparse.ArgumentParser(prog="sessionstore", description=cli.help)
    _render(cli, parser, 0)
    return parser


def _render(command: click.Command, parser: argparse.ArgumentParser, depth: int) -> None:
    if isinstance(command, click.Group):
        sub = parser.add_subparsers(dest=f"command_{depth}", required=True, metavar="COMMAND")
        for name, child in command.commands.items():
            _render(child, sub.add_parser(name, help=child.get_short_help_str()), depth + 1)
        return
    for param in command.params:
        if isinstance(param, click.Option):
            action = "store_true" if param.is_flag else "store"
            parser.add_argument(*param.opts, dest=param.name, action=action, help=param.help)
        else:
            parser.add_argument(param.name, nargs="*" if param.nargs == -1 else None)


if __name__ == "__main__":
    sys.exit(main())
