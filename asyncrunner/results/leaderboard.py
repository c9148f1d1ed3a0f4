"""`asyncrunner compare`: a leaderboard of two or more experiments, or of a study.

This module owns the leaderboard (`Board`): gathering it from the database (`build`) and
showing it as text (`render_text`), JSON (`to_json`) and a self-contained HTML page with
a chart (`write_html`). Every figure is computed here from `narrative_results`, against
the manual labels or the adjudicated ones (labels.py), never read from stored metrics.

For each experiment: precision, recall, F1 and accuracy over its narratives, each with a
95 % interval (stats.py); the same at case level (a case is detected when any of its
narratives is, and scored against the case label); Cohen's kappa against the labels;
errors, tokens, cost and wall time. The best experiment is the one with the highest
narrative F1; every other one is tested against it with McNemar's exact test on the
labelled narratives both answered, the p-values Holm-adjusted over those comparisons. In
a study, the repeats of a cell (same study_cell) are checked for test-retest agreement:
Fleiss' kappa over their answers and the share of narratives whose answer flips. What
the data file lost at ingest is shown per data checksum, since those narratives were
never scored by anyone. With exactly two experiments the pairwise lines of compare.py
(agreement, kappa, McNemar) follow, as `compare ID1 ID2` has always printed them.

Reads only, in a few aggregate queries per experiment; the repeat agreement is the one
part that walks the results of a cell narrative by narrative.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncrunner import refusals
from asyncrunner.db import store
from asyncrunner.db.drops import describe, drop_summary
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results import svg as _svg
from asyncrunner.results.compare import (
    Pairing,
    fmt,
    fmt_p,
    pairing,
    pairing_json,
    pairing_lines,
)
from asyncrunner.results.html import CSS as _CSS
from asyncrunner.results.html import NEGATIVE_COLOUR, POSITIVE_COLOUR
from asyncrunner.results.html import esc as _esc
from asyncrunner.results.html import note as _note
from asyncrunner.results.html import section as _section
from asyncrunner.results.html import table as _table
from asyncrunner.results.html import write_atomic as _write_atomic
from asyncrunner.results.labels import (
    ADJUDICATED,
    LABEL_SETS,
    narrative_label_sql,
)
from asyncrunner.results.metrics import Agreement, Confusion, case_metrics
from asyncrunner.results.stats import (
    Interval,
    f1_interval,
    f1_score,
    fleiss_kappa,
    flip_share,
    holm,
    proportion_interval,
)
from asyncrunner.results.status import cost_estimate

SHORT_ID = 8  # characters of an experiment id in text and chart labels

# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Entry:
    """One experiment's row. `narrative` and `case` are the 2x2 tables of its scored
    narratives and cases; every figure follows from them."""

    experiment_id: str
    name: str | None
    study_id: str | None
    study_cell: str | None
    study_repeat: int | None
    model: str | None
    temperature: float | None
    prompt_version: str | None
    data_checksum: str | None
    n_results: int
    errors: int
    unlabelled: int            # answered, but no label to score against
    narrative: Confusion
    case: Confusion
    case_conflicts: int        # cases whose narratives carry different case labels
    prompt_tokens: int
    completion_tokens: int
    cost: float | None         # None: the config names no price
    wall_s: float | None       # start to end; None while running or never recorded

    @property
    def f1(self) -> float | None:
        return _f1(self.narrative)

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa of the answers against the labels."""
        n = self.narrative
        return Agreement(n11=n.tp, n10=n.fp, n01=n.fn, n00=n.tn).kappa

    @property
    def label(self) -> str:
        """The cell (and repeat) of a study's experiment, else its name."""
        if self.study_cell is not None:
            return self.study_cell + (f"/r{self.study_repeat}" if self.study_repeat else "")
        return self.name or "-"


@dataclass(frozen=True, slots=True)
class VersusBest:
    pairing: Pairing   # experiment_1 is the best, experiment_2 the one tested against it
    p_holm: float      # mcnemar_p_exact, Holm-adjusted over every comparison with the best


@dataclass(frozen=True, slots=True)
class RepeatAgreement:
    """Test-retest agreement of one study cell's repeats."""

    cell: str
    experiment_ids: tuple[str, ...]
    n_narratives: int       # answered by at least one repeat
    n_all_answered: int     # answered by every repeat: Fleiss' subset
    fleiss_kappa: float | None
    flip_share: float | None  # of the narratives with two answers or more


@dataclass(frozen=True, slots=True)
class Board:
    labels: str
    decisions: int | None    # reviewer decisions on the board's data; None for manual
    study_id: str | None
    entries: tuple[Entry, ...]
    best: str | None         # experiment id with the highest narrative F1
    versus_best: tuple[VersusBest, ...]
    repeats: tuple[RepeatAgreement, ...]
    pair: Pairing | None     # exactly two experiments: the first against the second
    dropped: tuple[tuple[str | None, dict[str, Any] | None], ...]  # per data checksum

    @property
    def same_data(self) -> bool:
        return len({e.data_checksum for e in self.entries}) <= 1

    def number(self, experiment_id: str) -> int:
        """The experiment's row number (1-based), as the text and the page show it."""
        return next(i for i, e in enumerate(self.entries, 1) if e.experiment_id == experiment_id)


# --------------------------------------------------------------------------- gathering


def build(conn: sqlite3.Connection, ids: Sequence[str], study_id: str | None = None,
          labels: str = "manual") -> Board:
    """The leaderboard of `ids`, or of every experiment of `study_id` (ordered by cell,
    then repeat) followed by any `ids` not in it. RefusedError for an unknown id or a
    study without experiments."""
    if labels not in LABEL_SETS:
        raise UsageError(f"labels must be one of {', '.join(LABEL_SETS)}, not {labels!r}")
    chosen = _choose(conn, ids, study_id)
    entries = tuple(_entry(conn, experiment_id, labels) for experiment_id in chosen)
    best = _best(entries)
    checksums = list(dict.fromkeys(e.data_checksum for e in entries))
    cells = _repeat_cells(entries, study_id) if study_id else {}
    return Board(
        labels=labels,
        decisions=_decisions(conn, checksums) if labels == ADJUDICATED else None,
        study_id=study_id, entries=entries, best=best,
        versus_best=_versus_best(conn, entries, best, labels),
        repeats=tuple(_repeat_agreement(conn, cell, ids) for cell, ids in cells.items()),
        pair=(pairing(conn, entries[0].experiment_id, entries[1].experiment_id, labels)
              if len(entries) == 2 else None),
        dropped=tuple((c, drop_summary(conn, c)) for c in checksums),
    )


def _choose(conn: sqlite3.Connection, ids: Sequence[str], study_id: str | None) -> list[str]:
    chosen: list[str] = []
    if study_id is not None:
        chosen = [str(r[0]) for r in conn.execute(
            "SELECT experiment_id FROM experiments WHERE study_id = ? "
            "ORDER BY study_cell, study_repeat, experiment_id", (study_id,))]
        if not chosen:
            known = conn.execute("SELECT 1 FROM studies WHERE study_id = ?",
                                 (study_id,)).fetchone()
            raise RefusedError(f"study {study_id} has no experiment yet; start it with "
                               "`asyncrunner sweep`" if known else
                               f"no study {study_id} in this database; its id is the "
                               "`study_id:` line `asyncrunner sweep` printed")
    for experiment_id in ids:
        if store.get_experiment(conn, experiment_id) is None:
            raise refusals.no_experiment(experiment_id)
    chosen = list(dict.fromkeys([*chosen, *ids]))  # a repeated id is one row
    if not chosen:
        raise UsageError("compare needs experiment ids or --study STUDY_ID")
    return chosen


_EXPERIMENT_SQL = """
SELECT experiment_name, study_id, study_cell, study_repeat, model_name, temperature, prompt_version,
       data_checksum, start_time, end_time, config_json
FROM experiments WHERE experiment_id = ?
"""

# Every result of the experiment by (error, answer, label): nine groups at most.
_NARRATIVE_SQL = """
SELECT r.error_occurred, r.detected, {label}, COUNT(*)
FROM narrative_results r WHERE r.experiment_id = :experiment_id
GROUP BY 1, 2, 3
"""



def _f1(c: Confusion) -> float | None:
    return f1_score(c.tp, c.fp, c.fn)


def _confusion(table: Counter[tuple[int, int]]) -> Confusion:
    """(answer, label) counts as the 2x2 table."""
    return Confusion(tp=table[(1, 1)], fp=table[(1, 0)], tn=table[(0, 0)], fn=table[(0, 1)])


def _entry(conn: sqlite3.Connection, experiment_id: str, labels: str) -> Entry:
    row = conn.execute(_EXPERIMENT_SQL, (experiment_id,)).fetchone()
    params = {"experiment_id": experiment_id, "checksum": row["data_checksum"]}
    n_results = errors = unlabelled = 0
    narrative: Counter[tuple[int, int]] = Counter()
    for error, detected, label, n in conn.execute(
            _NARRATIVE_SQL.format(label=narrative_label_sql(labels)), params):
        n_results += n
        if error:
            errors += n
        elif detected is not None and label is None:
            unlabelled += n
        elif detected is not None:
            narrative[(int(detected), int(label))] += n
    cases = case_metrics(conn, experiment_id, labels=labels)
    prompt_tokens, completion_tokens, _ = store.token_totals(conn, experiment_id)
    config = json.loads(row["config_json"]) if row["config_json"] else {}
    return Entry(
        experiment_id=experiment_id, name=row["experiment_name"], study_id=row["study_id"],
        study_cell=row["study_cell"], study_repeat=row["study_repeat"],
        model=row["model_name"], temperature=row["temperature"],
        prompt_version=row["prompt_version"], data_checksum=row["data_checksum"],
        n_results=n_results, errors=errors, unlabelled=unlabelled,
        narrative=_confusion(narrative), case=cases.confusion,
        case_conflicts=cases.conflicts,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        cost=cost_estimate(config.get("model") or {}, prompt_tokens, completion_tokens),
        wall_s=_seconds_between(row["start_time"], row["end_time"]),
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    """Wall time from the stored start and end (local time, or ISO with a zone)."""
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (ValueError, TypeError):  # unparsable, or one stamp with a zone and one without
        return None


def _best(entries: Sequence[Entry]) -> str | None:
    """The highest narrative F1; on a tie the first in board order."""
    scored = [e for e in entries if e.f1 is not None]
    if not scored:
        return None
    return max(scored, key=lambda e: e.f1 or 0.0).experiment_id


def _versus_best(conn: sqlite3.Connection, entries: Sequence[Entry], best: str | None,
                 labels: str) -> tuple[VersusBest, ...]:
    if best is None:
        return ()
    pairs = [pairing(conn, best, e.experiment_id, labels) for e in entries
             if e.experiment_id != best]
    adjusted = holm([p.mcnemar_p_exact for p in pairs])
    return tuple(VersusBest(p, q) for p, q in zip(pairs, adjusted, strict=True))


def _decisions(conn: sqlite3.Connection, checksums: Sequence[str | None]) -> int:
    known = [c for c in checksums if c is not None]
    if not known:
        return 0
    marks = ", ".join("?" * len(known))
    return int(conn.execute(
        f"SELECT COUNT(*) FROM label_sets WHERE label_set = ? AND data_checksum IN ({marks})",
        (ADJUDICATED, *known)).fetchone()[0])


# Every answer of a cell's repeats, narrative by narrative (an error is NULL).
_ANSWERS_SQL = """
SELECT r.incident_id, r.narrative_type, r.experiment_id,
       CASE WHEN r.error_occurred = 0 THEN r.detected END
FROM narrative_results r WHERE r.experiment_id IN ({marks})
ORDER BY r.incident_id, r.narrative_type
"""


def _repeat_cells(entries: Sequence[Entry], study_id: str) -> dict[str, list[str]]:
    """The study's cells with two or more experiments, in board order."""
    cells: dict[str, list[str]] = {}
    for e in entries:
        if e.study_id == study_id and e.study_cell is not None:
            cells.setdefault(e.study_cell, []).append(e.experiment_id)
    return {cell: ids for cell, ids in cells.items() if len(ids) >= 2}


def _repeat_agreement(conn: sqlite3.Connection, cell: str,
                      ids: list[str]) -> RepeatAgreement:
    rows = conn.execute(_ANSWERS_SQL.format(marks=", ".join("?" * len(ids))), ids)
    answers: list[list[bool | None]] = []
    for _, group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
        given = {str(r[2]): r[3] for r in group}
        answers.append([None if given.get(i) is None else bool(given[i]) for i in ids])
    answers = [runs for runs in answers if any(a is not None for a in runs)]
    # Fleiss' table: per narrative every repeat answered, how many said yes and no.
    table = [[yes, len(runs) - yes] for runs in answers if None not in runs
             for yes in [sum(a is True for a in runs)]]
    return RepeatAgreement(cell=cell, experiment_ids=tuple(ids), n_narratives=len(answers),
                           n_all_answered=len(table), fleiss_kappa=fleiss_kappa(table),
                           flip_share=flip_share(answers))


# --------------------------------------------------------------------------- figures


def _figures(c: Confusion) -> dict[str, Any]:
    """Counts, the four figures and their 95 % intervals (an interval is None where its
    figure is: Wilson's whole range (0, 1) for 0/0 would read as a measurement)."""
    out: dict[str, Any] = {"n": c.n, "n_tp": c.tp, "n_fp": c.fp, "n_tn": c.tn, "n_fn": c.fn}
    for name, value, interval in (
            ("precision", c.precision, proportion_interval(c.tp, c.tp + c.fp)),
            ("recall", c.recall, proportion_interval(c.tp, c.tp + c.fn)),
            ("f1", _f1(c), f1_interval(c.tp, c.fp, c.fn)),
            ("accuracy", c.accuracy, proportion_interval(c.tp + c.tn, c.n))):
        out[name] = value
        out[f"{name}_ci"] = interval if value is not None else None
    return out


def _ranks(board: Board) -> dict[str, int]:
    """Rank by narrative F1 (1 = best); experiments without an F1 have none."""
    scored = sorted((e for e in board.entries if e.f1 is not None),
                    key=lambda e: -(e.f1 or 0.0))
    return {e.experiment_id: rank for rank, e in enumerate(scored, 1)}


def _warnings(board: Board) -> list[str]:
    lines = []
    if not board.same_data:
        lines.append(f"warning: the experiments ran on {len(board.dropped)} different data "
                     "loads (data checksums differ): they are not scored over the same "
                     "narratives")
    for e in board.entries:
        if e.case_conflicts:
            lines.append(f"warning: {e.experiment_id}: {e.case_conflicts} cases whose "
                         "narratives carry different case labels are left out at case level")
    return lines


def _labels_note(board: Board) -> str:
    if board.decisions is None:
        return f"labels: {board.labels}"
    return f"labels: {board.labels} ({board.decisions} decisions)"


# --------------------------------------------------------------------------- text


def _ci(value: float | None, interval: Interval | None) -> str:
    if value is None or interval is None:
        return "-"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _cut(text: str | None, width: int) -> str:
    text = "-" if text is None else text
    return text if len(text) <= width else text[:width - 1] + "~"


def _short(experiment_id: str) -> str:
    return experiment_id[:SHORT_ID]


def _run_lines(board: Board) -> list[str]:
    # The cell or name comes last and whole: a cell label names every value of the cell.
    lines = [f"{'#':>3}  {'experiment':<10}  {'model':<26}  {'T':>4}  {'prompt':<8}  "
             f"{'results':>7}  {'errors':>6}  {'wall':>7}  {'tokens in / out':>17}  "
             f"{'cost':>8}  cell / name"]
    for i, e in enumerate(board.entries, 1):
        tokens = f"{e.prompt_tokens} / {e.completion_tokens}"
        lines.append(
            f"{i:>3}  {_short(e.experiment_id):<10}  {_cut(e.model, 26):<26}  "
            f"{fmt(e.temperature, 2):>4}  {_cut(e.prompt_version, 8):<8}  "
            f"{e.n_results:>7}  {e.errors:>6}  {_duration(e.wall_s):>7}  {tokens:>17}  "
            f"{fmt(e.cost, 4):>8}  {e.label}")
    return lines


def _figure_lines(board: Board) -> list[str]:
    ranks = _ranks(board)
    width = 20
    lines = [f"{'#':>3}  {'rank':>4}  {'scored':>6}  {'F1':<{width}}  "
             f"{'precision':<{width}}  {'recall':<{width}}  {'accuracy':<{width}}  "
             f"{'kappa':>6}"]
    for i, e in enumerate(board.entries, 1):
        fig = _figures(e.narrative)
        mark = "*" if e.experiment_id == board.best else " "
        rank = ranks.get(e.experiment_id)
        lines.append(
            f"{i:>3}{mark} {rank or '-':>4}  {e.narrative.n:>6}  "
            + "  ".join(f"{_ci(fig[k], fig[k + '_ci']):<{width}}"
                        for k in ("f1", "precision", "recall", "accuracy"))
            + f"  {fmt(e.kappa):>6}")
    return lines


def _case_lines(board: Board) -> list[str]:
    lines = [f"{'#':>3}  {'cases':>6}  {'precision':>9}  {'recall':>6}  {'F1':>6}"]
    for i, e in enumerate(board.entries, 1):
        c = e.case
        lines.append(f"{i:>3}  {c.n:>6}  {fmt(c.precision):>9}  {fmt(c.recall):>6}  "
                     f"{fmt(_f1(c)):>6}")
    return lines


def _versus_lines(board: Board) -> list[str]:
    if board.best is None:
        return ["best: - (no experiment has a labelled answer to score)"]
    best = next(e for e in board.entries if e.experiment_id == board.best)
    lines = [f"best: #{board.number(board.best)} {board.best} (F1 {fmt(best.f1)})"]
    if board.pair is not None:  # two experiments: compare.py's lines say it all
        first, second = board.pair.experiment_1, board.pair.experiment_2
        return [*lines, f"pairwise: experiment 1 = #1 {first}, experiment 2 = #2 {second}",
                *(f"  {line}" for line in pairing_lines(board.pair))]
    if not board.versus_best:
        return lines
    lines.append(f"McNemar exact test against the best, on the labelled narratives both "
                 f"answered (Holm-adjusted over {len(board.versus_best)} comparisons):")
    for v in board.versus_best:
        p = v.pairing
        lines.append(
            f"  #{board.number(p.experiment_2)} {_short(p.experiment_2)}: "
            f"{p.n_labelled} labelled of {p.n_paired} paired, "
            f"b = {p.mcnemar_b} (only the best right), c = {p.mcnemar_c} (only this right), "
            f"p = {fmt_p(p.mcnemar_p_exact)}, Holm p = {fmt_p(v.p_holm)}; "
            f"agreement {fmt(p.agreement)}, kappa {fmt(p.kappa)}")
    return lines


def _repeat_lines(board: Board) -> list[str]:
    if not board.repeats:
        return []
    lines = ["test-retest agreement of repeated cells (answers detected / not):"]
    for r in board.repeats:
        numbers = ", ".join(f"#{board.number(i)}" for i in r.experiment_ids)
        lines.append(
            f"  cell {r.cell} ({len(r.experiment_ids)} repeats: {numbers}): "
            f"Fleiss' kappa {fmt(r.fleiss_kappa)} on {r.n_all_answered} narratives every "
            f"repeat answered; answer flips on {fmt(r.flip_share)} of the narratives with "
            "two answers or more")
    return lines


def _dropped_lines(board: Board) -> list[str]:
    lines = []
    for checksum, summary in board.dropped:
        head, *rest = describe(summary, limit=5)
        lines.append(f"not sent to the model (data {checksum or '-'}): {head}")
        lines += [f"  {line}" for line in rest]
    return lines


def render_text(board: Board) -> str:
    study = f" of study {board.study_id}" if board.study_id else ""
    blocks = [
        [f"leaderboard: {len(board.entries)} experiments{study}; {_labels_note(board)}",
         *_warnings(board)],
        _run_lines(board),
        ["narrative level (95% intervals; * = best F1)", *_figure_lines(board)],
        ["case level (a case is detected when any of its narratives is)",
         *_case_lines(board)],
        _versus_lines(board),
        _repeat_lines(board),
        _dropped_lines(board),
    ]
    return "\n\n".join("\n".join(block) for block in blocks if block)


# --------------------------------------------------------------------------- JSON


def _plain(value: Any) -> Any:
    """JSON's own types only: tuples become lists, NaN and infinities None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _entry_json(e: Entry, rank: int | None) -> dict[str, Any]:
    return {
        "experiment_id": e.experiment_id, "name": e.name, "study_id": e.study_id,
        "study_cell": e.study_cell,
        "study_repeat": e.study_repeat, "model": e.model, "temperature": e.temperature,
        "prompt_version": e.prompt_version, "data_checksum": e.data_checksum,
        "rank": rank, "n_results": e.n_results, "errors": e.errors,
        "unlabelled": e.unlabelled,
        "narrative": _figures(e.narrative), "kappa": e.kappa,
        "case": _figures(e.case) | {"conflicting_labels": e.case_conflicts},
        "tokens": {"prompt": e.prompt_tokens, "completion": e.completion_tokens},
        "cost": e.cost, "wall_s": e.wall_s,
    }


def to_json(board: Board) -> dict[str, Any]:
    """Everything on the board, in JSON's own types. With exactly two experiments their
    pairwise figures ("pair") also stand at the top level (experiment_1, n_paired,
    agreement, kappa, mcnemar_*), where `compare ID1 ID2 --json` has always printed them."""
    ranks = _ranks(board)
    pair = pairing_json(board.pair) if board.pair is not None else None
    out: dict[str, Any] = {
        "labels": board.labels, "adjudicated_decisions": board.decisions,
        "study_id": board.study_id, "same_data": board.same_data,
        "warnings": [w.removeprefix("warning: ") for w in _warnings(board)],
        "experiments": [_entry_json(e, ranks.get(e.experiment_id)) for e in board.entries],
        "best": board.best,
        "versus_best": [pairing_json(v.pairing) | {"mcnemar_p_holm": v.p_holm}
                        for v in board.versus_best],
        "repeats": [{"cell": r.cell, "experiment_ids": r.experiment_ids,
                     "n_narratives": r.n_narratives, "n_all_answered": r.n_all_answered,
                     "fleiss_kappa": r.fleiss_kappa, "flip_share": r.flip_share}
                    for r in board.repeats],
        "dropped": [{"data_checksum": c, "summary": s} for c, s in board.dropped],
        "pair": pair,
    }
    plain: dict[str, Any] = _plain((pair or {}) | out)
    return plain


# --------------------------------------------------------------------------- HTML


F1_CHART_WIDTH = 700.0
F1_LABEL_CAP = 28  # characters of an experiment's label beside its row


def _f1_row(y: float, low: float, f1: float, high: float, x: _svg.Scale,
            colour: str) -> str:
    """One experiment: its F1 as a dot on a horizontal 95 % error bar with end caps."""
    bar = (f"M{_svg.num(x(low))} {_svg.num(y)}H{_svg.num(x(high))}"
           + "".join(f"M{_svg.num(x(end))} {_svg.num(y - 5)}v10" for end in (low, high)))
    return (_svg.path(bar, stroke=colour, width=1.5)
            + _svg.dots([(f1, 0.0)], x, _svg.Scale(0, 0, y, y), colour, size=8.0))


def chart_f1(board: Board) -> str:
    """F1 of every experiment with its 95 % interval as error bars, best in colour."""
    rows = [(i, e) for i, e in enumerate(board.entries, 1) if e.f1 is not None]
    labels = [f"#{i} {_cut(e.label, F1_LABEL_CAP)}" for i, e in rows]
    height = max(240.0, 45.0 * len(board.entries) + 120)
    left = _svg.y_label_room(labels, title=False)
    frame = _svg.Frame(left, 16.0, F1_CHART_WIDTH - left - 24, height - 16 - 50)
    x = frame.x(-0.02, 1.02)  # a point at 0 or 1 stays whole
    values = _svg.ticks(0.0, 1.0)
    rows_y = _svg.Scale(0, max(1, len(rows)), frame.top, frame.bottom)  # row 1 on top
    parts = [_svg.x_axis(frame, x, values, _svg.tick_labels(values),
                         "narrative F1 with 95% interval", grid=True)]
    for k, (_, e) in enumerate(rows):
        low, high = f1_interval(e.narrative.tp, e.narrative.fp, e.narrative.fn)
        colour = POSITIVE_COLOUR if e.experiment_id == board.best else NEGATIVE_COLOUR
        parts.append(_f1_row(rows_y(k + 0.5), low, e.f1 or 0.0, high, x, colour))
    parts += [_svg.frame_box(frame),
              _svg.y_axis(frame, rows_y, [k + 0.5 for k in range(len(rows))], labels)]
    return _svg.document(F1_CHART_WIDTH, height, "F1 with its 95% interval per experiment",
                         *parts)


def _html_table(board: Board) -> str:
    ranks = _ranks(board)
    rows = []
    for i, e in enumerate(board.entries, 1):
        fig = _figures(e.narrative)
        c = e.case
        rows.append((
            f"{i}{' *' if e.experiment_id == board.best else ''}",
            ranks.get(e.experiment_id), e.experiment_id, e.label, e.model,
            fmt(e.temperature, 2), e.prompt_version, e.n_results, e.errors, e.narrative.n,
            *(_ci(fig[k], fig[k + "_ci"]) for k in ("f1", "precision", "recall", "accuracy")),
            fmt(e.kappa), c.n, fmt(c.precision), fmt(c.recall), fmt(_f1(c)),
            f"{e.prompt_tokens} / {e.completion_tokens}", fmt(e.cost, 4), _duration(e.wall_s),
        ))
    return _table(("#", "rank", "experiment", "cell / name", "model", "T", "prompt",
                   "results", "errors", "scored", "F1 [95% CI]", "precision [95% CI]",
                   "recall [95% CI]", "accuracy [95% CI]", "kappa", "cases", "case P",
                   "case R", "case F1", "tokens in / out", "cost", "wall"),
                  rows, cls="metrics")


def render_html(board: Board) -> str:
    study = f" of study {board.study_id}" if board.study_id else ""
    title = f"asyncrunner leaderboard: {len(board.entries)} experiments{study}"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lists = [("comparisons", "Against the best", _versus_lines(board)),
             ("repeats", "Repeated cells", _repeat_lines(board)),
             ("dropped", "Not sent to the model", _dropped_lines(board))]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">{_esc(_labels_note(board))} · generated {generated}</p>'
        + "".join(_note(w) for w in _warnings(board))
        + _section("table", "Leaderboard", _html_table(board),
                   _note("Narrative-level figures with 95% intervals; * marks the best F1. "
                         "A case is detected when any of its narratives is."))
        + _section("chart", "F1", chart_f1(board))
        + "".join(_section(anchor, heading, _lines(lines))
                  for anchor, heading, lines in lists if lines)
        + "</body></html>\n"
    )


def _lines(lines: Iterable[str]) -> str:
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>"


def write_html(board: Board, path: Path) -> Path:
    """Write the page to `path` (atomically) and return it."""
    _write_atomic(Path(path), render_html(board))
    return Path(path)
