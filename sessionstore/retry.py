"""Retrying transient database errors with exponential backoff and jitter.

Owns which database errors count as transient (:func:`is_transient`: the
connection was lost, the server is restarting or full of connections, a
serialisation failure or deadlock) and :func:`with_retries`, the one retry
loop of the package, which is also where database errors stop: nothing
raw from SQLAlchemy or psycopg leaves it. A transient error is retried
until the policy's timeout and then raised as
:class:`StorageUnavailableError`; a missing privilege (SQLSTATE 42501) is
raised as :class:`InsufficientPrivilegeError` at once, and any other
database error as :class:`StorageUnavailableError` at once. The original is
always chained.
Errors that are not database errors (sessionstore's own, a user callback's)
pass through unchanged.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import sqlalchemy.exc

from .errors import InsufficientPrivilegeError, StorageUnavailableError

__all__ = [
    "INSUFFICIENT_PRIVILEGE",
    "AttemptWithBackoff",
    "RetryPolicy",
    "describe",
    "is_database_error",
    "is_prepared_statement_error",
    "is_transient",
    "sqlstate_of",
    "with_retries",
]

T = TypeVar("T")
logger = logging.getLogger("sessionstore")

# SQLSTATEs after which a new attempt, on a fresh connection, may succeed:
# the server is shutting down or starting up (57P01-57P03), closed an idle
# session (57P05), has no connection slot free now (53300), or rolled the
# transaction back to resolve a conflict (40001, 40P01). Class 08 (connection
# exceptions) is matched by prefix. Everything else is an answer that a
# retry would only repeat, and slowly: a statement or lock timeout
# (57014, 55P03) would cost its whole timeout again per attempt, a full disk
# (53100), out of memory (53200) or program limit (54xxx) does not clear in
# seconds, and a SQL error is a bug.
_TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "53300", "40001", "40P01"})
_TRANSIENT_CLASSES = ("08",)

INSUFFICIENT_PRIVILEGE = "42501"
"""SQLSTATE of a statement the role may not run: raised as InsufficientPrivilegeError."""

# A statement psycopg prepared on the server is already there (42P05,
# duplicate_prepared_statement) or gone (26000, invalid_sql_statement_name):
# a pooler (PgBouncer in transaction mode) moved the client to another server
# connection between two transactions. We never name statements ourselves.
_PREPARED_STATEMENT_SQLSTATES = frozenset({"42P05", "26000"})
_UNPREPARED = (
    "%s: the server lost a prepared statement (%s): a pool that keeps no prepared "
    "statements (PgBouncer in transaction mode) is in between; server-side prepared "
    "statements are now off for this store's connections and the statement is retried. "
    "Pass prepared_statements=False to start that way (docs/scaling.md#pgbouncer)"
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (SQLAlchemy-wrapped or not), or None."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    sqlstate = getattr(exc, "sqlstate", None) if isinstance(exc, psycopg.Error) else None
    return sqlstate if isinstance(sqlstate, str) else None


def is_database_error(exc: BaseException) -> bool:
    """Did SQLAlchemy or psycopg raise this (as opposed to our code or a user's)?"""
    return isinstance(exc, sqlalchemy.exc.SQLAlchemyError | psycopg.Error)


def is_prepared_statement_error(exc: BaseException) -> bool:
    """Did the server lose, or already have, a statement psycopg prepared on it?

    Behind a pool that keeps no prepared statements across transactions
    (PgBouncer in transaction mode before 1.21). The statement did not run:
    it failed while being prepared or bound.
    """
    return sqlstate_of(exc) in _PREPARED_STATEMENT_SQLSTATES


def is_transient(exc: BaseException) -> bool:
    """True for errors that a new attempt on a fresh connection may not see again."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:  # SQLAlchemy saw a disconnect
            return True
        if exc.orig is not None:
            exc = exc.orig
    # Pool exhausted for pool_timeout, or a pooled connection found dead.
    if isinstance(exc, sqlalchemy.exc.TimeoutError | sqlalchemy.exc.DisconnectionError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # No answer from a server at all: the connection could not be made
        # or was lost (libpq's errors carry no SQLSTATE), or psycopg found
        # it closed. Other errors without one are raised by the client
        # itself (a bad parameter, say): a retry would repeat them.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_CLASSES)


_MESSAGE_LIMIT = 500


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line account of a database error for messages and logs.

    The driver's message and SQLSTATE, without SQLAlchemy's ``[SQL: ...]``
    and ``[parameters: ...]`` (the parameters may be a whole document), with
    every one of ``secrets`` (a password, say) replaced by ``***``.
    """
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    if orig is None:
        orig = exc
    text = re.sub(r"\s+", " ", str(orig)).strip() or type(orig).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3] + "..."
    sqlstate = sqlstate_of(exc)
    where = f", SQLSTATE {sqlstate}" if sqlstate else ""
    return f"{type(orig).__name__}{where}: {text}"


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry; ``timeout`` bounds the whole loop in seconds."""

    timeout: float = 10.0
    initial_delay: float = 0.05
    max_delay: float = 1.0
    factor: float = 2.0
    jitter: float = 0.5


class AttemptWithBackoff:
    """Delays for successive attempts: exponential, capped, with random jitter.

    ``jitter`` spreads each delay over ``[d * (1 - jitter), d]`` so that many
    clients that failed together do not retry together.
    """

    def __init__(self, policy: RetryPolicy, *, deadline: float | None = None) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + policy.timeout if deadline is None else deadline
        self._delay = policy.initial_delay
        self.attempts = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next attempt, or None once the deadline has passed."""
        self.attempts += 1
        remaining = self.remaining()
        if remaining <= 0:
            return None
        delay = self._delay * (1.0 - self.policy.jitter * random.random())
        self._delay = min(self._delay * self.policy.factor, self.policy.max_delay)
        return min(delay, remaining)

    def sleep(self) -> bool:
        """Sleep before the next attempt; False (without sleeping) once out of time."""
        delay = self.next_delay()
        if delay is None:
            return False
        time.sleep(delay)
        return True


def with_retries(
    policy: RetryPolicy,
    what: str,
    operation: Callable[[], T],
    *,
    extra: Mapping[str, object] | None = None,
    secrets: Iterable[str] = (),
    unprepare: Callable[[], bool] | None = None,
) -> T:
    """Run ``operation``, retrying transient errors until ``policy.timeout``.

    Raises :class:`StorageUnavailableError`, the original chained and its
    message saying ``what`` failed and the SQLSTATE: once out of time for a
    transient error, at once for any other database error (SQLAlchemy's or
    psycopg's), as its subclass :class:`InsufficientPrivilegeError` for a
    missing privilege. Other exceptions propagate unchanged. ``secrets`` (e.g. the
    DSN's password) are masked in the message and the retry log lines.

    ``unprepare``, if given, is called when the server lost or already had a
    prepared statement (:func:`is_prepared_statement_error`): it turns
    server-side prepared statements off for the connections ``operation``
    uses and returns True if they were on (then one WARNING is logged and
    the operation retried at once); such an error is then retried like a
    transient one, never raised.
    """
    attempt = AttemptWithBackoff(policy)
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_database_error(exc):
                raise
            if sqlstate_of(exc) == INSUFFICIENT_PRIVILEGE:
                # The one place a denial becomes typed; never retried (a grant
                # does not appear by waiting), whoever the caller is.
                raise InsufficientPrivilegeError(
                    f"{what}: insufficient privilege: {describe(exc, secrets)}"
                ) from exc
            unprepared = False
            if unprepare is not None and is_prepared_statement_error(exc):
                if unprepare():  # the first one: preparing is off from now on
                    logger.warning(_UNPREPARED, what, describe(exc, secrets), extra=extra)
                    continue  # at once: the failed statement did not run
                unprepared = True  # in flight on another thread meanwhile: retry it too
            if not (unprepared or is_transient(exc)):
                raise StorageUnavailableError(
                    f"{what}: database error: {describe(exc, secrets)}"
                ) from exc
            if not attempt.sleep():
                raise StorageUnavailableError(
                    f"{what}: database unavailable after {attempt.attempts} attempts "
                    f"({policy.timeout:g} s): {describe(exc, secrets)}"
                ) from exc
            if not unprepared:
                logger.warning(
                    "%s: transient database error, retrying: %s",
                    what,
                    describe(exc, secrets),
                    extra=extra,
                )
