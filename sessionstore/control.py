"""The control connection: a holder's proof of life and its handoff inbox.

Owns one long-lived session-mode connection per Store, on its own thread,
that (1) holds a session advisory lock on the holder id for as long as the
process lives, so that when the process dies PostgreSQL drops the lock and
other holders may take its leases at once, and (2) ``LISTEN``s on the
holder's channel for handoff requests from processes that want one of its
keys. If the connection drops, the thread reconnects and re-takes both
within a short grace; loaders wait out that grace before they treat a
missing lock as a death (fencing keeps even a wrong guess safe).

Session advisory locks and LISTEN need a real session: behind PgBouncer in
transaction mode give the Store a ``control_dsn`` that bypasses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import psycopg
import sqlalchemy as sa

__all__ = ["ALIVE_SQL", "ControlConnection", "channel_for", "libpq_url"]

logger = logging.getLogger("sessionstore")

# The two-int4 form of the advisory lock shows in pg_locks as classid/objid
# with objsubid = 2; a hash collision can only make a dead holder look alive
# (then its leases are taken when they expire), never the reverse.
_LOCK = "SELECT pg_advisory_lock(hashtext('sessionstore.holder'), hashtext(%s))"
ALIVE_SQL = """EXISTS (
    SELECT 1 FROM pg_locks pl
    WHERE pl.locktype = 'advisory' AND pl.granted AND pl.objsubid = 2
      AND pl.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND pl.classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid
      AND pl.objid = (hashtext({holder}::text)::bigint & 4294967295)::oid
)"""
"""SQL condition: the holder (an SQL expression, e.g. ``l.holder``) holds its advisory lock."""


def channel_for(holder: str) -> str:
    """The LISTEN channel of a holder (a valid identifier, quoted when used)."""
    return "sessionstore_" + holder.replace("-", "")


def libpq_url(url: sa.URL) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ControlConnection:
    """Keeps the holder's advisory lock and delivers handoff requests to ``on_request``.

    ``on_request(key)`` runs on this thread and must return quickly (hand the
    work to another thread).
    """

    def __init__(
        self,
        conninfo: str,
        holder: str,
        name: str,
        on_request: Callable[[str], None],
        *,
        liveness: bool,
        reconnect_delay: float = 0.05,
        log_extra: Mapping[str, object] | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._holder = holder
        self._channel = channel_for(holder)
        self._on_request = on_request
        self._liveness = liveness
        self._log_extra = log_extra
        self._reconnect_delay = reconnect_delay
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self.last_error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"sessionstore-control-{name}", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the lock is held and the channel is listened to."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = self._reconnect_delay
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name="sessionstore-control",
                    connect_timeout=10,
                ) as conn:
                    if self._liveness:
                        conn.execute(_LOCK, (self._holder,))
                    conn.execute(f'LISTEN "{self._channel}"')
                    self._ready.set()
                    delay = self._reconnect_delay
                    while not self._stopped.is_set():
                        for notify in conn.notifies(timeout=0.1):
                            self._on_request(notify.payload)
            except Exception as exc:
                self.last_error = exc
                if self._stopped.is_set():
                    break
                self._ready.clear()
                logger.warning(
                    "%s: control connection lost, reconnecting: %s",
                    self._thread.name,
                    exc,
                    extra=self._log_extra,
                )
                time.sleep(delay)
                delay = min(delay * 2, 0.25)  # back well within a takeover grace
        self._ready.clear()
