"""`asyncrunner compare`: two experiments over the same narratives, side by side.

Results are paired on (incident_id, narrative_type) where neither experiment has an error.
On the pairs: raw agreement and Cohen's kappa between the two experiments' answers. On the
pairs that also carry a manual label: McNemar's test of whether the two differ in accuracy
(b = only experiment 1 right, c = only experiment 2 right). Each experiment's own metric
table (all of its scored results, from finalize.metrics_report) is shown next to the other.

Pure Python (math.erfc, math.comb): the statistics are few and exact formulas are short, so
scipy would be a heavy dependency for nothing.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import store
from .errors import RefusedError, UsageError
from .finalize import metrics_report

# Below this many discordant pairs the chi-square approximation is poor; use the exact test.
EXACT_BELOW = 25
METHOD_EXACT = "exact binomial"
METHOD_CHI2 = "chi-square with continuity correction"


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
    metrics_1: dict[str, Any]
    metrics_2: dict[str, Any]


# --------------------------------------------------------------------------- statistics


def cohen_kappa(pairs: Sequence[tuple[int, int]]) -> float | None:
    """Cohen's kappa of two raters' labels; None when undefined (no pairs, or both raters
    always gave the same single label, so chance agreement is already 1)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[k] * second[k] for k in first) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def mcnemar_chi2(b: int, c: int) -> tuple[float | None, float | None]:
    """(statistic, p) of the continuity-corrected test, (|b-c|-1)^2 / (b+c) on 1 df, as R's
    mcnemar.test computes it; (None, None) when there are no discordant pairs."""
    if b + c == 0:
        return None, None
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    # Survival function of chi-square with 1 df: P(X > x) = erfc(sqrt(x / 2)).
    return statistic, math.erfc(math.sqrt(statistic / 2))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact p: under H0 the discordant pairs split Binomial(b+c, 1/2).
    Integer arithmetic until the final division, so large b+c loses no precision."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(b: int, c: int) -> tuple[float | None, float, str]:
    """(statistic or None for exact, p, method): exact when b + c < 25, else chi-square."""
    if b + c < EXACT_BELOW:
        return None, mcnemar_exact(b, c), METHOD_EXACT
    statistic, p = mcnemar_chi2(b, c)
    assert statistic is not None and p is not None  # b + c >= 25 > 0
    return statistic, p, METHOD_CHI2


# --------------------------------------------------------------------------- data


# Labels come from the source file, so both rows of a pair carry the same one; a pair whose
# labels differ (e.g. the file was re-labelled between runs) is left out of McNemar's test
# rather than scored against either label.
_PAIRS_SQL = """
SELECT r1.detected, r2.detected,
       CASE WHEN r1.manual_flag_ind IS r2.manual_flag_ind THEN r1.manual_flag_ind END
FROM narrative_results r1
JOIN narrative_results r2
  ON r2.incident_id = r1.incident_id AND r2.narrative_type = r1.narrative_type
WHERE r1.experiment_id = ? AND r2.experiment_id = ?
  AND r1.error_occurred = 0 AND r2.error_occurred = 0
  AND r1.detected IS NOT NULL AND r2.detected IS NOT NULL
"""


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
    rows = conn.execute(_PAIRS_SQL, (id1, id2)).fetchall()
    if not rows:
        raise UsageError(f"experiments {id1} and {id2} have no narrative that both "
                         "classified without an error; nothing to compare")
    pairs = [(int(r[0]), int(r[1])) for r in rows]
    labelled = [(int(r[0]), int(r[1]), int(r[2])) for r in rows if r[2] is not None]
    b = sum(1 for d1, d2, y in labelled if d1 == y and d2 != y)
    c = sum(1 for d1, d2, y in labelled if d1 != y and d2 == y)
    chi2, p_chi2 = mcnemar_chi2(b, c)
    statistic, p, method = mcnemar(b, c)
    n_agree = sum(1 for d1, d2 in pairs if d1 == d2)
    return Comparison(
        experiment_1=id1, experiment_2=id2,
        describe_1=_describe(rec1), describe_2=_describe(rec2),
        same_data=rec1.data_checksum == rec2.data_checksum,
        n_paired=len(pairs), n_agree=n_agree, agreement=n_agree / len(pairs),
        kappa=cohen_kappa(pairs), n_labelled=len(labelled),
        mcnemar_b=b, mcnemar_c=c, mcnemar_chi2=chi2, mcnemar_p_chi2=p_chi2,
        mcnemar_p_exact=mcnemar_exact(b, c), mcnemar_statistic=statistic, mcnemar_p=p,
        mcnemar_method=method,
        metrics_1=metrics_report(conn, id1), metrics_2=metrics_report(conn, id2),
    )


# --------------------------------------------------------------------------- output


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.2e}"


_METRIC_COLS = ("n", "precision", "recall", "f1", "accuracy")


def _metric_cells(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "  ".join(f"{'':>6}" if k != "n" else f"{'':>5}" for k in _METRIC_COLS)
    return "  ".join(f"{entry['n']:>5}" if k == "n" else f"{_f(entry[k]):>6}"
                     for k in _METRIC_COLS)


def _metrics_lines(c: Comparison) -> list[str]:
    keys = ["overall"] + sorted(
        (set(c.metrics_1) | set(c.metrics_2)) - {"overall", "unscored"})
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
        f"McNemar on {c.n_labelled} labelled pairs: b = {c.mcnemar_b} (only exp 1 correct), "
        f"c = {c.mcnemar_c} (only exp 2 correct)",
        f"  {chi2}; exact binomial p = {_p(c.mcnemar_p_exact)}",
        f"  used: {c.mcnemar_method}, p = {_p(c.mcnemar_p)}"
        f" (exact when b + c < {EXACT_BELOW})",
        "metrics (each experiment's own scored results, labelled and error-free)",
        *_metrics_lines(c),
    ]
    return "\n".join(lines)


def to_json(c: Comparison) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: the dataclass fields, flat, plus the threshold
    that chose the McNemar method (interval tuples become lists once serialised)."""
    return asdict(c) | {"mcnemar_exact_below": EXACT_BELOW}
