"""Finalization: storing an experiment's metrics, marking it completed, and exports.

This module owns the end of a run (`finalize`) and the result files (`export`,
`EXPORT_COLUMNS`). The figures themselves come from metrics.py, computed from the database
alone, so they are the same after any number of resumes.
"""

from __future__ import annotations

import csv
import heapq
import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

from asyncrunner.db.experiments import set_status
from asyncrunner.db.schema import transaction
from asyncrunner.results.metrics import MetricsReport, metrics_report
from asyncrunner.vocab import Status

EXPORT_COLUMNS = (
    "result_id", "experiment_id", "incident_id", "narrative_type", "detected", "confidence",
    "indicators", "rationale", "raw_response", "response_sec", "prompt_tokens",
    "completion_tokens", "error_occurred", "error_message", "error_category",
    "attempt_count", "first_error_message", "last_attempt_at", "processed_at",
    "manual_flag_ind", "manual_flag",
)
_COLUMNS_SQL = ", ".join(EXPORT_COLUMNS)
WRITE_BUFFER = 1 << 20


TEXT_COLUMN = "narrative_text"
# OWASP's CSV-injection rule: a text cell starting with one of these is a formula to a
# spreadsheet. Such cells get a leading apostrophe (shown as text, value still readable).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_RISKY_FIRST = frozenset(_FORMULA_START)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV/xlsx cell value that no spreadsheet runs as a formula; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) \
            and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def export(conn: sqlite3.Connection, experiment_id: str, fmt: str, out: Path, *,
           with_text: bool = False) -> Path:
    """Write every result of the experiment (CSV or JSON) to `out`: see `export_files`."""
    return export_files(conn, experiment_id, {fmt: out}, with_text=with_text)[fmt]


def export_files(conn: sqlite3.Connection, experiment_id: str, outs: Mapping[str, Path], *,
                 with_text: bool = False) -> dict[str, Path]:
    """Write every result of the experiment to each of `outs` (format csv|json -> path),
    all from one reading of the rows, each atomically (temp file + rename).

    Rows stream from the database to the files one at a time, in result_id order, so
    memory stays flat however many results there are; they are read in one read
    transaction, so an export taken while the experiment runs is one consistent snapshot.
    `with_text` adds the narrative text (off by default: the text is the confidential part
    of the data). CSV cells are made spreadsheet-safe; JSON keeps every value as stored.
    A failure leaves none of the files behind (those already renamed are removed)."""
    unknown = set(outs) - {"csv", "json"}
    if unknown:
        raise ValueError(f"unknown export format(s): {', '.join(sorted(unknown))}")
    columns = (*EXPORT_COLUMNS, TEXT_COLUMN) if with_text else EXPORT_COLUMNS
    tmps = {fmt: out.with_name(out.name + ".partial") for fmt, out in outs.items()}
    renamed: list[Path] = []
    own_transaction = not conn.in_transaction
    if own_transaction:
        conn.execute("BEGIN")
    try:
        with ExitStack() as stack:
            files = {}
            for fmt, tmp in tmps.items():
                tmp.parent.mkdir(parents=True, exist_ok=True)
                files[fmt] = stack.enter_context(
                    tmp.open("w", encoding="utf-8", newline="", buffering=WRITE_BUFFER))
            _write_rows(files.get("csv"), files.get("json"), columns,
                        rows_with_text(conn, experiment_id) if with_text
                        else result_rows(conn, experiment_id))
        for fmt, tmp in tmps.items():
            tmp.replace(outs[fmt])
            renamed.append(outs[fmt])
    except BaseException:
        for path in (*tmps.values(), *renamed):
            path.unlink(missing_ok=True)
        raise
    finally:
        if own_transaction and conn.in_transaction:
            conn.execute("ROLLBACK")             # it only read
    return dict(outs)


def _write_rows(csv_file: IO[str] | None, json_file: IO[str] | None,
                columns: tuple[str, ...], rows: Iterator[tuple[Any, ...]]) -> None:
    """Each row to the CSV and/or the JSON file."""
    writer = csv.writer(csv_file) if csv_file is not None else None
    if writer is not None:
        writer.writerow(columns)
    if json_file is not None:
        json_file.write("[\n")
    separator = ""
    risky = _RISKY_FIRST
    for row in rows:
        if writer is not None:
            # A row with no text cell starting like a formula (nearly all) is written as
            # it is: no Python call per cell.
            writer.writerow(tuple(map(spreadsheet_safe, row))
                            if any(type(v) is str and v[:1] in risky for v in row) else row)
        if json_file is not None:
            json_file.write(separator + json.dumps(dict(zip(columns, row, strict=True)))
                            + "\n")
            separator = ","
    if json_file is not None:
        json_file.write("]\n")


# error_occurred is 0 or 1; anything else (NULL in a database of an older version) is read
# by the last stream, which SQLite sorts (it is empty in practice).
_STREAMS = ("error_occurred = 0", "error_occurred = 1",
            "(error_occurred IS NULL OR error_occurred NOT IN (0, 1))")


def result_rows(conn: sqlite3.Connection, experiment_id: str) -> Iterator[tuple[Any, ...]]:
    """The experiment's results as plain tuples of EXPORT_COLUMNS, in result_id order,
    streamed (call it inside a read transaction for one snapshot).

    `ORDER BY result_id` over all of the experiment's rows would make SQLite sort them in a
    temporary b-tree, spilled to a temp file as large as the results. The index on
    (experiment_id, error_occurred) instead yields each error_occurred value's rows already
    in result_id order, so each is read as its own stream and the streams are merged, one
    row of each held at a time."""
    streams = []
    for match in _STREAMS:
        cursor = conn.cursor()
        cursor.row_factory = None            # tuples: no Row object per result
        streams.append(cursor.execute(
            f"SELECT {_COLUMNS_SQL} FROM narrative_results WHERE experiment_id = ? "
            f"AND {match} ORDER BY result_id", (experiment_id,)))
    return heapq.merge(*streams, key=itemgetter(0))      # result_id comes first


def rows_with_text(conn: sqlite3.Connection,
                   experiment_id: str) -> Iterator[tuple[Any, ...]]:
    """result_rows plus each narrative's text from `source_narratives` of the experiment's
    data checksum (the database is the only source after ingest)."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return cursor.execute(
        f"SELECT {', '.join('r.' + c for c in EXPORT_COLUMNS)}, s.narrative_text "
        "FROM narrative_results r LEFT JOIN source_narratives s "
        "ON s.data_checksum = (SELECT data_checksum FROM experiments WHERE experiment_id = ?) "
        "AND s.incident_id = r.incident_id AND s.narrative_type = r.narrative_type "
        "WHERE r.experiment_id = ? ORDER BY r.result_id", (experiment_id, experiment_id))


def finalize(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> dict[str, Any]:
    """Write exports, then store metrics and mark completed. Safe to run again.

    The exports come first so that an experiment is only completed with its exports on
    disk: if they fail (a full disk), it stays resumable and a resume finishes it.
    Returns {"metrics": the metrics_json dict, "exports": {"csv": path, "json": path}}."""
    report = metrics_report(conn, experiment_id)
    paths = export_files(conn, experiment_id,
                         {fmt: output_dir / f"{experiment_id}.{fmt}" for fmt in ("csv", "json")})
    with transaction(conn):
        _store_metrics(conn, experiment_id, report)
        set_status(conn, experiment_id, Status.COMPLETED)
    return {"metrics": report.to_dict(), "exports": {k: str(v) for k, v in paths.items()}}


def _store_metrics(conn: sqlite3.Connection, experiment_id: str,
                   report: MetricsReport) -> None:
    o = report.overall
    conn.execute(
        """UPDATE experiments SET n_tp = :tp, n_fp = :fp, n_tn = :tn, n_fn = :fn,
           precision = :precision, recall = :recall, f1 = :f1, accuracy = :accuracy,
           metrics_json = :json,
           n_narratives_completed = (SELECT COUNT(*) FROM narrative_results
                                     WHERE experiment_id = :id),
           n_narratives_processed = (SELECT COUNT(*) FROM narrative_results
                                     WHERE experiment_id = :id),
           estimated_completion_time = NULL
           WHERE experiment_id = :id""",
        {"tp": o.tp, "fp": o.fp, "tn": o.tn, "fn": o.fn,
         "precision": o.precision, "recall": o.recall, "f1": o.f1,
         "accuracy": o.accuracy, "json": json.dumps(report.to_dict()), "id": experiment_id},
    )
