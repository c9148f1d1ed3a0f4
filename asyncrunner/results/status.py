"""`asyncrunner status`: what operators see of experiments, as text or JSON.

This module owns the status listing and the detail view (`collect` gathers, `render_*`
print). The metrics shown are metrics.py's `MetricsReport`: the stored metrics_json of a
completed experiment, passed through unchanged to `--json`.

Reads only. Works while a run is going (WAL readers never block the writer).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncrunner.db import locks, store
from asyncrunner.results.metrics import Confusion, Interval, MetricsReport, metrics_report
from asyncrunner.vocab import Status

RECENT_WINDOW_S = 300


def recent_rate(conn: sqlite3.Connection, experiment_id: str) -> float:
    """Results stored per second over the last five minutes (0 when idle)."""
    since = (datetime.now(UTC) - timedelta(seconds=RECENT_WINDOW_S)).strftime(
        "%Y-%m-%dT%H:%M:%S")
    n: int = conn.execute(
        "SELECT COUNT(*) FROM narrative_results WHERE experiment_id = ? AND processed_at >= ?",
        (experiment_id, since),
    ).fetchone()[0]
    return n / RECENT_WINDOW_S


def list_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [
        {
            "experiment_id": r["experiment_id"], "name": r["experiment_name"],
            "status": r["status"], "done": r["n_narratives_completed"] or 0,
            "total": r["n_narratives_total"] or 0, "errors": r["n_errors"],
            "eta": r["estimated_completion_time"], "start_time": r["start_time"],
        }
        for r in store.list_experiments(conn)
    ]


def render_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no experiments in this database"
    lines = [(f"{'experiment_id':36}  {'status':11}  {'done/total':>13}  {'errors':>6}  "
              f"{'ETA':19}  name")]
    for r in rows:
        eta = r["eta"] if r["status"] == Status.RUNNING and r["eta"] else "-"
        lines.append(f"{r['experiment_id']:36}  {r['status'] or '?':11}  "
                     f"{str(r['done']) + '/' + str(r['total']):>13}  {r['errors']:>6}  "
                     f"{eta:19}  {r['name'] or ''}")
    return "\n".join(lines)


def collect(conn: sqlite3.Connection, db_path: Path, experiment_id: str) -> dict[str, Any] | None:
    row = store.experiment_row(conn, experiment_id)
    if row is None:
        return None
    done, n_errors = store.count_results(conn, experiment_id)
    prompt_tokens, completion_tokens, response_s = store.token_totals(conn, experiment_id)
    lock = locks.probe(db_path, experiment_id)
    config = json.loads(row["config_json"]) if row.get("config_json") else {}
    model_cfg = config.get("model", {})
    info: dict[str, Any] = {
        "experiment_id": experiment_id,
        "name": row["experiment_name"],
        "status": row["status"],
        "model": row["model_name"],
        "provider": row["model_provider"],
        "temperature": row["temperature"],
        "prompt_version": row["prompt_version"],
        "data_file": row["data_file"],
        "done": done,
        "total": row["n_narratives_total"] or 0,
        "errors": n_errors,
        "errors_by_category": store.errors_by_category(conn, experiment_id),
        "rate_per_s": round(recent_rate(conn, experiment_id), 4),
        "eta": row["estimated_completion_time"] if row["status"] == Status.RUNNING else None,
        "start_time": row["start_time"],
        "end_time": row["end_time"],
        "last_progress_update": row["last_progress_update"],
        "failure_reason": row.get("failure_reason"),
        "lock": {"held": lock.held, "pid": (lock.holder or {}).get("pid") if lock.held else None},
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens,
                   "per_s": round((prompt_tokens + completion_tokens) / response_s, 2)
                   if response_s else 0.0},
        "cost_estimate": _cost(model_cfg, prompt_tokens, completion_tokens),
        "log_dir": row["log_dir"],
        "metrics": None,
    }
    if row["status"] == Status.COMPLETED:
        # The stored JSON as it is, so --json shows what finalize recorded.
        info["metrics"] = (json.loads(row["metrics_json"]) if row.get("metrics_json")
                           else metrics_report(conn, experiment_id).to_dict())
    return info


def _cost(model_cfg: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> float | None:
    pin, pout = model_cfg.get("price_per_1k_input"), model_cfg.get("price_per_1k_output")
    if pin is None and pout is None:
        return None
    return round(prompt_tokens / 1000 * (pin or 0) + completion_tokens / 1000 * (pout or 0), 4)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_detail(info: dict[str, Any]) -> str:
    pct = 100.0 * info["done"] / info["total"] if info["total"] else 100.0
    lines = [
        f"experiment {info['experiment_id']}  '{info['name']}'",
        f"  status     {info['status']}" + (
            f" (lock held by live PID {info['lock']['pid']})" if info["lock"]["held"]
            else " (no live process holds its lock)" if info["status"] == Status.RUNNING
            else ""),
        (f"  model      {info['model']} ({info['provider']}, T={info['temperature']}, "
         f"prompt {info['prompt_version']})"),
        f"  progress   {info['done']}/{info['total']} ({pct:.1f}%)" + (
            f", recent rate {info['rate_per_s']:.2f}/s" if info["status"] == Status.RUNNING
            else "")
        + (f", ETA {info['eta']}" if info["eta"] else ""),
        f"  started    {info['start_time']}" + (
            f", ended {info['end_time']}" if info["end_time"] else ""),
        f"  errors     {info['errors']}" + (
            " (" + ", ".join(f"{k}: {v}" for k, v in info["errors_by_category"].items()) + ")"
            if info["errors_by_category"] else ""),
        (f"  tokens     prompt {info['tokens']['prompt']}, completion "
         f"{info['tokens']['completion']} ({info['tokens']['per_s']:.0f} tokens per second "
         "of request time)"),
    ]
    if info["cost_estimate"] is not None:
        lines.append(f"  cost est.  {info['cost_estimate']}")
    if info["failure_reason"]:
        lines.append(f"  reason     {info['failure_reason']}")
    if info["metrics"]:
        lines += _metrics_lines(MetricsReport.from_dict(info["metrics"]))
    return "\n".join(lines)


def _metrics_lines(report: MetricsReport) -> list[str]:
    lines = ["  metrics    (results with a manual label and no error; 95% Wilson CI)",
             (f"    {'set':8} {'n':>6} {'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} "
              f"{'precision':>22} {'recall':>22} {'F1':>6} {'accuracy':>6}")]
    lines += [_metrics_row(key, m) for key, m in report.rows()]
    lines.append(f"    not scored: {report.unscored.errors} errors, "
                 f"{report.unscored.unlabelled} without a manual label")
    return lines


def _metrics_row(key: str, m: Confusion) -> str:
    return (f"    {key:8} {m.n:>6} {m.tp:>5} {m.fp:>5} {m.tn:>5} {m.fn:>5} "
            f"{_with_ci(m.precision, m.precision_interval):>22} "
            f"{_with_ci(m.recall, m.recall_interval):>22} "
            f"{_fmt(m.f1):>6} {_fmt(m.accuracy):>6}")


def _with_ci(value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f},{ci[1]:.3f}]" if ci else f"{value:.3f}"
