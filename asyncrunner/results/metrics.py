"""Every classification figure asyncrunner reports, and the SQL that counts them.

This module owns:

* the confusion matrix of one set of scored results (`Confusion`): precision, recall, F1,
  accuracy and the 95 % Wilson intervals of the three proportions (`wilson_interval`);
* an experiment's `MetricsReport` (overall, per narrative type, and what was not scored),
  read from `narrative_results`, whose `to_dict()` is the JSON stored in
  `experiments.metrics_json` and printed by `status --json`;
* the same at the level of cases (`case_metrics`: a case is detected when any of its
  narratives answered without an error is), and how many reviewer decisions an
  experiment's labels take in (`label_decisions`);
* agreement between two experiments on the narratives both classified (`Agreement`:
  raw agreement and Cohen's kappa) and McNemar's test of their accuracy (`McNemarResult`),
  read from `narrative_results` by `paired_counts`.

A result is *scored* when it has no error, an answer (`detected`) and a label; errors and
unlabelled results are counted, never scored. Every reader takes `labels`: "manual" (the
default: the labels of the input file, stored with each result) or "adjudicated" (those
with the reviewers' decisions in their place); labels.py writes the SQL of either. The
metrics_json that finalize stores is always the manual one.

Everything but the readers is a pure function of counts. Pure Python (math.erfc): the
statistics are few and their formulas short, so scipy would be a heavy dependency for
nothing; the exact McNemar p is stats.py's, so there is one implementation of it. The
formulas are kept operation for operation as they were first written, so figures already
stored in databases are reproduced to the last bit.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from asyncrunner.results import stats
from asyncrunner.results.labels import ADJUDICATED, case_label_sql, narrative_label_sql

Interval = tuple[float, float]

Z_95 = 1.96
OVERALL = "overall"      # metrics_json key of all scored results
UNSCORED = "unscored"    # metrics_json key of the error / unlabelled counts

# Below this many discordant pairs the chi-square approximation is poor; use the exact test.
EXACT_BELOW = 25
METHOD_EXACT = "exact binomial"
METHOD_CHI2 = "chi-square with continuity correction"


# --------------------------------------------------------------------------- proportions


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval | None:
    """95 % Wilson score interval for a proportion; None when there is nothing to count."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamped because rounding can push an end a hair past 0 or 1 when p is 0 or 1.
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True, slots=True)
class Confusion:
    """Scored results as a 2x2 table: detected (1/0) against the manual label (1/0).
    Every figure is None when its denominator is zero (nothing to measure it on)."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn,
                         self.fn + other.fn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        """Harmonic mean of precision and recall: None if either is undefined, 0.0 when
        both are 0 (no true positive at all) rather than a division by zero."""
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision_interval(self) -> Interval | None:
        return wilson_interval(self.tp, self.tp + self.fp)

    @property
    def recall_interval(self) -> Interval | None:
        return wilson_interval(self.tp, self.tp + self.fn)

    @property
    def accuracy_interval(self) -> Interval | None:
        return wilson_interval(self.tp + self.tn, self.n)

    def to_dict(self) -> dict[str, Any]:
        """One entry of metrics_json; the key order is that of databases already written."""
        return {
            "n_tp": self.tp, "n_fp": self.fp, "n_tn": self.tn, "n_fn": self.fn,
            "n": self.n, "precision": self.precision, "recall": self.recall,
            "f1": self.f1, "accuracy": self.accuracy,
            "intervals": {"precision": self.precision_interval,
                          "recall": self.recall_interval,
                          "accuracy": self.accuracy_interval},
        }

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Confusion:
        """Read back an entry of metrics_json: only the counts, every figure follows."""
        return cls(int(entry["n_tp"]), int(entry["n_fp"]), int(entry["n_tn"]),
                   int(entry["n_fn"]))


# --------------------------------------------------------------------------- one experiment


@dataclass(frozen=True, slots=True)
class Unscored:
    """Results left out of every figure: error rows, and error-free rows with no label."""

    errors: int = 0
    unlabelled: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"errors": self.errors, "unlabelled": self.unlabelled}


@dataclass(frozen=True, slots=True)
class MetricsReport:
    """An experiment's figures: all scored results, each narrative type, what was not
    scored. A tuple rather than a dict holds the types so the report stays immutable."""

    overall: Confusion
    per_type: tuple[tuple[str, Confusion], ...]  # in narrative_type order
    unscored: Unscored

    @property
    def by_type(self) -> dict[str, Confusion]:
        return dict(self.per_type)

    def rows(self) -> list[tuple[str, Confusion]]:
        """("overall", ...) then each narrative type: the rows every table shows."""
        return [(OVERALL, self.overall), *self.per_type]

    def get(self, key: str) -> Confusion | None:
        """The row named `key` ("overall" or a narrative type), None if there is none."""
        return self.overall if key == OVERALL else self.by_type.get(key)

    def to_dict(self) -> dict[str, Any]:
        """Exactly the structure of experiments.metrics_json (and `status --json`)."""
        out: dict[str, Any] = {OVERALL: self.overall.to_dict()}
        for name, confusion in self.per_type:
            out[name] = confusion.to_dict()
        out[UNSCORED] = self.unscored.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricsReport:
        """Read back a stored metrics_json (the counts; every figure is recomputed)."""
        unscored = data.get(UNSCORED) or {}
        return cls(
            overall=Confusion.from_dict(data[OVERALL]),
            per_type=tuple((k, Confusion.from_dict(v)) for k, v in data.items()
                           if k not in (OVERALL, UNSCORED)),
            unscored=Unscored(int(unscored.get("errors", 0)),
                              int(unscored.get("unlabelled", 0))),
        )


def data_checksum(conn: sqlite3.Connection, experiment_id: str) -> str | None:
    """The experiment's data checksum: the load whose reviewer decisions apply to it."""
    row = conn.execute("SELECT data_checksum FROM experiments WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _params(conn: sqlite3.Connection, experiment_id: str, labels: str) -> dict[str, Any]:
    """Named parameters of every reader's SQL (the checksum is only read when needed)."""
    return {"experiment_id": experiment_id,
            "checksum": data_checksum(conn, experiment_id) if labels != "manual" else None}


# One pass over the experiment's rows, grouped by type; the overall row is their sum. Every
# type with a stored result gets a row, even one with nothing scored (n = 0), as before.
# {label} is the result's label (labels.py), y.
_REPORT_SQL = """
SELECT narrative_type,
  COALESCE(SUM(error_occurred = 0 AND detected = 1 AND y = 1), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 1 AND y = 0), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 0 AND y = 0), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 0 AND y = 1), 0),
  COALESCE(SUM(error_occurred = 1), 0),
  COALESCE(SUM(error_occurred = 0 AND y IS NULL), 0)
FROM (SELECT r.narrative_type, r.error_occurred, r.detected, {label} AS y
      FROM narrative_results r WHERE r.experiment_id = :experiment_id)
GROUP BY narrative_type
ORDER BY narrative_type
"""


def metrics_report(conn: sqlite3.Connection, experiment_id: str, *,
                   labels: str = "manual") -> MetricsReport:
    """The experiment's figures against `labels`, from the database alone (the same after
    any resume)."""
    sql = _REPORT_SQL.format(label=narrative_label_sql(labels))
    per_type: list[tuple[str, Confusion]] = []
    overall, unscored = Confusion(), Unscored()
    for name, tp, fp, tn, fn, errors, unlabelled in conn.execute(
            sql, _params(conn, experiment_id, labels)):
        confusion = Confusion(int(tp), int(fp), int(tn), int(fn))
        per_type.append((name, confusion))
        overall += confusion
        unscored = Unscored(unscored.errors + int(errors),
                            unscored.unlabelled + int(unlabelled))
    return MetricsReport(overall, tuple(per_type), unscored)


@dataclass(frozen=True, slots=True)
class CaseMetrics:
    """Cases (incidents) as a 2x2 table: a case is detected when any of its narratives
    answered without an error is, and is left out when none did. Its truth is the case
    label; cases whose rows carry different case labels are counted, never scored."""

    confusion: Confusion
    unlabelled: int = 0   # cases with an answer but no case label
    conflicts: int = 0    # cases whose rows disagree on the case label

    def to_dict(self) -> dict[str, Any]:
        return self.confusion.to_dict() | {"unlabelled": self.unlabelled,
                                           "conflicting_labels": self.conflicts}


# Per case: the highest answer of its error-free narratives, and its lowest and highest
# case label (equal unless the data disagree with itself).
_CASE_SQL = """
SELECT predicted, low, high, COUNT(*) FROM (
  SELECT MAX(CASE WHEN r.error_occurred = 0 THEN r.detected END) AS predicted,
         MIN({label}) AS low, MAX({label}) AS high
  FROM narrative_results r WHERE r.experiment_id = :experiment_id
  GROUP BY r.incident_id)
WHERE predicted IS NOT NULL
GROUP BY 1, 2, 3
"""


def case_metrics(conn: sqlite3.Connection, experiment_id: str, *,
                 labels: str = "manual") -> CaseMetrics:
    """The experiment's figures over cases, against `labels` (labels.case_label_sql)."""
    cells: Counter[tuple[int, int]] = Counter()
    unlabelled = conflicts = 0
    sql = _CASE_SQL.format(label=case_label_sql(labels))
    for predicted, low, high, n in conn.execute(sql, _params(conn, experiment_id, labels)):
        if low is None:
            unlabelled += int(n)
        elif low != high:
            conflicts += int(n)
        else:
            cells[(int(predicted), int(low))] += int(n)
    confusion = Confusion(tp=cells[(1, 1)], fp=cells[(1, 0)], tn=cells[(0, 0)],
                          fn=cells[(0, 1)])
    return CaseMetrics(confusion, unlabelled, conflicts)


@dataclass(frozen=True, slots=True)
class LabelDecisions:
    """Reviewer decisions (label set 'adjudicated') that apply to an experiment's results:
    how many, and how many of them differ from the manual label they replace."""

    applied: int = 0
    changed: int = 0


_DECISIONS_SQL = f"""
SELECT COUNT(*), COALESCE(SUM(l.label IS NOT r.manual_flag_ind), 0)
FROM narrative_results r
JOIN label_sets l
  ON l.label_set = '{ADJUDICATED}' AND l.data_checksum = :checksum
 AND l.incident_id = r.incident_id AND l.narrative_type = r.narrative_type
WHERE r.experiment_id = :experiment_id
"""


def label_decisions(conn: sqlite3.Connection, experiment_id: str) -> LabelDecisions:
    """The decisions `labels="adjudicated"` puts in place of this experiment's manual labels
    (decisions on narratives it has no result for are not counted)."""
    applied, changed = conn.execute(
        _DECISIONS_SQL, {"experiment_id": experiment_id,
                         "checksum": data_checksum(conn, experiment_id)}).fetchone()
    return LabelDecisions(int(applied), int(changed))


# --------------------------------------------------------------------------- two experiments


@dataclass(frozen=True, slots=True)
class Agreement:
    """Two raters' binary answers on the same items: n<rater 1><rater 2>."""

    n11: int = 0
    n10: int = 0
    n01: int = 0
    n00: int = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> Agreement:
        counts = Counter(pairs)
        if unknown := set(counts) - {(1, 1), (1, 0), (0, 1), (0, 0)}:
            raise ValueError(f"labels must be 0 or 1, got {sorted(unknown)}")
        return cls(counts[(1, 1)], counts[(1, 0)], counts[(0, 1)], counts[(0, 0)])

    @property
    def n(self) -> int:
        return self.n11 + self.n10 + self.n01 + self.n00

    @property
    def n_agree(self) -> int:
        return self.n11 + self.n00

    @property
    def agreement(self) -> float | None:
        return _ratio(self.n_agree, self.n)

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa; None when undefined (no pairs, or both raters always gave the
        same single label, so chance agreement is already 1)."""
        n = self.n
        if n == 0:
            return None
        observed = self.n_agree / n
        # Integer products until the one division: sum over labels of the two raters'
        # marginal counts, over n^2.
        expected = ((self.n11 + self.n10) * (self.n11 + self.n01)
                    + (self.n01 + self.n00) * (self.n10 + self.n00)) / (n * n)
        if expected >= 1.0:
            return None
        return (observed - expected) / (1.0 - expected)


def cohen_kappa(pairs: Iterable[tuple[int, int]]) -> float | None:
    """Cohen's kappa of two raters' 0/1 labels given as (rater 1, rater 2) pairs."""
    return Agreement.from_pairs(pairs).kappa


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
    stats.mcnemar_exact computes it (exact integers up to 20,000 pairs, log space above),
    so it takes well under a millisecond for any count."""
    return stats.mcnemar_exact(b, c)


def mcnemar(b: int, c: int) -> tuple[float | None, float, str]:
    """(statistic or None for exact, p, method): exact when b + c < 25, else chi-square."""
    if b + c < EXACT_BELOW:
        return None, mcnemar_exact(b, c), METHOD_EXACT
    statistic, p = mcnemar_chi2(b, c)
    assert statistic is not None and p is not None  # b + c >= 25 > 0
    return statistic, p, METHOD_CHI2


@dataclass(frozen=True, slots=True)
class McNemarResult:
    """McNemar's test on b (only experiment 1 right) and c (only experiment 2 right):
    both the chi-square and the exact p, and which one is used."""

    b: int
    c: int
    chi2: float | None       # continuity-corrected statistic; None when b + c == 0
    p_chi2: float | None
    p_exact: float
    statistic: float | None  # of the method used (None for the exact test)
    p: float                 # of the method used
    method: str


def mcnemar_test(b: int, c: int) -> McNemarResult:
    chi2, p_chi2 = mcnemar_chi2(b, c)
    statistic, p, method = mcnemar(b, c)
    return McNemarResult(b, c, chi2, p_chi2, mcnemar_exact(b, c), statistic, p, method)


@dataclass(frozen=True, slots=True)
class PairedCounts:
    """Two experiments' results on the narratives both classified without an error."""

    table: Agreement  # experiment 1's answer against experiment 2's, every pair
    n_labelled: int   # pairs with one manual label: McNemar's subset
    b: int            # labelled pairs only experiment 1 got right
    c: int            # labelled pairs only experiment 2 got right


# Labels come from the source file (or a reviewer's decision on its load), so both rows of a
# pair carry the same one; a pair whose labels differ (e.g. the file was re-labelled between
# runs) is left out of McNemar's test rather than scored against either label (y is NULL,
# so every comparison with it is too).
_PAIRS_SQL = """
WITH labelled AS (
  SELECT r1.detected AS d1, r2.detected AS d2, {label_1} AS y1, {label_2} AS y2
  FROM narrative_results r1
  JOIN narrative_results r2
    ON r2.incident_id = r1.incident_id AND r2.narrative_type = r1.narrative_type
  WHERE r1.experiment_id = :id1 AND r2.experiment_id = :id2
    AND r1.error_occurred = 0 AND r2.error_occurred = 0
    AND r1.detected IS NOT NULL AND r2.detected IS NOT NULL
), pairs AS (
  SELECT d1, d2, CASE WHEN y1 IS y2 THEN y1 END AS y FROM labelled
)
SELECT COALESCE(SUM(d1 = 1 AND d2 = 1), 0), COALESCE(SUM(d1 = 1 AND d2 = 0), 0),
       COALESCE(SUM(d1 = 0 AND d2 = 1), 0), COALESCE(SUM(d1 = 0 AND d2 = 0), 0),
       COALESCE(SUM(y IS NOT NULL), 0),
       COALESCE(SUM(d1 = y AND d2 != y), 0), COALESCE(SUM(d1 != y AND d2 = y), 0)
FROM pairs
"""


def paired_counts(conn: sqlite3.Connection, id1: str, id2: str, *,
                  labels: str = "manual") -> PairedCounts:
    """Pair the two experiments' results on (incident_id, narrative_type) and count,
    against `labels` (each result's own, from its experiment's load)."""
    sql = _PAIRS_SQL.format(
        label_1=narrative_label_sql(labels, result="r1", checksum=":checksum1"),
        label_2=narrative_label_sql(labels, result="r2", checksum=":checksum2"))
    manual = labels == "manual"
    params = {"id1": id1, "id2": id2,
              "checksum1": None if manual else data_checksum(conn, id1),
              "checksum2": None if manual else data_checksum(conn, id2)}
    n11, n10, n01, n00, n_labelled, b, c = (
        int(v) for v in conn.execute(sql, params).fetchone())
    return PairedCounts(Agreement(n11, n10, n01, n00), n_labelled, b, c)
