"""Ingest: one spreadsheet or CSV -> rows of `source_narratives`, once per file content.

This module owns reading the operator's data file and nothing after it. It

  * identifies a file by the MD5 of its bytes plus the column mapping (`ingests` table), so
    a file already loaded is never parsed again and a changed file loads beside the old rows;
  * turns the wide sheet (one row per case, one column per narrative type) into long rows
    (one per case x narrative type), keeping IDs as the text an operator sees ("00123");
  * reads the manual labels in the spellings hand-kept sheets use (1/0, yes/no, y/n,
    true/false, blank = unknown) and refuses anything else, naming row and column;
  * records every narrative slot it does not load in `ingest_drops` (spreadsheet row, id,
    type, reason, labels; never text): blank or placeholder text (`data.placeholders`, and
    any text without a letter or digit), a duplicate (incident_id, narrative_type) with
    whether its labels or text contradict the kept row, or a row without an id;
  * stores two digests of the normalized cells beside the file's MD5 (every cell; the cells
    the mapping reads), so a re-save that changes bytes but no cell can be told apart;
  * writes everything, including the `ingests` record, in one transaction.

It is synchronous (sqlite3) and runs before any event loop exists. Errors are `InputError`
with one-line messages that name the file, row and column, never narrative text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sqlite3
import warnings
import zipfile
import zlib
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import islice
from json.encoder import encode_basestring as _json_string
from pathlib import Path
from typing import Any

from asyncrunner.config import DataSection
from asyncrunner.db.schema import transaction
from asyncrunner.errors import InputError
from asyncrunner.vocab import DropReason

CHECKSUM_CHUNK_BYTES = 1 << 20
INSERT_CHUNK_ROWS = 5_000
# A label longer than this cannot be a label: it is probably a narrative column mapped as a
# flag, so the message describes the value instead of quoting it.
MAX_QUOTED_LABEL = 20

_TRUE = frozenset({"1", "true", "yes", "y"})
_FALSE = frozenset({"0", "false", "no", "n"})
# The spellings most files use, as typed (lower, Title or UPPER case), looked up before the
# general reading (millions of cells).
_QUICK_LABELS: dict[str, tuple[int | None]] = {
    "": (None,), "1": (1,), "0": (0,),
    **{form: (1,) for w in _TRUE for form in (w, w.title(), w.upper())},
    **{form: (0,) for w in _FALSE for form in (w, w.title(), w.upper())},
}

_INSERT_SQL = (
    "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
    "manual_flag_ind, manual_flag, data_source, data_checksum, loaded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DROP_SQL = (
    "INSERT INTO ingest_drops (data_checksum, row_number, incident_id, narrative_type, "
    "reason, manual_flag_ind, manual_flag, kept_row_number, has_text, label_conflict, "
    "text_differs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# `ingests.origin` of narratives found under a checksum with no ingest record (loaded by the
# R version, which stored the same MD5): adopted as they are, never loaded a second time.
ORIGIN_ADOPTED = "adopted"
# `ingests.origin` of a load still being committed chunk by chunk beside a running
# experiment (db/loading.py); n_narratives is then what is committed so far.
ORIGIN_LOADING = "loading"

Row = tuple[int, Sequence[Any]]  # (spreadsheet row number, header = 1; cell values)


@dataclass(frozen=True, slots=True)
class IngestReport:
    data_file: str
    data_checksum: str
    loaded: bool  # False when this checksum + mapping was already in the DB (file not parsed)
    n_rows: int
    n_narratives: int
    n_blank: int          # empty or placeholder text (n_placeholder of them placeholders)
    n_duplicates: int
    n_placeholder: int = 0
    n_no_id: int = 0      # narrative slots of rows without an id
    rows_digest: str | None = None
    content_digest: str | None = None
    loaded_at: str | None = None
    origin: str | None = None        # ORIGIN_ADOPTED: rows found without an ingest record
    placeholders_applied: bool = True  # False: loaded before data.placeholders existed

    @property
    def n_dropped(self) -> int:
        return self.n_blank + self.n_duplicates + self.n_no_id


@dataclass(frozen=True, slots=True)
class Digests:
    """What a file holds, as normalized cells: every cell, and the cells the mapping reads."""

    n_rows: int
    rows_digest: str
    content_digest: str


@dataclass(slots=True)
class _Kept:
    row: int
    flag_ind: int | None
    flag: int | None
    text_hash: int


@dataclass(slots=True)
class _Counts:
    n_rows: int = 0
    n_narratives: int = 0
    n_blank: int = 0
    n_duplicates: int = 0
    n_placeholder: int = 0
    n_no_id: int = 0
    drops: list[tuple[Any, ...]] = field(default_factory=list)
    rows_hash: Any = field(default_factory=lambda: hashlib.sha256())
    content_hash: Any = field(default_factory=lambda: hashlib.sha256())

    def digests(self) -> Digests:
        return Digests(self.n_rows, self.rows_hash.hexdigest(), self.content_hash.hexdigest())


# ---------------------------------------------------------------------------------------
# Public API


def file_checksum(path: Path) -> str:
    """MD5 hex digest of the file's bytes, read in chunks so large files stay cheap."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHECKSUM_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def normalize_placeholder(text: str) -> str:
    return " ".join(text.split()).casefold()


def placeholder_set(data: DataSection) -> frozenset[str]:
    return frozenset(normalize_placeholder(p) for p in data.placeholders if p.strip())


# str.isalnum() as a regex (the re docs define \w as the isalnum characters plus "_"): one
# C-level scan instead of a Python-level loop per character, for every narrative ingested.
_ALNUM = re.compile(r"[^\W_]")


def is_placeholder(text: str, placeholders: frozenset[str]) -> bool:
    """Text that stands for "no narrative": a listed placeholder (trimmed, any case) or text
    without a single letter or digit (whitespace and punctuation only)."""
    if _ALNUM.search(text) is None:
        return True
    if not placeholders:
        return False
    # A text with more words than the longest placeholder cannot be one; splitting off only
    # that many words spares normalizing every narrative (it is the costliest step of
    # ingesting a large file). Case folding never makes or removes whitespace.
    most = _most_words(placeholders)
    words = text.split(maxsplit=most)
    return len(words) <= most and " ".join(words).casefold() in placeholders


@lru_cache(maxsize=8)
def _most_words(placeholders: frozenset[str]) -> int:
    return max(p.count(" ") for p in placeholders) + 1


def mapping_json(data: DataSection) -> str:
    """The column mapping that, with the checksum, identifies one load of a file. The
    placeholder list is part of it: another list loads other narratives."""
    return json.dumps(
        {
            "id_column": data.id_column,
            "narratives": data.narratives,
            "flags": data.flags,
            "case_flag": data.case_flag,
            "sheet": data.sheet,
            "placeholders": sorted(placeholder_set(data)),
        },
        sort_keys=True,
    )


def ingest(conn: sqlite3.Connection, data: DataSection, path: Path, *,
           checksum: str | None = None) -> IngestReport:
    """Load `path` into source_narratives unless this content + mapping is already there.
    `checksum`: the file's, when the caller has just computed it (it is not read twice)."""
    path = Path(path)
    checksum = checksum or readable_checksum(path)
    mapping = mapping_json(data)
    stored = _stored_report(conn, path, checksum, mapping)
    if stored is not None:
        return stored

    with transaction(conn):      # Ctrl-C or SIGTERM mid-ingest leaves no partial load
        # Another process may have loaded the same file while we waited for the write lock.
        report = _stored_report(conn, path, checksum, mapping)
        if report is None:
            unfinished = _unfinished(conn, checksum, mapping)
            if unfinished is not None:
                report = _load(conn, data, path, checksum, mapping, after=unfinished)
            elif _rows_under(conn, checksum):
                report = _adopt(conn, path, checksum, mapping)
            else:
                report = _load(conn, data, path, checksum, mapping)
    return report


def read_digests(data: DataSection, path: Path) -> Digests:
    """The digests `ingest` would store for `path`, reading it without loading anything."""
    counts = _Counts()
    with closing(_read_rows(Path(path), data.sheet)) as rows:
        for _ in _narrative_records(rows, data, Path(path), counts):
            pass
    return counts.digests()


@dataclass(frozen=True, slots=True)
class CsvCheck:
    """What `check_csv` found: the MD5 of the bytes it read, and the incident ids on more
    than one row of them (only their narratives can be duplicates)."""

    checksum: str
    repeated_ids: frozenset[str]


def check_csv(data: DataSection, path: Path) -> CsvCheck:
    """Everything that can refuse a CSV, without loading it: the header, every label of
    every row with an id, the file's encoding and quoting; returns the MD5 of the bytes it
    read (the file's checksum, read once for both) and the ids on more than one row. A
    load of those bytes can then only fail on the disk or the database, never on the
    file's content halfway (db/loading.py loads beside a running run), and it needs to
    remember only the repeated ids' narratives to find duplicates (Loader `repeated`)."""
    path = Path(path)
    read = hashlib.md5(usedforsecurity=False)
    seen: set[str] = set()
    repeated: set[str] = set()
    with closing(_csv_rows(path, read)) as rows:
        header_number, header = _first_nonempty(rows, path)
        columns = _column_index(header, header_number, data, path)
        id_at = columns[data.id_column]
        labels = [(name, columns[name]) for name in
                  [*data.flags.values(), *([data.case_flag] if data.case_flag else [])]]
        quick = _QUICK_LABELS
        for number, row in rows:
            incident_id = row[id_at].strip() if id_at < len(row) else ""
            if not incident_id:
                continue      # a row without an id is dropped whatever its labels say
            if incident_id in seen:
                repeated.add(incident_id)
            else:
                seen.add(incident_id)
            for name, at in labels:
                if at < len(row) and row[at] not in quick:
                    _label(row[at], number, name, path)
    return CsvCheck(read.hexdigest(), frozenset(repeated))


@dataclass(frozen=True, slots=True)
class PriorLoad:
    """An earlier version of a data file at the same path, and who used it."""

    data_checksum: str
    loaded_at: str | None
    n_rows: int | None
    n_narratives: int | None
    rows_digest: str | None
    content_digest: str | None
    experiments: tuple[tuple[str, str | None, str | None], ...]  # (id, name, status)


def prior_versions(conn: sqlite3.Connection, path: Path, checksum: str) -> list[PriorLoad]:
    """Loads of other content from the same path (newest first), with the experiments that
    ran on each. The path is matched as given and as resolved."""
    path = Path(path)
    rows = conn.execute(
        "SELECT data_checksum, MAX(loaded_at), MAX(n_rows), MAX(n_narratives), "
        "MAX(rows_digest), MAX(content_digest) FROM ingests "
        "WHERE (data_source = ? OR data_path = ?) AND data_checksum != ? "
        "GROUP BY data_checksum ORDER BY MAX(loaded_at) DESC, MAX(rowid) DESC",
        (str(path), str(path.resolve()), checksum)).fetchall()
    out = []
    for row in rows:
        users = conn.execute(
            "SELECT experiment_id, experiment_name, status FROM experiments "
            "WHERE data_checksum = ? ORDER BY start_time", (row[0],)).fetchall()
        out.append(PriorLoad(row[0], row[1], row[2], row[3], row[4], row[5],
                             tuple((u[0], u[1], u[2]) for u in users)))
    return out


def count_placeholder_texts(conn: sqlite3.Connection, checksum: str,
                            placeholders: frozenset[str]) -> int:
    """Stored narratives of a load whose text is a placeholder (loads made before
    data.placeholders existed kept them)."""
    return sum(1 for (text,) in conn.execute(
        "SELECT narrative_text FROM source_narratives WHERE data_checksum = ?", (checksum,))
        if text is None or is_placeholder(str(text), placeholders))


# ---------------------------------------------------------------------------------------
# Loading (inside the caller's transaction)


def _load(conn: sqlite3.Connection, data: DataSection, path: Path, checksum: str,
          mapping: str, *, after: Unfinished | None = None) -> IngestReport:
    """The whole file in the caller's transaction. `after`: an unfinished load's committed
    part, which this one finishes."""
    with closing(Loader(data, path, checksum, after=after)) as loader:
        while not loader.finished:
            loader.step(conn)
        loader.record(conn, mapping)
        return loader.report()


class Loader:
    """One reading of a data file into source_narratives, in steps: each step inserts the
    next narratives and the drops found on the way, in the caller's transaction, so a load
    can be one transaction (ingest) or one per step beside a running experiment
    (db/loading.py). The file is read in one pass; records and drops come in file order,
    so an unfinished load's committed part is a prefix of both, and `after` (what it
    committed) finishes it without a second copy of any row."""

    def __init__(self, data: DataSection, path: Path, checksum: str, *,
                 after: Unfinished | None = None,
                 repeated: frozenset[str] | None = None) -> None:
        """`repeated`: the ids on more than one row of the file (CsvCheck.repeated_ids),
        when known; then only their narratives are remembered to find duplicates. A load
        beside a run is the case: every narrative remembered (at 420,000 about 100 MiB)
        would stay in the process's heap after the load, spread among the run's objects."""
        self.data, self.path, self.checksum = data, Path(path), checksum
        self.loaded_at = after.loaded_at if after is not None else _utc_seconds()
        self.counts = _Counts()
        self.finished = False
        self._skip_narratives = after.n_narratives if after is not None else 0
        self._drops_done = after.n_drops if after is not None else 0
        self._read = hashlib.md5(usedforsecurity=False)   # of the bytes parsed (CSV)
        self._rows = _read_rows(self.path, data.sheet, self._read)
        # Each record carries the load's columns too: no second generator per narrative.
        self._records = _narrative_records(self._rows, data, self.path, self.counts,
                                           repeated=repeated,
                                           stamp=(str(path), checksum, self.loaded_at))

    def step(self, conn: sqlite3.Connection, limit: int = INSERT_CHUNK_ROWS) -> int:
        """Insert up to `limit` more narratives and the drops read meanwhile; returns how
        many narratives. At the end of the file, checks it is the file that was hashed."""
        if self._skip_narratives:
            self._skip_committed(conn)
        chunk = list(islice(self._records, limit))
        if chunk:
            conn.executemany(_INSERT_SQL, chunk)
        drops = self.counts.drops
        if len(drops) > self._drops_done:
            conn.executemany(_DROP_SQL, [(self.checksum, *drop)
                                         for drop in drops[self._drops_done:]])
            self._drops_done = len(drops)
        if len(chunk) < limit:
            self._end()
        return len(chunk)

    def _skip_committed(self, conn: sqlite3.Connection) -> None:
        """Read past the narratives an unfinished load committed, and check the last of
        them is the last one stored (the same file read by the same rules)."""
        last = next(islice(self._records, self._skip_narratives - 1, None), None)
        stored = conn.execute(
            "SELECT incident_id, narrative_type FROM source_narratives WHERE data_checksum = ? "
            "ORDER BY narrative_id DESC LIMIT 1", (self.checksum,)).fetchone()
        if last is None or stored is None or tuple(last[:2]) != tuple(stored):
            raise InputError(f"data file {self.path}: its unfinished load does not match the "
                             "file's rows; load it into a new database")
        self._skip_narratives = 0

    def _end(self) -> None:
        self.close()
        # The file was hashed before it was read; a writer replacing it in between would
        # leave rows under a checksum they do not belong to. A CSV is hashed as it is
        # parsed (one pass less over a large file); a workbook is read at random, so
        # hashed again.
        parsed = (self._read.hexdigest() if self.path.suffix.lower() == ".csv"
                  else readable_checksum(self.path))
        if parsed != self.checksum:
            raise changed_while_read(self.path)
        self.finished = True

    def close(self) -> None:
        self._rows.close()

    def record(self, conn: sqlite3.Connection, mapping: str, *,
               origin: str | None = None) -> None:
        """The `ingests` row: this load's counts so far (final once finished), under
        `origin` (None: an ordinary finished load); an unfinished load's row is updated
        (one row per checksum and mapping: uq_ingest)."""
        c, digests = self.counts, self.counts.digests()
        values = {
            "checksum": self.checksum, "mapping": mapping, "source": str(self.path),
            "n_rows": c.n_rows, "n_narratives": c.n_narratives, "n_blank": c.n_blank,
            "n_duplicates": c.n_duplicates, "loaded_at": self.loaded_at,
            "n_placeholder": c.n_placeholder, "n_no_id": c.n_no_id,
            "rows_digest": digests.rows_digest, "content_digest": digests.content_digest,
            "path": str(self.path.resolve()), "origin": origin,
        }
        conn.execute(
            "INSERT INTO ingests (data_checksum, mapping_json, data_source, n_rows, "
            "n_narratives, n_blank, n_duplicates, loaded_at, n_placeholder, n_no_id, "
            "rows_digest, content_digest, data_path, origin) VALUES (:checksum, :mapping, "
            ":source, :n_rows, :n_narratives, :n_blank, :n_duplicates, :loaded_at, "
            ":n_placeholder, :n_no_id, :rows_digest, :content_digest, :path, :origin) "
            "ON CONFLICT (data_checksum, mapping_json) DO UPDATE SET n_rows = :n_rows, "
            "n_narratives = :n_narratives, n_blank = :n_blank, n_duplicates = :n_duplicates, "
            "n_placeholder = :n_placeholder, n_no_id = :n_no_id, "
            "rows_digest = :rows_digest, content_digest = :content_digest, origin = :origin",
            values)

    def report(self) -> IngestReport:
        c, digests = self.counts, self.counts.digests()
        return IngestReport(str(self.path), self.checksum, True, c.n_rows, c.n_narratives,
                            c.n_blank, c.n_duplicates, c.n_placeholder, c.n_no_id,
                            digests.rows_digest, digests.content_digest, self.loaded_at)


def changed_while_read(path: Path) -> InputError:
    """The file's bytes are not the ones hashed: rows read from them would sit under a
    checksum they do not belong to."""
    return InputError(f"data file {path} changed while it was being read; run again")


def unfinished_load(conn: sqlite3.Connection, checksum: str) -> bool:
    """Whether this checksum's load was stopped halfway (db/loading.py); `ingest` with
    the same mapping finishes it."""
    return conn.execute("SELECT 1 FROM ingests WHERE data_checksum = ? AND origin = ?",
                        (checksum, ORIGIN_LOADING)).fetchone() is not None


@dataclass(frozen=True, slots=True)
class Unfinished:
    """What an unfinished load committed."""

    n_narratives: int
    n_drops: int
    loaded_at: str


def _unfinished(conn: sqlite3.Connection, checksum: str, mapping: str) -> Unfinished | None:
    row = conn.execute("SELECT n_narratives, loaded_at FROM ingests WHERE data_checksum = ? "
                       "AND mapping_json = ? AND origin = ?",
                       (checksum, mapping, ORIGIN_LOADING)).fetchone()
    if row is None:
        return None
    drops = conn.execute("SELECT COUNT(*) FROM ingest_drops WHERE data_checksum = ?",
                         (checksum,)).fetchone()[0]
    return Unfinished(int(row[0] or 0), int(drops), str(row[1]))


def _rows_under(conn: sqlite3.Connection, checksum: str) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM source_narratives WHERE data_checksum = ?",
                            (checksum,)).fetchone()[0])


def _adopt(conn: sqlite3.Connection, path: Path, checksum: str, mapping: str) -> IngestReport:
    """Narratives already stored under this checksum without an ingest record (the R
    version loaded this very file): record them as this checksum's load instead of loading
    the file a second time beside them, which would double every experiment's set."""
    n = _rows_under(conn, checksum)
    loaded_at = conn.execute("SELECT MIN(loaded_at) FROM source_narratives "
                             "WHERE data_checksum = ?", (checksum,)).fetchone()[0]
    conn.execute(
        "INSERT INTO ingests (data_checksum, mapping_json, data_source, n_narratives, "
        "loaded_at, data_path, origin) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (checksum, mapping, str(path), n, loaded_at, str(path.resolve()), ORIGIN_ADOPTED))
    return IngestReport(str(path), checksum, False, 0, n, 0, 0, loaded_at=loaded_at,
                        origin=ORIGIN_ADOPTED)


def _without_placeholders(mapping: str) -> str:
    loaded = json.loads(mapping)
    loaded.pop("placeholders", None)
    return json.dumps(loaded, sort_keys=True)


_STORED_SQL = (
    "SELECT mapping_json, n_rows, n_narratives, n_blank, n_duplicates, n_placeholder, "
    "n_no_id, rows_digest, content_digest, loaded_at, origin FROM ingests "
    "WHERE data_checksum = ?"
)


def _stored_report(conn: sqlite3.Connection, path: Path, checksum: str,
                   mapping: str) -> IngestReport | None:
    rows = conn.execute(_STORED_SQL, (checksum,)).fetchall()
    if any(row[10] == ORIGIN_LOADING and row[0] == mapping for row in rows):
        return None          # unfinished: ingest() finishes it
    for row in rows:
        # A load recorded before data.placeholders existed has no list in its mapping: it is
        # the same reading of the file except that placeholder texts were kept.
        legacy = "placeholders" not in json.loads(row[0])
        if row[0] == mapping or (legacy and row[0] == _without_placeholders(mapping)):
            return IngestReport(str(path), checksum, False, row[1] or 0, row[2] or 0,
                                row[3] or 0, row[4] or 0, row[5] or 0, row[6] or 0,
                                row[7], row[8], row[9], row[10],
                                placeholders_applied=not legacy)
    if rows:
        # Loading again under the same checksum would mix two readings of one file in the
        # set that experiments select by checksum.
        raise InputError(
            f"data file {path} (checksum {checksum}) is already loaded with a different "
            "column mapping or placeholder list; use the original data.id_column/"
            "narratives/flags/case_flag/sheet/placeholders settings or a separate database"
        )
    return None


def stored_ingest(conn: sqlite3.Connection, checksum: str) -> IngestReport | None:
    """The recorded load of a checksum (one mapping per checksum), or None."""
    row = conn.execute(
        "SELECT mapping_json, n_rows, n_narratives, n_blank, n_duplicates, n_placeholder, "
        "n_no_id, rows_digest, content_digest, loaded_at, origin, data_source FROM ingests "
        "WHERE data_checksum = ? ORDER BY loaded_at LIMIT 1", (checksum,)).fetchone()
    if row is None:
        return None
    return IngestReport(row[11] or "", checksum, False, row[1] or 0, row[2] or 0,
                        row[3] or 0, row[4] or 0, row[5] or 0, row[6] or 0, row[7], row[8],
                        row[9], row[10],
                        placeholders_applied="placeholders" in json.loads(row[0]))


def readable_checksum(path: Path) -> str:
    """The file's checksum, or one line saying why it cannot be read (exit 2)."""
    try:
        return file_checksum(path)
    except OSError as exc:
        raise InputError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


def _utc_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# Wide -> long


def _narrative_records(rows: Iterator[Row], data: DataSection, path: Path, counts: _Counts,
                       stamp: tuple[Any, ...] = (), *,
                       repeated: frozenset[str] | None = None) -> Iterator[tuple[Any, ...]]:
    """(incident_id, narrative_type, text, manual_flag_ind, manual_flag, *stamp) per kept
    narrative; every slot not kept is counted and recorded in `counts.drops`. `repeated`
    (None: any id may repeat): the only ids whose narratives can be duplicates."""
    header_number, header = _first_nonempty(rows, path)
    columns = _column_index(header, header_number, data, path)
    mapped = sorted(_configured_columns(data))  # the digest must not follow mapping order
    mapped_at = [columns[name] for name in mapped]
    _digest(counts.rows_hash, _encoded([_cell_text(v) for v in header]))
    _digest(counts.content_hash, _encoded(mapped))
    id_at = columns[data.id_column]
    case_at = columns[data.case_flag] if data.case_flag is not None else None
    placeholders = placeholder_set(data)
    # Per narrative type: the text's and the flag's positions (None: no flag column).
    slots = [(ntype, columns[column], data.flags.get(ntype),
              None if data.flags.get(ntype) is None else columns[data.flags[ntype]])
             for ntype, column in data.narratives.items()]
    width = max(columns.values()) + 1
    quick = _QUICK_LABELS.get
    kept: dict[tuple[str, str], _Kept] = {}
    for number, raw in rows:
        # Rows may be shorter than the header (CSV, or sheets whose trailing cells are
        # empty): padded with blanks, which no digest counts (trailing blanks are trimmed).
        values = raw if len(raw) >= width else [*raw, *([None] * (width - len(raw)))]
        # Each cell as text once (text cells inline: millions of them), and JSON-encoded
        # once for both digests.
        cells = [(v.strip() or None) if type(v) is str else _cell_text(v) for v in values]
        if not any(cells):    # _cell_text gives None or a non-empty text
            continue  # formatted-but-empty rows that spreadsheets keep at the end
        counts.n_rows += 1
        encoded = _encoded(cells)
        _digest(counts.rows_hash, encoded)
        _digest(counts.content_hash, [encoded[at] for at in mapped_at])
        incident_id = cells[id_at]
        strict = incident_id is not None  # a row without an id cannot stop the load
        case_flag = (None if case_at is None
                     else _label(values[case_at], number, data.case_flag or "", path,
                                 strict=strict))
        for ntype, text_at, flag_column, flag_at in slots:
            if flag_column is None or flag_at is None:
                flag_ind = None
            elif type(v := values[flag_at]) is str and (q := quick(v)) is not None:
                flag_ind = q[0]        # the common spellings, without a call per cell
            else:
                flag_ind = _label(v, number, flag_column, path, strict=strict)
            text = cells[text_at]
            blank = text is None or is_placeholder(text, placeholders)
            if incident_id is None:
                # Without an ID none of the row's narratives can be stored.
                counts.n_no_id += 1
                counts.drops.append((number, None, ntype, DropReason.NO_ID, flag_ind,
                                     case_flag, None, int(not blank), None, None))
                continue
            if text is None or blank:
                reason = DropReason.BLANK if text is None else DropReason.PLACEHOLDER
                counts.n_blank += 1
                counts.n_placeholder += reason is DropReason.PLACEHOLDER
                counts.drops.append((number, incident_id, ntype, reason, flag_ind, case_flag,
                                     None, 0, None, None))
                continue
            if repeated is None or incident_id in repeated:   # else its only row
                key = (incident_id, ntype)
                first = kept.get(key)
                if first is not None:
                    counts.n_duplicates += 1
                    conflict = (flag_ind, case_flag) != (first.flag_ind, first.flag)
                    counts.drops.append((number, incident_id, ntype, DropReason.DUPLICATE,
                                         flag_ind, case_flag, first.row, 1, int(conflict),
                                         int(hash(text) != first.text_hash)))
                    continue
                kept[key] = _Kept(number, flag_ind, case_flag, hash(text))
            counts.n_narratives += 1
            yield (incident_id, ntype, text, flag_ind, case_flag, *stamp)


_NULL = "null"


def _encoded(cells: Sequence[str | None]) -> list[str]:
    """Each cell as its JSON text (the cells are text or None), by the C string encoder."""
    return [_NULL if c is None else _json_string(c) for c in cells]


def _digest(h: Any, encoded: Sequence[str]) -> None:
    """One row (`_encoded` cells) into a running digest: byte for byte
    json.dumps(cells, ensure_ascii=False), so digests stored earlier stay comparable.
    Trailing empty cells do not count (a sheet re-saved with a wider used range holds the
    same cells)."""
    end = len(encoded)
    while end and encoded[end - 1] is _NULL:
        end -= 1
    h.update(("[" + ", ".join(encoded[:end]) + "]\n").encode())


def _first_nonempty(rows: Iterator[Row], path: Path) -> Row:
    for number, values in rows:
        if not _is_empty_row(values):
            return number, values
    raise InputError(f"data file {path} has no header row")


def _column_index(header: Sequence[Any], header_number: int, data: DataSection,
                  path: Path) -> dict[str, int]:
    """Configured column name -> position; names every missing column at once."""
    wanted = _configured_columns(data)
    positions: dict[str, int] = {}
    for at, value in enumerate(header):
        name = _cell_text(value)
        if name not in wanted:
            continue
        if name in positions:
            raise InputError(
                f"data file {path}: column '{_shown(name)}' appears more than once in the header "
                f"(row {header_number})"
            )
        positions[name] = at
    missing = [name for name in wanted if name not in positions]
    if missing:
        raise InputError(
            f"data file {path} lacks configured column(s): "
            + ", ".join(f"'{_shown(name)}'" for name in missing)
        )
    return positions


def _configured_columns(data: DataSection) -> list[str]:
    names = [data.id_column, *data.narratives.values(), *data.flags.values()]
    if data.case_flag is not None:
        names.append(data.case_flag)
    return list(dict.fromkeys(names))  # config order, each once


def _is_empty_row(values: Sequence[Any]) -> bool:
    return all(_cell_text(v) is None for v in values)


def _cell_text(value: Any) -> str | None:
    """A cell as the text an operator sees; None when blank."""
    if type(value) is str:       # every CSV cell and most workbook cells: the fast path
        return value.strip() or None
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).upper()  # how spreadsheets display booleans
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Spreadsheets store every number as a float: 123.0 is the ID 123.
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def _label(value: Any, row: int, column: str, path: Path, *, strict: bool = True) -> int | None:
    """0/1 from the spellings hand-kept sheets use; None for blank (unknown). Not `strict`
    (a row that is dropped anyway), an unreadable label is None instead of an error."""
    if type(value) is str:
        quick = _QUICK_LABELS.get(value)
        if quick is not None:
            return quick[0]
    try:
        return _read_label(value, row, column, path)
    except InputError:
        if strict:
            raise
        return None


def _read_label(value: Any, row: int, column: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _TRUE:
            return 1
        if text in _FALSE:
            return 0
    raise InputError(
        f"data file {path}, row {row}, column '{column}': cannot read {_describe(value)} as "
        "a flag (use 1/0, yes/no, y/n, true/false, or leave blank for unknown)"
    )


def _describe(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_QUOTED_LABEL or "\n" in text:
        return f"a {type(value).__name__} value of {len(text)} characters"
    return repr(value)


# ---------------------------------------------------------------------------------------
# File formats


def _shown(name: object) -> str:
    """A column or sheet name in a one-line message: a line break in an Excel header
    (Alt+Enter) or any other control character shown escaped."""
    text = str(name)
    return text if text.isprintable() else text.encode("unicode_escape").decode()


def _read_rows(path: Path, sheet: str | None,
               hashing: Any = None) -> Generator[Row, None, None]:
    """(row number, values) for every row of the file, header included, streamed. A CSV's
    bytes also go into `hashing` (a hashlib object), if given, as they are read."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return _xlsx_rows(path, sheet)
    if suffix == ".csv":
        return _csv_rows(path, hashing)
    raise InputError(
        f"data file {path}: unsupported file type '{path.suffix or '(none)'}'; "
        "use .xlsx or .csv"
    )


# The csv module refuses a field over 131,072 characters by default; a workbook cell takes
# far more. One limit for both kinds of file (the module's limit is process-wide).
MAX_CELL_CHARS = 1_048_576


class _HashingReader(io.RawIOBase):
    """A binary file whose bytes also go into a hash as they are read."""

    def __init__(self, raw: io.BufferedReader, hashing: Any) -> None:
        self._raw, self._hashing = raw, hashing

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._hashing.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_csv(path: Path, hashing: Any) -> io.TextIOWrapper:
    if hashing is None:
        return path.open(newline="", encoding="utf-8-sig")
    raw = _HashingReader(path.open("rb"), hashing)
    return io.TextIOWrapper(io.BufferedReader(raw, CHECKSUM_CHUNK_BYTES), newline="",
                            encoding="utf-8-sig")


def _csv_rows(path: Path, hashing: Any = None) -> Generator[Row, None, None]:
    if csv.field_size_limit() < MAX_CELL_CHARS:
        csv.field_size_limit(MAX_CELL_CHARS)
    number = 0
    try:
        with _open_csv(path, hashing) as fh:
            # Record numbers, not line numbers: a quoted narrative may span lines, and the
            # operator finds the row by opening the file in a spreadsheet.
            for number, row in enumerate(csv.reader(fh), start=1):
                yield number, row
    except UnicodeDecodeError:
        raise InputError(f"data file {path} is not UTF-8 text; save it as CSV UTF-8") from None
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise InputError(
                f"data file {path}, row {number + 1}: a cell holds more than "
                f"{MAX_CELL_CHARS:,} characters; is a closing quote missing?") from None
        raise InputError(f"data file {path} is not a readable CSV: {exc}") from None
    except OSError as exc:
        raise InputError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


# What openpyxl raises for files that are not (intact) workbooks; XML parse errors of both
# the stdlib and lxml derive from SyntaxError.
_XLSX_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, KeyError, ValueError, TypeError, IndexError,
    AttributeError, EOFError, OSError, SyntaxError,
)


def _xlsx_rows(path: Path, sheet: str | None) -> Generator[Row, None, None]:
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    errors = (*_XLSX_ERRORS, InvalidFileException)
    try:
        with warnings.catch_warnings():
            # Warnings about workbook features openpyxl drops (data validation, styles)
            # concern writing; only cell values are read here.
            warnings.simplefilter("ignore", UserWarning)
            book = load_workbook(path, read_only=True, data_only=True)
    except errors as exc:
        raise InputError(_unreadable_xlsx(path, exc)) from None
    try:
        worksheet = _worksheet(book, sheet, path)
        # Some writers store a wrong <dimension>; trusting it would cut rows or columns.
        worksheet.reset_dimensions()
        try:
            # iter_rows starts at row 1 and fills gaps, so enumerate gives the sheet's row.
            yield from enumerate(worksheet.iter_rows(values_only=True), start=1)
        except errors as exc:
            raise InputError(_unreadable_xlsx(path, exc)) from None
    finally:
        book.close()


def _worksheet(book: Any, sheet: str | None, path: Path) -> Any:
    names = [ws.title for ws in book.worksheets]
    if sheet is None:
        if not names:
            raise InputError(f"data file {path} has no worksheet")
        return book.worksheets[0]
    if sheet not in names:
        raise InputError(
            f"data file {path} has no sheet '{_shown(sheet)}' (sheets: "
            + ", ".join(f"'{_shown(name)}'" for name in names) + ")"
        )
    return book[sheet]


def _unreadable_xlsx(path: Path, exc: BaseException) -> str:
    detail = (str(exc).splitlines() or [""])[0][:120]
    return (f"data file {path} is not a readable .xlsx workbook "
            f"({type(exc).__name__}{': ' + detail if detail else ''})")
