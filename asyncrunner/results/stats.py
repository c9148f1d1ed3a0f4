"""The statistics of the leaderboard (leaderboard.py) that metrics.py does not have.

This module owns, as pure functions of counts or answers:

* 95 % intervals: Wilson for proportions (`proportion_interval`) and for F1 (`f1_interval`),
  and F1 itself as the leaderboard ranks it (`f1_score`);
* agreement of repeated runs: Fleiss' kappa between many raters (`fleiss_kappa`), and how
  often repeats change their answer (`flip_share`);
* paired tests: exact McNemar (`mcnemar_exact`, fast for any count) and Holm's correction
  over a family of them (`holm`).

The confusion matrix, Cohen's kappa and the chi-square McNemar are metrics.py's
(`Confusion`, `Agreement`, `mcnemar_chi2`); nothing here repeats them. A prediction of
None is an error (no usable answer): it is left out, never scored as a negative. Standard
library only, for the same reason as metrics.py: the formulas are short and exact, so
scipy would be a heavy dependency for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Interval = tuple[float, float]

Z_95 = 1.959963984540054  # standard normal quantile at 0.975
UNINFORMATIVE: Interval = (0.0, 1.0)

# The McNemar tail is summed from its largest term down and stops once a term adds less
# than 2**-_TAIL_BITS of the total: the rest is below double precision anyway, and near
# b == c it cuts the work from min(b, c) terms to about sqrt(b + c).
_TAIL_BITS = 64
# Above this many discordant pairs exact integers get slow (math.comb(20000, 10000) takes
# about 5 ms, and the cost grows faster than n); log space takes well under 1 ms.
EXACT_UP_TO = 20_000


# --------------------------------------------------------------------------- intervals


def _wilson(p: float, n: float, z: float) -> Interval:
    """Wilson score interval of an observed proportion p on a (possibly fractional) n > 0."""
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At p = 0 (or 1) the end is exactly 0 (or 1), but centre - half rounds a hair off it,
    # which would leave the point estimate outside its own interval.
    lower = 0.0 if p == 0 else max(0.0, centre - half)
    upper = 1.0 if p == 1 else min(1.0, centre + half)
    return (lower, upper)


def proportion_interval(k: int, n: int, z: float = Z_95) -> Interval:
    """Wilson score interval (95 % by default) for k successes in n trials.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps close
    to its nominal coverage at p near 0 or 1 and at small n, both common here. With n == 0
    nothing is known, so the whole range (0.0, 1.0) is returned."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return UNINFORMATIVE
    return _wilson(k / n, n, z)


def f1_interval(tp: int, fp: int, fn: int, z: float = Z_95) -> Interval:
    """A deterministic 95 % interval for F1: Wilson on F1 = 2TP / (2TP + FP + FN) with an
    effective sample size n_eff = (2TP + FP + FN) / 2 = TP + (FP + FN) / 2.

    Why: F1 is exactly the proportion 2TP of 2TP + FP + FN, but each true positive is
    counted twice there, so that total overstates the information and would give too
    narrow an interval; halving it (one unit per true positive, half a unit per error)
    is conservative against the TP + FP + FN items actually involved. Wilson rather than
    a bootstrap because it is closed-form and reproducible with no seed, and behaves well
    at F1 near 0 or 1. It is an approximation, and a conservative one: in simulation
    (100 to 2,000 items, F1 from 0.4 to 0.94) it covered the true F1 97.5-99.5 % of
    the time, so it is somewhat too wide, never too narrow.

    With no positives at all (TP = FP = FN = 0) F1 is undefined and nothing is known of
    it, so the whole range (0.0, 1.0) is returned, as `proportion_interval` does for n = 0.
    """
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    total = 2 * tp + fp + fn
    if total == 0:
        return UNINFORMATIVE
    return _wilson(2 * tp / total, total / 2, z)


def f1_score(tp: int, fp: int, fn: int) -> float | None:
    """F1 as 2TP / (2TP + FP + FN): 0.0 for a run that finds none of the positives, even
    when it flags nothing (precision 0/0), and None only with no positives at all.

    `metrics.Confusion.f1` is None in the first case as well; a leaderboard needs the 0,
    or a run that never says yes would drop out of the ranking instead of coming last."""
    total = 2 * tp + fp + fn
    return 2 * tp / total if total else None


# --------------------------------------------------------------------------- agreement


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa; counts[i][j] is how many raters put subject i in category j.

    Every subject must have the same number of raters n >= 2 and every row the same
    categories (ValueError otherwise). None when undefined: no subjects, or every rating
    fell in one category, so chance agreement P_e is 1."""
    if not counts:
        return None
    raters = _raters_per_subject(counts)
    subjects = len(counts)
    total = subjects * raters
    columns: list[int] = [sum(column) for column in zip(*counts, strict=True)]
    # Integer sums until the last division: P_bar = agree / (N n (n-1)) and
    # P_e = chance / (N n)^2, so kappa's numerator and denominator are both integers.
    agree = sum(c * c for row in counts for c in row) - total
    chance = sum(c * c for c in columns)
    if chance == total * total:
        return None
    pairs = subjects * raters * (raters - 1)
    return (agree * total * total - chance * pairs) / (pairs * (total * total - chance))


def _raters_per_subject(counts: Sequence[Sequence[int]]) -> int:
    categories = len(counts[0])
    if any(len(row) != categories for row in counts):
        raise ValueError("every subject needs a count for every category")
    if any(c < 0 for row in counts for c in row):
        raise ValueError("counts must be >= 0")
    raters = {sum(row) for row in counts}
    if len(raters) != 1:
        raise ValueError(f"every subject needs the same number of raters, got {sorted(raters)}")
    n = raters.pop()
    if n < 2:
        raise ValueError(f"need at least 2 raters per subject, got {n}")
    return n


def flip_share(answers: Sequence[Sequence[bool | None]]) -> float | None:
    """Share of narratives whose repeated runs disagree: answers[i] holds the R repeats'
    answers on narrative i. Errors (None) are dropped first; a narrative needs two answers
    left to be able to flip, so only those count. None when no narrative qualifies."""
    given = [[x for x in runs if x is not None] for runs in answers]
    eligible = [runs for runs in given if len(runs) >= 2]
    if not eligible:
        return None
    return sum(len(set(runs)) > 1 for runs in eligible) / len(eligible)


# --------------------------------------------------------------------------- tests


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: under H0 the b + c discordant pairs split as
    X ~ Binomial(b + c, 1/2), and p = min(1, 2 P(X <= min(b, c))); 1.0 with no pairs.

    Up to `EXACT_UP_TO` pairs the tail is summed in exact integers with one correctly
    rounded division; beyond, math.comb alone would take tens of milliseconds, so the tail
    is summed in log space (relative error about 1e-10, far below what a p-value needs)."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    if n <= EXACT_UP_TO:
        return min(1.0, 2 * _lower_tail_count(n, min(b, c)) / (1 << n))
    return min(1.0, math.exp(math.log(2) + _log_lower_tail(n, min(b, c))))


def _lower_tail_count(n: int, m: int) -> int:
    """Sum of comb(n, k) for k = m, m-1, ..., each from the one before, exactly. For
    m <= n/2 the terms only shrink going down, so the sum stops once they are negligible."""
    term = math.comb(n, m)
    total = term
    for k in range(m, 0, -1):
        term = term * k // (n - k + 1)  # comb(n, k-1)
        total += term
        if term << _TAIL_BITS < total:
            break
    return total


def _log_lower_tail(n: int, m: int) -> float:
    """log P(X <= m) for X ~ Binomial(n, 1/2) and m <= n/2: the largest term, P(X = m),
    from lgamma, times the sum of the smaller terms relative to it, which stays near 1."""
    log_top = math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1) - n * math.log(2)
    term = total = 1.0
    for k in range(m, 0, -1):
        term *= k / (n - k + 1)
        total += term
        if term < total * 2.0**-_TAIL_BITS:
            break
    return log_top + math.log(total)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    Step-down: the i-th smallest of m p-values is multiplied by m - i (i from 0), each
    adjusted value is at least the one before it in sorted order, and all are capped at
    1. Ties get the same adjusted value whatever their input order."""
    if any(not 0.0 <= p <= 1.0 for p in pvalues):  # also rejects NaN
        raise ValueError("p-values must lie in [0, 1]")
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
