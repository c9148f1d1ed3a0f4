"""Two experiments over the same narratives, side by side: the pairwise part of
`asyncrunner compare` (leaderboard.py holds the rest).

This module owns the pairing of two experiments (`Pairing`, `pairing`, `pairing_lines`),
and the two-experiment comparison record built on it (`Comparison`, `compare`,
`render_text`, `to_json`); every figure comes from metrics.py, but for the exact McNemar
p, which is stats.py's (the same value, in well under a millisecond for any count).

Results are paired on (incident_id, narrative_type) where neither experiment has an error.
On the pairs: raw agreement and Cohen's kappa between the two experiments' answers. On the
pairs that also carry a label (manual, or adjudicated: labels.py): McNemar's test of
whether the two differ in accuracy (b = only experiment 1 right, c = only experiment 2
right). `Comparison` adds each experiment's own metric table (all of its scored results,
metrics.metrics_report) and what its data file lost at ingest.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from asyncrunner.db import store
from asyncrunner.db.drops import describe, drop_summary
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results.metrics import (
    EXACT_BELOW,
    OVERALL,
    Confusion,
    MetricsReport,
    mcnemar,
    mcnemar_chi2,
    metrics_report,
    paired_counts,
)
from asyncrunner.results.stats import mcnemar_exact


@dataclass(frozen=True, slots=True)
class Pairing:
    """Two experiments' answers on the narratives both gave one (the JSON keys of
    `compare --json` since its first version)."""

    experiment_1: str
    experiment_2: str
    n_paired: int                  # pairs where neither has an error
    n_agree: int
    agreement: float | None        # None: not a single pair
    kappa: float | None            # None: undefined (expected agreement is 1)
    n_labelled: int                # pairs with one label (McNemar's subset)
    mcnemar_b: int                 # exp 1 correct, exp 2 wrong
    mcnemar_c: int                 # exp 1 wrong, exp 2 correct
    mcnemar_chi2: float | None     # continuity-corrected statistic; None when b + c == 0
    mcnemar_p_chi2: float | None
    mcnemar_p_exact: float
    mcnemar_statistic: float | None  # of the method used (None for the exact test)
    mcnemar_p: float               # of the method used
    mcnemar_method: str


@dataclass(frozen=True, slots=True)
class Comparison(Pairing):
    describe_1: str                # name, model, provider, temperature, prompt version
    describe_2: str
    same_data: bool                # both ran on the same data checksum
    metrics_1: MetricsReport
    metrics_2: MetricsReport
    # What each experiment's data file lost at ingest (db/drops.py); None: not recorded.
    dropped_1: dict[str, Any] | None = None
    dropped_2: dict[str, Any] | None = None


# --------------------------------------------------------------------------- data

def pairing(conn: sqlite3.Connection, first: str, second: str,
            labels: str = "manual") -> Pairing:
    """Agreement, kappa and McNemar of two experiments (no pair at all is not an error
    here: agreement is then None and McNemar's p 1)."""
    counts = paired_counts(conn, first, second, labels=labels)
    table, b, c = counts.table, counts.b, counts.c
    chi2, p_chi2 = mcnemar_chi2(b, c)
    statistic, p, method = mcnemar(b, c)  # the exact branch only below EXACT_BELOW pairs
    return Pairing(
        experiment_1=first, experiment_2=second, n_paired=table.n, n_agree=table.n_agree,
        agreement=table.agreement, kappa=table.kappa, n_labelled=counts.n_labelled,
        mcnemar_b=b, mcnemar_c=c, mcnemar_chi2=chi2, mcnemar_p_chi2=p_chi2,
        mcnemar_p_exact=mcnemar_exact(b, c), mcnemar_statistic=statistic, mcnemar_p=p,
        mcnemar_method=method)


def _describe(record: store.ExperimentRecord) -> str:
    return (f"{record.experiment_name or '?'} ({record.model_name}, {record.model_provider}, "
            f"T={record.temperature}, prompt {record.prompt_version})")


def _require(conn: sqlite3.Connection, experiment_id: str) -> store.ExperimentRecord:
    record = store.get_experiment(conn, experiment_id)
    if record is None:
        raise RefusedError(f"no experiment {experiment_id} in this database; "
                           "list them with `asyncrunner status`")
    return record


def compare(conn: sqlite3.Connection, id1: str, id2: str) -> Comparison:
    """The two experiments against the manual labels (as metrics_report scores them)."""
    rec1, rec2 = _require(conn, id1), _require(conn, id2)
    pair = pairing(conn, id1, id2)
    if pair.agreement is None:  # not a single pair
        raise UsageError(f"experiments {id1} and {id2} have no narrative that both "
                         "classified without an error; nothing to compare")
    return Comparison(
        **asdict(pair),
        describe_1=_describe(rec1), describe_2=_describe(rec2),
        same_data=rec1.data_checksum == rec2.data_checksum,
        metrics_1=metrics_report(conn, id1), metrics_2=metrics_report(conn, id2),
        dropped_1=drop_summary(conn, rec1.data_checksum),
        dropped_2=drop_summary(conn, rec2.data_checksum),
    )


# --------------------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure to `digits` decimals; "-" when undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_p(value: float | None) -> str:
    """A p-value to three significant digits, in exponent form below 1e-4."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.2e}"


_METRIC_COLS = ("n", "precision", "recall", "f1", "accuracy")


def _metric_cells(m: Confusion | None) -> str:
    if m is None:
        return "  ".join(f"{'':>6}" if k != "n" else f"{'':>5}" for k in _METRIC_COLS)
    return "  ".join([f"{m.n:>5}"] + [f"{fmt(v):>6}"
                                     for v in (m.precision, m.recall, m.f1, m.accuracy)])


def _metrics_lines(c: Comparison) -> list[str]:
    keys = [OVERALL, *sorted(set(c.metrics_1.by_type) | set(c.metrics_2.by_type))]
    cols = "  ".join(f"{'n':>5}" if k == "n" else f"{k[:6]:>6}" for k in _METRIC_COLS)
    width = len(cols)
    lines = [f"  {'set':10}  {'experiment 1':<{width}}  |  {'experiment 2':<{width}}",
             f"  {'':10}  {cols}  |  {cols}"]
    for key in keys:
        lines.append(f"  {key[:10]:10}  {_metric_cells(c.metrics_1.get(key))}  |  "
                     f"{_metric_cells(c.metrics_2.get(key))}")
    return lines


def pairing_lines(p: Pairing) -> list[str]:
    """Agreement, kappa and McNemar's test, as `compare` has always printed them."""
    chi2 = (f"chi2 = {fmt(p.mcnemar_chi2, 4)}, p = {fmt_p(p.mcnemar_p_chi2)}"
            if p.mcnemar_chi2 is not None else "chi2 = - (no discordant pairs)")
    return [
        f"paired narratives (no error in either)  {p.n_paired}",
        f"agreement      {fmt(p.agreement)} ({p.n_agree}/{p.n_paired})",
        f"Cohen's kappa  {fmt(p.kappa)}",
        (f"McNemar on {p.n_labelled} labelled pairs: b = {p.mcnemar_b} (only exp 1 correct), "
         f"c = {p.mcnemar_c} (only exp 2 correct)"),
        f"  {chi2}; exact binomial p = {fmt_p(p.mcnemar_p_exact)}",
        (f"  used: {p.mcnemar_method}, p = {fmt_p(p.mcnemar_p)}"
         f" (exact when b + c < {EXACT_BELOW})"),
    ]


def render_text(c: Comparison) -> str:
    lines = [
        f"experiment 1  {c.experiment_1}  {c.describe_1}",
        f"experiment 2  {c.experiment_2}  {c.describe_2}",
    ]
    if not c.same_data:
        lines.append("warning: the experiments ran on different data (checksums differ)")
    lines += [
        *pairing_lines(c),
        "metrics (each experiment's own scored results, labelled and error-free)",
        *_metrics_lines(c),
        *_dropped_lines(c),
    ]
    return "\n".join(lines)


def _dropped_lines(c: Comparison) -> list[str]:
    """What never reached the model, per experiment: the same narratives are compared only
    where both kept them."""
    first, second = describe(c.dropped_1, limit=5), describe(c.dropped_2, limit=5)
    if c.dropped_1 is not None and c.dropped_1 == c.dropped_2:
        return ["not sent to the model (same data file load for both)",
                *(f"  {line}" for line in first)]
    return ["not sent to the model",
            f"  experiment 1: {first[0]}", *(f"    {line}" for line in first[1:]),
            f"  experiment 2: {second[0]}", *(f"    {line}" for line in second[1:])]


def pairing_json(p: Pairing) -> dict[str, Any]:
    """The dataclass fields, flat, plus the threshold that chose the McNemar method."""
    return asdict(p) | {"mcnemar_exact_below": EXACT_BELOW}


def to_json(c: Comparison) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: the dataclass fields, flat, each metric table
    as metrics_json stores it, plus the threshold that chose the McNemar method (interval
    tuples become lists once serialised)."""
    return pairing_json(c) | {"metrics_1": c.metrics_1.to_dict(),
                              "metrics_2": c.metrics_2.to_dict()}
