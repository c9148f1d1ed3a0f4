"""`asyncrunner compare`: two experiments over the same narratives, side by side.

This module owns the comparison record (`Comparison`), gathering it (`compare`) and
printing it (`render_text`, `to_json`); every figure in it comes from metrics.py.

Results are paired on (incident_id, narrative_type) where neither experiment has an error.
On the pairs: raw agreement and Cohen's kappa between the two experiments' answers. On the
pairs that also carry a manual label: McNemar's test of whether the two differ in accuracy
(b = only experiment 1 right, c = only experiment 2 right). Each experiment's own metric
table (all of its scored results, metrics.metrics_report) is shown next to the other.
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
    mcnemar_test,
    metrics_report,
    paired_counts,
)


@dataclass(frozen=True, slots=True)
class Comparison:
    experiment_1: str
    experiment_2: str
    describe_1: str                # name, model, provider, temperature, prompt version
    describe_2: str
    same_data: bool                # both ran on the same data checksum
    n_paired: int                  # pairs where neither has an error
    n_agree: int
    agreement: float
    kappa: float | None            # None: undefined (expected agreement is 1)
    n_labelled: int                # pairs with a manual label (McNemar's subset)
    mcnemar_b: int                 # exp 1 correct, exp 2 wrong
    mcnemar_c: int                 # exp 1 wrong, exp 2 correct
    mcnemar_chi2: float | None     # continuity-corrected statistic; None when b + c == 0
    mcnemar_p_chi2: float | None
    mcnemar_p_exact: float
    mcnemar_statistic: float | None  # of the method used (None for the exact test)
    mcnemar_p: float               # of the method used
    mcnemar_method: str
    metrics_1: MetricsReport
    metrics_2: MetricsReport
    # What each experiment's data file lost at ingest (db/drops.py); None: not recorded.
    dropped_1: dict[str, Any] | None = None
    dropped_2: dict[str, Any] | None = None


# --------------------------------------------------------------------------- data


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
    rec1, rec2 = _require(conn, id1), _require(conn, id2)
    counts = paired_counts(conn, id1, id2)
    table = counts.table
    agreement = table.agreement
    if agreement is None:  # not a single pair
        raise UsageError(f"experiments {id1} and {id2} have no narrative that both "
                         "classified without an error; nothing to compare")
    test = mcnemar_test(counts.b, counts.c)
    return Comparison(
        experiment_1=id1, experiment_2=id2,
        describe_1=_describe(rec1), describe_2=_describe(rec2),
        same_data=rec1.data_checksum == rec2.data_checksum,
        n_paired=table.n, n_agree=table.n_agree, agreement=agreement,
        kappa=table.kappa, n_labelled=counts.n_labelled,
        mcnemar_b=test.b, mcnemar_c=test.c, mcnemar_chi2=test.chi2,
        mcnemar_p_chi2=test.p_chi2, mcnemar_p_exact=test.p_exact,
        mcnemar_statistic=test.statistic, mcnemar_p=test.p, mcnemar_method=test.method,
        metrics_1=metrics_report(conn, id1), metrics_2=metrics_report(conn, id2),
        dropped_1=drop_summary(conn, rec1.data_checksum),
        dropped_2=drop_summary(conn, rec2.data_checksum),
    )


# --------------------------------------------------------------------------- output


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.2e}"


_METRIC_COLS = ("n", "precision", "recall", "f1", "accuracy")


def _metric_cells(m: Confusion | None) -> str:
    if m is None:
        return "  ".join(f"{'':>6}" if k != "n" else f"{'':>5}" for k in _METRIC_COLS)
    return "  ".join([f"{m.n:>5}"] + [f"{_f(v):>6}"
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


def render_text(c: Comparison) -> str:
    chi2 = (f"chi2 = {_f(c.mcnemar_chi2, 4)}, p = {_p(c.mcnemar_p_chi2)}"
            if c.mcnemar_chi2 is not None else "chi2 = - (no discordant pairs)")
    lines = [
        f"experiment 1  {c.experiment_1}  {c.describe_1}",
        f"experiment 2  {c.experiment_2}  {c.describe_2}",
    ]
    if not c.same_data:
        lines.append("warning: the experiments ran on different data (checksums differ)")
    lines += [
        f"paired narratives (no error in either)  {c.n_paired}",
        f"agreement      {c.agreement:.3f} ({c.n_agree}/{c.n_paired})",
        f"Cohen's kappa  {_f(c.kappa)}",
        (f"McNemar on {c.n_labelled} labelled pairs: b = {c.mcnemar_b} (only exp 1 correct), "
         f"c = {c.mcnemar_c} (only exp 2 correct)"),
        f"  {chi2}; exact binomial p = {_p(c.mcnemar_p_exact)}",
        (f"  used: {c.mcnemar_method}, p = {_p(c.mcnemar_p)}"
         f" (exact when b + c < {EXACT_BELOW})"),
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


def to_json(c: Comparison) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: the dataclass fields, flat, each metric table
    as metrics_json stores it, plus the threshold that chose the McNemar method (interval
    tuples become lists once serialised)."""
    return asdict(c) | {"metrics_1": c.metrics_1.to_dict(), "metrics_2": c.metrics_2.to_dict(),
                        "mcnemar_exact_below": EXACT_BELOW}
