"""Every option of a Store, its default and its check, in one place.

Owns :class:`StoreConfig`: the single home of each ``Store(...)`` option
(name, default, one-line meaning, and the rule its value must satisfy),
checked as a whole when it is built, before the Store does any I/O. A
value of the wrong type raises :class:`ArgumentTypeError`, a bad value
:class:`InvalidArgumentError` (docs/api.md, "Bad arguments"); the checks
themselves are those of :mod:`sessionstore._args` and
:func:`sessionstore.db.validate_schema_name`. Also renders the README's
table of options (:func:`configuration_table`), so the table cannot drift
from the code: ``python -m sessionstore.config`` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import zstandard
from sqlalchemy import URL, Engine

from . import _args, db
from .errors import ArgumentTypeError, InvalidArgumentError, InvalidDataError
from .frozen import JSON, encode
from .migrations import MigrationStep, check_steps
from .schema import SchemaLike, make_validator

__all__ = ["StoreConfig", "configuration_table"]

KiB = 1024
MiB = 1024 * KiB
ZSTD_MIN_LEVEL = -(2**17)
"""zstd's fastest level (``ZSTD_minCLevel()``); python-zstandard does not export it."""
MAX_SHARD_SIZE = 512 * MiB
"""A shard is one ``bytea`` value, sent whole; PostgreSQL takes values up to 1 GB."""

_Check = Callable[[Any, str], Any]


def _seconds(*, positive: bool = False) -> _Check:
    return lambda value, name: _args.check_seconds(value, name, exclusive=positive)


def _int(minimum: int, maximum: int = _args.INT64_MAX) -> _Check:
    return lambda value, name: _args.check_int(value, name, minimum=minimum, maximum=maximum)


def _meta(doc: str, check: _Check | None = None, *, size: bool = False) -> dict[str, Any]:
    """A field's README meaning, its check, and whether it is a byte size (for the table)."""
    return {"doc": doc, "check": check, "size": size}


def _callable(value: Any, name: str) -> Any:
    return _args.check_callable(value, name)


def _dsn(value: Any, name: str) -> Any:
    """A DSN is parsed here (no I/O), so a malformed one fails now; the value is kept as given."""
    if value is None or isinstance(value, str | URL):
        if value is not None:
            db.parse_dsn(value)
        return value
    if isinstance(value, Engine) and name == "dsn":
        return db.check_engine(value)
    kinds = "a str, a sqlalchemy URL or Engine, or None" if name == "dsn" else "a str, URL or None"
    raise ArgumentTypeError(f"{name} must be {kinds}, not {type(value).__name__}")


def _schema(value: Any, name: str) -> Any:
    try:
        make_validator(value)  # the Store builds its own; this only checks
    except TypeError as exc:
        raise ArgumentTypeError(f"{name}: {exc}") from exc
    return value


def _migrations(value: Any, name: str) -> tuple[MigrationStep, ...]:
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        raise ArgumentTypeError(f"{name} must be an iterable of steps, not {type(value).__name__}")
    try:
        return check_steps(value)
    except TypeError as exc:
        raise ArgumentTypeError(f"{name}: {exc}") from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"{name}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The options of a :class:`~sessionstore.Store`, checked; see the README's table.

    ``StoreConfig(name, template, **options)``. Every option but ``name`` and
    ``template`` is keyword-only. Seconds become floats, ``migrations`` and
    ``changed_callbacks`` tuples; nothing else is converted (a DSN is
    checked but kept as given). ``repr`` never shows a DSN's password.
    """

    name: str = field(
        metadata=_meta(
            "the store's name: 1-64 chars of `[A-Za-z0-9_.:-]`; stores share tables",
            _args.check_store_name,
        )
    )
    template: JSON = field(metadata=_meta("the document a new key starts with"))
    _: KW_ONLY
    schema: SchemaLike = field(
        default=None,
        metadata=_meta(
            "validator: callable `data -> bool | (bool, str)`, a pydantic model / TypeAdapter, "
            "or a JSON Schema dict",
            _schema,
        ),
    )
    migrations: Iterable[MigrationStep] = field(
        default=(),
        metadata=_meta(
            "ordered named steps: `ss.add_fields(name, fields)`, `ss.transform(name, fn)`",
            _migrations,
        ),
    )
    import_legacy_data: Callable[[str], JSON] | None = field(
        default=None,
        metadata=_meta("`key -> data | None`, consulted for keys never stored before", _callable),
    )
    changed_callbacks: Iterable[Callable[[str, JSON, JSON], Any]] = field(
        default=(),
        metadata=_meta(
            "`(key, new_data, old_data_or_None)` after each committed change", _args.check_callables
        ),
    )
    on_lock_lost: Callable[[str], Any] | None = field(
        default=None,
        metadata=_meta(
            "`key ->`: the key is no longer ours (lease lost or handed over)", _callable
        ),
    )
    on_handoff_request: Callable[[str], bool] | None = field(
        default=None,
        metadata=_meta("`key -> bool`: may another process have this key? default yes", _callable),
    )
    message_handler: Callable[[str, Any, Any], bool] | None = field(
        default=None,
        metadata=_meta(
            "`(key, data, message) -> bool`: apply a message (mutable copy); True applies it, "
            "False keeps it waiting",
            _callable,
        ),
    )
    on_save: Callable[[str, Any, str], Any] | None = field(
        default=None,
        metadata=_meta(
            "`(key, data, reason)` just before each write (mutable copy: changes go into it)",
            _callable,
        ),
    )
    on_after_save: Callable[[str, Any, int], Any] | None = field(
        default=None,
        metadata=_meta(
            "`(key, data, version)` after each write commits (frozen, as saved)", _callable
        ),
    )
    max_pending_messages: int = field(
        default=1000,
        metadata=_meta(
            "messages waiting for one key before `send_message` raises `MessageQueueFullError`",
            _int(1, 1_000_000),
        ),
    )
    idempotency_retention: int = field(
        default=1000,
        metadata=_meta(
            "applied idempotency keys remembered per key (the newest)", _int(1, 1_000_000)
        ),
    )
    dsn: str | URL | Engine | None = field(
        default=None,
        metadata=_meta(
            "`postgresql://...` or `key=value` string, a SQLAlchemy URL or Engine; "
            "else `$SESSIONSTORE_DSN`, else the embedded server",
            _dsn,
        ),
    )
    db_schema: str = field(
        default=db.DEFAULT_SCHEMA,
        metadata=_meta(
            "PostgreSQL schema holding the tables (see below); not a system schema (`pg_*`)",
            db.validate_schema_name,
        ),
    )
    lock_duration: float = field(
        default=90.0, metadata=_meta("lease length in seconds", _seconds(positive=True))
    )
    lock_refresh_interval: float = field(
        default=30.0,
        metadata=_meta(
            "how often the heartbeat renews leases; less than `lock_duration`",
            _seconds(positive=True),
        ),
    )
    lock_timeout: float = field(
        default=30.0, metadata=_meta("how long `load` waits for a key held elsewhere", _seconds())
    )
    autosave_interval: float = field(
        default=300.0,
        metadata=_meta("seconds between background saves of changed keys", _seconds(positive=True)),
    )
    takeover_grace: float = field(
        default=2.0,
        metadata=_meta(
            "how long a holder's advisory lock must stay gone before its keys are taken "
            "(dead process)",
            _seconds(),
        ),
    )
    instant_takeover: bool = field(
        default=True,
        metadata=_meta(
            "keep an advisory lock as proof of life; `False`: leases are only taken "
            "when they expire",
            _args.check_bool,
        ),
    )
    control_dsn: str | URL | None = field(
        default=None,
        metadata=_meta(
            "DSN of the control connection (advisory lock, LISTEN); set it to a direct "
            "connection behind PgBouncer in transaction mode",
            _dsn,
        ),
    )
    prepared_statements: bool = field(
        default=True,
        metadata=_meta(
            "let psycopg prepare statements on the server (after 5 runs); `False` behind "
            "PgBouncer in transaction mode before 1.21 (else turned off, with a warning, "
            "at the first statement the server lost)",
            _args.check_bool,
        ),
    )
    pool_size: int = field(
        default=10,
        metadata=_meta(
            "connections the Store's pool keeps open (and may open as many again)", _int(1)
        ),
    )
    retry_timeout: float = field(
        default=10.0,
        metadata=_meta(
            "how long transient database errors are retried before `StorageUnavailableError`",
            _seconds(),
        ),
    )
    max_document_size: int = field(
        default=512 * MiB, metadata=_meta("largest document (as JSON) accepted", _int(1), size=True)
    )
    compression_level: int = field(
        default=3,
        metadata=_meta(
            f"zstd level, {ZSTD_MIN_LEVEL} (fastest) to {zstandard.MAX_COMPRESSION_LEVEL}; "
            "0 is zstd's default (3)",
            _int(ZSTD_MIN_LEVEL, zstandard.MAX_COMPRESSION_LEVEL),
        ),
    )
    compress_threshold: int = field(
        default=1 * KiB,
        metadata=_meta("JSON below this is stored uncompressed", _int(0), size=True),
    )
    inline_threshold: int = field(
        default=256 * KiB,
        metadata=_meta("stored bytes above this are split into shard rows", _int(0), size=True),
    )
    shard_size: int = field(
        default=1 * MiB,
        metadata=_meta("bytes per shard row (at most 512 MiB)", _int(1, MAX_SHARD_SIZE), size=True),
    )
    stream_threshold: int = field(
        default=8 * MiB,
        metadata=_meta(
            "JSON of at least this size is compressed while it is sent "
            "(one transaction of several statements)",
            _int(0),
            size=True,
        ),
    )
    retain_versions: int = field(
        default=10,
        metadata=_meta("the janitor keeps at least this many newest versions per key ...", _int(1)),
    )
    retain_for: float = field(
        default=86400.0,
        metadata=_meta("... and every version younger than this (seconds)", _seconds()),
    )
    janitor_interval: float = field(
        default=60.0,
        metadata=_meta(
            "seconds between pruning passes (one process prunes a store at a time)",
            _seconds(positive=True),
        ),
    )
    peek_cache_size: int = field(
        default=1024,
        metadata=_meta("entries of the `peek(key, max_age=...)` cache; 0: none", _int(0)),
    )
    view_cache_size: int = field(
        default=256,
        metadata=_meta(
            "sessions that keep a decoded copy besides their JSON bytes (bounds memory); 0: none",
            _int(0),
        ),
    )
    save_batch_size: int = field(
        default=500,
        metadata=_meta("keys per statement when autosave and `close()` write many keys", _int(1)),
    )

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            check = option.metadata.get("check")
            if check is not None:
                value = check(getattr(self, option.name), option.name)
                object.__setattr__(self, option.name, value)
        if not self.lock_refresh_interval < self.lock_duration:
            raise InvalidArgumentError(
                f"lock_refresh_interval ({self.lock_refresh_interval:g} s) must be less than "
                f"lock_duration ({self.lock_duration:g} s): the heartbeat must renew a lease "
                "before it expires"
            )
        self._check_template()

    def _check_template(self) -> None:
        """The template must be JSON of at most ``max_document_size`` bytes (the schema is the
        Store's to check: it runs user code)."""
        try:
            size = len(encode(self.template))
        except InvalidDataError as exc:
            raise InvalidDataError(f"store {self.name!r}: template is invalid: {exc}") from exc
        if size > self.max_document_size:
            raise InvalidDataError(
                f"store {self.name!r}: template is {size} bytes of JSON; "
                f"max_document_size is {self.max_document_size}"
            )

    def __repr__(self) -> str:
        shown = []
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if option.name in ("dsn", "control_dsn") and isinstance(value, str | URL):
                text = repr(db.display_url(db.parse_dsn(value)))  # no password
            else:
                text = _args.show(value)
            shown.append(f"{option.name}={text}")
        return f"StoreConfig({', '.join(shown)})"


def _default_text(option: dataclasses.Field[Any]) -> str:
    if option.default is dataclasses.MISSING:
        return "required"
    value = option.default
    if option.metadata.get("size"):
        for unit, scale in (("MiB", MiB), ("KiB", KiB)):
            if value >= scale and value % scale == 0:
                return f"{value // scale} {unit}"
        return f"{value} bytes"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def configuration_table() -> str:
    """The README's table of ``Store(...)`` options, as markdown, from :class:`StoreConfig`."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for option in dataclasses.fields(StoreConfig):
        meaning = option.metadata["doc"].replace("|", "\\|")
        rows.append(f"| `{option.name}` | {_default_text(option)} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(configuration_table(), end="")
