"""stats.py: every statistic against a published or hand-computed value, plus properties
(symmetry, monotonicity, bounds) checked over generated inputs."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncrunner.results import metrics
from asyncrunner.results.stats import (
    EXACT_UP_TO,
    f1_interval,
    f1_score,
    fleiss_kappa,
    flip_share,
    holm,
    mcnemar_exact,
    proportion_interval,
)

# --------------------------------------------------------------------------- Wilson


def test_wilson_zero_successes_has_upper_bound_z2_over_n_plus_z2() -> None:
    # With k = 0 the upper end reduces to z^2 / (n + z^2) = 3.8415 / 13.8415.
    lower, upper = proportion_interval(0, 10)
    assert lower == 0.0
    assert upper == pytest.approx(0.2775, abs=1e-4)


def test_wilson_half_matches_published_interval() -> None:
    # 5/10: (0.2366, 0.7634), as in Newcombe (1998) and any Wilson calculator.
    lower, upper = proportion_interval(5, 10)
    assert (round(lower, 4), round(upper, 4)) == (0.2366, 0.7634)


def test_wilson_all_successes_mirrors_no_successes() -> None:
    lower, upper = proportion_interval(10, 10)
    assert upper == 1.0
    assert lower == pytest.approx(1 - 0.2775, abs=1e-4)


def test_wilson_without_trials_is_the_whole_range() -> None:
    assert proportion_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        proportion_interval(k, n)


@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_holds_the_point_estimate(kn: tuple[int, int]) -> None:
    k, n = kn
    lower, upper = proportion_interval(k, n)
    assert 0.0 <= lower <= k / n <= upper <= 1.0


# --------------------------------------------------------------------------- F1 interval


def test_f1_interval_is_wilson_on_half_the_doubled_count() -> None:
    # tp=8, fp=2, fn=2: F1 = 16/20 = 0.8 on n_eff = 20/2 = 10, i.e. Wilson for 8/10,
    # published as (0.4902, 0.9433).
    lower, upper = f1_interval(8, 2, 2)
    assert (round(lower, 4), round(upper, 4)) == (0.4902, 0.9433)


def test_f1_interval_with_no_true_positive_starts_at_zero() -> None:
    # F1 = 0 on n_eff = 5/2: upper = z^2 / (2.5 + z^2) = 3.8415 / 6.3415.
    lower, upper = f1_interval(0, 3, 2)
    assert lower == 0.0
    assert upper == pytest.approx(3.8415 / 6.3415, abs=1e-4)


def test_f1_interval_without_positives_is_the_whole_range() -> None:
    assert f1_interval(0, 0, 0) == (0.0, 1.0)


def test_f1_interval_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        f1_interval(1, -1, 0)


@given(st.integers(0, 500), st.integers(0, 500), st.integers(0, 500))
def test_f1_interval_holds_f1_and_is_deterministic(tp: int, fp: int, fn: int) -> None:
    interval = f1_interval(tp, fp, fn)
    assert interval == f1_interval(tp, fp, fn)
    f1 = f1_score(tp, fp, fn)
    if f1 is not None:
        assert 0.0 <= interval[0] <= f1 <= interval[1] <= 1.0


# --------------------------------------------------------------------------- F1


def test_f1_score_hand_computed() -> None:
    # tp=2, fp=1, fn=1: 4 / (4 + 1 + 1).
    assert f1_score(2, 1, 1) == pytest.approx(4 / 6)
    assert f1_score(0, 0, 0) is None


def test_f1_is_zero_when_nothing_is_flagged_but_positives_exist() -> None:
    # No positive predictions: precision is 0/0, yet every positive was missed.
    assert f1_score(0, 0, 3) == 0.0
    assert metrics.Confusion(tp=0, fp=0, tn=7, fn=3).f1 is None  # why stats has its own


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_f1_score_is_the_harmonic_mean_where_both_are_defined(tp: int, fp: int, tn: int,
                                                              fn: int) -> None:
    theirs = metrics.Confusion(tp=tp, fp=fp, tn=tn, fn=fn).f1
    if theirs is not None:
        assert f1_score(tp, fp, fn) == pytest.approx(theirs, abs=1e-12)


# --------------------------------------------------------------------------- Fleiss' kappa

WIKIPEDIA_FLEISS = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_matches_wikipedia_example() -> None:
    # 10 subjects, 14 raters, 5 categories: P_bar = 0.378, P_e = 0.213, kappa = 0.210.
    kappa = fleiss_kappa(WIKIPEDIA_FLEISS)
    assert kappa is not None
    assert abs(kappa - 0.210) < 0.001


def test_fleiss_kappa_hand_computed_extremes() -> None:
    # Two raters always agree, categories balanced: P_bar = 1, P_e = 0.5, kappa = 1.
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    # Two raters always split: P_bar = 0, P_e = 0.5, kappa = -1.
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)


def test_fleiss_kappa_is_undefined_when_everything_is_one_category() -> None:
    assert fleiss_kappa([[3, 0], [3, 0]]) is None
    assert fleiss_kappa([]) is None


@pytest.mark.parametrize("counts", [
    [[2, 1], [1, 1]],    # 3 raters, then 2
    [[1, 0], [0, 1]],    # a single rater
    [[2, 0], [1, 0, 1]],  # ragged categories
    [[3, -1], [1, 1]],   # negative count
])
def test_fleiss_kappa_rejects_malformed_tables(counts: list[list[int]]) -> None:
    with pytest.raises(ValueError):
        fleiss_kappa(counts)


# --------------------------------------------------------------------------- flip share


def test_flip_share_counts_narratives_with_two_answers() -> None:
    answers = [
        [True, True, True],    # stable
        [True, False, True],   # flipped
        [False, None, False],  # stable once the error is dropped
        [None, None, True],    # one answer: cannot flip, left out
        [None, True, False],   # flipped
        [],                    # no answer: left out
    ]
    assert flip_share(answers) == pytest.approx(2 / 4)


def test_flip_share_is_undefined_without_repeats() -> None:
    assert flip_share([[True], [None, False], []]) is None
    assert flip_share([]) is None


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_hand_computed() -> None:
    # X ~ Bin(10, 1/2): P(X <= 1) = (1 + 10) / 1024, doubled.
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024 == 0.021484375
    # P(X = 0) = 1/32 for Bin(5, 1/2), doubled.
    assert mcnemar_exact(0, 5) == 0.0625


def test_mcnemar_exact_without_a_difference_is_one() -> None:
    assert mcnemar_exact(7, 7) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


@given(st.integers(0, 3_000), st.integers(0, 3_000))
def test_mcnemar_exact_is_symmetric_and_a_probability(b: int, c: int) -> None:
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    assert 0.0 <= p <= 1.0


@given(st.integers(0, 150), st.integers(0, 150))
def test_mcnemar_exact_matches_the_full_binomial_sum(b: int, c: int) -> None:
    n = b + c
    full = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, 2 * full / 2**n), rel=1e-15)


def test_mcnemar_log_space_path_matches_exact_integers() -> None:
    # Just past the switch to log space, against the untruncated integer tail.
    b, c = 9_800, EXACT_UP_TO + 10 - 9_800
    n = b + c
    term = total = math.comb(n, b)
    for k in range(b, 0, -1):
        term = term * k // (n - k + 1)
        total += term
    assert mcnemar_exact(b, c) == pytest.approx(2 * total / 2**n, rel=1e-9)


def test_mcnemar_exact_is_close_to_normal_for_large_counts() -> None:
    p = mcnemar_exact(40_000, 41_000)
    assert 0.0 < p < 1.0
    # Continuity-corrected normal approximation: z = (1000 - 1) / sqrt(81000) = 3.51.
    z = (1000 - 1) / math.sqrt(81_000)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


# --------------------------------------------------------------------------- Holm


def test_holm_hand_worked_example() -> None:
    # m = 4, sorted: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04, raised to
    # 0.06 by the step before it. Back in input order: [0.03, 0.06, 0.06, 0.02]
    # (R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm")).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_handles_edge_cases() -> None:
    assert holm([0.4, 0.5, 0.9]) == [1.0, 1.0, 1.0]
    assert holm([]) == []
    assert holm([0.02]) == [0.02]
    # Ties get one value whatever their order: 0.01*3 = 0.03 for both, then 0.5.
    assert holm([0.01, 0.5, 0.01]) == pytest.approx([0.03, 0.5, 0.03])


@pytest.mark.parametrize("bad", [[-0.1], [1.5], [math.nan]])
def test_holm_rejects_values_outside_zero_one(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        holm(bad)


@given(st.lists(st.floats(0.0, 1.0), max_size=40))
def test_holm_is_monotone_bounded_and_no_smaller_than_raw(pvalues: list[float]) -> None:
    adjusted = holm(pvalues)
    m = len(pvalues)
    assert len(adjusted) == m
    for p, q in zip(pvalues, adjusted, strict=True):
        assert p <= q <= 1.0
    # Order-preserving: a smaller raw p never gets a larger adjusted one.
    pairs = sorted(zip(pvalues, adjusted, strict=True))
    assert all(q1 <= q2 for (_, q1), (_, q2) in itertools.pairwise(pairs))
    if pvalues:
        # The smallest p is simply Bonferroni-corrected.
        smallest = min(range(m), key=lambda i: pvalues[i])
        assert adjusted[smallest] == pytest.approx(min(1.0, m * pvalues[smallest]))
