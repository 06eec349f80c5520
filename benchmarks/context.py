"""The benchmark run's shared state: sizes, server, throwaway schema, connections, stores.

One :class:`Bench` per run. It owns a fresh schema ``bench_<hex>`` (dropped at
the end) holding sessionstore's tables and the baselines' ``docs`` table
(``key text primary key, doc jsonb``) and ``docs_bytea`` (the same, ``doc
bytea``: the single-key baselines' true minimum), hands out raw psycopg
connections, a plain SQLAlchemy engine (baseline (b)), and Stores with timers
long enough that no background heartbeat or autosave runs during a measurement.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url

import sessionstore as ss
from sessionstore import db

__all__ = ["Bench", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    """How big and how often: one set for ``--quick`` (CI), one for a full run."""

    repeats: int
    many: int
    """Sessions of the 'many sessions' scenarios (heartbeat, close, threads)."""
    close_repeats: int
    memory_sessions: int
    huge: int
    """Sessions of the 100,000-session scenario (``sessions100k``)."""
    hot_updates: int
    """Updates per thread in the hot-key scenario."""
    scale: float
    """Multiplier of each scenario's inner loop counts."""

    @classmethod
    def choose(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                repeats=5,
                many=500,
                close_repeats=3,
                memory_sessions=200,
                huge=5_000,
                hot_updates=500,
                scale=0.2,
            )
        return cls(
            repeats=11,
            many=10_000,
            close_repeats=3,
            memory_sessions=10_000,  # the scale: "10,000 loaded sessions"
            huge=100_000,  # issue 15: "100,000 sessions"
            hot_updates=5_000,
            scale=1.0,
        )

    def inner(self, full: int) -> int:
        return max(1, int(full * self.scale))


# No background task may run while we measure: the heartbeat, autosave and
# janitor timers are far longer than any run.
_QUIET = {
    "lock_duration": 3600.0,
    "lock_refresh_interval": 1800.0,
    "autosave_interval": 3600.0,
    "janitor_interval": 3600.0,
    "lock_timeout": 5.0,
}


def libpq_url(dsn: str) -> str:
    """A URL psycopg accepts, for whatever DSN form sessionstore accepts."""
    url = make_url(db.resolve_url(dsn))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Bench:
    """Server, schema, connections and stores of one benchmark run."""

    def __init__(self, dsn: str, sizes: Sizes) -> None:
        self.dsn = libpq_url(dsn)
        self.sizes = sizes
        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self._names = itertools.count()
        self._stores: list[ss.Store] = []
        self._many: ss.Store | None = None
        # Baseline (b): what an application developer writes with SQLAlchemy Core.
        self.engine = sa.create_engine(db.resolve_url(self.dsn), pool_size=8)
        self.docs = sa.Table(
            "docs",
            sa.MetaData(schema=self.schema),
            sa.Column("key", sa.Text, primary_key=True),
            sa.Column("doc", JSONB, nullable=False),
        )
        db.ensure_schema(self.engine, self.schema)
        with self.engine.begin() as conn:
            self.docs.create(conn)
            # The single-key write baselines' table: the same shape, the bytes as bytea.
            bytea = f"CREATE TABLE {self.table('docs_bytea')} (key text PRIMARY KEY, doc bytea)"
            conn.execute(sa.text(bytea))

    # -- connections ---------------------------------------------------------------

    def raw(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new raw psycopg connection (the caller closes it)."""
        return psycopg.connect(self.dsn, autocommit=autocommit)

    def table(self, name: str) -> str:
        return f'"{self.schema}".{name}'

    def put_docs(self, documents: dict[str, Any]) -> None:
        """Upsert documents into the baselines' table (setup, untimed)."""
        with self.raw() as conn:
            conn.cursor().executemany(
                f"INSERT INTO {self.table('docs')} (key, doc) VALUES (%s, %s::jsonb) "
                "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc",
                [(key, orjson.dumps(doc).decode()) for key, doc in documents.items()],
            )

    # -- stores ----------------------------------------------------------------------

    def fresh_name(self) -> str:
        return f"s{next(self._names)}"

    def store_options(self, **options: Any) -> dict[str, Any]:
        """The options of :meth:`store` (server, schema, quiet timers), over ``options``.

        Plain values: a scenario passes them to the Stores of its child processes.
        """
        return {"dsn": self.dsn, "db_schema": self.schema, **_QUIET, **options}

    def store(self, template: Any, name: str | None = None, **options: Any) -> ss.Store:
        """A Store in the bench schema (a fresh name unless given); closed at teardown."""
        store = ss.Store(name or self.fresh_name(), template, **self.store_options(**options))
        self._stores.append(store)
        return store

    def load_many(self, store: ss.Store, keys: Iterable[str], workers: int = 4) -> None:
        """Load many keys (setup): a few threads overlap the per-key round trips."""
        with ThreadPoolExecutor(workers, thread_name_prefix="bench-load") as pool:
            for _ in pool.map(store.load, keys):
                pass

    def many_store(self) -> ss.Store:
        """A Store holding ``sizes.many`` 2 KB documents, loaded once and shared."""
        if self._many is None:
            from .documents import player_profile

            self._many = self.store(player_profile(2048))
            self.load_many(self._many, (f"k{i:06d}" for i in range(self.sizes.many)))
        return self._many

    @staticmethod
    def threads_of(store: ss.Store) -> list[str]:
        """Names of the live threads a Store started (their names end in its name)."""
        suffix = f"-{store.name}"
        return sorted(
            t.name for t in threading.enumerate() if t.name.split("_")[0].endswith(suffix)
        )

    def close(self) -> None:
        for store in self._stores:
            with contextlib.suppress(Exception):
                store.close()
        with self.engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        db.clear_schema_cache()
        self.engine.dispose()

    def server_info(self) -> dict[str, str]:
        settings = ("server_version", "fsync", "synchronous_commit", "shared_buffers")
        with self.raw(autocommit=True) as conn:
            return {
                name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                for name in settings
            }


@contextlib.contextmanager
def opened(dsn: str | None, sizes: Sizes) -> Iterator[Bench]:
    """A Bench on ``dsn``, else ``$SESSIONSTORE_DSN``, else the embedded server."""
    if dsn is None:
        dsn = os.environ.get(db.DSN_ENV) or None
    if dsn is None:
        from sessionstore.embedded import embedded_dsn

        dsn = embedded_dsn()
    bench = Bench(dsn, sizes)
    try:
        yield bench
    finally:
        bench.close()
