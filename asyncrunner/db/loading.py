"""A data file loaded beside the run that classifies it.

A new experiment on a CSV not loaded yet does not wait for the whole file (at 420,000
narratives that took ten seconds before the first request). `check_csv` first refuses
whatever the file's content could refuse, so nothing about the content can stop the load
halfway; then the first narratives are committed with the `ingests` row marked `loading`
(origin), the experiment starts on them, and the rest is committed one step (5,000
narratives and their drops) per transaction while the pipeline runs (pipeline/loading.py
tells the producer how far the committed rows go). The last step writes the final counts
and digests and clears the mark.

A load stopped halfway (a signal, kill -9, a full disk) stays marked, with what it
committed; the next session that needs the file (the experiment's resume, or any new run
on it) finishes it first, in one transaction, through `ingest`, which reads the file
again and skips the committed prefix (db/ingest.py Loader). Each step checks, inside its
transaction, that the mark is still its own (the count it last committed): if another
process finished the load meanwhile, this one stops, and the rows are there all the same.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from asyncrunner.config import Config, DataSection
from asyncrunner.db.ingest import (
    ORIGIN_LOADING,
    CsvCheck,
    IngestReport,
    Loader,
    changed_while_read,
    check_csv,
    ingest,
    mapping_json,
)
from asyncrunner.db.schema import BUSY_TIMEOUT_MS, configure, transaction
from asyncrunner.db.store import set_cutoff

# Narratives per step: a step is one transaction, holding the write lock meanwhile, and
# the producer sees its rows only once it commits.
STEP_NARRATIVES = 5_000


@dataclass(frozen=True, slots=True)
class Progress:
    """What a load has committed: narratives, the highest narrative_id, whether it ended,
    and the experiment's cutoff (the narrative_id of its max_narratives-th) once known."""

    n_narratives: int
    upto: int
    finished: bool
    cutoff: int | None = None


def can_load_beside(cfg: Config, path: Path) -> bool:
    """Whether a new experiment may start before its file is loaded: a CSV (a workbook
    cannot be checked in one cheap pass), no sample (a sample is drawn from all of it),
    requests sent one by one (a batch file is written from the whole set)."""
    return (Path(path).suffix.lower() == ".csv" and cfg.data.sample is None
            and cfg.model.provider != "openai-batch")


def start(conn: sqlite3.Connection, data: DataSection, path: Path, checksum: str,
          max_narratives: int | None, *,
          checked: CsvCheck | None = None) -> IngestReport | BackgroundLoad:
    """The file's load: done (already stored, or small enough to finish in the first
    step), or begun, with at least one narrative or the whole file committed. `checked`:
    what `check_csv` found on these bytes, when it read them already (it hashed them)."""
    path = Path(path)
    mapping = mapping_json(data)
    if conn.execute("SELECT 1 FROM ingests WHERE data_checksum = ? UNION ALL "
                    "SELECT 1 FROM source_narratives WHERE data_checksum = ? LIMIT 1",
                    (checksum, checksum)).fetchone():
        return ingest(conn, data, path, checksum=checksum)   # stored, or to finish first
    if checked is None:
        checked = check_csv(data, path)
    if checked.checksum != checksum:
        raise changed_while_read(path)
    # A file rewritten after its check fails the load at its end (its bytes no longer
    # hash to `checksum`): the ids repeated in it are then no longer the checked ones,
    # but neither are the rows committed before; the next session refuses the file.
    loader = Loader(data, path, checksum, repeated=checked.repeated_ids)
    try:
        with transaction(conn):
            if conn.execute("SELECT 1 FROM ingests WHERE data_checksum = ?",
                            (checksum,)).fetchone():
                loader.close()       # another process began it while this one checked
                return ingest(conn, data, path, checksum=checksum)
            while not loader.finished and not loader.counts.n_narratives:
                loader.step(conn, STEP_NARRATIVES)
            loader.record(conn, mapping, origin=None if loader.finished else ORIGIN_LOADING)
    except BaseException:
        loader.close()
        raise
    if loader.finished:
        return loader.report()
    return BackgroundLoad(loader, mapping, max_narratives,
                          _progress(conn, checksum, loader.counts.n_narratives, False,
                                    max_narratives))


class BackgroundLoad:
    """The rest of a load begun by `start`, one transaction per `step`, on its own
    connection (made on first use, by whichever thread runs the steps one at a time)."""

    def __init__(self, loader: Loader, mapping: str, max_narratives: int | None,
                 progress: Progress) -> None:
        self.loader, self.mapping, self.limit = loader, mapping, max_narratives
        self.progress = progress
        self._conn: sqlite3.Connection | None = None

    @property
    def report(self) -> IngestReport:
        """The counts so far (final once finished)."""
        return self.loader.report()

    def step(self, db_path: str | Path) -> Progress:
        if self.progress.finished:
            return self.progress
        conn = self._connection(db_path)
        loader = self.loader
        with transaction(conn):
            row = conn.execute(
                "SELECT origin, n_narratives FROM ingests WHERE data_checksum = ? "
                "AND mapping_json = ?", (loader.checksum, self.mapping)).fetchone()
            if row is None or row[0] != ORIGIN_LOADING or row[1] != self.progress.n_narratives:
                # Finished by another process (ingest) while this one waited: stop here.
                n = int(row[1]) if row is not None and row[1] is not None else 0
                self.progress = _progress(conn, loader.checksum, n, True, self.limit)
            else:
                loader.step(conn, STEP_NARRATIVES)
                loader.record(conn, self.mapping,
                              origin=None if loader.finished else ORIGIN_LOADING)
                self.progress = _progress(conn, loader.checksum, loader.counts.n_narratives,
                                          loader.finished, self.limit, self.progress.cutoff)
        if self.progress.finished:
            self.close()
        return self.progress

    def _connection(self, db_path: str | Path) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(str(db_path), isolation_level=None,
                                         timeout=BUSY_TIMEOUT_MS / 1000,
                                         check_same_thread=False)
            configure(self._conn)
        return self._conn

    def close(self) -> None:
        """Stop reading the file and let go of the connection (a stopped load stays
        marked and is finished by the next session that needs it)."""
        self.loader.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _progress(conn: sqlite3.Connection, checksum: str, n: int, finished: bool,
              max_narratives: int | None, cutoff: int | None = None) -> Progress:
    """The committed state (`n` narratives under `checksum`), read in the caller's
    transaction."""
    upto = conn.execute("SELECT COALESCE(MAX(narrative_id), -1) FROM source_narratives "
                        "WHERE data_checksum = ?", (checksum,)).fetchone()[0]
    if cutoff is None and max_narratives is not None and n >= max_narratives:
        cutoff = set_cutoff(conn, checksum, max_narratives)   # once
    return Progress(int(n), int(upto), finished, cutoff)
