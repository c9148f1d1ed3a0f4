"""`asyncrunner adjudicate`: narratives worth a human look out to a workbook, decisions back in.

This module owns the database side of adjudication; the workbook itself (layout, trust,
text safety) is workbook.py's.

Export reads, never writes. The experiments are the ids given, or every experiment of a
study (by cell, then repeat); they must share one data checksum, as a workbook is about
one set of narratives. A narrative is worth a look when any experiment's answer is a false
positive or a false negative against its manual label (labelled narratives, answers that
are not errors), or when the experiments' answers disagree (errors ignored). One row per
narrative, by incident id then type; the workbook's source is the study id, or
`experiments:<id>,<id>...` (sorted ids), so an import finds the same experiments again.
An export with nothing to review still writes its (empty) workbook, so the file at `out`
always matches the database as it is now.

Import writes one transaction. The source must resolve to experiments of this database
with one data checksum, and every decided key must be a narrative of that checksum with a
result in those experiments, or the whole workbook is refused. Decisions go to label set
'adjudicated' (labels.py says how they are scored); the manual labels are never touched.
A decision whose label and note are already stored is left as it is, so importing the
same workbook twice writes nothing the second time; a changed one replaces the stored one.
Blank, "unsure" and deleted rows leave any stored decision in place.

Narrative text goes only into the workbook, never into a message or a log.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asyncrunner.clock import utc_now
from asyncrunner.db.schema import transaction
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results.labels import ADJUDICATED
from asyncrunner.results.workbook import (
    CellAnswer,
    Decision,
    ReviewImport,
    ReviewRow,
    cell_text,
    read_review_workbook,
    write_review_workbook,
)

EXPERIMENTS_SOURCE = "experiments:"
_NAME_LIMIT = 80                          # characters of a cell name in the column headers


@dataclass(frozen=True, slots=True)
class Experiment:
    experiment_id: str
    name: str | None
    data_checksum: str | None
    study_cell: str | None
    study_repeat: int | None


@dataclass(frozen=True, slots=True)
class _Answer:
    detected: int | None                  # None: an error (or no answer stored)
    label: int | None                     # the manual label stored with the result
    confidence: float | None
    indicators: str | None
    rationale: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Found:
    rows: list[ReviewRow]
    n_fp: int                             # rows with a false positive in any experiment
    n_fn: int                             # rows with a false negative in any experiment
    n_disagree: int                       # other rows: the experiments' answers disagree
    n_missing: int                        # flagged, but not in source_narratives: left out


# -- choosing the experiments --------------------------------------------------------------

_EXPERIMENT_COLUMNS = ("experiment_id, experiment_name, data_checksum, study_cell, "
                       "study_repeat")


def _by_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> list[Experiment]:
    """These experiments in the order given (once each); RefusedError naming the first
    id this database does not have."""
    chosen: list[Experiment] = []
    for experiment_id in dict.fromkeys(ids):
        row = conn.execute(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments "
                           "WHERE experiment_id = ?", (experiment_id,)).fetchone()
        if row is None:
            raise RefusedError(f"no experiment {experiment_id} in this database; "
                               "list them with `asyncrunner status`")
        chosen.append(Experiment(*row))
    if not chosen:
        raise UsageError("no experiments given")
    return chosen


def _by_study(conn: sqlite3.Connection, study_id: str) -> list[Experiment]:
    """The experiments of a study by cell, then repeat; RefusedError if there are none."""
    rows = conn.execute(
        f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE study_id = ? "
        "ORDER BY study_cell, study_repeat, experiment_id", (study_id,)).fetchall()
    if not rows:
        raise RefusedError(f"no experiments of study {study_id} in this database; "
                           "list them with `asyncrunner status`")
    return [Experiment(*row) for row in rows]


def _one_checksum(experiments: Sequence[Experiment]) -> str:
    checksums = {e.data_checksum for e in experiments}
    if None in checksums or "" in checksums:
        missing = next(e for e in experiments if not e.data_checksum)
        raise UsageError(f"experiment {missing.experiment_id} has no data checksum recorded; "
                         "its narratives cannot be adjudicated")
    if len(checksums) > 1:
        raise UsageError(
            f"the experiments ran on {len(checksums)} different data files (checksums); a "
            "review workbook is about one set of narratives: export each data file's "
            "experiments separately")
    (checksum,) = checksums
    assert checksum is not None
    return checksum


def experiments_source(ids: Iterable[str]) -> str:
    """The workbook source of an export by experiment ids: the same for the same set."""
    return EXPERIMENTS_SOURCE + ",".join(sorted(set(ids)))


def cell_names(experiments: Sequence[Experiment]) -> list[str]:
    """One column-header name per experiment: a study cell and its repeat, else the
    experiment's name, else its short id; colliding names get the (short, then full) id."""
    bases = [_base_name(e) for e in experiments]
    folded = Counter(_fold(name) for name in bases)
    clashing = {name for name, count in folded.items() if count > 1}
    for length in (8, None):              # the short id, then the whole id
        names = [f"{base} ({e.experiment_id[:length]})" if _fold(base) in clashing else base
                 for base, e in zip(bases, experiments, strict=True)]
        if len({_fold(name) for name in names}) == len(names):
            return names
    return [f"{base} ({i})" for i, base in enumerate(bases, start=1)]


def _base_name(experiment: Experiment) -> str:
    if experiment.study_cell:
        name = " ".join(experiment.study_cell.split())[:_NAME_LIMIT]
        if experiment.study_repeat is not None:
            name = f"{name} #{experiment.study_repeat}"
    else:
        name = " ".join((experiment.name or "").split())[:_NAME_LIMIT]
    return name or experiment.experiment_id[:8]


def _fold(name: str) -> str:
    # As workbook.review_headers compares headers.
    return " ".join(cell_text(name).split()).casefold()


# -- export --------------------------------------------------------------------------------

def export_workbook(conn: sqlite3.Connection, ids: list[str], study_id: str | None,
                    out: Path) -> str:
    """Write the review workbook of these experiments (or this study's) to `out`; return
    the one-line summary. `conn` may be read-only: nothing is written to it."""
    if ids and study_id is not None:
        raise UsageError("adjudicate export takes experiment ids or --study, not both")
    # One read transaction, so a run committing meanwhile cannot mix two states.
    conn.execute("BEGIN")
    try:
        experiments = _by_study(conn, study_id) if study_id is not None else _by_ids(conn, ids)
        checksum = _one_checksum(experiments)
        found = _review_rows(conn, experiments, checksum)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    source = study_id if study_id is not None else experiments_source(
        e.experiment_id for e in experiments)
    try:
        write_review_workbook(out, source=source, cell_names=cell_names(experiments),
                              rows=found.rows)
    except ValueError as exc:             # e.g. too many experiment ids for one cell
        raise UsageError(f"cannot write {out}: {exc}") from None
    return _export_summary(out, found, len(experiments))


def _export_summary(out: Path, found: _Found, n_experiments: int) -> str:
    source = f"from {_count(n_experiments, 'experiment')}"
    if found.rows:
        line = (f"wrote {out}: {_count(len(found.rows), 'narrative')} to review "
                f"(FP {found.n_fp}, FN {found.n_fn}, disagreements {found.n_disagree}) {source}")
    else:
        line = (f"wrote {out}: nothing to review (no false positive, false negative or "
                f"disagreement) {source}; the workbook has no rows")
    if found.n_missing:
        line += (f"; {_count(found.n_missing, 'narrative')} left out: not in the database's "
                 "source narratives of this data file")
    return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


# The narratives worth a look, by (incident id, type), over the chosen experiments.
_FLAGGED = """
WITH flagged AS (
  SELECT incident_id, narrative_type FROM narrative_results
  WHERE experiment_id IN ({ids})
  GROUP BY incident_id, narrative_type
  HAVING SUM(error_occurred = 0 AND detected = 1 AND manual_flag_ind = 0) > 0
      OR SUM(error_occurred = 0 AND detected = 0 AND manual_flag_ind = 1) > 0
      OR (SUM(error_occurred = 0 AND detected = 1) > 0
          AND SUM(error_occurred = 0 AND detected = 0) > 0)
)
"""


def _review_rows(conn: sqlite3.Connection, experiments: Sequence[Experiment],
                 checksum: str) -> _Found:
    ids = [e.experiment_id for e in experiments]
    flagged = _FLAGGED.format(ids=_placeholders(len(ids)))
    answers: dict[tuple[str, str], dict[str, _Answer]] = {}
    for row in conn.execute(
            flagged + "SELECT r.incident_id, r.narrative_type, r.experiment_id, r.detected, "
            "r.manual_flag_ind, r.confidence, r.indicators, r.rationale, r.error_occurred, "
            "r.error_category FROM narrative_results r JOIN flagged f "
            "ON f.incident_id = r.incident_id AND f.narrative_type = r.narrative_type "
            f"WHERE r.experiment_id IN ({_placeholders(len(ids))})", [*ids, *ids]):
        errored = bool(row[8]) or row[3] is None
        answers.setdefault((row[0], row[1]), {})[row[2]] = _Answer(
            detected=None if errored else int(row[3]), label=row[4], confidence=row[5],
            indicators=row[6], rationale=row[7],
            error=(row[9] or "unknown") if errored else None)
    texts: dict[tuple[str, str], tuple[str, int | None]] = {}
    for row in conn.execute(
            flagged + "SELECT s.incident_id, s.narrative_type, s.narrative_text, "
            "s.manual_flag_ind FROM source_narratives s JOIN flagged f "
            "ON f.incident_id = s.incident_id AND f.narrative_type = s.narrative_type "
            "WHERE s.data_checksum = ? ORDER BY s.narrative_id", [*ids, checksum]):
        texts.setdefault((row[0], row[1]), (row[2] or "", row[3]))   # the first load wins
    rows: list[ReviewRow] = []
    n_fp = n_fn = n_disagree = 0
    for key in sorted(answers):
        if key not in texts:
            continue
        by_experiment = answers[key]
        text, source_label = texts[key]
        reason, fp, fn = _reason([by_experiment.get(i) for i in ids], len(ids))
        n_fp += fp
        n_fn += fn
        n_disagree += not (fp or fn)
        labels = [a.label for a in by_experiment.values() if a.label is not None]
        manual = labels[0] if labels else source_label
        rows.append(ReviewRow(
            incident_id=key[0], narrative_type=key[1], text=text,
            manual=None if manual is None else bool(manual), reason=reason,
            answers=tuple(_cell_answer(by_experiment.get(i)) for i in ids)))
    return _Found(rows=rows, n_fp=n_fp, n_fn=n_fn, n_disagree=n_disagree,
                  n_missing=len(answers.keys() - texts.keys()))


def _reason(answers: Sequence[_Answer | None], n_experiments: int) -> tuple[str, bool, bool]:
    """Why a narrative is in the workbook, and whether it has a false positive / negative."""
    answered = [a for a in answers if a is not None and a.detected is not None]
    scored = [a for a in answered if a.label is not None]
    fp = sum(a.detected == 1 and a.label == 0 for a in scored)
    fn = sum(a.detected == 0 and a.label == 1 for a in scored)
    parts = []
    for n, what in ((fp, "false positive"), (fn, "false negative")):
        if n:
            parts.append(what if n_experiments == 1 else f"{what} in {n} of {len(scored)}")
    if not parts:
        yes = sum(a.detected == 1 for a in answered)
        parts.append(f"cells disagree ({yes} yes, {len(answered) - yes} no)")
    return "; ".join(parts), fp > 0, fn > 0


def _cell_answer(answer: _Answer | None) -> CellAnswer:
    if answer is None:
        return CellAnswer(detected=None, confidence=None, indicators="", rationale="",
                          error="no result")
    return CellAnswer(
        detected=None if answer.detected is None else bool(answer.detected),
        confidence=answer.confidence, indicators=_indicators(answer.indicators),
        rationale=answer.rationale or "", error=answer.error)


def _indicators(stored: str | None) -> str:
    """A stored JSON array of indicators as one '; '-joined line (other text as it is)."""
    if not stored:
        return ""
    try:
        items = json.loads(stored)
    except ValueError:
        return stored
    if not isinstance(items, list):
        return stored
    return "; ".join(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
                     for item in items)


# -- import --------------------------------------------------------------------------------

def import_workbook(conn: sqlite3.Connection, path: Path) -> str:
    """Store a reviewed workbook's decisions as label set 'adjudicated', in one
    transaction; return the one-line summary. Refused as a whole (nothing written) when the
    workbook cannot be trusted or is not about this database's narratives."""
    review = read_review_workbook(path)   # refusals about the file itself: before any write
    with transaction(conn):
        experiments = _resolve_source(conn, review.source, path)
        checksum = _one_checksum(experiments)
        _check_keys(conn, review.decisions, [e.experiment_id for e in experiments], checksum,
                    path)
        new, changed, unchanged = _store(conn, review, checksum)
    return (f"imported {path}: {_count(len(review.decisions), 'decision')} stored "
            f"({new} new, {changed} changed, {unchanged} unchanged) in label set "
            f"'{ADJUDICATED}'; {review.undecided} left undecided")


def _resolve_source(conn: sqlite3.Connection, source: str, path: Path) -> list[Experiment]:
    """The experiments a workbook was exported from, found again in this database."""
    if source.startswith(EXPERIMENTS_SOURCE):
        ids = source[len(EXPERIMENTS_SOURCE):].split(",")
        have = {row[0] for row in conn.execute(
            f"SELECT experiment_id FROM experiments WHERE experiment_id IN "
            f"({_placeholders(len(ids))})", ids)}
        missing = [i for i in ids if i not in have]
        if not missing:
            return _by_ids(conn, ids)
        what = f"experiment {_quote(missing[0])}"
    else:
        if conn.execute("SELECT 1 FROM experiments WHERE study_id = ? LIMIT 1",
                        (source,)).fetchone():
            return _by_study(conn, source)
        what = f"study {_quote(source)}"
    raise RefusedError(
        f"review workbook {path} was exported from {what}, which is not in this database; "
        "import it into the database it was exported from")


def _check_keys(conn: sqlite3.Connection, decisions: Sequence[Decision], ids: Sequence[str],
                checksum: str, path: Path) -> None:
    if not decisions:
        return
    # As plain tuples: the connection may hand back sqlite3.Row, which never equals one.
    narratives = {(row[0], row[1]) for row in conn.execute(
        "SELECT incident_id, narrative_type FROM source_narratives WHERE data_checksum = ?",
        (checksum,))}
    in_results = (f"SELECT 1 FROM narrative_results WHERE experiment_id IN "
                  f"({_placeholders(len(ids))}) AND incident_id = ? AND narrative_type = ? "
                  "LIMIT 1")
    for d in decisions:
        key = (d.incident_id, d.narrative_type)
        if key not in narratives or conn.execute(in_results, [*ids, *key]).fetchone() is None:
            raise RefusedError(
                f"review workbook {path}: incident {_quote(d.incident_id)} type "
                f"{_quote(d.narrative_type)} is not a narrative of its experiments in this "
                "database; keys that are not part of the experiment are refused, nothing "
                "was imported")


def _store(conn: sqlite3.Connection, review: ReviewImport,
           checksum: str) -> tuple[int, int, int]:
    """Write the new and changed decisions; (new, changed, unchanged)."""
    new = changed = unchanged = 0
    imported_at = utc_now()
    for d in review.decisions:
        key = (ADJUDICATED, checksum, d.incident_id, d.narrative_type)
        stored = conn.execute(
            "SELECT label, note FROM label_sets WHERE label_set = ? AND data_checksum = ? "
            "AND incident_id = ? AND narrative_type = ?", key).fetchone()
        label, note = int(d.label), d.note or None
        if stored is not None and (stored[0], stored[1] or None) == (label, note):
            unchanged += 1
            continue
        if stored is None:
            new += 1
        else:
            changed += 1
        conn.execute(
            "INSERT INTO label_sets (label_set, data_checksum, incident_id, narrative_type, "
            "label, note, source, workbook_checksum, imported_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (label_set, data_checksum, incident_id, narrative_type) DO UPDATE SET "
            "label = excluded.label, note = excluded.note, source = excluded.source, "
            "workbook_checksum = excluded.workbook_checksum, "
            "imported_at = excluded.imported_at",
            (*key, label, note, review.source, review.checksum, imported_at))
    return new, changed, unchanged


def _quote(value: str) -> str:
    """A value from the workbook in a one-line message, at most about 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
