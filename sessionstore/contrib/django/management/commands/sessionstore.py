"""``manage.py sessionstore ...``: the ``sessionstore`` command line, configured by the settings.

Runs :func:`sessionstore.cli.main` with the arguments given, adding the
``--dsn`` (built from ``DATABASES``, or ``SESSIONSTORE["DSN"]``) and
``--schema`` (the stores' ``db_schema``) of ``settings.SESSIONSTORE`` to
the commands that take them, unless they are given::

    python manage.py sessionstore db upgrade      # every schema the stores use
    python manage.py sessionstore db current
    python manage.py sessionstore --store players db current
    python manage.py sessionstore locks players
    python manage.py sessionstore unlock players alice --reason "stuck since 02:10"

When the stores use several schemas (or databases), a command that takes
``--schema`` runs once for each; ``--store NAME`` picks one store's. The
commands themselves, their options and output are the CLI's
(``python manage.py sessionstore --help``, ``... sessionstore db --help``).
Django's own options (``--settings``, ``--verbosity`` ...) go before the
sessionstore command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from sessionstore import cli, db

from ...conf import Settings

_INJECTED = ("--dsn", "--schema")
# Handled by manage.py itself wherever they appear; argparse leaves them in our remainder.
_DJANGO_GLOBAL = ("--settings", "--pythonpath")


class _Writer(io.TextIOBase):
    """A text stream writing to a command's OutputWrapper, with no line ending added."""

    def __init__(self, out: OutputWrapper) -> None:
        super().__init__()
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._out.write(text, ending="")
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def _accepted_options(argv: list[str]) -> set[str]:
    """The options of the CLI (sub)command ``argv`` names (e.g. ``db current``)."""
    parser: argparse.ArgumentParser = cli._parser()
    words = iter(arg for arg in argv if not arg.startswith("-"))
    while True:
        subparsers = [
            action
            for action in parser._actions  # as django.core.management.call_command does
            if isinstance(action, argparse._SubParsersAction)
        ]
        word = next(words, None) if subparsers else None
        if word is None or word not in subparsers[0].choices:
            return {option for action in parser._actions for option in action.option_strings}
        parser = subparsers[0].choices[word]


def _given(argv: list[str], option: str) -> bool:
    return any(arg == option or arg.startswith(f"{option}=") for arg in argv)


def _with_options(argv: list[str], options: list[str]) -> list[str]:
    """``argv`` with ``options`` added before a ``--`` (after which all are arguments)."""
    if "--" not in argv:
        return [*argv, *options]
    at = argv.index("--")
    return [*argv[:at], *options, *argv[at:]]


def _without_django_globals(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _DJANGO_GLOBAL:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in _DJANGO_GLOBAL)):
            kept.append(arg)
    return kept


class Command(BaseCommand):
    help = (
        "Run a sessionstore command (db upgrade, keys, locks, unlock, ...) on the database "
        "and schema of settings.SESSIONSTORE. `manage.py sessionstore db --help` shows the "
        "command line's own help."
    )
    # Only the sessionstore checks: the DSN and schema come from those settings.
    requires_system_checks = ("sessionstore",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--store",
            default=None,
            help="use this store's DSN and schema (default: those of every store)",
        )
        parser.add_argument(
            "argv",
            nargs=argparse.REMAINDER,
            metavar="COMMAND ...",
            help="a sessionstore command and its options, e.g. `db upgrade`",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        argv = _without_django_globals(list(options["argv"]))
        if not argv:
            raise CommandError("give a sessionstore command, e.g. `db upgrade` or `db current`")
        injected = [
            option
            for option in _INJECTED
            if option in _accepted_options(argv) and not _given(argv, option)
        ]
        try:
            targets = list(self._targets(injected, options["store"]))
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        failed = 0
        for extra in targets:
            code = self._run(_with_options(argv, extra))
            failed = failed or code
        if failed:
            raise CommandError(f"sessionstore {' '.join(argv)} failed", returncode=failed)

    def _targets(self, injected: list[str], store: str | None) -> Iterator[list[str]]:
        """The ``--dsn``/``--schema`` arguments of each run: one per distinct target."""
        if not injected:
            yield []
            return
        config = Settings.from_django()
        names = [store] if store is not None else list(config.stores)
        targets: list[tuple[str, str]] = []
        if not names:  # no stores: the common OPTIONS
            dsn = config.options.get("dsn") or config.database_dsn(settings.DATABASES)
            targets.append((str(dsn), str(config.options.get("db_schema", db.DEFAULT_SCHEMA))))
        for name in names:
            entry = config.entry(name)
            dsn = entry.get("dsn") or config.database_dsn(settings.DATABASES)
            if not isinstance(dsn, str):
                raise CommandError(f"store {name!r}: its dsn must be a str for this command")
            targets.append((dsn, str(entry.get("db_schema", db.DEFAULT_SCHEMA))))
        seen: set[tuple[str, ...]] = set()
        for dsn, schema in targets:
            values = {"--dsn": dsn, "--schema": schema}
            extra = tuple(part for option in injected for part in (option, values[option]))
            if extra not in seen:
                seen.add(extra)
                yield list(extra)

    def _run(self, argv: list[str]) -> int:
        """``sessionstore argv``; its exit code (its usage errors and --help included)."""
        with (
            contextlib.redirect_stdout(_Writer(self.stdout)),
            contextlib.redirect_stderr(_Writer(self.stderr)),
        ):
            try:
                return cli.main(argv)
            except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
                code = exc.code
                return code if isinstance(code, int) else (0 if code is None else 1)
