"""Retrying transient database errors with exponential backoff and jitter.

Owns which database errors count as transient (connection lost, server
restart, serialisation failure, deadlock) and :class:`AttemptWithBackoff`,
the one retry loop of the package. After the last attempt the error surfaces
as :class:`StorageUnavailableError` with the original chained.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import sqlalchemy.exc

from .errors import StorageUnavailableError

__all__ = ["AttemptWithBackoff", "RetryPolicy", "is_transient", "with_retries"]

T = TypeVar("T")
logger = logging.getLogger("sessionstore")


def is_transient(exc: BaseException) -> bool:
    """True for errors that a new attempt on a fresh connection may not see again."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # pool exhausted for pool_timeout
        return True
    # psycopg.OperationalError covers connection failures, admin shutdown,
    # serialization_failure and deadlock_detected (TransactionRollbackError).
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


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
) -> T:
    """Run ``operation``, retrying transient errors until ``policy.timeout``.

    Raises :class:`StorageUnavailableError` (original chained) once out of
    attempts; other errors propagate at once.
    """
    attempt = AttemptWithBackoff(policy)
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if not attempt.sleep():
                raise StorageUnavailableError(
                    f"{what}: database unavailable after {attempt.attempts} attempts: {exc}"
                ) from exc
            logger.warning("%s: transient database error, retrying: %s", what, exc, extra=extra)
