"""Flask integration: :class:`SessionStores`, the sessionstore extension for Flask.

It follows the Flask extension pattern (as Flask-SQLAlchemy does)::

    from flask import Flask
    from sessionstore.contrib.flask import SessionStores

    stores = SessionStores()
    stores.register("players", {"coins": 0}, lock_timeout=10)

    def add_coins(player: dict[str, int]) -> bool:
        player["coins"] += 10
        return True

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["SESSIONSTORE_DSN"] = "postgresql://user:password@db/app"
        stores.init_app(app)  # or SessionStores(app) when there is one app

        @app.post("/reward/<player>")
        def reward(player: str) -> dict[str, int]:
            with stores.session("players", player) as s:  # loaded here, saved on exit
                s.update(add_coins)
                coins = s.get()["coins"]
            return {"coins": coins}  # sent once the change is saved

        return app

Configuration, read from ``app.config`` by :meth:`SessionStores.init_app`:

``SESSIONSTORE_DSN``
    The database: anything ``Store(dsn=...)`` takes. When it is not set,
    ``SQLALCHEMY_DATABASE_URI`` is used if it names a PostgreSQL database
    (any driver: sessionstore always connects with psycopg 3); otherwise the
    Store's own default applies: ``$SESSIONSTORE_DSN``, else the embedded
    server.
``SESSIONSTORE_OPTIONS``
    A dict of ``Store`` options (the README's configuration table, e.g.
    ``{"db_schema": "app", "lock_timeout": 10.0}``) for every store of the
    app; the options given to :meth:`SessionStores.register` override them.

Lifecycle. A Store belongs to a process, not to a request or an app
context: ``stores[name]`` builds this process's Store for the current app on
first use (thread-safe: concurrent first uses build one), so importing and
configuring the app does no I/O and a gunicorn ``--preload`` master connects
to nothing. (A Store made before ``os.fork()`` would be safe too: in the
child it acts as a fresh Store, see docs/architecture.md, "Processes".)
Nothing is closed at the end of a request or app context; every open Store
is closed at interpreter exit (its keys saved, its leases released; under
gunicorn, when a worker exits after SIGTERM), or earlier by
:meth:`SessionStores.close`. Use one session per request
(``with stores.session(name, key)``), or keys kept loaded with
``stores[name].load(key)`` (see the README, "Web servers and workers").

Command line. :meth:`~SessionStores.init_app` adds the ``flask sessionstore``
group, the ``sessionstore`` command line run on the app's database and
schema (``SESSIONSTORE_DSN`` as above, ``db_schema`` of
``SESSIONSTORE_OPTIONS``)::

    flask --app myapp sessionstore db upgrade
    flask --app myapp sessionstore locks players
    flask --app myapp sessionstore unlock players alice --reason "stuck since 02:10"

Every command of the CLI is mirrored (made from its click commands: same
arguments, options and help); each hands its arguments to
:func:`sessionstore.cli.main`, which does the work; ``--dsn`` and
``--schema`` override the app's settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import URL, Engine
from sqlalchemy.engine import make_url

import sessionstore as ss
from sessionstore import cli, db

__all__ = ["EXTENSION_KEY", "SessionStores", "UnknownStoreError"]

EXTENSION_KEY = "sessionstore"
"""The key of ``app.extensions`` that holds the :class:`SessionStores` of an app."""

_log = logging.getLogger("sessionstore")

_OPTIONS = frozenset(field.name for field in dataclasses.fields(ss.StoreConfig)) - {
    "name",
    "template",
}
"""The options a store may be given besides its name and template (StoreConfig's fields)."""

_Dsn = str | URL | Engine
"""What ``Store(dsn=...)`` takes, besides ``None``."""


class UnknownStoreError(ss.SessionStoreError, KeyError):
    """No store of that name was registered with :meth:`SessionStores.register`."""

    def __str__(self) -> str:  # KeyError's str() would show the message's repr
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class _Registration:
    """A store registered on the extension: its name, template and own options."""

    name: str
    template: Any
    options: Mapping[str, Any]


class _AppState:
    """What one app's configuration gives the extension, and this process's Stores for it."""

    def __init__(self, dsn: _Dsn | None, options: Mapping[str, Any]) -> None:
        self.dsn = dsn
        self.options = dict(options)
        self.stores: dict[str, ss.Store[Any]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()  # guards ``locks`` and ``stores``

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _AppState:
        """Read and check ``SESSIONSTORE_DSN`` and ``SESSIONSTORE_OPTIONS`` (no I/O)."""
        options = config.get("SESSIONSTORE_OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise ss.ArgumentTypeError(
                "SESSIONSTORE_OPTIONS must be a dict of Store options, "
                f"not {type(options).__name__}"
            )
        _check_option_names(options, "SESSIONSTORE_OPTIONS")
        if "dsn" in options:
            raise ss.InvalidArgumentError(
                "SESSIONSTORE_OPTIONS: set the database with SESSIONSTORE_DSN, not an option 'dsn'"
            )
        state = cls(_app_dsn(config), options)
        # Checked as a whole (a bad value, lock_refresh_interval >= lock_duration ...).
        ss.StoreConfig(name="sessionstore", template=None, **state.store_kwargs(None))
        return state

    def store_kwargs(self, registration: _Registration | None) -> dict[str, Any]:
        """The ``Store(...)`` arguments of a registered store in this app (or the app's own)."""
        kwargs: dict[str, Any] = dict(self.options)
        if self.dsn is not None:
            kwargs["dsn"] = self.dsn
        if registration is not None:
            kwargs.update(registration.options)
            kwargs.update(name=registration.name, template=registration.template)
        return kwargs

    def config(self, registration: _Registration) -> ss.StoreConfig:
        """The checked options the registered store is built with in this app (no I/O)."""
        return ss.StoreConfig(**self.store_kwargs(registration))

    def lock_for(self, name: str) -> threading.Lock:
        with self.lock:
            return self.locks.setdefault(name, threading.Lock())

    def after_fork_in_child(self) -> None:
        # A lock held by another thread of the parent at fork time would stay held
        # forever in the child. The Stores themselves reset on their own.
        self.lock = threading.Lock()
        self.locks = {}


def _is_postgresql(uri: object) -> bool:
    """True if ``uri`` (Flask-SQLAlchemy's ``SQLALCHEMY_DATABASE_URI``) is a PostgreSQL URL."""
    if not isinstance(uri, str | URL):
        return False
    try:
        url = make_url(uri)
    except Exception:  # not a URL at all: Flask-SQLAlchemy's concern, not ours
        return False
    return url.drivername.split("+", 1)[0] in ("postgresql", "postgres")


def _app_dsn(config: Mapping[str, Any]) -> _Dsn | None:
    """``SESSIONSTORE_DSN``, else ``SQLALCHEMY_DATABASE_URI`` if PostgreSQL, else None."""
    dsn = config.get("SESSIONSTORE_DSN")
    if dsn is not None and dsn != "":
        if not isinstance(dsn, str | URL | Engine):
            raise ss.ArgumentTypeError(
                "SESSIONSTORE_DSN must be a str, a sqlalchemy URL or Engine, "
                f"not {type(dsn).__name__}"
            )
        return dsn
    uri = config.get("SQLALCHEMY_DATABASE_URI")
    if _is_postgresql(uri):
        assert isinstance(uri, str | URL)
        return uri
    return None


def _check_option_names(options: Mapping[Any, Any], where: str) -> None:
    for option in options:
        if not isinstance(option, str) or option not in _OPTIONS:
            close = difflib.get_close_matches(str(option), sorted(_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ss.ArgumentTypeError(f"{where}: unknown Store option {option!r}{hint}")


class SessionStores:
    """The sessionstore extension: named Stores, one per process and app, made on first use.

    ``SessionStores(app)`` for one app, or ``SessionStores()`` and later
    :meth:`init_app` for each app (the factory pattern). Stores are declared
    once with :meth:`register`, before or after :meth:`init_app`; each app
    then builds them with its own configuration (see the module's docs). The
    extension is thread-safe, and safe across ``os.fork()``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._registered: dict[str, _Registration] = {}
        self._apps: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # guards _registered and _apps
        _instances.add(self)
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<SessionStores {sorted(self._registered)}>"

    # -- set-up --------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read the app's configuration, add the ``flask sessionstore`` commands.

        ``SESSIONSTORE_DSN`` and ``SESSIONSTORE_OPTIONS`` are read now (later
        changes to ``app.config`` are not seen) and checked before any I/O:
        the options on their own (they apply to stores registered later too)
        and with every registered store's. No Store is made until one is used.

        Raises:
            RuntimeError: the app already has a ``SessionStores``.
            SessionStoreError: a bad setting (:class:`~sessionstore.ArgumentTypeError`,
                :class:`~sessionstore.InvalidArgumentError`); the app is left unchanged.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"this Flask app already has a SessionStores (app.extensions[{EXTENSION_KEY!r}])"
            )
        state = _AppState.from_config(app.config)
        with self._lock:
            for registration in self._registered.values():
                state.config(registration)
            self._apps[app] = state
        app.extensions[EXTENSION_KEY] = self
        app.cli.add_command(_commands)

    def register(self, name: str, template: Any, **options: Any) -> None:
        """Declare the store ``name``, built as ``Store(name, template, **options)``.

        ``options`` are ``Store`` options (the README's configuration table);
        they override the app's ``SESSIONSTORE_OPTIONS`` (and ``dsn`` its
        ``SESSIONSTORE_DSN``). Everything is checked now, by
        :class:`~sessionstore.StoreConfig`, for every app already initialised
        too; nothing connects.

        Raises:
            SessionStoreError: a bad name, template or option
                (:class:`~sessionstore.InvalidArgumentError`,
                :class:`~sessionstore.ArgumentTypeError` for an unknown or mistyped
                option, :class:`~sessionstore.InvalidDataError` for a template that
                is not JSON), or the name is already registered.
        """
        _check_option_names(options, f"store {name!r}")
        ss.StoreConfig(name=name, template=template, **options)
        registration = _Registration(name, template, dict(options))
        with self._lock:
            if name in self._registered:
                raise ss.InvalidArgumentError(f"a store named {name!r} is already registered")
            for state in list(self._apps.values()):
                state.config(registration)
            self._registered[name] = registration

    # -- the stores ------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._registered

    def __iter__(self) -> Iterator[str]:
        """The registered names."""
        return iter(list(self._registered))

    def __getitem__(self, name: str) -> ss.Store[Any]:
        """``stores[name]``: the current app's Store ``name`` in this process (:meth:`get`)."""
        return self.get(name)

    def get(self, name: str, app: Flask | None = None) -> ss.Store[Any]:
        """This process's Store ``name`` for ``app`` (default: the current app), made on first use.

        Outside an application context (a thread of your own, a script), pass
        ``app``. Concurrent first uses make one Store; if making it fails (the
        database is unreachable, say), the error is raised and the next call
        tries again.

        Raises:
            UnknownStoreError: ``name`` was not registered (a ``KeyError``).
            RuntimeError: no ``app`` and no application context, or the app was
                not initialised with :meth:`init_app`.
        """
        state = self._state(app)
        store = state.stores.get(name)
        if store is not None:
            return store
        registration = self._registration(name)
        with state.lock_for(name):
            store = state.stores.get(name)
            if store is None:
                store = ss.Store(**state.store_kwargs(registration))
                with state.lock:
                    state.stores[name] = store
            return store

    def session(
        self, name: str, key: str, app: Flask | None = None
    ) -> AbstractContextManager[ss.SessionHandle[Any]]:
        """``with stores.session(name, key) as s:``, i.e. ``stores.get(name, app).session(key)``.

        The key is loaded on entry (waiting up to ``lock_timeout`` for another
        process to let it go) and saved and released when the last block on it
        in this process exits: one session per request.
        """
        return self.get(name, app).session(key)

    def config(self, name: str, app: Flask | None = None) -> ss.StoreConfig:
        """The options the Store ``name`` is (or would be) built with for ``app``; no I/O."""
        return self._state(app).config(self._registration(name))

    def close(self, app: Flask | None = None) -> None:
        """Close this process's Stores of ``app`` (default: of every app), and forget them.

        Each Store's keys are saved and its leases released
        (:meth:`sessionstore.Store.close`); a later use makes a new Store. Not
        needed at exit: every open Store is closed then. Every Store is
        closed even if one fails; the first error is raised.
        """
        with self._lock:
            states = [self._initialised(app)] if app is not None else list(self._apps.values())
        errors: list[BaseException] = []
        for state in states:
            for name in list(state.stores):
                with state.lock_for(name), state.lock:
                    store = state.stores.pop(name, None)
                if store is None:
                    continue
                try:
                    store.close()
                except Exception as exc:
                    _log.error("closing store %r failed: %s", name, exc)
                    errors.append(exc)
        if errors:
            raise errors[0]

    # -- helpers -----------------------------------------------------------------------

    def _registration(self, name: str) -> _Registration:
        registration = self._registered.get(name)
        if registration is None:
            known = ", ".join(repr(n) for n in sorted(self._registered)) or "none"
            raise UnknownStoreError(
                f"no store named {name!r} is registered (registered: {known}); "
                "call stores.register(name, template, ...) first"
            )
        return registration

    def _initialised(self, app: Flask) -> _AppState:
        state = self._apps.get(app)
        if state is None:
            raise RuntimeError(
                f"the Flask app {app.name!r} is not initialised with this SessionStores; "
                "call stores.init_app(app) first"
            )
        return state

    def _state(self, app: Flask | None) -> _AppState:
        if app is None:
            # RuntimeError ("Working outside of application context") without one.
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        assert app is not None
        return self._initialised(app)

    def _app_settings(self, app: Flask) -> tuple[_Dsn | None, str]:
        """The app's own DSN (or None) and ``db_schema``, for the command line."""
        state = self._initialised(app)
        schema = state.options.get("db_schema", db.DEFAULT_SCHEMA)
        return state.dsn, schema

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for state in list(self._apps.values()):
            state.after_fork_in_child()


_instances: weakref.WeakSet[SessionStores] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for extension in list(_instances):
        extension._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- flask sessionstore ... ----------------------------------------------------------------


def _dsn_argument(dsn: _Dsn) -> str:
    """The DSN as text for the command line's ``--dsn`` (the password kept: it stays in-process)."""
    if isinstance(dsn, Engine):
        dsn = dsn.url
    if isinstance(dsn, URL):
        return dsn.render_as_string(hide_password=False)
    return dsn


def _run(path: tuple[str, ...], values: dict[str, Any]) -> None:
    """Run ``sessionstore PATH`` with ``values``, the app's DSN and schema unless given; exit."""
    extension = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(extension, SessionStores):
        raise click.UsageError("this app has no SessionStores (call stores.init_app(app))")
    app_dsn, app_schema = extension._app_settings(current_app._get_current_object())  # type: ignore[attr-defined]
    if "dsn" in values and values["dsn"] is None and app_dsn is not None:
        values["dsn"] = _dsn_argument(app_dsn)
    if "schema" in values and values["schema"] is None:
        values["schema"] = app_schema
    raise SystemExit(cli.main(cli.argv_for(path, values)))


_DEFAULTS_HELP = {
    "dsn": "postgresql:// or SQLAlchemy URL (default: the app's)",
    "schema": "schema holding the tables (default: the app's db_schema)",
}


def _mirror_param(param: click.Parameter) -> click.Parameter:
    """A parameter of the CLI as the mirror takes it: --dsn and --schema default to the app's."""
    if param.name not in _DEFAULTS_HELP:
        return param
    return click.Option(param.opts, default=None, help=_DEFAULTS_HELP[param.name])


def _mirror(command: click.Command, path: tuple[str, ...]) -> click.Command:
    """``command`` of the ``sessionstore`` CLI (at ``path``) as a ``flask sessionstore`` one.

    Same name, parameters and help; running it runs the CLI's
    :func:`~sessionstore.cli.main`, so output and exit codes are the CLI's.
    """
    if isinstance(command, click.Group):
        group = AppGroup(command.name, help=command.help)
        for name, sub in command.commands.items():
            group.add_command(_mirror(sub, (*path, name)))
        return group

    def callback(**values: Any) -> None:
        _run(path, values)

    return click.Command(
        command.name,
        params=[_mirror_param(param) for param in command.params],
        callback=with_appcontext(callback),
        help=command.help,
        short_help=command.short_help,
    )


def _mirror_cli() -> AppGroup:
    group = AppGroup(
        "sessionstore",
        help="The sessionstore command line, on this app's database (SESSIONSTORE_DSN) and "
        "schema (SESSIONSTORE_OPTIONS['db_schema']).",
    )
    for name, command in cli.cli.commands.items():
        group.add_command(_mirror(command, (name,)))
    return group


_commands = _mirror_cli()
"""``flask sessionstore``: mirrors ``sessionstore`` (sessionstore/cli.py); its ``main`` runs it."""
