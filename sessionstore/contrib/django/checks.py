"""System checks of ``settings.SESSIONSTORE`` (tag ``"sessionstore"``), run by ``manage.py check``.

Nothing here does I/O: every store's options are checked by building its
:class:`sessionstore.StoreConfig`, which is what ``sessionstore.Store``
checks before it connects.

=====================  ===============================================================
``sessionstore.E001``  the database sessionstore would use is missing or not PostgreSQL
``sessionstore.E002``  ``SESSIONSTORE`` is malformed, or its DSN cannot be used
``sessionstore.E003``  a store's options are invalid (a bad value, an import that fails)
``sessionstore.W001``  a transaction-pooling setup (PgBouncer) without a control DSN
=====================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

import sessionstore as ss
from sessionstore import db

from .conf import POSTGRESQL, SETTING, Settings, backend_vendor

__all__ = ["PGBOUNCER_PORT", "TAG", "check_sessionstore", "check_settings"]

TAG = "sessionstore"
"""The tag of these checks: ``manage.py check --tag sessionstore``."""

PGBOUNCER_PORT = 6432
"""PgBouncer's default port: a DSN on it is taken for a transaction pool."""

_POOLING_HINT = (
    "Each store keeps one control connection that holds a session advisory lock (its "
    "proof of life) and LISTENs for handoff requests; both need a session-mode "
    "connection, which PgBouncer in transaction pooling mode does not give (the store "
    "would fall back to expiry-only takeover, and handoff requests may not reach it). Set "
    f"{SETTING}['CONTROL_DSN'] (or the store's 'control_dsn') to a direct PostgreSQL "
    "connection or a session-mode pool. If this database is not behind a transaction "
    "pool, add 'sessionstore.W001' to SILENCED_SYSTEM_CHECKS."
)


def check_sessionstore(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """The registered check: :func:`check_settings` on the project's settings."""
    from django.conf import settings

    return check_settings(getattr(settings, SETTING, None), settings.DATABASES)


def check_settings(value: object, databases: Mapping[str, Any]) -> list[checks.CheckMessage]:
    """The check messages for a ``SESSIONSTORE`` value and the ``DATABASES`` it refers to."""
    try:
        config = Settings.from_value(value)
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="sessionstore.E002", obj=SETTING)]
    messages: list[checks.CheckMessage] = []
    dsn: str | None = None
    if config.needs_database():
        dsn, message = _database_dsn(config, databases)
        if message is not None:
            messages.append(message)
    elif config.dsn is not None:
        try:  # once here, not in every store's message
            db.parse_dsn(config.dsn)
            dsn = config.dsn
        except ss.SessionStoreError as exc:
            messages.append(
                checks.Error(f"{SETTING}['DSN']: {exc}", id="sessionstore.E002", obj=SETTING)
            )
    for name in config.stores:
        try:
            config.store_config(name, dsn)
        except (ImproperlyConfigured, ss.SessionStoreError) as exc:
            # ImproperlyConfigured names the store already; a SessionStoreError does not.
            where = f"{SETTING}['STORES'][{name!r}]: "
            where = "" if isinstance(exc, ImproperlyConfigured) else where
            messages.append(
                checks.Error(
                    f"{where}{exc}",
                    hint="The options are those of sessionstore.Store (its README's table).",
                    id="sessionstore.E003",
                    obj=SETTING,
                )
            )
    if not any(m.id in ("sessionstore.E001", "sessionstore.E002") for m in messages):
        messages.extend(_pooling(config, dsn, databases))
    return messages


def _database_dsn(
    config: Settings, databases: Mapping[str, Any]
) -> tuple[str | None, checks.CheckMessage | None]:
    """The DSN from ``DATABASES``, or the message saying why there is none."""
    alias = config.database
    hint = (
        f"Point {SETTING}['DATABASE'] at a DATABASES alias whose ENGINE is "
        "'django.db.backends.postgresql' (PostgreSQL 15 or newer), or give "
        f"{SETTING}['DSN']."
    )
    if alias not in databases:
        return None, checks.Error(
            f"{SETTING}['DATABASE'] is {alias!r}, which is not in DATABASES",
            hint=hint,
            id="sessionstore.E001",
            obj=SETTING,
        )
    engine = databases[alias].get("ENGINE") or ""
    try:
        vendor = backend_vendor(engine) if engine else "no ENGINE"
    except ImproperlyConfigured as exc:
        vendor = f"cannot be imported: {exc}"
    if vendor != POSTGRESQL:
        return None, checks.Error(
            f"DATABASES[{alias!r}] is not PostgreSQL (ENGINE {engine!r}: {vendor}); "
            "sessionstore needs PostgreSQL",
            hint=hint,
            id="sessionstore.E001",
            obj=SETTING,
        )
    try:
        return config.database_dsn(databases), None
    except ImproperlyConfigured as exc:
        return None, checks.Error(str(exc), id="sessionstore.E002", obj=SETTING)


def _ports(dsn: str) -> list[int]:
    """The ports a DSN names (several for a multi-host DSN); none if it cannot be parsed."""
    try:
        url = db.parse_dsn(dsn)
    except ss.SessionStoreError:
        return []
    found = [url.port] if url.port is not None else []
    query = url.query.get("port")
    for values in (query,) if isinstance(query, str) else query or ():
        found.extend(int(port) for port in values.split(",") if port.strip().isdigit())
    return found


def _pooling(
    config: Settings, dsn: str | None, databases: Mapping[str, Any]
) -> list[checks.CheckMessage]:
    """W001: stores whose DSN looks like a transaction pool and that have no control DSN."""
    names: list[str | None] = [*config.stores] or [None]
    flagged: list[tuple[str | None, str]] = []
    for name in names:
        entry = config.entry(name) if name is not None else dict(config.options)
        if entry.get("control_dsn") is not None or config.control_dsn is not None:
            continue
        store_dsn = entry.get("dsn", dsn)
        from_database = "dsn" not in entry and config.dsn is None
        reason = ""
        if from_database:
            database = databases.get(config.database, {})
            if database.get("DISABLE_SERVER_SIDE_CURSORS"):
                reason = (
                    f"DATABASES[{config.database!r}] sets DISABLE_SERVER_SIDE_CURSORS, "
                    "as Django's docs advise behind a transaction pool"
                )
        if not reason and isinstance(store_dsn, str) and PGBOUNCER_PORT in _ports(store_dsn):
            reason = f"its DSN uses port {PGBOUNCER_PORT}, PgBouncer's"
        if reason:
            flagged.append((name, reason))
    if not flagged:
        return []
    stores = ", ".join(repr(name) for name, _ in flagged if name is not None)
    return [
        checks.Warning(
            f"sessionstore looks to be behind a transaction-pooling PgBouncer "
            f"({flagged[0][1]}) and has no CONTROL_DSN" + (f" (stores {stores})" if stores else ""),
            hint=_POOLING_HINT,
            id="sessionstore.W001",
            obj=SETTING,
        )
    ]
