"""The producer: an experiment's remaining narratives -> the hand-out, then end it.

It walks the narrative set in `narrative_id` order a page at a time, each page a short read
of its own (an anti-join against `narrative_results`), so memory stays flat however large
the file and no read transaction stays open to stop WAL checkpoints during a days-long run.
Ending the hand-out (handout.py) is how the workers learn there is no more work.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import anyio

from asyncrunner.db.schema import BUSY_TIMEOUT_MS, open_async
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.loading import LoadFeed

PAGE_SIZE = 256

_SELECT = (
    "SELECT s.narrative_id, s.incident_id, s.narrative_type, s.narrative_text, "
    "s.manual_flag_ind, s.manual_flag FROM source_narratives s "
    "WHERE s.data_checksum = :checksum AND s.narrative_id > :after "
    "AND (:cutoff IS NULL OR s.narrative_id <= :cutoff) AND {match} "
    "AND (:sampled = 0 OR EXISTS (SELECT 1 FROM experiment_sample x "
    "WHERE x.experiment_id = :experiment_id AND x.incident_id = s.incident_id "
    "AND x.narrative_type = s.narrative_type)) "
    "ORDER BY s.narrative_id LIMIT :limit"
)
_RESULT = (
    "SELECT 1 FROM narrative_results r WHERE r.experiment_id = :experiment_id "
    "AND r.incident_id = s.incident_id AND r.narrative_type = s.narrative_type"
)
MISSING_SQL = _SELECT.format(match=f"NOT EXISTS ({_RESULT})")
ERRORED_SQL = _SELECT.format(match=(
    f"EXISTS ({_RESULT} AND r.error_occurred = 1 AND (:categories IS NULL OR "
    "COALESCE(r.error_category, 'unknown') IN (SELECT value FROM json_each(:categories))))"))
# A page as one row holding a JSON array of its rows. sqlite3 hands the GIL back to the
# event loop after every row it steps to and must win it back before the next; while the
# loop is busy each of those waits can last the interpreter's switch interval (5 ms), so a
# page read row by row could take a second and starve the workers. One row, one wait.
_PAGE = ("SELECT json_group_array(json_array(narrative_id, incident_id, narrative_type, "
         "narrative_text, manual_flag_ind, manual_flag)) FROM ({select})")


@dataclass(frozen=True, slots=True)
class WorkSelection:
    experiment_id: str
    checksum: str
    cutoff: int | None
    retry_errors_only: bool = False
    # With retry_errors_only: the error categories to send again (None: every error row).
    # A row stored without a category counts as 'unknown'.
    categories: tuple[str, ...] | None = None
    sampled: bool = False      # only the narratives in experiment_sample (data.sample)


class _Page:
    """A page being read in the background: its rows, or the error that stopped the read."""

    def __init__(self) -> None:
        self.rows: list[Sequence[Any]] = []
        self.error: Exception | None = None
        self.done = anyio.Event()
        self.after = -1               # the narrative_id it was read after
        # With a load beside the run: whether the experiment's rows were all committed
        # when it was read (else a short page is not the end), and the feed's version then.
        self.complete = True
        self.version = 0


def _query(selection: WorkSelection, page_size: int) -> tuple[str, dict[str, object]]:
    """The page statement and its parameters, all but `after`."""
    sql = _PAGE.format(select=ERRORED_SQL if selection.retry_errors_only else MISSING_SQL)
    return sql, {
        "checksum": selection.checksum, "cutoff": selection.cutoff,
        "experiment_id": selection.experiment_id, "limit": page_size,
        "sampled": int(selection.sampled),
        "categories": (json.dumps(list(selection.categories))
                       if selection.categories is not None else None),
    }


def _rows(encoded: str) -> list[Sequence[Any]]:
    # in narrative_id order, whatever order the aggregate kept
    return sorted(json.loads(encoded), key=itemgetter(0))


class FirstPage:
    """The first page of a selection, read on a thread of its own from the moment it is
    made, so the session can get the HTTP side ready (and probe) meanwhile. On a resume
    the first page is the slow one: it passes every narrative already done (0.2 s at
    200,000). Made once the session's records are written and before the pipeline starts,
    so no result of the experiment can be stored in between (the session holds its lock)."""

    def __init__(self, db_path: str | Path, selection: WorkSelection,
                 page_size: int = PAGE_SIZE) -> None:
        self.selection, self.page_size = selection, page_size
        self._rows: list[Sequence[Any]] = []
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._read, args=(str(db_path),),
                                        name="first-page", daemon=True)
        self._thread.start()

    def _read(self, db_path: str) -> None:
        sql, params = _query(self.selection, self.page_size)
        try:
            conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                conn.execute("PRAGMA query_only = 1")
                [(encoded,)] = conn.execute(sql, {**params, "after": -1}).fetchall()
                self._rows = _rows(encoded)
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - raised by the producer that takes it
            self._error = exc

    def wait(self) -> None:
        """Until the read has ended (a session that stops before its pipeline)."""
        self._thread.join()

    async def into(self, page: _Page) -> None:
        await anyio.to_thread.run_sync(self._thread.join)
        page.rows, page.error = self._rows, self._error
        page.done.set()


async def produce(db_path: str | Path, selection: WorkSelection, handout: Handout, *,
                  page_size: int = PAGE_SIZE, first: FirstPage | None = None,
                  feed: LoadFeed | None = None) -> None:
    """Put every remaining narrative of the selection into `handout`, in id order, then
    end it: normally, so what is left is still taken; stopped or failed, dropping it.

    While one page is being taken the next is already being read: one page ahead, no more,
    so a page is read at most one page's taking before its first narrative leaves, and
    results stored meanwhile still thin out the pages after it. `first`: the first page,
    already being read (of this selection and page size). `feed`: the data file is still
    being loaded (pipeline/loading.py): no row past its bound is read, and a short page
    read before the load was complete is followed by another once it has moved on.
    """
    sql, base = _query(selection, page_size)
    failure: Exception | None = None
    finished = False
    try:
        async with open_async(db_path) as db:
            await db.execute("PRAGMA query_only = 1")

            async def read(after: int, page: _Page, past: int | None = None) -> None:
                # One call on the connection's thread (execute + fetchall): the statement
                # runs to its end there, so no read transaction stays open between pages.
                page.after = after
                try:
                    params = {**base, "after": after}
                    if feed is not None:
                        if past is not None:
                            await feed.wait_past(past)
                        page.complete, page.version = feed.complete, feed.version
                        params["cutoff"] = feed.bound
                    [(encoded,)] = await db.execute_fetchall(sql, params)
                    page.rows = _rows(encoded)
                except Exception as exc:  # noqa: BLE001 - handed to produce(), raised there
                    page.error = exc
                finally:
                    page.done.set()

            async with anyio.create_task_group() as tg:
                # Failures are raised from here, outside the task group, as themselves (a
                # consumer side that went away is a BrokenResourceError, not a group).
                try:
                    page = _Page()
                    await (first.into(page) if first is not None else read(-1, page))
                    while True:
                        await page.done.wait()
                        if page.error is not None:
                            raise page.error
                        rows = page.rows
                        after = rows[-1][0] if rows else page.after
                        following = _Page()
                        if len(rows) == page_size:
                            tg.start_soon(read, after, following)
                        elif not page.complete:      # more rows are being loaded
                            tg.start_soon(read, after, following, page.version)
                        elif rows:
                            following.done.set()     # a short page was the last one
                        else:
                            break
                        handout.put(rows)
                        await handout.wait_low()
                        page = following
                except Exception as exc:  # noqa: BLE001 - re-raised below
                    failure = exc
                    tg.cancel_scope.cancel()
        finished = failure is None
    finally:
        handout.end(drop=not finished)
    if failure is not None:
        raise failure
