"""``settings.SESSIONSTORE``: its format, the DSN built from ``DATABASES``, each store's options.

The setting (every key optional)::

    SESSIONSTORE = {
        "DATABASE": "default",            # the DATABASES alias to connect to (PostgreSQL)
        "DSN": None,                      # or a DSN of its own, instead of DATABASE
        "CONTROL_DSN": None,              # direct/session-mode DSN for the control connection
        "OPTIONS": {"lock_timeout": 10},  # Store options common to every store
        "STORES": {
            "players": {                  # get_store("players")
                "template": {"coins": 0},
                "schema": "myapp.schemas.Player",          # dotted path: imported
                "migrations": "myapp.migrations_ss.STEPS",
                "on_lock_lost": "myapp.hooks.lock_lost",
                "lock_duration": 60,                       # literal: used as is
            },
        },
    }

A store's entry takes every option of :class:`sessionstore.StoreConfig`
(the README's configuration table) and overrides ``OPTIONS``; ``template``
is required, ``name`` defaults to the entry's key. The options that hold
code (:data:`CODE_OPTIONS`) take a dotted path (a str, imported with
:func:`django.utils.module_loading.import_string`) or the object itself;
``migrations`` and ``changed_callbacks`` also take a list mixing both. All
other values are literal.

The DSN, unless a store's ``dsn`` option or ``SESSIONSTORE["DSN"]`` gives
one, is built from ``DATABASES[DATABASE]`` as Django's PostgreSQL backend
would connect (:func:`database_dsn`): a libpq ``key=value`` string quoted by
psycopg, so socket directories, passwords with any character and
``OPTIONS`` reach libpq unchanged. ``CONTROL_DSN`` becomes each store's
``control_dsn`` unless the store sets one.

Nothing here does I/O. Errors: :class:`~django.core.exceptions.ImproperlyConfigured`
for the shape of the setting, an unknown alias or option, a dotted path
that does not import; :class:`sessionstore.SessionStoreError` (from
:class:`~sessionstore.StoreConfig`) for a bad option value.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

import sessionstore as ss

__all__ = [
    "CODE_OPTIONS",
    "DEFAULT_DATABASE",
    "SETTING",
    "Settings",
    "backend_vendor",
    "database_dsn",
]

SETTING = "SESSIONSTORE"
"""The name of the Django setting."""

DEFAULT_DATABASE = "default"
"""The ``DATABASES`` alias used when ``SESSIONSTORE["DATABASE"]`` is not set."""

KEYS = ("DATABASE", "DSN", "CONTROL_DSN", "OPTIONS", "STORES")
"""The keys ``SESSIONSTORE`` may have."""

CODE_OPTIONS = frozenset(
    {
        "schema",
        "migrations",
        "import_legacy_data",
        "changed_callbacks",
        "on_lock_lost",
        "on_handoff_request",
        "message_handler",
        "on_save",
        "on_after_save",
    }
)
"""Store options whose str value is a dotted path to import (the others are literal)."""

_LIST_OPTIONS = frozenset({"migrations", "changed_callbacks"})
STORE_OPTIONS = frozenset(option.name for option in dataclasses.fields(ss.StoreConfig))
"""Every option a store's entry may set (those of :class:`sessionstore.StoreConfig`)."""

POSTGRESQL = "postgresql"
"""``DatabaseWrapper.vendor`` of Django's PostgreSQL backends (postgis and wrappers too)."""

# OPTIONS of Django's PostgreSQL backend that are Django's or psycopg's own, not libpq
# connection parameters: Django pops them before it connects, and so do we.
_NOT_LIBPQ = frozenset(
    {
        "assume_role",
        "autocommit",
        "context",
        "cursor_factory",
        "isolation_level",
        "pool",
        "prepare_threshold",
        "row_factory",
        "server_side_binding",
    }
)


@functools.lru_cache(maxsize=1)
def _libpq_keywords() -> frozenset[str]:
    """The connection parameters the libpq in use knows (``PQconndefaults``)."""
    from psycopg import pq

    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def backend_vendor(engine: str) -> str:
    """The vendor (``"postgresql"``, ``"sqlite"`` ...) of a Django database ``ENGINE``.

    Imports the backend's module (as Django does), never connects.

    Raises:
        ImproperlyConfigured: the backend cannot be imported.
    """
    from django.db.utils import load_backend

    vendor: str = load_backend(engine).DatabaseWrapper.vendor
    return vendor


def database_dsn(database: Mapping[str, Any], alias: str = DEFAULT_DATABASE) -> str:
    """The libpq ``key=value`` connection string of a ``DATABASES`` entry of PostgreSQL.

    Mirrors what Django's PostgreSQL backend passes to psycopg
    (``DatabaseWrapper.get_connection_params``): ``NAME`` (``None``: the
    ``postgres`` database; empty: ``OPTIONS["service"]`` must name one),
    then ``OPTIONS`` (``sslmode``, ``options="-c statement_timeout=5000"``,
    ``application_name``, ``service``, ``passfile`` ...; Django's own
    ``isolation_level``, ``pool``, ``server_side_binding``,
    ``assume_role`` and psycopg's ``prepare_threshold``, ``cursor_factory``,
    ``context`` are left out), then ``USER``, ``PASSWORD``, ``HOST`` (a
    hostname, an address, a socket directory starting with ``/``, or a
    comma-separated list) and ``PORT`` when they are not empty. Every value is
    quoted by :func:`psycopg.conninfo.make_conninfo`, so no character of a
    password or a path needs escaping by the user.

    Raises:
        ImproperlyConfigured: neither ``NAME`` nor ``OPTIONS["service"]`` is
            set, or ``OPTIONS`` holds a key libpq does not know. The message
            never quotes the password.
    """
    from psycopg.conninfo import make_conninfo

    where = f"DATABASES[{alias!r}]"
    options = database.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(f"{where}['OPTIONS'] must be a dict")
    params: dict[str, Any] = {k: v for k, v in options.items() if k not in _NOT_LIBPQ}
    unknown = sorted(k for k in params if k not in _libpq_keywords())
    if unknown:
        raise ImproperlyConfigured(
            f"{where}['OPTIONS'] has {', '.join(map(repr, unknown))}, which is not a libpq "
            "connection parameter"
            + _suggest(unknown[0], _libpq_keywords())
            + "; sessionstore connects with the parameters of "
            "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS"
        )
    name = database.get("NAME")
    if name:
        params["dbname"] = name
    elif name is None:
        params.pop("service", None)  # as Django does: None is the 'postgres' database
        params["dbname"] = "postgres"
    elif not params.get("service"):
        raise ImproperlyConfigured(f"{where} needs a NAME or OPTIONS['service']")
    for key, param in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host")):
        value = database.get(key)
        if value:
            params[param] = value
    port = database.get("PORT")
    if port:
        params["port"] = str(port)
    params = {k: v for k, v in params.items() if v is not None}
    return make_conninfo("", **params)


def _import(path: str, where: str) -> Any:
    try:
        return import_string(path)
    except Exception as exc:  # ImportError, or whatever the module raised on import
        raise ImproperlyConfigured(
            f"{where}: cannot import {path!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _resolve(option: str, value: Any, where: str) -> Any:
    """``value`` of ``option`` with its dotted paths imported (code options only)."""
    if option not in CODE_OPTIONS:
        return value
    where = f"{where}[{option!r}]"
    if isinstance(value, str):
        found = _import(value, where)
        # A dotted path to one callback is a list of one.
        return (found,) if option == "changed_callbacks" and callable(found) else found
    if option in _LIST_OPTIONS and isinstance(value, list | tuple):
        return tuple(_import(item, where) if isinstance(item, str) else item for item in value)
    return value


@dataclass(frozen=True)
class Settings:
    """``settings.SESSIONSTORE``, its shape checked (:meth:`from_value`); no I/O."""

    database: str = DEFAULT_DATABASE
    """The ``DATABASES`` alias the DSN is built from (unless :attr:`dsn` is set)."""
    dsn: str | None = None
    """A DSN given instead of :attr:`database`."""
    control_dsn: str | None = None
    """The control connection's DSN, for every store that sets no ``control_dsn``."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Store options common to every store."""
    stores: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each store's options, by the name :func:`~sessionstore.contrib.django.get_store` takes."""

    @classmethod
    def from_django(cls) -> Settings:
        """The settings of the running Django project (``django.conf.settings``)."""
        from django.conf import settings

        return cls.from_value(getattr(settings, SETTING, None))

    @classmethod
    def from_value(cls, value: object) -> Settings:
        """Check the shape of a ``SESSIONSTORE`` value (``None``: not set).

        Raises:
            ImproperlyConfigured: it is not a dict of the known keys, or a
                value has the wrong type (option names are checked by
                :meth:`store_options`).
        """
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ImproperlyConfigured(f"{SETTING} must be a dict, not {type(value).__name__}")
        unknown = [key for key in value if key not in KEYS]
        if unknown:
            raise ImproperlyConfigured(
                f"{SETTING} has an unknown key {unknown[0]!r}{_suggest(str(unknown[0]), KEYS)}; "
                f"its keys are {', '.join(KEYS)}"
            )
        database = value.get("DATABASE", DEFAULT_DATABASE)
        if not isinstance(database, str):
            raise ImproperlyConfigured(f"{SETTING}['DATABASE'] must be a DATABASES alias (a str)")
        for key in ("DSN", "CONTROL_DSN"):
            if not isinstance(value.get(key), str | None):
                raise ImproperlyConfigured(f"{SETTING}[{key!r}] must be a str or None")
        options = value.get("OPTIONS") or {}
        _check_options(options, f"{SETTING}['OPTIONS']", allow_name=False)
        stores = value.get("STORES") or {}
        if not isinstance(stores, Mapping):
            raise ImproperlyConfigured(f"{SETTING}['STORES'] must be a dict of name: options")
        for name, entry in stores.items():
            if not isinstance(name, str):
                raise ImproperlyConfigured(f"{SETTING}['STORES'] keys must be str, not {name!r}")
            _check_options(entry, f"{SETTING}['STORES'][{name!r}]", allow_name=True)
        return cls(
            database=database,
            dsn=value.get("DSN"),
            control_dsn=value.get("CONTROL_DSN"),
            options=dict(options),
            stores={name: dict(entry) for name, entry in stores.items()},
        )

    def entry(self, name: str) -> dict[str, Any]:
        """Store ``name``'s options as written: ``OPTIONS`` overridden by its entry.

        Raises:
            ImproperlyConfigured: ``STORES`` has no such store.
        """
        if name not in self.stores:
            known = ", ".join(map(repr, self.stores)) or "none"
            raise ImproperlyConfigured(
                f"no store {name!r} in {SETTING}['STORES']{_suggest(name, self.stores)} "
                f"(configured: {known})"
            )
        return {**self.options, **self.stores[name]}

    def needs_database(self) -> bool:
        """Whether some store's DSN comes from ``DATABASES`` (no ``DSN``, no store ``dsn``)."""
        if self.dsn is not None:
            return False
        return not self.stores or any("dsn" not in self.entry(name) for name in self.stores)

    def database_dsn(self, databases: Mapping[str, Any]) -> str:
        """``DSN`` if set, else the DSN of ``databases[DATABASE]`` (:func:`database_dsn`).

        Raises:
            ImproperlyConfigured: the alias is missing, is not PostgreSQL, or
                its entry cannot make a DSN.
        """
        if self.dsn is not None:
            return self.dsn
        alias = self.database
        if alias not in databases:
            raise ImproperlyConfigured(
                f"{SETTING}['DATABASE'] is {alias!r}, which is not in DATABASES"
                f"{_suggest(alias, databases)}"
            )
        database = databases[alias]
        engine = database.get("ENGINE", "")
        vendor = backend_vendor(engine) if engine else "dummy"
        if vendor != POSTGRESQL:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}] uses {engine or 'no ENGINE'!s} ({vendor}); "
                "sessionstore needs PostgreSQL"
            )
        return database_dsn(database, alias)

    def store_options(self, name: str, dsn: str | None) -> dict[str, Any]:
        """The keyword arguments of ``sessionstore.Store`` for store ``name``.

        Dotted paths imported, ``name`` defaulted to the entry's key, ``dsn``
        (the result of :meth:`database_dsn`, or None to leave it unset) and
        ``CONTROL_DSN`` filled in where the store sets none.

        Raises:
            ImproperlyConfigured: no such store, an unknown option, no
                ``template``, or a dotted path that does not import.
        """
        where = f"{SETTING}['STORES'][{name!r}]"
        entry = self.entry(name)
        _check_names(entry, where)
        if "template" not in entry:
            raise ImproperlyConfigured(
                f"{where} needs a 'template' (the document a new key starts with)"
            )
        options = {option: _resolve(option, value, where) for option, value in entry.items()}
        options.setdefault("name", name)
        if "dsn" not in options and dsn is not None:
            options["dsn"] = dsn
        if "control_dsn" not in options and self.control_dsn is not None:
            options["control_dsn"] = self.control_dsn
        return options

    def store_config(self, name: str, dsn: str | None) -> ss.StoreConfig:
        """Store ``name``'s options checked as ``sessionstore.Store`` checks them, without I/O.

        Raises:
            ImproperlyConfigured: as :meth:`store_options`.
            sessionstore.SessionStoreError: an option has a bad type or value.
        """
        return ss.StoreConfig(**self.store_options(name, dsn))


def _check_options(options: object, where: str, *, allow_name: bool) -> None:
    """The shape of an options dict (its option names are checked per store, see
    :func:`_check_names`)."""
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(f"{where} must be a dict of Store options")
    if not allow_name and "name" in options:
        raise ImproperlyConfigured(f"{where}: 'name' is given per store, not in OPTIONS")


def _check_names(options: Mapping[str, Any], where: str) -> None:
    for option in options:
        if option not in STORE_OPTIONS:
            raise ImproperlyConfigured(
                f"{where}: unknown Store option {option!r}{_suggest(str(option), STORE_OPTIONS)}; "
                "the options are those of sessionstore.StoreConfig"
            )
