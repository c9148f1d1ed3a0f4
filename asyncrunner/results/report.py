"""`asyncrunner report`: one self-contained HTML file describing an experiment.

This module owns the report: what it shows, its charts and writing the file. Its figures
(confusion matrix, metrics table, error count) are metrics.py's `MetricsReport`.

The file must open anywhere, offline and years later, so everything is inline: CSS in a
<style> element and every chart a base64 PNG in a data: URI (no CDN, no web fonts, no
JavaScript). Charts are drawn with matplotlib's Agg renderer on `Figure` objects that pyplot
never sees, so nothing opens a window, no global backend is switched and no figure outlives
its function.

matplotlib is optional (`asyncrunner[report]`, ~117 MB): it is imported only by the
functions that draw, and `render_html` checks for it first, so without it the report fails
in one line (UsageError) and every other command, this module's import included, works.

What the report never contains: narrative text (it is not even selected — results rows carry
only ids, labels and the model's answer) and any secret (the stored config names the API key
variable, never its value; the summary shows neither). Everything that came from a model or a
data file is passed through html.escape, because rationales are untrusted text.

Reads only; safe to run while an experiment is still going (WAL readers never block).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import sqlite3
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncrunner.db import store
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results.metrics import Confusion, Interval, MetricsReport, metrics_report
from asyncrunner.vocab import Status

if TYPE_CHECKING:
    from matplotlib.figure import Figure

N_CALIBRATION_BINS = 10
N_DISAGREEMENTS = 20
LATENCY_WINDOW = 25  # results per rolling-median point: smooths single slow calls away
FIG_DPI = 100

POSITIVE_COLOUR = "#c0392b"
NEGATIVE_COLOUR = "#2471a3"

MATPLOTLIB_MISSING = "the HTML report needs matplotlib: pip install 'asyncrunner[report]'"


@dataclass(frozen=True, slots=True)
class ResultPoint:
    """The columns of one result the charts need; deliberately no text of any kind."""

    narrative_type: str
    detected: int | None
    confidence: float | None
    manual_flag_ind: int | None
    error_occurred: int
    response_sec: float | None
    processed_at: datetime | None

    @property
    def scored(self) -> bool:
        return self.error_occurred == 0 and self.detected is not None

    @property
    def p_detected(self) -> float | None:
        """The model's probability of 'detected': its confidence is in the answer it gave."""
        if self.confidence is None or self.detected is None:
            return None
        conf = min(1.0, max(0.0, float(self.confidence)))
        return conf if self.detected else 1.0 - conf


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    lower: float
    upper: float
    n: int
    mean_predicted: float
    observed_rate: float


# --------------------------------------------------------------------------- data access


_POINTS_SQL = """
SELECT narrative_type, detected, confidence, manual_flag_ind, error_occurred, response_sec,
       processed_at
FROM narrative_results WHERE experiment_id = ? ORDER BY processed_at, result_id
"""

# Ties on confidence are broken by id so the same database always gives the same report.
_DISAGREEMENTS_SQL = """
SELECT incident_id, narrative_type, detected, manual_flag_ind, confidence, rationale
FROM narrative_results
WHERE experiment_id = ? AND error_occurred = 0 AND manual_flag_ind IS NOT NULL
  AND detected IS NOT NULL AND detected != manual_flag_ind
ORDER BY confidence IS NULL, confidence DESC, incident_id, narrative_type
LIMIT ?
"""


def parse_utc(text: str | None) -> datetime | None:
    """A per-result timestamp (UTC ISO-8601, 'Z' suffix); None when absent or unreadable,
    since rows from older databases may hold other formats and must not stop the report."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def load_points(conn: sqlite3.Connection, experiment_id: str) -> list[ResultPoint]:
    return [
        ResultPoint(row[0], row[1], row[2], row[3], int(row[4] or 0), row[5],
                    parse_utc(row[6]))
        for row in conn.execute(_POINTS_SQL, (experiment_id,))
    ]


def top_disagreements(conn: sqlite3.Connection, experiment_id: str,
                      limit: int = N_DISAGREEMENTS) -> list[Sequence[Any]]:
    return conn.execute(_DISAGREEMENTS_SQL, (experiment_id, limit)).fetchall()


# --------------------------------------------------------------------------- pure statistics


def calibration_bins(points: Iterable[ResultPoint],
                     n_bins: int = N_CALIBRATION_BINS) -> list[CalibrationBin]:
    """Equal-width bins of p(detected) over labelled, scored results; empty bins skipped."""
    members: list[list[ResultPoint]] = [[] for _ in range(n_bins)]
    for p in points:
        prob = p.p_detected
        if not p.scored or p.manual_flag_ind is None or prob is None:
            continue
        # p == 1.0 belongs in the top bin, not in a bin past the end.
        members[min(int(prob * n_bins), n_bins - 1)].append(p)
    bins = []
    for i, group in enumerate(members):
        if group:
            bins.append(CalibrationBin(
                lower=i / n_bins, upper=(i + 1) / n_bins, n=len(group),
                mean_predicted=statistics.fmean(q.p_detected or 0.0 for q in group),
                observed_rate=statistics.fmean(1.0 if q.manual_flag_ind else 0.0
                                               for q in group)))
    return bins


def per_minute(times: Iterable[datetime]) -> list[tuple[datetime, int]]:
    """Results per UTC minute, for the minutes that have any (gaps are zero by omission)."""
    counts = Counter(t.astimezone(UTC).replace(second=0, microsecond=0)
                     for t in times)
    return sorted(counts.items())


def rolling_median(values: Sequence[float], window: int = LATENCY_WINDOW) -> list[float]:
    """Median of the trailing `window` values at each position (shorter at the start)."""
    return [statistics.median(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


# --------------------------------------------------------------------------- charts


def require_matplotlib() -> None:
    """Raise UsageError (one line, exit 2) when the optional charting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(MATPLOTLIB_MISSING) from None


def _figure(width: float = 6.4, height: float = 3.6) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no pyplot, no GUI backend
    return fig


def _png_img(fig: Figure, alt: str) -> str:
    """The figure as an inline <img>; the figure is cleared so its memory goes now."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    finally:
        fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def chart_confusion(tp: int, fp: int, tn: int, fn: int) -> str:
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot()
    # Rows: predicted 1 / 0; columns: manual label 1 / 0 (same layout as the HTML table).
    grid = [[tp, fp], [fn, tn]]
    names = [["TP", "FP"], ["FN", "TN"]]
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(1, tp, fp, tn, fn))
    top = max(1, tp, fp, tn, fn)
    for r in range(2):
        for c in range(2):
            colour = "white" if grid[r][c] > top / 2 else "black"
            ax.text(c, r, f"{names[r][c]}\n{grid[r][c]}", ha="center", va="center",
                    color=colour, fontsize=13)
    ax.set_xticks([0, 1], ["label 1", "label 0"])
    ax.set_yticks([0, 1], ["detected 1", "detected 0"])
    ax.set_xlabel("manual label")
    ax.set_ylabel("predicted")
    ax.set_title("Confusion matrix")
    return _png_img(fig, "Confusion matrix heatmap")


def chart_confidence(points: Sequence[ResultPoint]) -> str:
    from matplotlib.ticker import MaxNLocator

    pos = [p.confidence for p in points
           if p.scored and p.confidence is not None and p.manual_flag_ind == 1]
    neg = [p.confidence for p in points
           if p.scored and p.confidence is not None and p.manual_flag_ind == 0]
    fig = _figure()
    ax = fig.add_subplot()
    edges = [i / 20 for i in range(21)]
    ax.hist([pos, neg], bins=edges, color=[POSITIVE_COLOUR, NEGATIVE_COLOUR],
            label=[f"manual label 1 (n={len(pos)})", f"manual label 0 (n={len(neg)})"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("model confidence in its answer")
    ax.set_ylabel("results")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no half results
    ax.legend(loc="upper left")
    return _png_img(fig, "Confidence distribution by manual label")


def chart_calibration(bins: Sequence[CalibrationBin]) -> str:
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot([b.mean_predicted for b in bins], [b.observed_rate for b in bins], marker="o",
            color=POSITIVE_COLOUR, label="observed")
    for b in bins:
        ax.annotate(str(b.n), (b.mean_predicted, b.observed_rate), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("p(detected), bin mean")
    ax.set_ylabel("observed positive rate")
    ax.legend(loc="upper left")
    return _png_img(fig, "Calibration curve")


def chart_timeline(points: Sequence[ResultPoint]) -> str:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.ticker import MaxNLocator

    timed = [p for p in points if p.processed_at is not None]
    minutes = per_minute(p.processed_at for p in timed if p.processed_at)
    lat = [p for p in timed if p.response_sec is not None]
    fig = _figure(7.2, 5.0)
    ax_rate, ax_lat = fig.subplots(2, 1, sharex=True)
    ax_rate.bar([m for m, _ in minutes], [n for _, n in minutes], width=1 / 1440,
                align="edge", color=NEGATIVE_COLOUR)
    ax_rate.set_ylabel("results / minute")
    ax_rate.yaxis.set_major_locator(MaxNLocator(integer=True))
    if lat:
        when = [p.processed_at for p in lat]
        secs = [float(p.response_sec or 0.0) for p in lat]
        ax_lat.scatter(when, secs, s=6, alpha=0.4, color="grey", label="per result")
        ax_lat.plot(when, rolling_median(secs), color=POSITIVE_COLOUR,
                    label=f"rolling median ({LATENCY_WINDOW})")
        ax_lat.legend(loc="upper left")
    ax_lat.set_ylabel("latency (s)")
    ax_lat.set_xlabel("processed at (UTC)")
    # Concise labels (time, date once) stay readable from a minute-long to a days-long run.
    # matplotlib leaves these two constructors unannotated.
    locator = AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax_lat.xaxis.set_major_locator(locator)
    ax_lat.xaxis.set_major_formatter(
        ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
    return _png_img(fig, "Throughput and latency over time")


def chart_errors(counts: dict[str, int]) -> str:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.6, max(2.0, 0.8 + 0.4 * len(counts)))
    ax = fig.add_subplot()
    names = list(counts)
    ax.barh(names, [counts[n] for n in names], color=POSITIVE_COLOUR)
    ax.invert_yaxis()  # largest category first, as in the table
    ax.set_xlabel("error rows")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png_img(fig, "Errors by category")


# --------------------------------------------------------------------------- HTML pieces


def _esc(value: Any) -> str:
    return "-" if value is None else html.escape(str(value))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           caption: str | None = None, cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def section_summary(record: store.ExperimentRecord, points: Sequence[ResultPoint],
                    scored: MetricsReport) -> str:
    rows = [
        ("Name", record.experiment_name), ("Experiment id", record.experiment_id),
        ("Status", record.status), ("Model", record.model_name),
        ("Provider", record.model_provider), ("Temperature", record.temperature),
        ("Prompt version", record.prompt_version), ("Data file", record.data_file),
        ("Data checksum", record.data_checksum), ("Started", record.start_time),
        ("Ended", record.end_time),
        ("Narratives done / total", f"{len(points)} / {record.n_narratives_total or 0}"),
        ("Error rows", scored.unscored.errors),
    ]
    if record.failure_reason:
        rows.append(("Failure reason", record.failure_reason))
    parts = [_table(("Setting", "Value"), rows, cls="kv")]
    if record.status == Status.RUNNING:
        parts.append(_note("This experiment is still running: the figures below cover the "
                           "results committed when the report was written."))
    return _section("summary", "Experiment", *parts)


def section_confusion(m: Confusion) -> str:
    table = (
        '<table class="confusion"><caption>Confusion matrix</caption>'
        '<thead><tr><th></th><th>manual label 1</th><th>manual label 0</th></tr></thead>'
        f'<tbody><tr><th>detected 1</th><td>TP {m.tp}</td><td>FP {m.fp}</td></tr>'
        f'<tr><th>detected 0</th><td>FN {m.fn}</td><td>TN {m.tn}</td></tr></tbody>'
        '</table>'
    )
    if m.n == 0:
        return _section("confusion", "Confusion matrix", table,
                        _note("No scored results yet (none with a manual label and no error)."))
    return _section("confusion", "Confusion matrix", table,
                    _note("Predicted (rows) vs manual label (columns), over results with a "
                          "manual label and no error."),
                    chart_confusion(m.tp, m.fp, m.tn, m.fn))


def section_metrics(scored: MetricsReport) -> str:
    headers = ("Set", "n", "TP", "FP", "TN", "FN", "Precision [95% CI]", "Recall [95% CI]",
               "F1", "Accuracy [95% CI]")
    rows = [(key, m.n, m.tp, m.fp, m.tn, m.fn,
             _with_ci(m.precision, m.precision_interval),
             _with_ci(m.recall, m.recall_interval), _fmt(m.f1),
             _with_ci(m.accuracy, m.accuracy_interval)) for key, m in scored.rows()]
    return _section(
        "metrics", "Metrics by narrative type",
        _table(headers, rows, caption="Metrics (Wilson 95% intervals)", cls="metrics"),
        _note(f"Not scored: {scored.unscored.errors} error rows, "
              f"{scored.unscored.unlabelled} results without a manual label."))


def section_confidence(points: Sequence[ResultPoint]) -> str:
    labelled = [p for p in points
                if p.scored and p.confidence is not None and p.manual_flag_ind is not None]
    if not labelled:
        return _section("confidence", "Confidence distribution",
                        _note("No labelled results with a confidence to show."))
    return _section("confidence", "Confidence distribution", chart_confidence(points),
                    _note("Confidence the model gave in its own answer, split by the manual "
                          "label; unlabelled and error rows are left out."))


def section_calibration(points: Sequence[ResultPoint]) -> str:
    bins = calibration_bins(points)
    if not bins:
        return _section("calibration", "Calibration",
                        _note("No labelled results with a confidence to calibrate."))
    rows = [(f"{b.lower:.1f}-{b.upper:.1f}", b.n, _fmt(b.mean_predicted),
             _fmt(b.observed_rate)) for b in bins]
    return _section(
        "calibration", "Calibration", chart_calibration(bins),
        _note("p(detected) is the confidence when the model said detected, else 1 - "
              "confidence; 10 equal-width bins, empty bins omitted."),
        _table(("p(detected) bin", "n", "mean p(detected)", "observed positive rate"), rows))


def section_timeline(points: Sequence[ResultPoint]) -> str:
    if not any(p.processed_at for p in points):
        return _section("timeline", "Throughput and latency",
                        _note("No results with a processing time yet."))
    return _section("timeline", "Throughput and latency", chart_timeline(points),
                    _note("Top: results stored per UTC minute. Bottom: response time of each "
                          "call and its rolling median."))


def section_errors(conn: sqlite3.Connection, experiment_id: str) -> str:
    counts = dict(sorted(store.errors_by_category(conn, experiment_id).items(),
                         key=lambda kv: (-kv[1], kv[0])))
    if not counts:
        return _section("errors", "Errors by category", _note("No errors."))
    return _section("errors", "Errors by category",
                    _table(("Category", "Rows"), counts.items(), cls="errors"),
                    chart_errors(counts))


def section_disagreements(conn: sqlite3.Connection, experiment_id: str) -> str:
    rows = top_disagreements(conn, experiment_id)
    title = f"Top {N_DISAGREEMENTS} disagreements"
    if not rows:
        return _section("disagreements", title,
                        _note("No disagreements between the model and the manual labels."))
    table = _table(("Incident", "Type", "Detected", "Manual label", "Confidence", "Rationale"),
                   [(r[0], r[1], r[2], r[3], _fmt(r[4], 2), r[5]) for r in rows],
                   cls="disagreements")
    return _section("disagreements", title,
                    _note("Scored results where the model and the manual label differ, the "
                          "most confident first. Narrative text is deliberately not shown."),
                    table)


# --------------------------------------------------------------------------- document

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:2em auto;max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}thead th{background:#f2f2f2}
caption{font-weight:bold;text-align:left;padding:.3em 0}
table.confusion td{text-align:center;min-width:7em;font-size:1.1em}
table.metrics td:not(:first-child){text-align:right;white-space:nowrap}
table.disagreements td:last-child{max-width:40em}
.note{color:#555;font-size:.92em}img{max-width:100%;height:auto;display:block;margin:.6em 0}
.meta{color:#777;font-size:.85em}
"""


def render_html(conn: sqlite3.Connection, record: store.ExperimentRecord) -> str:
    require_matplotlib()  # before any work, so a missing extra fails fast and alone
    eid = record.experiment_id
    points = load_points(conn, eid)
    scored = metrics_report(conn, eid)
    sections: list[Callable[[], str]] = [
        lambda: section_summary(record, points, scored),
        lambda: section_confusion(scored.overall),
        lambda: section_metrics(scored),
        lambda: section_confidence(points),
        lambda: section_calibration(points),
        lambda: section_timeline(points),
        lambda: section_errors(conn, eid),
        lambda: section_disagreements(conn, eid),
    ]
    title = f"asyncrunner report: {record.experiment_name or eid}"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">Experiment {html.escape(eid)} · generated {generated}</p>'
        + "".join(build() for build in sections)
        + "</body></html>\n"
    )


def _write_atomic(out: Path, text: str) -> None:
    """Temp file in the same directory, then rename: readers see the old or the new file.
    The temp name carries the PID so two writers never share one; created with the
    process umask (unlike mkstemp's 0600) because a report is meant to be shared."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def default_report_path(output_dir: Path, experiment_id: str) -> Path:
    return output_dir / f"{experiment_id}_report.html"


def write_report(conn: sqlite3.Connection, experiment_id: str, out: Path) -> Path:
    """Write the HTML report of one experiment to `out` (atomically); return the path.
    UsageError when matplotlib is not installed, RefusedError for an unknown experiment."""
    record = store.get_experiment(conn, experiment_id)
    if record is None:
        raise RefusedError(f"no experiment {experiment_id} in this database")
    _write_atomic(out, render_html(conn, record))
    return out
