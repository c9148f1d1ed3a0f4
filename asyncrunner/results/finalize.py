"""Finalization: storing an experiment's metrics, marking it completed, and exports.

This module owns the end of a run (`finalize`) and the result files (`export`,
`EXPORT_COLUMNS`). The figures themselves come from metrics.py, computed from the database
alone, so they are the same after any number of resumes.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

from asyncrunner.db.experiments import set_status
from asyncrunner.results.metrics import MetricsReport, metrics_report
from asyncrunner.vocab import Status

EXPORT_COLUMNS = (
    "result_id", "experiment_id", "incident_id", "narrative_type", "detected", "confidence",
    "indicators", "rationale", "raw_response", "response_sec", "prompt_tokens",
    "completion_tokens", "error_occurred", "error_message", "error_category",
    "attempt_count", "first_error_message", "last_attempt_at", "processed_at",
    "manual_flag_ind", "manual_flag",
)


def export(conn: sqlite3.Connection, experiment_id: str, fmt: str, out: Path) -> Path:
    """Write every result of the experiment (CSV or JSON), atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    cursor = conn.execute(
        f"SELECT {', '.join(EXPORT_COLUMNS)} FROM narrative_results "
        "WHERE experiment_id = ? ORDER BY result_id", (experiment_id,))
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            writer = csv.writer(fh)
            writer.writerow(EXPORT_COLUMNS)
            for row in cursor:
                writer.writerow(tuple(row))
        else:
            fh.write("[\n")
            for i, row in enumerate(cursor):
                record = dict(zip(EXPORT_COLUMNS, row, strict=True))
                fh.write(("," if i else "") + json.dumps(record) + "\n")
            fh.write("]\n")
    tmp.replace(out)
    return out


def finalize(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> dict[str, Any]:
    """Store metrics, mark completed, write exports. Safe to run again.
    Returns {"metrics": the metrics_json dict, "exports": {"csv": path, "json": path}}."""
    report = metrics_report(conn, experiment_id)
    conn.execute("BEGIN IMMEDIATE")
    try:
        _store_metrics(conn, experiment_id, report)
        set_status(conn, experiment_id, Status.COMPLETED)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    paths = {fmt: export(conn, experiment_id, fmt, output_dir / f"{experiment_id}.{fmt}")
             for fmt in ("csv", "json")}
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
