"""The import step both batch paths share: answer lines -> Results -> the writer.

    the narratives a file may answer   custom_id -> Narrative (`batch_narratives` for one
                                       provider batch, `experiment_narratives` for batch-import)
    each answer line                   BatchCodec.result, counted in a `LineTally`
    the results                        `store_results`: a ResultWriter of their own, batched
                                       INSERT OR IGNORE commits (nothing is stored twice)

A fatal answer is counted, never stored (as in a live run); a line without an answer
(expired, cancelled) leaves its narrative remaining.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from asyncrunner.pipeline.batch_codec import BatchCodec, custom_id
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.pipeline.producer import WorkSelection
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.writer import ResultWriter, WriterSettings


@dataclass(slots=True)
class LineTally:
    """What reading answer lines gave."""

    lines: int = 0
    stored: int = 0               # results handed to the writer
    duplicates: int = 0           # a key seen before: the first line wins
    unknown: int = 0              # a key that is not one of the narratives expected
    malformed: int = 0
    no_answer: int = 0            # batch_expired / batch_cancelled
    fatal: int = 0
    fatal_reason: str | None = None

    def count(self, result: Result | None) -> Result | None:
        """Count what a line gave; returns the result to store (None: nothing to store)."""
        if result is None:
            self.no_answer += 1
            return None
        if result.fatal is not None:
            self.fatal += 1
            self.fatal_reason = self.fatal_reason or result.fatal
            return None
        self.stored += 1
        return result


async def store_results(db_path: str, settings: WriterSettings, results: AsyncIterator[Result],
                        on_commit: Callable[[Snapshot], None] | None = None
                        ) -> Snapshot | None:
    """Every result through a ResultWriter of its own (batched INSERT OR IGNORE commits,
    progress in the same transaction); returns when all of them are committed."""
    writer = ResultWriter(db_path, settings, on_commit=on_commit)
    send, recv = anyio.create_memory_object_stream[Result](max(2, 2 * settings.batch_size))
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run, recv)
        async with send:
            async for result in results:
                await send.send(result)
    return writer.last


async def answer_results(codec: BatchCodec, narratives: Mapping[str, Narrative],
                         contents: list[bytes], tally: LineTally) -> AsyncIterator[Result]:
    """The results of downloaded answer files; a line that cannot be read, or names a
    narrative not expected, is counted and skipped (the batch is the provider's, not ours
    to refuse)."""
    seen: set[str] = set()
    for content in contents:
        for raw in content.splitlines():
            if not raw.strip():
                continue
            tally.lines += 1
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                tally.malformed += 1
                continue
            key = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(key, str):
                tally.malformed += 1
                continue
            n = narratives.get(key)
            if n is None:
                tally.unknown += 1
                continue
            if key in seen:
                tally.duplicates += 1
                continue
            seen.add(key)
            result = tally.count(await codec.result(n, line))
            if result is not None:
                yield result


def batch_narratives(conn: sqlite3.Connection, batch_id: str,
                     checksum: str) -> dict[str, Narrative]:
    """custom_id -> the narrative (without its text) of every line of a batch."""
    rows = conn.execute(
        "SELECT s.narrative_id, s.incident_id, s.narrative_type, s.manual_flag_ind, "
        "s.manual_flag FROM batch_items i JOIN source_narratives s "
        "ON s.data_checksum = ? AND s.incident_id = i.incident_id "
        "AND s.narrative_type = i.narrative_type WHERE i.batch_id = ? "
        "ORDER BY s.narrative_id", (checksum, batch_id)).fetchall()
    return _keyed(rows)


def experiment_narratives(conn: sqlite3.Connection, selection: WorkSelection
                          ) -> dict[str, Narrative]:
    """custom_id -> the narrative (without its text) of every narrative of the experiment:
    the producer's selection (checksum, cutoff, sample) without its anti-join."""
    rows = conn.execute(
        "SELECT s.narrative_id, s.incident_id, s.narrative_type, s.manual_flag_ind, "
        "s.manual_flag FROM source_narratives s WHERE s.data_checksum = :checksum "
        "AND (:cutoff IS NULL OR s.narrative_id <= :cutoff) "
        "AND (:sampled = 0 OR EXISTS (SELECT 1 FROM experiment_sample x "
        "WHERE x.experiment_id = :experiment_id AND x.incident_id = s.incident_id "
        "AND x.narrative_type = s.narrative_type)) ORDER BY s.narrative_id",
        {"checksum": selection.checksum, "cutoff": selection.cutoff,
         "sampled": int(selection.sampled), "experiment_id": selection.experiment_id}
    ).fetchall()
    return _keyed(rows)


def _keyed(rows: list[Any]) -> dict[str, Narrative]:
    out: dict[str, Narrative] = {}
    for r in rows:
        key = custom_id(str(r[1]), str(r[2]))
        out.setdefault(key, Narrative(int(r[0]), str(r[1]), str(r[2]), "", r[3], r[4]))
    return out
