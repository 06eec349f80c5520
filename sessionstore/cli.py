"""The ``sessionstore`` command line.

Owns argument parsing and printing for the operations commands::

    sessionstore db upgrade [--dsn DSN] [--schema S]   bring the schema to head
    sessionstore db current [--dsn DSN] [--schema S]   print the schema's revision
    sessionstore demo [--dsn DSN]                      run the README demo

Without ``--dsn``, ``$SESSIONSTORE_DSN`` is used, then the embedded server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _add_db_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help="postgresql:// or SQLAlchemy URL (default: $SESSIONSTORE_DSN, else embedded server)",
    )
    parser.add_argument(
        "--schema", default="sessionstore", help="schema holding the tables (default: %(default)s)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionstore", description="Per-key JSON documents in PostgreSQL under leases."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database schema commands")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="create or upgrade the schema to the newest")
    _add_db_options(upgrade)
    current = db_commands.add_parser("current", help="print the schema's current revision")
    _add_db_options(current)

    demo = commands.add_parser("demo", help="run the two-process demo of the README")
    demo.add_argument("--dsn", default=None, help="as for `db upgrade`")
    return parser


def _db(args: argparse.Namespace) -> int:
    from sessionstore.db import (
        create_engine,
        current_revision,
        display_url,
        ensure_schema,
        validate_identifier,
    )

    schema = validate_identifier(args.schema)
    engine = create_engine(args.dsn, pool_size=1, application_name="sessionstore-cli")
    try:
        where = f"{display_url(engine.url)} schema {schema}"
        if args.db_command == "upgrade":
            ensure_schema(engine, schema)
            print(f"{where}: at revision {current_revision(engine, schema)}")
            return 0
        revision = current_revision(engine, schema)
        print(f"{where}: {'not created' if revision is None else f'at revision {revision}'}")
        return 0 if revision is not None else 1
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from sessionstore.errors import SessionStoreError

    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "db":
            return _db(args)
        from sessionstore import demo

        return demo.main(args.dsn)
    except (ValueError, TypeError, ImportError) as exc:
        # Bad DSN, bad argument, embedded server not installed: bad usage, no traceback.
        print(f"sessionstore: error: {exc}", file=sys.stderr)
        return 2
    except (SessionStoreError, SQLAlchemyError) as exc:
        # The database is unreachable or refused: the operation failed, no traceback.
        print(f"sessionstore: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
