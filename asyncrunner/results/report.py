"""`asyncrunner report`: one self-contained HTML file describing an experiment.

This module owns the report: what it shows, its charts and writing the file. Its figures
(confusion matrices, metrics table, error count) are metrics.py's `MetricsReport`; beside
them, the error analysis: calibration with the Brier score, the indicators the model gave
most often for its true and its false positives, and how many outputs were cut off or
needed a repair turn or a resample.

Every figure that needs a label is scored against `labels`: "manual" (the input file's, the
default) or "adjudicated" (those with the reviewers' decisions in their place, labels.py);
the header and the summary say which, and how many decisions that took in.

The file must open anywhere, offline and years later, so everything is inline: CSS in a
<style> element and every chart an inline <svg> element drawn by svg.py (no CDN, no web
fonts, no JavaScript, no plotting library: matplotlib used to be the largest fixed cost of a
run). A chart is a handful of elements however many results it shows.

What the report never contains: narrative text (it is not even selected — results rows carry
only ids, labels and the model's answer) and any secret (the stored config names the API key
variable, never its value; the summary shows neither). Everything that came from a model or a
data file is passed through html.escape, because rationales and indicators are untrusted
text, and is capped in length (`cap_answer`).

Reads only; safe to run while an experiment is still going (WAL readers never block).
Memory and time do not grow with the number of results beyond SQLite's own work: every
chart is drawn from SQL aggregates (histogram and calibration bins, per-minute counts and
latency percentiles, indicator counts), never from the result rows themselves, and the
tables read at most `ANSWER_CAP` characters of any one answer (`INDICATOR_CAP` of one
indicator).
"""

from __future__ import annotations

import html
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from asyncrunner.db import store
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results import svg as _svg
from asyncrunner.results.html import CSS as _CSS
from asyncrunner.results.html import NEGATIVE_COLOUR, POSITIVE_COLOUR
from asyncrunner.results.html import esc as _esc
from asyncrunner.results.html import note as _note
from asyncrunner.results.html import section as _section
from asyncrunner.results.html import table as _table
from asyncrunner.results.html import write_atomic as _write_atomic
from asyncrunner.results.labels import LABEL_SETS, narrative_label_sql
from asyncrunner.results.metrics import (
    Confusion,
    Interval,
    LabelDecisions,
    MetricsReport,
    data_checksum,
    label_decisions,
    metrics_report,
)
from asyncrunner.vocab import Status

N_CALIBRATION_BINS = 10
N_CONFIDENCE_BINS = 20
N_DISAGREEMENTS = 20
ANSWER_CAP = 2000  # characters of one answer (rationale) the disagreements table shows
N_INDICATORS = 10  # most frequent indicators shown for true and for false positives
INDICATOR_CAP = 200  # characters of one indicator the report shows
LATENCY_PERCENTILES = (50, 90, 99)




@dataclass(frozen=True, slots=True)
class ConfidenceHistogram:
    """Scored results with a label, counted per equal-width confidence bin."""

    edges: tuple[float, ...]
    positive: tuple[int, ...]   # label 1, per bin
    negative: tuple[int, ...]   # label 0, per bin

    @property
    def n(self) -> int:
        return sum(self.positive) + sum(self.negative)


@dataclass(frozen=True, slots=True)
class MinuteStats:
    """One UTC minute of the run: results stored, and their response times' percentiles
    (`LATENCY_PERCENTILES`, nearest rank; None when no result of the minute has one)."""

    minute: datetime
    results: int
    latency: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    lower: float
    upper: float
    n: int
    mean_predicted: float
    observed_rate: float


@dataclass(frozen=True, slots=True)
class BrierScore:
    """Mean squared difference between p(detected) and the label (0 or 1) over the results
    the calibration curve uses: 0 is perfect. `reference` is the score of always
    answering the base rate, so `skill` > 0 means better than knowing only the base rate."""

    n: int
    score: float | None       # None when nothing is scored
    base_rate: float | None   # share of label 1 among the n

    @property
    def reference(self) -> float | None:
        return None if self.base_rate is None else self.base_rate * (1 - self.base_rate)

    @property
    def skill(self) -> float | None:
        """1 - score / reference; None when the labels are all one class (reference 0)."""
        reference = self.reference
        if self.score is None or not reference:
            return None
        return 1 - self.score / reference


@dataclass(frozen=True, slots=True)
class IndicatorCounts:
    """The indicators (model output, capped) most often given by true and by false
    positives: (indicator, results naming it), most frequent first."""

    n_tp: int
    n_fp: int
    tp: tuple[tuple[str, int], ...]
    fp: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class OutputQuality:
    """How the answers came about: outputs cut off at max_tokens (finish_reason 'length',
    over every result, since a cut-off output often fails to parse) and answers that took a
    repair turn or a resample (answer_source, over the answers)."""

    results: int            # every stored result
    answers: int            # results without an error
    truncated: int          # finish_reason 'length'
    truncated_answers: int  # of those, ones that still gave an answer
    repaired: int           # answer_source 'repair'
    resampled: int          # answer_source 'resample'

    @property
    def truncated_share(self) -> float | None:
        return self.truncated / self.results if self.results else None

    @property
    def second_chance(self) -> int:
        return self.repaired + self.resampled

    @property
    def second_chance_share(self) -> float | None:
        return self.second_chance / self.answers if self.answers else None


# --------------------------------------------------------------------------- data access


# Every query below that reads a label names it {label}: labels.py's SQL for the result
# row `r`, with the experiment's data checksum as :checksum (see _params).

# Scored: no error and an answer. Bins are equal-width; the top edge (1.0) is in the last bin.
_CONFIDENCE_SQL = """
SELECT y, MIN(CAST(confidence * :bins AS INTEGER), :bins - 1), COUNT(*)
FROM (SELECT r.confidence, {label} AS y FROM narrative_results r
      WHERE r.experiment_id = :id AND r.error_occurred = 0 AND r.detected IS NOT NULL
        AND r.confidence >= 0 AND r.confidence <= 1)
WHERE y IN (0, 1)
GROUP BY 1, 2
"""

# p(detected): the confidence (clamped to 0..1) when the model said detected, else 1 - it;
# y: the label as 0.0 or 1.0. Labelled, scored results with a confidence only.
_P_DETECTED_SQL = """
SELECT CASE WHEN detected THEN c ELSE 1.0 - c END AS p,
       CASE WHEN label THEN 1.0 ELSE 0.0 END AS y
FROM (SELECT MIN(1.0, MAX(0.0, r.confidence)) AS c, r.detected, {label} AS label
      FROM narrative_results r
      WHERE r.experiment_id = :id AND r.error_occurred = 0 AND r.detected IS NOT NULL
        AND r.confidence IS NOT NULL)
WHERE label IS NOT NULL
"""

_CALIBRATION_SQL = f"""
SELECT MIN(CAST(p * :bins AS INTEGER), :bins - 1) AS bin, COUNT(*), AVG(p), AVG(y)
FROM ({_P_DETECTED_SQL})
GROUP BY bin ORDER BY bin
"""

_BRIER_SQL = f"""
SELECT COUNT(*), AVG((p - y) * (p - y)), AVG(y) FROM ({_P_DETECTED_SQL})
"""

# Per indicator: how many of the chosen results (true or false positives) name it. Stored
# indicators that are not a JSON array are skipped (the nested CASE keeps json_each from
# ever seeing malformed JSON); non-string items and blank strings are skipped; an
# indicator named twice in one answer counts once. Only INDICATOR_CAP + 1 characters of an
# indicator leave SQLite.
_INDICATORS_SQL = """
SELECT substr(k, 1, :cap + 1), length(k), n FROM (
  SELECT trim(j.value) AS k, COUNT(DISTINCT s.result_id) AS n
  FROM (SELECT r.result_id,
               COALESCE(CASE WHEN json_valid(r.indicators) THEN
                          CASE WHEN json_type(r.indicators) = 'array' THEN r.indicators END
                        END, '[]') AS indicators
        FROM narrative_results r
        WHERE r.experiment_id = :id AND r.error_occurred = 0 AND r.detected = 1
          AND {label} = :y) s,
       json_each(s.indicators) j
  WHERE j.type = 'text' AND trim(j.value) != ''
  GROUP BY k ORDER BY n DESC, k LIMIT :limit)
ORDER BY n DESC, k
"""

# True positives (y = 1) and false positives (y = 0) among the answers.
_POSITIVES_SQL = """
SELECT COALESCE(SUM(y = 1), 0), COALESCE(SUM(y = 0), 0)
FROM (SELECT {label} AS y FROM narrative_results r
      WHERE r.experiment_id = :id AND r.error_occurred = 0 AND r.detected = 1)
"""

_OUTPUT_SQL = """
SELECT COUNT(*), COALESCE(SUM(error_occurred = 0), 0),
       COALESCE(SUM(finish_reason = 'length'), 0),
       COALESCE(SUM(finish_reason = 'length' AND error_occurred = 0), 0),
       COALESCE(SUM(error_occurred = 0 AND answer_source = 'repair'), 0),
       COALESCE(SUM(error_occurred = 0 AND answer_source = 'resample'), 0)
FROM narrative_results WHERE experiment_id = ?
"""

# Per-result times are UTC ISO-8601 ('...THH:MM:SS.ffffffZ'): their first 16 characters
# are the minute. Each group's earliest time is parsed to place it (see minute_stats).
_MINUTES_SQL = """
SELECT substr(processed_at, 1, 16), MIN(processed_at), COUNT(*)
FROM narrative_results WHERE experiment_id = ? AND processed_at IS NOT NULL
GROUP BY 1 ORDER BY 1
"""

# Nearest-rank percentiles per minute, ranked by SQLite (which spills to disk if it must):
# the k-th smallest of n is the p-th percentile when k = ceil(p * n / 100).
_LATENCY_SQL = """
SELECT minute, {columns}
FROM (SELECT substr(processed_at, 1, 16) AS minute, response_sec AS s,
             ROW_NUMBER() OVER (PARTITION BY substr(processed_at, 1, 16)
                                ORDER BY response_sec) AS k,
             COUNT(*) OVER (PARTITION BY substr(processed_at, 1, 16)) AS n
      FROM narrative_results
      WHERE experiment_id = ? AND processed_at IS NOT NULL AND response_sec IS NOT NULL)
GROUP BY minute
""".format(columns=", ".join(f"MAX(CASE WHEN k = (n * {p} + 99) / 100 THEN s END)"
                             for p in LATENCY_PERCENTILES))

# Ties on confidence are broken by id so the same database always gives the same report.
# Only the first ANSWER_CAP + 1 characters of a rationale are read (the +1 shows it was cut).
_DISAGREEMENTS_SQL = """
SELECT incident_id, narrative_type, detected, y, confidence,
       substr(rationale, 1, :cap + 1), length(rationale)
FROM (SELECT r.incident_id, r.narrative_type, r.detected, {label} AS y, r.confidence,
             r.rationale
      FROM narrative_results r
      WHERE r.experiment_id = :id AND r.error_occurred = 0 AND r.detected IS NOT NULL)
WHERE y IS NOT NULL AND detected != y
ORDER BY confidence IS NULL, confidence DESC, incident_id, narrative_type
LIMIT :limit
"""


def _params(conn: sqlite3.Connection, experiment_id: str, labels: str,
            **extra: Any) -> dict[str, Any]:
    """Named parameters of a query with a {label}: the experiment id as :id and its data
    checksum as :checksum (read only for the adjudicated labels)."""
    checksum = data_checksum(conn, experiment_id) if labels != "manual" else None
    return {"id": experiment_id, "checksum": checksum, **extra}


def _label_sql(labels: str) -> str:
    return narrative_label_sql(labels, result="r", checksum=":checksum")


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


def confidence_histogram(conn: sqlite3.Connection, experiment_id: str,
                         n_bins: int = N_CONFIDENCE_BINS, *,
                         labels: str = "manual") -> ConfidenceHistogram:
    counts = {0: [0] * n_bins, 1: [0] * n_bins}
    for label, index, n in conn.execute(
            _CONFIDENCE_SQL.format(label=_label_sql(labels)),
            _params(conn, experiment_id, labels, bins=n_bins)):
        counts[int(label)][int(index)] += int(n)
    return ConfidenceHistogram(edges=tuple(i / n_bins for i in range(n_bins + 1)),
                               positive=tuple(counts[1]), negative=tuple(counts[0]))


def calibration_bins(conn: sqlite3.Connection, experiment_id: str,
                     n_bins: int = N_CALIBRATION_BINS, *,
                     labels: str = "manual") -> list[CalibrationBin]:
    """Equal-width bins of p(detected) over labelled, scored results; empty bins skipped."""
    return [
        CalibrationBin(lower=index / n_bins, upper=(index + 1) / n_bins, n=int(n),
                       mean_predicted=float(mean_p), observed_rate=float(observed))
        for index, n, mean_p, observed in conn.execute(
            _CALIBRATION_SQL.format(label=_label_sql(labels)),
            _params(conn, experiment_id, labels, bins=n_bins))
    ]


def brier_score(conn: sqlite3.Connection, experiment_id: str, *,
                labels: str = "manual") -> BrierScore:
    """The Brier score of p(detected) against the label, over the calibration's results."""
    n, score, base_rate = conn.execute(_BRIER_SQL.format(label=_label_sql(labels)),
                                       _params(conn, experiment_id, labels)).fetchone()
    if not n:
        return BrierScore(0, None, None)
    return BrierScore(int(n), float(score), float(base_rate))


def top_indicators(conn: sqlite3.Connection, experiment_id: str, *, labels: str = "manual",
                   limit: int = N_INDICATORS) -> IndicatorCounts:
    """The `limit` indicators most often given by true positives and by false positives
    (ties by text), each capped at `INDICATOR_CAP` characters."""
    label = _label_sql(labels)

    def top(y: int) -> tuple[tuple[str, int], ...]:
        rows = conn.execute(_INDICATORS_SQL.format(label=label),
                            _params(conn, experiment_id, labels, y=y, cap=INDICATOR_CAP,
                                    limit=limit))
        return tuple((cap_answer(text, length, cap=INDICATOR_CAP) or "", int(n))
                     for text, length, n in rows)

    n_tp, n_fp = conn.execute(_POSITIVES_SQL.format(label=label),
                              _params(conn, experiment_id, labels)).fetchone()
    return IndicatorCounts(int(n_tp), int(n_fp), top(1), top(0))


def output_quality(conn: sqlite3.Connection, experiment_id: str) -> OutputQuality:
    """Outputs cut off at max_tokens, and answers after a repair turn or a resample."""
    row = conn.execute(_OUTPUT_SQL, (experiment_id,)).fetchone()
    return OutputQuality(*(int(v) for v in row))


def minute_stats(conn: sqlite3.Connection, experiment_id: str) -> list[MinuteStats]:
    """Results and latency percentiles per UTC minute, for the minutes that have any (gaps
    are zero by omission). One row per minute comes out of SQLite, never one per result.
    Times that do not parse are left out; times written with an offset are placed in
    their UTC minute."""
    latency = {row[0]: tuple(float(v) for v in row[1:])
               for row in conn.execute(_LATENCY_SQL, (experiment_id,))}
    merged: dict[datetime, tuple[int, tuple[float, ...] | None]] = {}
    for key, earliest, n in conn.execute(_MINUTES_SQL, (experiment_id,)):
        when = parse_utc(earliest)
        if when is None:
            continue
        minute = when.astimezone(UTC).replace(second=0, microsecond=0)
        before, before_latency = merged.get(minute, (0, None))
        # Two spellings of one minute (older rows only): the counts add up; the
        # percentiles shown are those of one of them.
        merged[minute] = (before + int(n), latency.get(key) or before_latency)
    return [MinuteStats(minute, n, lat) for minute, (n, lat) in sorted(merged.items())]


def top_disagreements(conn: sqlite3.Connection, experiment_id: str,
                      limit: int = N_DISAGREEMENTS, *,
                      labels: str = "manual") -> list[tuple[Any, ...]]:
    """The most confident disagreements; each rationale capped at `ANSWER_CAP` characters
    (a longer one ends with a note of its full length)."""
    rows = []
    for *head, rationale, length in conn.execute(
            _DISAGREEMENTS_SQL.format(label=_label_sql(labels)),
            _params(conn, experiment_id, labels, cap=ANSWER_CAP, limit=limit)):
        rows.append((*head, cap_answer(rationale, length)))
    return rows


def cap_answer(text: str | None, length: int | None = None, *,
               cap: int = ANSWER_CAP) -> str | None:
    """At most `cap` characters of an answer, saying so when it was longer."""
    if text is None:
        return None
    full = len(text) if length is None else int(length)
    if full <= cap:
        return text
    return f"{text[:cap]} [... {full - cap} more characters not shown]"


# --------------------------------------------------------------------------- charts

# Chart sizes in pixels: the old figures' inches at 100 dpi.
CONFUSION_SIZE = (420.0, 360.0)
CONFIDENCE_SIZE = (640.0, 360.0)
CALIBRATION_SIZE = (480.0, 420.0)
TIMELINE_SIZE = (720.0, 500.0)
ERRORS_WIDTH = 560.0
LATENCY_COLOURS = (POSITIVE_COLOUR, "grey", "black")
MAX_MARKED_MINUTES = 60  # up to this many minutes every point gets a dot (a lone one shows)


def _cell_text(cx: float, cy: float, name: str, count: int, colour: str,
               cell: float) -> str:
    """A heatmap cell's name over its count; a huge count shrinks to fit the cell."""
    shown = str(count)
    size = min(17.0, 0.85 * cell / (_svg.CHAR_WIDTH * max(2, len(shown))))
    return (_svg.text(cx, cy - 11, name, size=17.0, fill=colour, middle=True)
            + _svg.text(cx, cy + 11, shown, size=size, fill=colour, middle=True))


def chart_confusion(tp: int, fp: int, tn: int, fn: int, *, label: str = "manual label") -> str:
    width, height = CONFUSION_SIZE
    cell = 115.0
    frame = _svg.Frame(125.0, 42.0, 2 * cell, 2 * cell)
    # Rows: predicted 1 / 0; columns: label 1 / 0 (same layout as the HTML table).
    grid = [[("TP", tp), ("FP", fp)], [("FN", fn), ("TN", tn)]]
    top = max(1, tp, fp, tn, fn)
    parts = [_svg.text(width / 2, 24, "Confusion matrix", size=_svg.TITLE_SIZE, bold=True)]
    for r, row in enumerate(grid):
        for c, (name, count) in enumerate(row):
            x, y = frame.left + c * cell, frame.top + r * cell
            colour = "white" if count > top / 2 else "black"  # readable on dark cells
            parts += [_svg.rect(x, y, cell, cell, _svg.blues(count, top)),
                      _cell_text(x + cell / 2, y + cell / 2, name, count, colour, cell)]
    centres = [0.5, 1.5]
    columns = _svg.Scale(0, 2, frame.left, frame.right)
    rows = _svg.Scale(0, 2, frame.top, frame.bottom)  # row 0 (detected 1) on top
    parts += [_svg.frame_box(frame),
              _svg.x_axis(frame, columns, centres, ["label 1", "label 0"], label),
              _svg.y_axis(frame, rows, centres, ["detected 1", "detected 0"], "predicted")]
    return _svg.document(width, height, "Confusion matrix heatmap", *parts)


def _counts_axis(top_count: float) -> tuple[float, list[float], list[str]]:
    """Axis maximum, ticks and labels of a count axis: whole numbers only."""
    top = _svg.nice_top(top_count, integer=True)
    values = _svg.ticks(0, top, integer=True)
    return top, values, _svg.tick_labels(values)


def _unit_axis() -> tuple[list[float], list[str]]:
    """Ticks and labels of a 0..1 axis (confidence, probability, F1)."""
    values = _svg.ticks(0.0, 1.0)
    return values, _svg.tick_labels(values)


def chart_confidence(hist: ConfidenceHistogram, *, label: str = "manual label") -> str:
    width, height = CONFIDENCE_SIZE
    top, y_values, y_labels = _counts_axis(max((*hist.positive, *hist.negative), default=0))
    left = _svg.y_label_room(y_labels)
    frame = _svg.Frame(left, 16.0, width - left - 16, height - 16 - 56)
    x, y = frame.x(0.0, 1.0), frame.y(0.0, top)
    # Per bin the two series side by side over the middle 80 % (as matplotlib's hist).
    series: tuple[list[tuple[float, float, float, float]], ...] = ([], [])
    for i, (a, b) in enumerate(pairwise(hist.edges)):
        step = (b - a) * 0.4
        for k, count in enumerate((hist.positive[i], hist.negative[i])):
            x0, x1 = x(a + (b - a) * 0.1 + k * step), x(a + (b - a) * 0.1 + (k + 1) * step)
            series[k].append((x0, y(count), x1 - x0, y(0) - y(count)))
    x_values, x_labels = _unit_axis()
    parts = [_svg.path(_svg.bars_d(series[0]), fill=POSITIVE_COLOUR),
             _svg.path(_svg.bars_d(series[1]), fill=NEGATIVE_COLOUR),
             _svg.frame_box(frame),
             _svg.x_axis(frame, x, x_values, x_labels, "model confidence in its answer"),
             _svg.y_axis(frame, y, y_values, y_labels, "results"),
             _svg.legend(frame.left + 8, frame.top + 8, [
                 (_svg.BOX, POSITIVE_COLOUR, f"{label} 1 (n={sum(hist.positive)})"),
                 (_svg.BOX, NEGATIVE_COLOUR, f"{label} 0 (n={sum(hist.negative)})")])]
    return _svg.document(width, height, f"Confidence distribution by {label}", *parts)


def chart_calibration(bins: Sequence[CalibrationBin]) -> str:
    width, height = CALIBRATION_SIZE
    values, labels = _unit_axis()
    left = _svg.y_label_room(labels)
    frame = _svg.Frame(left, 16.0, width - left - 16, height - 16 - 56)
    x, y = frame.x(0.0, 1.0), frame.y(-0.02, 1.02)
    points = [(b.mean_predicted, b.observed_rate) for b in bins]
    parts = [_svg.line(x(0), y(0), x(1), y(1), "grey", width=1.5, dash="6 4"),
             _svg.path(_svg.line_d(points, x, y), stroke=POSITIVE_COLOUR),
             _svg.dots(points, x, y, POSITIVE_COLOUR)]
    parts += [_svg.text(x(b.mean_predicted) + 4, y(b.observed_rate) + 14, str(b.n),
                        anchor="start", size=10)
              for b in bins if math.isfinite(b.mean_predicted) and math.isfinite(b.observed_rate)]
    parts += [_svg.frame_box(frame),
              _svg.x_axis(frame, x, values, labels, "p(detected), bin mean"),
              _svg.y_axis(frame, y, values, labels, "observed positive rate"),
              _svg.legend(frame.left + 8, frame.top + 8, [
                  (_svg.DASHED, "grey", "perfect calibration"),
                  (_svg.LINE_DOT, POSITIVE_COLOUR, "observed")])]
    return _svg.document(width, height, "Calibration curve", *parts)


def _minute_steps(minutes: Sequence[MinuteStats]) -> tuple[list[datetime], list[int]]:
    """Edges and heights of the per-minute counts as one step outline, zero across gaps:
    one path however many minutes (a bar per minute would grow with a long run)."""
    edges: list[datetime] = []
    heights: list[int] = []
    one = timedelta(minutes=1)
    for m in minutes:
        if edges and edges[-1] != m.minute:
            heights.append(0)                    # a gap: zero up to this minute
            edges.append(m.minute)
        elif not edges:
            edges.append(m.minute)
        heights.append(m.results)
        edges.append(m.minute + one)
    return edges, heights


def _rate_panel(frame: _svg.Frame, x: _svg.Scale, ticks_x: Sequence[float],
                minutes: Sequence[MinuteStats]) -> str:
    """Results per minute as a filled step outline."""
    edges, heights = _minute_steps(minutes)
    top, y_values, y_labels = _counts_axis(max(heights, default=0))
    y = frame.y(0.0, top)
    outline = [(t.timestamp(), float(h))
               for (a, b), h in zip(pairwise(edges), heights, strict=True) for t in (a, b)]
    return (_svg.path(_svg.area_d(outline, x, y), fill=NEGATIVE_COLOUR)
            + _svg.frame_box(frame)
            + _svg.x_axis(frame, x, ticks_x, [""] * len(ticks_x))
            + _svg.y_axis(frame, y, y_values, y_labels, "results / minute"))


def _latency_panel(frame: _svg.Frame, x: _svg.Scale, ticks_x: Sequence[tuple[float, str]],
                   minutes: Sequence[MinuteStats]) -> str:
    """Median, 90th and 99th percentile of the minute's response times, one line each."""
    timed = [(m.minute.timestamp() + 30, m.latency) for m in minutes if m.latency is not None]
    highest = max((v for _, lat in timed for v in lat if math.isfinite(v)), default=0.0)
    top = _svg.nice_top(highest)
    y_values = _svg.ticks(0.0, top)
    y = frame.y(0.0, top)
    marked = len(timed) <= MAX_MARKED_MINUTES
    parts: list[str] = []
    entries: list[tuple[str, str, str]] = []
    for i, (pct, colour) in enumerate(zip(LATENCY_PERCENTILES, LATENCY_COLOURS, strict=True)):
        points = [(when, lat[i]) for when, lat in timed]
        parts.append(_svg.path(_svg.line_d(points, x, y), stroke=colour, width=1.2))
        if marked:
            parts.append(_svg.dots(points, x, y, colour, size=5.0))
        entries.append((_svg.LINE_DOT if marked else _svg.LINE, colour,
                        "median" if pct == 50 else f"{pct}th percentile"))
    parts += [_svg.frame_box(frame),
              _svg.x_axis(frame, x, [t for t, _ in ticks_x], [s for _, s in ticks_x],
                          "processed at (UTC)"),
              _svg.y_axis(frame, y, y_values, _svg.tick_labels(y_values), "latency (s)")]
    if timed:
        parts.append(_svg.legend(frame.left + 8, frame.top + 8, entries))
    return "".join(parts)


def chart_timeline(minutes: Sequence[MinuteStats]) -> str:
    """Two panels sharing one UTC time axis: results per minute over latency percentiles."""
    width, height = TIMELINE_SIZE
    edges, heights = _minute_steps(minutes)
    # Room for the widest y labels of either panel, so the two plots line up.
    _, _, rate_labels = _counts_axis(max(heights, default=0))
    left = max(_svg.y_label_room(rate_labels), 72.0)
    plot_width = width - left - 24
    rate = _svg.Frame(left, 14.0, plot_width, 180.0)
    latency = _svg.Frame(left, rate.bottom + 18, plot_width, 205.0)
    if edges:
        x = rate.x(edges[0].timestamp(), edges[-1].timestamp())
        ticks_x = _svg.time_ticks(edges[0], edges[-1], max_ticks=int(plot_width // 95))
    else:
        x, ticks_x = rate.x(0.0, 60.0), []
    return _svg.document(width, height, "Throughput and latency over time",
                         _rate_panel(rate, x, [t for t, _ in ticks_x], minutes),
                         _latency_panel(latency, x, ticks_x, minutes))


ERROR_LABEL_CAP = 40  # characters of a category name beside its bar


def chart_errors(counts: dict[str, int]) -> str:
    """One horizontal bar per category, the largest on top."""
    names = sorted(counts, key=lambda name: (-counts[name], name))
    shown = [name if len(name) <= ERROR_LABEL_CAP else name[:ERROR_LABEL_CAP - 1] + "…"
             for name in names]
    row = 40.0
    height = max(200.0, 80 + row * len(names))
    top, x_values, x_labels = _counts_axis(max(counts.values(), default=0))
    left = _svg.y_label_room(shown, title=False)
    frame = _svg.Frame(left, 16.0, ERRORS_WIDTH - left - 24, height - 16 - 50)
    x = frame.x(0.0, top)
    pitch = frame.height / max(1, len(names))
    boxes = [(x(0), frame.top + pitch * (i + 0.1), x(counts[name]) - x(0), pitch * 0.8)
             for i, name in enumerate(names)]
    rows = _svg.Scale(0, max(1, len(names)), frame.top, frame.bottom)
    parts = [_svg.path(_svg.bars_d(boxes), fill=POSITIVE_COLOUR),
             _svg.frame_box(frame),
             _svg.x_axis(frame, x, x_values, x_labels, "error rows"),
             _svg.y_axis(frame, rows, [i + 0.5 for i in range(len(names))], shown)]
    return _svg.document(ERRORS_WIDTH, height, "Errors by category", *parts)


# --------------------------------------------------------------------------- HTML pieces


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Interval | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def label_word(labels: str) -> str:
    """What the report calls a label of `labels`: "manual label" or "adjudicated label"."""
    return "manual label" if labels == "manual" else f"{labels} label"


def _a(noun: str) -> str:
    """The noun with its indefinite article: "a manual label", "an adjudicated label"."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def describe_labels(labels: str, decisions: LabelDecisions) -> str:
    """One line naming the label set and, for the adjudicated one, what it took in."""
    applied = f"{decisions.applied} reviewer decision{'' if decisions.applied == 1 else 's'}"
    if labels == "manual":
        return "manual labels (the input file's)" + (
            f"; {applied} for these results exist, not used here (--labels adjudicated)"
            if decisions.applied else "")
    return (f"{labels} labels: the manual labels with {applied} in their place "
            f"({decisions.changed} differ{'s' if decisions.changed == 1 else ''} from the "
            "manual label)")


def section_summary(record: store.ExperimentRecord, n_results: int,
                    scored: MetricsReport, labels_line: str | None = None) -> str:
    rows = [
        ("Name", record.experiment_name), ("Experiment id", record.experiment_id),
        ("Status", record.status), ("Model", record.model_name),
        ("Provider", record.model_provider), ("Temperature", record.temperature),
        ("Prompt version", record.prompt_version), ("Data file", record.data_file),
        ("Data checksum", record.data_checksum), ("Started", record.start_time),
        ("Ended", record.end_time),
        ("Narratives done / total", f"{n_results} / {record.n_narratives_total or 0}"),
        ("Error rows", scored.unscored.errors),
    ]
    if labels_line is not None:
        rows.append(("Scored against", labels_line))
    if record.failure_reason:
        rows.append(("Failure reason", record.failure_reason))
    parts = [_table(("Setting", "Value"), rows, cls="kv")]
    if record.status == Status.RUNNING:
        parts.append(_note("This experiment is still running: the figures below cover the "
                           "results committed when the report was written."))
    return _section("summary", "Experiment", *parts)


def section_confusion(m: Confusion, *, label: str = "manual label") -> str:
    lab = html.escape(label)
    table = (
        '<table class="confusion"><caption>Confusion matrix</caption>'
        f'<thead><tr><th></th><th>{lab} 1</th><th>{lab} 0</th></tr></thead>'
        f'<tbody><tr><th>detected 1</th><td>TP {m.tp}</td><td>FP {m.fp}</td></tr>'
        f'<tr><th>detected 0</th><td>FN {m.fn}</td><td>TN {m.tn}</td></tr></tbody>'
        '</table>'
    )
    if m.n == 0:
        return _section("confusion", "Confusion matrix", table,
                        _note(f"No scored results yet (none with {_a(label)} and no error)."))
    return _section("confusion", "Confusion matrix", table,
                    _note(f"Predicted (rows) vs {label} (columns), over results with "
                          f"{_a(label)} and no error."),
                    chart_confusion(m.tp, m.fp, m.tn, m.fn, label=label))


def section_confusion_by_type(scored: MetricsReport, *, label: str = "manual label") -> str:
    """The 2x2 matrix of each narrative type, one block of two rows per type."""
    title = "Confusion matrix by narrative type"
    if not scored.per_type:
        return _section("confusion-by-type", title, _note("No results yet."))
    lab = html.escape(label)
    body = "".join(
        f'<tr><th rowspan="2">{_esc(name)}</th><th>detected 1</th><td>TP {m.tp}</td>'
        f'<td>FP {m.fp}</td><td rowspan="2">{m.n}</td></tr>'
        f'<tr><th>detected 0</th><td>FN {m.fn}</td><td>TN {m.tn}</td></tr>'
        for name, m in scored.per_type)
    table = ('<table class="confusion by-type"><caption>Confusion matrix by narrative type'
             f'</caption><thead><tr><th>Type</th><th></th><th>{lab} 1</th><th>{lab} 0</th>'
             f'<th>Scored</th></tr></thead><tbody>{body}</tbody></table>')
    return _section("confusion-by-type", title, table,
                    _note(f"Each narrative type on its own: predicted (rows) vs {label} "
                          "(columns), over its results with a label and no error."))


def section_metrics(scored: MetricsReport, *, label: str = "manual label") -> str:
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
              f"{scored.unscored.unlabelled} results without {_a(label)}."))


def section_confidence(hist: ConfidenceHistogram, *, label: str = "manual label") -> str:
    if not hist.n:
        return _section("confidence", "Confidence distribution",
                        _note("No labelled results with a confidence to show."))
    return _section("confidence", "Confidence distribution",
                    chart_confidence(hist, label=label),
                    _note(f"Confidence the model gave in its own answer, split by the {label}; "
                          "unlabelled and error rows are left out."))


def _briertable(brier: BrierScore) -> str:
    rows = [("Brier score of p(detected)", _fmt(brier.score, 4)),
            ("Results scored", brier.n),
            ("Base rate (share of label 1)", _fmt(brier.base_rate)),
            ("Reference: always the base rate", _fmt(brier.reference, 4)),
            ("Skill (1 - Brier / reference)", _fmt(brier.skill))]
    return _table(("Figure", "Value"), rows, caption="Brier score", cls="kv brier")


def section_calibration(bins: Sequence[CalibrationBin],
                        brier: BrierScore | None = None) -> str:
    if not bins:
        return _section("calibration", "Calibration",
                        _note("No labelled results with a confidence to calibrate."))
    rows = [(f"{b.lower:.1f}-{b.upper:.1f}", b.n, _fmt(b.mean_predicted),
             _fmt(b.observed_rate)) for b in bins]
    parts = [chart_calibration(bins)]
    if brier is not None:
        parts += [_briertable(brier),
                  _note("Brier score: the mean of (p(detected) - label)^2 over the same "
                        "results, 0 at best; the reference is the score of always answering "
                        "the base rate, so a skill above 0 beats it.")]
    return _section(
        "calibration", "Calibration", *parts,
        _note("p(detected) is the confidence when the model said detected, else 1 - "
              "confidence; 10 equal-width bins, empty bins omitted."),
        _table(("p(detected) bin", "n", "mean p(detected)", "observed positive rate"), rows))


def _share(k: int, n: int) -> str:
    return "-" if not n else f"{100 * k / n:.1f}%"


def section_indicators(counts: IndicatorCounts) -> str:
    """The indicators true and false positives gave most often, side by side."""
    title = "Indicators of true and false positives"
    if not counts.tp and not counts.fp:
        return _section("indicators", title,
                        _note("No indicators given by a scored positive answer."))
    parts = []
    for name, n, rows in (("true positives", counts.n_tp, counts.tp),
                          ("false positives", counts.n_fp, counts.fp)):
        caption = f"Top {N_INDICATORS} indicators of {name} ({n} answers)"
        if rows:
            parts.append(_table(("Indicator", "Answers", "Share"),
                                [(text, k, _share(k, n)) for text, k in rows],
                                caption=caption, cls="indicators"))
        else:
            parts.append(_note(f"No indicators among the {name}."))
    parts.append(_note("Indicators as the model wrote them (trimmed), each counted once per "
                       f"answer; longer than {INDICATOR_CAP} characters is cut. An indicator "
                       "frequent among false positives may be a cue the model over-trusts."))
    return _section("indicators", title, *parts)


def section_output(quality: OutputQuality) -> str:
    """How often an output was cut off at max_tokens, or needed a second chance."""
    title = "Truncated and repaired outputs"
    if not quality.results:
        return _section("output", title, _note("No results yet."))
    rows = [
        ("Cut off at max_tokens (finish_reason = length)", quality.truncated,
         f"{_share(quality.truncated, quality.results)} of {quality.results} results"),
        ("Answers from a cut-off output", quality.truncated_answers,
         f"{_share(quality.truncated_answers, quality.answers)} of {quality.answers} answers"),
        ("Answer after a repair turn", quality.repaired,
         f"{_share(quality.repaired, quality.answers)} of {quality.answers} answers"),
        ("Answer after a resample", quality.resampled,
         f"{_share(quality.resampled, quality.answers)} of {quality.answers} answers"),
        ("Repaired or resampled", quality.second_chance,
         f"{_share(quality.second_chance, quality.answers)} of {quality.answers} answers"),
    ]
    return _section("output", title, _table(("Output", "Count", "Share"), rows, cls="kv"),
                    _note("A cut-off output often fails to parse (an error row), so it is "
                          "counted over every result; repairs and resamples over the "
                          "answers."))


def section_timeline(minutes: Sequence[MinuteStats]) -> str:
    if not minutes:
        return _section("timeline", "Throughput and latency",
                        _note("No results with a processing time yet."))
    return _section("timeline", "Throughput and latency", chart_timeline(minutes),
                    _note("Top: results stored per UTC minute. Bottom: response times of the "
                          "minute's results: median, 90th and 99th percentile."))


def section_errors(conn: sqlite3.Connection, experiment_id: str) -> str:
    counts = dict(sorted(store.errors_by_category(conn, experiment_id).items(),
                         key=lambda kv: (-kv[1], kv[0])))
    if not counts:
        return _section("errors", "Errors by category", _note("No errors."))
    return _section("errors", "Errors by category",
                    _table(("Category", "Rows"), counts.items(), cls="errors"),
                    chart_errors(counts))


def section_disagreements(conn: sqlite3.Connection, experiment_id: str, *,
                          labels: str = "manual") -> str:
    rows = top_disagreements(conn, experiment_id, labels=labels)
    title = f"Top {N_DISAGREEMENTS} disagreements"
    label = label_word(labels)
    if not rows:
        return _section("disagreements", title,
                        _note(f"No disagreements between the model and the {label}s."))
    table = _table(("Incident", "Type", "Detected", label.capitalize(), "Confidence",
                    "Rationale"),
                   [(r[0], r[1], r[2], r[3], _fmt(r[4], 2), r[5]) for r in rows],
                   cls="disagreements")
    return _section("disagreements", title,
                    _note(f"Scored results where the model and the {label} differ, the "
                          "most confident first. Narrative text is deliberately not shown."),
                    table)


def section_dropped(conn: sqlite3.Connection, record: store.ExperimentRecord) -> str:
    """What the data file held that never reached the model (issue #10), per reason and
    narrative type, with the rows a researcher must look at; never narrative text."""
    from asyncrunner.db.drops import describe, drop_summary

    title = "Narratives not sent to the model"
    summary = drop_summary(conn, record.data_checksum)
    lines = describe(summary)
    parts = [_note(lines[0])]
    if summary and summary.get("by_type"):
        reasons = ("blank", "placeholder", "duplicate", "no_id")
        rows = [(t, *(c.get(r, 0) for r in reasons), sum(c.values()))
                for t, c in summary["by_type"].items()]
        parts.append(_table(("Type", "Blank", "Placeholder", "Duplicate", "No id", "Total"),
                            rows, caption="Dropped at ingest, by narrative type"))
    if summary and summary.get("positive_label", {}).get("rows"):
        parts.append(_table(
            ("Row", "Incident", "Type", "Reason", "Narrative label", "Case label"),
            [(r["row_number"], r["incident_id"], r["narrative_type"], r["reason"],
              r["manual_flag_ind"], r["manual_flag"]) for r in summary["positive_label"]["rows"]],
            caption=f"Dropped with a positive manual label ({summary['positive_label']['count']})"))
    if summary and summary.get("label_conflicts", {}).get("rows"):
        parts.append(_table(
            ("Row", "Incident", "Type", "Kept row", "Narrative label", "Case label"),
            [(r["row_number"], r["incident_id"], r["narrative_type"], r["kept_row_number"],
              r["manual_flag_ind"], r["manual_flag"]) for r in summary["label_conflicts"]["rows"]],
            caption=("Duplicates whose labels contradict the kept row "
                     f"({summary['label_conflicts']['count']})")))
    parts += [_note(line.removeprefix("WARNING ")) for line in lines[1:]
              if not line.startswith(("by type", "WARNING"))]
    if summary and summary.get("no_id", {}).get("rows"):
        no_id = summary["no_id"]
        parts.append(_note(f"{no_id['rows']} rows without an id (spreadsheet rows "
                           + ", ".join(str(n) for n in no_id["row_numbers"][:50])
                           + (" ..." if no_id["rows"] > 50 else "") + f"), holding "
                           f"{no_id['narratives_with_text']} narratives with text."))
    return _section("dropped", title, *parts)


def _used_format(conn: sqlite3.Connection, experiment_id: str) -> str | None:
    row = conn.execute("SELECT response_format_used FROM experiments WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    return str(row[0]) if row is not None and row[0] else None


def _token_rows(conn: sqlite3.Connection, experiment_id: str,
                model: dict[str, Any]) -> list[tuple[str, Any]]:
    """Tokens over every attempt, per successful answer, the cost when prices are set, and
    the answers that needed a second chance (issue #15)."""
    prompt, completion, _ = store.token_totals(conn, experiment_id)
    answers = store.answer_stats(conn, experiment_id)
    rows: list[tuple[str, Any]] = [
        ("Tokens (all attempts)", f"prompt {prompt}, completion {completion}"),
        ("Tokens per successful answer",
         f"{(prompt + completion) / answers['answers']:.0f}" if answers["answers"] else "-"),
        ("Answers after a repair / resample", f"{answers['repair']} / {answers['resample']}"),
        ("Answers cut off at max_tokens", answers["cut_off"]),
    ]
    pin, pout = model.get("price_per_1k_input"), model.get("price_per_1k_output")
    if pin is not None or pout is not None:
        cost = prompt / 1000 * (pin or 0) + completion / 1000 * (pout or 0)
        rows.append(("Cost estimate", f"{cost:.4f}"))
    return rows


def section_provenance(conn: sqlite3.Connection, record: store.ExperimentRecord) -> str:
    """What produced the answers: versions, platform, generation settings and the prompt
    (issue #10); the sessions and every change of the stored configuration."""
    import json

    from asyncrunner.db.sessions import config_history, list_sessions

    row = conn.execute("SELECT asyncrunner_version, parser_version, python_version, "
                       "platform FROM experiments WHERE experiment_id = ?",
                       (record.experiment_id,)).fetchone()
    model = record.config.get("model", {})
    prompt = record.config.get("prompt", {})
    rows: list[tuple[str, Any]] = [
        ("asyncrunner version", row[0] if row else None),
        ("Parser version", row[1] if row else None),
        ("Python", row[2] if row else None), ("Platform", row[3] if row else None),
        ("Seed", record.run_seed), ("Temperature", record.temperature),
        ("max_tokens", model.get("max_tokens")),
        ("Response format", f"{_used_format(conn, record.experiment_id) or '-'} (setting "
                            f"{model.get('response_format') or 'none'})"),
        *_token_rows(conn, record.experiment_id, model),
        ("Extra request fields", json.dumps(model.get("extra_body") or {})),
        ("Prompt version", record.prompt_version or prompt.get("version")),
    ]
    prompts = (f"<h3>System prompt</h3><pre>{_esc(record.system_prompt)}</pre>"
               f"<h3>User template</h3><pre>{_esc(record.user_template)}</pre>")
    sessions = list_sessions(conn, record.experiment_id)
    session_rows = [(s["started_at"], s["intent"], s["n_done"], s["target"],
                     s["ended_as"] or "-", ", ".join(s["allowed_drift"] or []) or "-",
                     ", ".join(sorted(s["settings_diff"] or {})) or "-") for s in sessions]
    changes = [(c["changed_at"], c["key"], json.dumps(c["old"]), json.dumps(c["new"]),
                c["reason"]) for c in config_history(conn, record.experiment_id)]
    parts = [_table(("Setting", "Value"), rows, cls="kv"), prompts]
    if session_rows:
        parts.append(_table(("Started (UTC)", "Intent", "Done", "Target", "Ended",
                             "Allowed drift", "Session settings changed"), session_rows,
                            caption="Sessions"))
    if changes:
        parts.append(_table(("When (UTC)", "Key", "Old", "New", "Why"), changes,
                            caption="Changes of the stored configuration"))
    return _section("provenance", "Provenance", *parts)


# --------------------------------------------------------------------------- document

def render_html(conn: sqlite3.Connection, record: store.ExperimentRecord, *,
                labels: str = "manual") -> str:
    eid = record.experiment_id
    n_results, _ = store.count_results(conn, eid)
    scored = metrics_report(conn, eid, labels=labels)
    labels_line = describe_labels(labels, label_decisions(conn, eid))
    label = label_word(labels)
    sections: list[Callable[[], str]] = [
        lambda: section_summary(record, n_results, scored, labels_line),
        lambda: section_confusion(scored.overall, label=label),
        lambda: section_confusion_by_type(scored, label=label),
        lambda: section_metrics(scored, label=label),
        lambda: section_confidence(confidence_histogram(conn, eid, labels=labels),
                                   label=label),
        lambda: section_calibration(calibration_bins(conn, eid, labels=labels),
                                    brier_score(conn, eid, labels=labels)),
        lambda: section_indicators(top_indicators(conn, eid, labels=labels)),
        lambda: section_output(output_quality(conn, eid)),
        lambda: section_timeline(minute_stats(conn, eid)),
        lambda: section_errors(conn, eid),
        lambda: section_disagreements(conn, eid, labels=labels),
        lambda: section_dropped(conn, record),
        lambda: section_provenance(conn, record),
    ]
    title = f"asyncrunner report: {record.experiment_name or eid}"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">Experiment {html.escape(eid)} · generated {generated}</p>'
        f'<p class="labels">Scored against the {html.escape(labels_line)}</p>'
        + "".join(build() for build in sections)
        + "</body></html>\n"
    )


def default_report_path(output_dir: Path, experiment_id: str) -> Path:
    return output_dir / f"{experiment_id}_report.html"


def write_report(conn: sqlite3.Connection, experiment_id: str, out: Path, *,
                 labels: str = "manual") -> Path:
    """Write the HTML report of one experiment to `out` (atomically), scored against
    `labels` ("manual" or "adjudicated"); return the path. UsageError when `labels`
    is unknown, RefusedError for an unknown experiment."""
    if labels not in LABEL_SETS:
        raise UsageError(f"labels must be one of {', '.join(LABEL_SETS)}, not {labels!r}")
    record = store.get_experiment(conn, experiment_id)
    if record is None:
        raise RefusedError(f"no experiment {experiment_id} in this database")
    _write_atomic(out, render_html(conn, record, labels=labels))
    return out
