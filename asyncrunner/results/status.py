"""`asyncrunner status`: what operators see of experiments, as text or JSON.

This module owns the status listing and the detail view (`collect` gathers, `render_*`
print). The metrics shown are metrics.py's `MetricsReport`: against the manual labels, the
stored metrics_json of a completed experiment, passed through unchanged to `--json`;
against the adjudicated ones (`--labels adjudicated`), computed from the database, with
the number of reviewer decisions they take in. Either way the label set is named.

Honest by construction:
  * `alive`: whether a live process holds the experiment's lock (an OS lock, or a bare-PID
    lock file of a running process as the R version wrote). A `running` experiment nobody
    works on is shown as `running (dead)`, and no experiment shows an ETA unless a live
    process works on it (an interrupted run's last ETA is in the past, not a forecast).
  * the recent rate is results per second over the real window: the last five minutes, or
    since the live session started if that is shorter (114 results in 11 s is 10/s, not
    114/300).
  * a retry of error rows shows its own progress, k of E errors, not the experiment's N/N.
  * what the data file lost at ingest (db/drops.py), the sessions, the configuration and
    metrics history, and the provenance are part of the detail.

Reads only. Works while a run is going (WAL readers never block the writer).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncrunner.db import batches, drops, locks, sessions, store
from asyncrunner.errors import RefusedError
from asyncrunner.llm.router import endpoint_line
from asyncrunner.results.metrics import (
    Confusion,
    Interval,
    MetricsReport,
    case_metrics,
    label_decisions,
    metrics_report,
)
from asyncrunner.vocab import Status

RECENT_WINDOW_S = 300
_UTC_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"   # narrative_results.processed_at, sessions.started_at


def _parse_utc(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, _UTC_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def recent_rate(conn: sqlite3.Connection, experiment_id: str, session_start: str | None = None,
                now: datetime | None = None) -> tuple[float, float | None]:
    """(results stored per second, window in seconds) over the last five minutes, or since
    `session_start` when that is later; without a session start, since the first result in
    the window. (0.0, None) when there is nothing to measure."""
    now = now or datetime.now(UTC)
    start = now - timedelta(seconds=RECENT_WINDOW_S)
    started = _parse_utc(session_start)
    if started is not None and started > start:
        start = started
    n, first = conn.execute(
        "SELECT COUNT(*), MIN(processed_at) FROM narrative_results WHERE experiment_id = ? "
        "AND processed_at >= ?", (experiment_id, start.strftime(_UTC_FORMAT))).fetchone()
    if started is None and first:
        start = max(start, _parse_utc(first) or start)
    window = (now - start).total_seconds()
    if not n or window <= 0:
        return 0.0, (window if window > 0 else None)
    return n / window, window


def _alive(db_path: Path, experiment_id: str) -> tuple[bool, Any]:
    try:
        state = locks.probe(db_path, experiment_id)
    except RefusedError:  # an id that is no UUID (R era) has no lock file
        return False, None
    return state.held, (state.holder or {}).get("pid") if state.held else None


def _live_session(conn: sqlite3.Connection, experiment_id: str) -> dict[str, Any] | None:
    rows = sessions.list_sessions(conn, experiment_id)
    open_rows = [r for r in rows if r["ended_at"] is None and r["ended_as"] is None]
    return open_rows[-1] if open_rows else None


def _display(status: str | None, alive: bool, retry: dict[str, Any] | None) -> str:
    if status != Status.RUNNING:
        return str(status or "?")
    if not alive:
        return "running (dead)"
    if retry:
        return f"running (retry {retry['done']}/{retry['target']})"
    return "running"


def _retry(session: dict[str, Any] | None) -> dict[str, Any] | None:
    if not session or session["intent"] != "retry-errors":
        return None
    return {"done": session["n_done"], "target": session["target"],
            "errors_left": session["n_errors"],
            "categories": session["retry_categories"]}


def list_rows(conn: sqlite3.Connection, db_path: Path | None = None) -> list[dict[str, Any]]:
    out = []
    dropped = {r[0]: r[1] for r in conn.execute(
        "SELECT e.experiment_id, (SELECT COALESCE(n_blank, 0) + COALESCE(n_duplicates, 0) + "
        "COALESCE(n_no_id, 0) FROM ingests i WHERE i.data_checksum = e.data_checksum "
        "ORDER BY loaded_at LIMIT 1) FROM experiments e")}
    for r in store.list_experiments(conn):
        alive, retry = False, None
        if r["status"] == Status.RUNNING and db_path is not None:
            alive, _ = _alive(db_path, r["experiment_id"])
            if alive:
                retry = _retry(_live_session(conn, r["experiment_id"]))
        out.append({
            "experiment_id": r["experiment_id"], "name": r["experiment_name"],
            "status": r["status"], "alive": alive,
            "status_display": _display(r["status"], alive, retry),
            "done": r["n_narratives_completed"] or 0,
            "total": r["n_narratives_total"] or 0, "errors": r["n_errors"],
            "retry": retry, "dropped": dropped.get(r["experiment_id"]),
            "eta": r["estimated_completion_time"] if alive else None,
            "start_time": r["start_time"],
        })
    return out


def render_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no experiments in this database"
    lines = [(f"{'experiment_id':36}  {'status':22}  {'done/total':>13}  {'errors':>6}  "
              f"{'ETA':19}  name")]
    for r in rows:
        eta = r["eta"] or "-"
        lines.append(f"{r['experiment_id']:36}  {r['status_display']:22}  "
                     f"{str(r['done']) + '/' + str(r['total']):>13}  {r['errors']:>6}  "
                     f"{eta:19}  {r['name'] or ''}")
    return "\n".join(lines)


def collect(conn: sqlite3.Connection, db_path: Path, experiment_id: str, *,
            labels: str = "manual") -> dict[str, Any] | None:
    """Everything the detail view shows, as JSON-ready values; None for an unknown id.
    `labels` ("manual" or "adjudicated") is what the metrics are scored against."""
    row = store.experiment_row(conn, experiment_id)
    if row is None:
        return None
    done, n_errors = store.count_results(conn, experiment_id)
    prompt_tokens, completion_tokens, response_s = store.token_totals(conn, experiment_id)
    answers = store.answer_stats(conn, experiment_id)
    alive, holder_pid = _alive(db_path, experiment_id)
    config = json.loads(row["config_json"]) if row.get("config_json") else {}
    model_cfg = config.get("model", {})
    all_sessions = sessions.list_sessions(conn, experiment_id)
    live = _live_session(conn, experiment_id) if alive else None
    rate, window = (recent_rate(conn, experiment_id, live["started_at"] if live else None)
                    if alive else (0.0, None))
    retry = _retry(live)
    decisions = label_decisions(conn, experiment_id)
    adjudicated = labels != "manual"
    info: dict[str, Any] = {
        "experiment_id": experiment_id,
        "name": row["experiment_name"],
        "status": row["status"],
        "alive": alive,
        "status_display": _display(row["status"], alive, retry),
        "model": row["model_name"],
        "provider": row["model_provider"],
        "temperature": row["temperature"],
        "prompt_version": row["prompt_version"],
        "data_file": row["data_file"],
        "data_checksum": row["data_checksum"],
        "done": done,
        "total": row["n_narratives_total"] or 0,
        "errors": n_errors,
        "errors_by_category": store.errors_by_category(conn, experiment_id),
        "retry": retry,
        "rate_per_s": round(rate, 4),
        "rate_window_s": round(window, 1) if window is not None else None,
        "eta": row["estimated_completion_time"] if alive else None,
        "start_time": row["start_time"],
        "end_time": row["end_time"],
        "last_progress_update": row["last_progress_update"],
        "failure_reason": row.get("failure_reason"),
        "lock": {"held": alive, "pid": holder_pid},
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens,
                   "per_s": round((prompt_tokens + completion_tokens) / response_s, 2)
                   if response_s else 0.0,
                   "per_answer": round((prompt_tokens + completion_tokens)
                                       / answers["answers"], 1)
                   if answers["answers"] else None},
        "answers": answers,
        "response_format": {"setting": model_cfg.get("response_format"),
                            "used": row.get("response_format_used")},
        "cost_estimate": cost_estimate(model_cfg, prompt_tokens, completion_tokens),
        "log_dir": row["log_dir"],
        "dropped": drops.drop_summary(conn, row["data_checksum"]),
        "provenance": {k: row.get(k) for k in ("asyncrunner_version", "parser_version",
                                               "python_version", "platform")},
        "sessions": [_session_json(s) for s in all_sessions],
        "config_history": sessions.config_history(conn, experiment_id),
        "metrics_history": sessions.metrics_history(conn, experiment_id),
        "labels": labels,
        "decisions": decisions.applied if adjudicated else 0,
        "decisions_changing_label": decisions.changed if adjudicated else 0,
        "decisions_available": decisions.applied,
        "metrics": None,
        "case_metrics": None,
        "batches": batches.batch_info(conn, experiment_id),
        "endpoints": _endpoints(all_sessions),
    }
    if row["status"] == Status.COMPLETED:
        # Against the manual labels, the stored JSON as it is, so --json shows what
        # finalize recorded; the adjudicated figures exist only in the database.
        info["metrics"] = (json.loads(row["metrics_json"])
                           if row.get("metrics_json") and not adjudicated
                           else metrics_report(conn, experiment_id, labels=labels).to_dict())
        info["case_metrics"] = case_metrics(conn, experiment_id, labels=labels).to_dict()
    return info


def _session_json(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("session_id", "intent", "pid", "host", "started_at", "ended_at", "ended_as",
            "end_reason", "target", "n_done", "n_errors", "retry_categories", "settings_hash",
            "settings_diff", "allowed_drift", "asyncrunner_version", "parser_version")
    return {k: s.get(k) for k in keep}


def cost_estimate(model_cfg: dict[str, Any], prompt_tokens: int,
                  completion_tokens: int) -> float | None:
    """From model.price_per_mtok ({input, output} per million tokens), else the older
    price_per_1k_input/output; None without prices."""
    per_mtok = model_cfg.get("price_per_mtok")
    if isinstance(per_mtok, dict):
        return round(prompt_tokens / 1e6 * (per_mtok.get("input") or 0)
                     + completion_tokens / 1e6 * (per_mtok.get("output") or 0), 4)
    pin, pout = model_cfg.get("price_per_1k_input"), model_cfg.get("price_per_1k_output")
    if pin is None and pout is None:
        return None
    return round(prompt_tokens / 1000 * (pin or 0) + completion_tokens / 1000 * (pout or 0), 4)


def _endpoints(all_sessions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per endpoint of the pool, as of the newest session's last commit
    ({"as_of", "endpoints": [...]}, see llm/router.py); None before schema version 9."""
    for s in reversed(all_sessions):
        raw = s.get("endpoints_json")
        if raw:
            try:
                value = json.loads(raw)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _progress_line(info: dict[str, Any]) -> str:
    pct = 100.0 * info["done"] / info["total"] if info["total"] else 100.0
    line = f"  progress   {info['done']}/{info['total']} ({pct:.1f}%)"
    retry = info["retry"]
    if retry:
        target = retry["target"] or 0
        rpct = 100.0 * retry["done"] / target if target else 100.0
        line = (f"  progress   retrying errors: {retry['done']} of {target} ({rpct:.1f}%); "
                f"experiment {info['done']}/{info['total']} stored")
    if info["alive"]:
        window = info["rate_window_s"]
        line += f", recent rate {info['rate_per_s']:.2f}/s" + (
            f" over {window:.0f}s" if window is not None else "")
    if info["eta"]:
        line += f", ETA {info['eta']}"
    return line


def _status_line(info: dict[str, Any]) -> str:
    line = f"  status     {info['status_display']}"
    if info["lock"]["held"]:
        return line + f" (lock held by live PID {info['lock']['pid']})"
    if info["status"] == Status.RUNNING:
        return line + " (no live process holds its lock: resume it)"
    return line


def render_detail(info: dict[str, Any]) -> str:
    lines = [
        f"experiment {info['experiment_id']}  '{info['name']}'",
        _status_line(info),
        (f"  model      {info['model']} ({info['provider']}, T={info['temperature']}, "
         f"prompt {info['prompt_version']})"),
        _progress_line(info),
        f"  started    {info['start_time']}" + (
            f", ended {info['end_time']}" if info["end_time"] else ""),
        f"  errors     {info['errors']}" + (
            " (" + ", ".join(f"{k}: {v}" for k, v in info["errors_by_category"].items()) + ")"
            if info["errors_by_category"] else ""),
        (f"  tokens     prompt {info['tokens']['prompt']}, completion "
         f"{info['tokens']['completion']} ({info['tokens']['per_s']:.0f} tokens per second "
         "of request time)"),
    ]
    if info["tokens"].get("per_answer") is not None:
        lines.append(f"             {info['tokens']['per_answer']:.0f} tokens per answer "
                     "(all attempts, errors included, over successful answers)")
    if info["cost_estimate"] is not None:
        lines.append(f"  cost est.  {info['cost_estimate']}")
    answers = info.get("answers") or {}
    if answers:
        lines.append(f"  answers    {answers['answers']}; after a repair turn "
                     f"{answers['repair']}, after a resample {answers['resample']}; cut off "
                     f"at max_tokens {answers['cut_off']}")
    fmt = info.get("response_format") or {}
    if fmt.get("used") or fmt.get("setting"):
        lines.append(f"  format     response_format {fmt.get('used') or '-'} (setting "
                     f"{fmt.get('setting') or 'none'})")
    if info["failure_reason"]:
        lines.append(f"  reason     {info['failure_reason']}")
    dropped = drops.describe(info["dropped"])
    lines.append(f"  dropped    {dropped[0]}")
    lines += [f"             {line}" for line in dropped[1:]]
    prov = info["provenance"]
    if any(prov.values()):
        lines.append(f"  built by   asyncrunner {prov['asyncrunner_version']}, parser "
                     f"{prov['parser_version']}, Python {prov['python_version']} on "
                     f"{prov['platform']}")
    lines += _session_lines(info)
    for change in info["config_history"]:
        lines.append(f"  changed    {change['changed_at']} {change['key']}: "
                     f"{json.dumps(change['old'])} -> {json.dumps(change['new'])} "
                     f"({change['reason']})")
    for old in info["metrics_history"]:
        lines.append(f"  earlier    metrics of {old['completed_at']} ({old['n_results']} "
                     f"results, {old['n_errors']} errors): precision {_fmt(old['precision'])}, "
                     f"recall {_fmt(old['recall'])}, F1 {_fmt(old['f1'])}")
    lines += [f"  {line}" for line in batches.batch_lines(info.get("batches") or [])]
    pool = (info.get("endpoints") or {}).get("endpoints") or []
    if len(pool) > 1:
        lines += [f"  {endpoint_line(e)}" for e in pool if isinstance(e, dict)]
    lines.append(_labels_line(info))
    if info["metrics"]:
        lines += _metrics_lines(MetricsReport.from_dict(info["metrics"]), info)
    return "\n".join(lines)


def _labels_line(info: dict[str, Any]) -> str:
    if info["labels"] == "manual":
        available = info.get("decisions_available") or 0
        return "  labels     manual" + (
            f" ({_decisions(available)} available: --labels adjudicated)" if available else "")
    changed = info["decisions_changing_label"]
    return (f"  labels     {info['labels']}: manual labels with "
            f"{_decisions(info['decisions'])} in their place ({changed} "
            f"differ{'s' if changed == 1 else ''} from the manual label)")


def _decisions(n: int) -> str:
    return f"{n} reviewer decision{'' if n == 1 else 's'}"


def _session_lines(info: dict[str, Any]) -> list[str]:
    rows = info["sessions"]
    if not rows:
        return []
    lines = [f"  sessions   {len(rows)}"]
    for s in rows:
        if s["ended_as"]:
            how = s["ended_as"] + (f" ({s['end_reason']})" if s["end_reason"]
                                   and s["ended_as"] != "died" else "")
        else:
            how = "running" if info["alive"] and s is rows[-1] else "died (no clean end)"
        extra = []
        if s["intent"] == "retry-errors":
            extra.append(f"errors {', '.join(s['retry_categories'] or [])}")
        if s["allowed_drift"]:
            extra.append("allowed drift " + ", ".join(s["allowed_drift"]))
        if s["settings_diff"]:
            extra.append("session settings " + ", ".join(sorted(s["settings_diff"])))
        lines.append(f"    {s['started_at'][:19]}  {s['intent']:12} PID {s['pid']}: "
                     f"{s['n_done']}/{s['target']} done, {how}"
                     + ("; " + "; ".join(extra) if extra else ""))
    return lines


def _metrics_lines(report: MetricsReport, info: dict[str, Any]) -> list[str]:
    label = ("a manual label" if info.get("labels", "manual") == "manual"
             else "an adjudicated label")
    lines = [f"  metrics    (results with {label} and no error; 95% Wilson CI)",
             (f"    {'set':8} {'n':>6} {'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} "
              f"{'precision':>22} {'recall':>22} {'F1':>6} {'accuracy':>6}")]
    lines += [_metrics_row(key, m) for key, m in report.rows()]
    cases = info.get("case_metrics")
    if cases:
        lines.append(_metrics_row("cases", Confusion.from_dict(cases)))
    lines.append(f"    not scored: {report.unscored.errors} errors, "
                 f"{report.unscored.unlabelled} without {label}")
    if cases:
        lines.append("    cases: detected when any narrative is; "
                     f"{cases['unlabelled']} without a case label, "
                     f"{cases['conflicting_labels']} with conflicting case labels")
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
