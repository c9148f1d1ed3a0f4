"""Every classification figure asyncrunner reports, and the SQL that counts them.

This module owns:

* the confusion matrix of one set of scored results (`Confusion`): precision, recall, F1,
  accuracy and the 95 % Wilson intervals of the three proportions (`wilson_interval`);
* an experiment's `MetricsReport` (overall, per narrative type, and what was not scored),
  read from `narrative_results`, whose `to_dict()` is the JSON stored in
  `experiments.metrics_json` and printed by `status --json`;
* agreement between two experiments on the narratives both classified (`Agreement`:
  raw agreement and Cohen's kappa) and McNemar's test of their accuracy (`McNemarResult`),
  read from `narrative_results` by `paired_counts`.

A result is *scored* when it has no error, an answer (`detected`) and a manual label;
errors and unlabelled results are counted, never scored.

Everything but the two readers is a pure function of counts. Pure Python (math.erfc,
math.comb): the statistics are few and their exact formulas short, so scipy would be a
heavy dependency for nothing. The formulas are kept operation for operation as they were
first written, so figures already stored in databases are reproduced to the last bit.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


# One pass over the experiment's rows, grouped by type; the overall row is their sum. Every
# type with a stored result gets a row, even one with nothing scored (n = 0), as before.
_REPORT_SQL = """
SELECT narrative_type,
  COALESCE(SUM(error_occurred = 0 AND detected = 1 AND manual_flag_ind = 1), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 1 AND manual_flag_ind = 0), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 0 AND manual_flag_ind = 0), 0),
  COALESCE(SUM(error_occurred = 0 AND detected = 0 AND manual_flag_ind = 1), 0),
  COALESCE(SUM(error_occurred = 1), 0),
  COALESCE(SUM(error_occurred = 0 AND manual_flag_ind IS NULL), 0)
FROM narrative_results
WHERE experiment_id = ?
GROUP BY narrative_type
ORDER BY narrative_type
"""


def metrics_report(conn: sqlite3.Connection, experiment_id: str) -> MetricsReport:
    """The experiment's figures, from the database alone (the same after any resume)."""
    per_type: list[tuple[str, Confusion]] = []
    overall, unscored = Confusion(), Unscored()
    for name, tp, fp, tn, fn, errors, unlabelled in conn.execute(
            _REPORT_SQL, (experiment_id,)):
        confusion = Confusion(int(tp), int(fp), int(tn), int(fn))
        per_type.append((name, confusion))
        overall += confusion
        unscored = Unscored(unscored.errors + int(errors),
                            unscored.unlabelled + int(unlabelled))
    return MetricsReport(overall, tuple(per_type), unscored)


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
    Integer arithmetic until the final division, so large b+c loses no precision."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    outcomes: int = 2 ** n  # equally likely splits of n pairs
    return min(1.0, 2 * tail / outcomes)


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


# Labels come from the source file, so both rows of a pair carry the same one; a pair whose
# labels differ (e.g. the file was re-labelled between runs) is left out of McNemar's test
# rather than scored against either label (y is NULL, so every comparison with it is too).
_PAIRS_SQL = """
WITH pairs AS (
  SELECT r1.detected AS d1, r2.detected AS d2,
         CASE WHEN r1.manual_flag_ind IS r2.manual_flag_ind THEN r1.manual_flag_ind END AS y
  FROM narrative_results r1
  JOIN narrative_results r2
    ON r2.incident_id = r1.incident_id AND r2.narrative_type = r1.narrative_type
  WHERE r1.experiment_id = ? AND r2.experiment_id = ?
    AND r1.error_occurred = 0 AND r2.error_occurred = 0
    AND r1.detected IS NOT NULL AND r2.detected IS NOT NULL
)
SELECT COALESCE(SUM(d1 = 1 AND d2 = 1), 0), COALESCE(SUM(d1 = 1 AND d2 = 0), 0),
       COALESCE(SUM(d1 = 0 AND d2 = 1), 0), COALESCE(SUM(d1 = 0 AND d2 = 0), 0),
       COALESCE(SUM(y IS NOT NULL), 0),
       COALESCE(SUM(d1 = y AND d2 != y), 0), COALESCE(SUM(d1 != y AND d2 = y), 0)
FROM pairs
"""


def paired_counts(conn: sqlite3.Connection, id1: str, id2: str) -> PairedCounts:
    """Pair the two experiments' results on (incident_id, narrative_type) and count."""
    n11, n10, n01, n00, n_labelled, b, c = (
        int(v) for v in conn.execute(_PAIRS_SQL, (id1, id2)).fetchone())
    return PairedCounts(Agreement(n11, n10, n01, n00), n_labelled, b, c)
