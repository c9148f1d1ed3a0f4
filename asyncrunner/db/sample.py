"""data.sample: a seeded, stratified random sample of an experiment's narratives.

The sample is drawn once, when the experiment is created, and its keys are stored in
`experiment_sample`: every resume scores exactly those narratives, whatever the code that
draws samples becomes later. Every cell of a study draws from the same data with the same
definition and so gets the same keys (the draw depends on nothing else).

The draw: the narratives (of the data checksum, up to max_narratives' cutoff) are grouped
by the strata's values; each stratum gets its proportional share of n, rounded by largest
remainder (ties to the stratum listed first); within a stratum, narratives are picked by
a random generator seeded with the seed and the stratum, so adding a stratum does not
reshuffle the others.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Sequence
from typing import Any

Key = tuple[str, str]      # (incident_id, narrative_type)

_STRATUM_SQL = {
    "narrative_type": "narrative_type",
    "manual_flag_ind": "manual_flag_ind",
    "manual_flag": "manual_flag",
}


def draw(conn: sqlite3.Connection, checksum: str, cutoff: int | None,
         sample: dict[str, Any]) -> list[Key]:
    """The sample's keys, in narrative order."""
    strata: Sequence[str] = sample["stratify"]
    columns = ", ".join(_STRATUM_SQL[s] for s in strata) if strata else "NULL"
    rows = conn.execute(
        f"SELECT incident_id, narrative_type, {columns} FROM source_narratives "
        "WHERE data_checksum = ? AND (? IS NULL OR narrative_id <= ?) ORDER BY narrative_id",
        (checksum, cutoff, cutoff)).fetchall()
    n = int(sample["n"])
    if n >= len(rows):
        return [(str(r[0]), str(r[1])) for r in rows]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row[2:]), []).append(i)
    order = sorted(groups, key=lambda g: tuple((v is None, str(v)) for v in g))
    quotas = _allocate(n, [len(groups[g]) for g in order])
    chosen: list[int] = []
    for stratum, quota in zip(order, quotas, strict=True):
        rng = random.Random(json.dumps([sample["seed"], list(stratum)], default=str))
        chosen += rng.sample(groups[stratum], quota)
    return [(str(rows[i][0]), str(rows[i][1])) for i in sorted(chosen)]


def _allocate(n: int, sizes: list[int]) -> list[int]:
    """Proportional quotas summing to n, by largest remainder."""
    total = sum(sizes)
    exact = [n * size / total for size in sizes]
    quotas = [int(x) for x in exact]
    short = n - sum(quotas)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[:short]:
        quotas[i] += 1
    return quotas


def store(conn: sqlite3.Connection, experiment_id: str, keys: list[Key]) -> None:
    """Record the keys (inside the caller's transaction, with the experiment's row)."""
    conn.executemany(
        "INSERT OR IGNORE INTO experiment_sample (experiment_id, incident_id, narrative_type) "
        "VALUES (?, ?, ?)", [(experiment_id, i, t) for i, t in keys])


def stored_count(conn: sqlite3.Connection, experiment_id: str) -> int:
    row = conn.execute("SELECT COUNT(*) FROM experiment_sample WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    return int(row[0])
