"""The producer: an experiment's remaining narratives -> a bounded stream, then close it.

It walks the narrative set in `narrative_id` order a page at a time, each page a short read
of its own (an anti-join against `narrative_results`), so memory stays flat however large
the file and no read transaction stays open to stop WAL checkpoints during a days-long run.
Closing the send stream is how the workers learn there is no more work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anyio.abc import ObjectSendStream

from asyncrunner.db.schema import open_async
from asyncrunner.pipeline.messages import Narrative

PAGE_SIZE = 256

_SELECT = (
    "SELECT s.narrative_id, s.incident_id, s.narrative_type, s.narrative_text, "
    "s.manual_flag_ind, s.manual_flag FROM source_narratives s "
    "WHERE s.data_checksum = :checksum AND s.narrative_id > :after "
    "AND (:cutoff IS NULL OR s.narrative_id <= :cutoff) AND {match} "
    "ORDER BY s.narrative_id LIMIT :limit"
)
_RESULT = (
    "SELECT 1 FROM narrative_results r WHERE r.experiment_id = :experiment_id "
    "AND r.incident_id = s.incident_id AND r.narrative_type = s.narrative_type"
)
MISSING_SQL = _SELECT.format(match=f"NOT EXISTS ({_RESULT})")
ERRORED_SQL = _SELECT.format(match=f"EXISTS ({_RESULT} AND r.error_occurred = 1)")


@dataclass(frozen=True, slots=True)
class WorkSelection:
    experiment_id: str
    checksum: str
    cutoff: int | None
    retry_errors_only: bool = False


async def produce(db_path: str | Path, selection: WorkSelection,
                  send: ObjectSendStream[Narrative], *, page_size: int = PAGE_SIZE) -> None:
    sql = ERRORED_SQL if selection.retry_errors_only else MISSING_SQL
    params: dict[str, object] = {
        "checksum": selection.checksum, "cutoff": selection.cutoff,
        "experiment_id": selection.experiment_id, "limit": page_size, "after": -1,
    }
    async with send, open_async(db_path) as db:
        await db.execute("PRAGMA query_only = 1")
        while True:
            async with db.execute(sql, params) as cursor:
                rows = list(await cursor.fetchall())
            if not rows:
                return
            for row in rows:
                await send.send(Narrative(
                    narrative_id=row[0], incident_id=row[1], narrative_type=row[2],
                    text=row[3] or "", manual_flag_ind=row[4], manual_flag=row[5],
                ))
            params["after"] = rows[-1][0]
