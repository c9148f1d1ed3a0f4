"""Finalization: metrics and exports, computed from the database alone.

Because nothing here uses in-memory state of the run, the numbers are the same after any
number of resumes. Metrics count results with a manual label and no error; a narrative
whose label is blank (unknown) or whose call failed is reported but not scored.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .experiments import set_status

EXPORT_COLUMNS = (
    "result_id", "experiment_id", "incident_id", "narrative_type", "detected", "confidence",
    "indicators", "rationale", "raw_response", "response_sec", "prompt_tokens",
    "completion_tokens", "error_occurred", "error_message", "error_category",
    "attempt_count", "first_error_message", "last_attempt_at", "processed_at",
    "manual_flag_ind", "manual_flag",
)


@dataclass(frozen=True, slots=True)
class Metrics:
    n_tp: int
    n_fp: int
    n_tn: int
    n_fn: int

    @property
    def n(self) -> int:
        return self.n_tp + self.n_fp + self.n_tn + self.n_fn

    @staticmethod
    def _ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    @property
    def precision(self) -> float | None:
        return self._ratio(self.n_tp, self.n_tp + self.n_fp)

    @property
    def recall(self) -> float | None:
        return self._ratio(self.n_tp, self.n_tp + self.n_fn)

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None or p + r == 0:
            return None if p is None or r is None else 0.0
        return 2 * p * r / (p + r)

    @property
    def accuracy(self) -> float | None:
        return self._ratio(self.n_tp + self.n_tn, self.n)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "n": self.n, "precision": self.precision, "recall": self.recall,
            "f1": self.f1, "accuracy": self.accuracy,
        }


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval for a proportion; None when there is nothing to count."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


_CONFUSION_SQL = """
SELECT
  COALESCE(SUM(detected = 1 AND manual_flag_ind = 1), 0),
  COALESCE(SUM(detected = 1 AND manual_flag_ind = 0), 0),
  COALESCE(SUM(detected = 0 AND manual_flag_ind = 0), 0),
  COALESCE(SUM(detected = 0 AND manual_flag_ind = 1), 0)
FROM narrative_results
WHERE experiment_id = ? AND error_occurred = 0 AND manual_flag_ind IS NOT NULL
  AND detected IS NOT NULL {extra}
"""


def confusion(conn: sqlite3.Connection, experiment_id: str,
              narrative_type: str | None = None) -> Metrics:
    if narrative_type is None:
        row = conn.execute(_CONFUSION_SQL.format(extra=""), (experiment_id,)).fetchone()
    else:
        row = conn.execute(_CONFUSION_SQL.format(extra="AND narrative_type = ?"),
                           (experiment_id, narrative_type)).fetchone()
    return Metrics(*(int(v) for v in row))


def metrics_report(conn: sqlite3.Connection, experiment_id: str) -> dict[str, Any]:
    """Overall and per narrative type, with 95 % Wilson intervals."""
    types = [r[0] for r in conn.execute(
        "SELECT DISTINCT narrative_type FROM narrative_results WHERE experiment_id = ? "
        "ORDER BY 1", (experiment_id,))]
    report: dict[str, Any] = {}
    for key, m in [("overall", confusion(conn, experiment_id))] + [
        (t, confusion(conn, experiment_id, t)) for t in types
    ]:
        entry = m.as_dict()
        entry["intervals"] = {
            "precision": wilson_interval(m.n_tp, m.n_tp + m.n_fp),
            "recall": wilson_interval(m.n_tp, m.n_tp + m.n_fn),
            "accuracy": wilson_interval(m.n_tp + m.n_tn, m.n),
        }
        report[key] = entry
    unscored = conn.execute(
        "SELECT COALESCE(SUM(error_occurred = 1), 0), "
        "COALESCE(SUM(error_occurred = 0 AND manual_flag_ind IS NULL), 0) "
        "FROM narrative_results WHERE experiment_id = ?", (experiment_id,)).fetchone()
    report["unscored"] = {"errors": int(unscored[0]), "unlabelled": int(unscored[1])}
    return report


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
                fh.write(("," if i else "") + json.dumps(dict(zip(EXPORT_COLUMNS, row, strict=True))) + "\n")
            fh.write("]\n")
    tmp.replace(out)
    return out


def finalize(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> dict[str, Any]:
    """Store metrics, mark completed, write exports. Safe to run again."""
    report = metrics_report(conn, experiment_id)
    conn.execute("BEGIN IMMEDIATE")
    try:
        _store_metrics(conn, experiment_id, report)
        set_status(conn, experiment_id, "completed")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    paths = {fmt: export(conn, experiment_id, fmt, output_dir / f"{experiment_id}.{fmt}")
             for fmt in ("csv", "json")}
    return {"metrics": report, "exports": {k: str(v) for k, v in paths.items()}}


def _store_metrics(conn: sqlite3.Connection, experiment_id: str,
                   report: dict[str, Any]) -> None:
    o = report["overall"]
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
        {"tp": o["n_tp"], "fp": o["n_fp"], "tn": o["n_tn"], "fn": o["n_fn"],
         "precision": o["precision"], "recall": o["recall"], "f1": o["f1"],
         "accuracy": o["accuracy"], "json": json.dumps(report), "id": experiment_id},
    )
