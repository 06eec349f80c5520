"""citus: the hot paths on a Citus cluster against the same on plain PostgreSQL, one run.

Needs ``$SESSIONSTORE_BENCH_CITUS_DSN`` (a Citus coordinator: ``.ci/citus``
starts one); the plain side is the run's own server. Each row's ratio is
Citus over plain PostgreSQL; the target (issue 14) is at most 4x. Without a
cluster the rows say so instead of a figure.
"""

from __future__ import annotations

import itertools
import os

from ..context import Bench, opened
from ..documents import bump, player_profile
from ..results import Figure, Row, Target, compare
from ..timing import Case

CITUS_ENV = "SESSIONSTORE_BENCH_CITUS_DSN"
_TARGET = Target("<=", 4.0, "≤ 4x")
_BASELINE = "the same on plain PostgreSQL (this run's server)"


def _keys_on_two_workers(bench: Bench) -> tuple[str, str]:
    """Two keys whose shards live on different Citus workers."""
    with bench.raw(autocommit=True) as conn:
        seen: dict[int, str] = {}
        for n in range(200):
            key = f"tx{n}"
            found = conn.execute(
                "SELECT nodeport FROM citus_shards WHERE table_name = CAST(%s AS regclass) "
                "AND shardid = get_shard_id_for_distribution_column(CAST(%s AS regclass), "
                "CAST(%s AS text))",
                (bench.table("locks"), bench.table("locks"), key),
            ).fetchone()
            assert found is not None
            seen.setdefault(int(found[0]), key)
            if len(seen) == 2:
                first, second = sorted(seen.values())
                return first, second
    raise RuntimeError("the Citus cluster has fewer than two workers")


def _cases(bench: Bench, keys: tuple[str, str], label: str) -> dict[str, Case]:
    document = player_profile(2048)
    store = bench.store(document)
    for key in ("p1", *keys):
        store.load(key)
        store.update(key, bump)
        store.save(key)
    new_keys = (f"new{i}" for i in itertools.count())
    first, second = keys

    def load_unload() -> None:
        key = next(new_keys)
        store.load(key)
        store.unload(key)

    def move(docs: dict[str, dict[str, int]]) -> bool:
        docs[first]["coins"] = docs[first].get("coins", 0) + 1
        docs[second]["coins"] = docs[second].get("coins", 0) - 1
        return True

    inner = bench.sizes.inner(100)
    return {
        "save": Case(
            label, lambda: store.save("p1"), prepare=lambda: store.update("p1", bump), inner=inner
        ),
        "load+unload": Case(label, load_unload, inner=inner),
        "tx": Case(label, lambda: store.tx([first, second], move), inner=inner),
        "peek": Case(label, lambda: store.peek("p1"), inner=inner),
    }


_MEASURES = {
    "save": "dirty 2 KB doc",
    "load+unload": "new key",
    "tx": "2 keys on different workers (2PC)",
    "peek": "saved 2 KB doc",
}


def run(bench: Bench) -> list[Row]:
    dsn = os.environ.get(CITUS_ENV)
    if not dsn:
        return [
            Row(
                "citus",
                f"{measure} (not measured: set ${CITUS_ENV})",
                Figure(0.0, 0.0, 0.0, "s"),
                note="no Citus cluster in this run",
            )
            for measure in _MEASURES.values()
        ]
    with opened(dsn, bench.sizes) as cluster:
        keys = _keys_on_two_workers(cluster)
        on_citus = _cases(cluster, keys, "Citus")
        on_plain = _cases(bench, keys, "plain")
        return [
            compare(
                "citus",
                measure,
                on_citus[name],
                on_plain[name],
                repeats=bench.sizes.repeats,
                baseline_name=_BASELINE,
                target=_TARGET,
            )
            for name, measure in _MEASURES.items()
        ]
