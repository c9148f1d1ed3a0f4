"""metrics.py: every figure against hand-computed or published values, and the report read
from a real SQLite file in exactly the JSON shape stored in experiments.metrics_json."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncrunner.db.schema import connect
from asyncrunner.results import status
from asyncrunner.results.finalize import finalize
from asyncrunner.results.metrics import (
    EXACT_BELOW,
    METHOD_CHI2,
    METHOD_EXACT,
    Agreement,
    Confusion,
    MetricsReport,
    Unscored,
    cohen_kappa,
    mcnemar_exact,
    mcnemar_test,
    metrics_report,
    paired_counts,
    wilson_interval,
)

EID = "55555555-5555-4555-8555-555555555555"
OTHER = "66666666-6666-4666-8666-666666666666"


# --------------------------------------------------------------------------- Confusion


def test_confusion_hand_computed() -> None:
    # TP 2, FP 2, TN 4, FN 1 (the matrix of test_e2e): n = 9
    m = Confusion(tp=2, fp=2, tn=4, fn=1)
    assert m.n == 9
    assert m.precision == pytest.approx(2 / 4)       # TP / (TP + FP)
    assert m.recall == pytest.approx(2 / 3)          # TP / (TP + FN)
    # F1 = 2PR / (P + R) = 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert m.f1 == pytest.approx(4 / 7)
    assert m.accuracy == pytest.approx(6 / 9)        # (TP + TN) / n
    assert m.precision_interval == wilson_interval(2, 4)
    assert m.recall_interval == wilson_interval(2, 3)
    assert m.accuracy_interval == wilson_interval(6, 9)


def test_confusion_zero_denominators() -> None:
    empty = Confusion()
    assert empty.n == 0
    assert (empty.precision, empty.recall, empty.f1, empty.accuracy) == (None,) * 4
    assert (empty.precision_interval, empty.recall_interval,
            empty.accuracy_interval) == (None,) * 3
    # no positive label at all: recall undefined, so F1 undefined; precision 0/3 = 0
    no_positives = Confusion(tp=0, fp=3, tn=2, fn=0)
    assert no_positives.precision == 0.0 and no_positives.recall is None
    assert no_positives.f1 is None
    assert no_positives.accuracy == pytest.approx(2 / 5)
    assert no_positives.recall_interval is None
    # never detected: precision undefined (0/0), recall 0/3 = 0, F1 undefined
    never = Confusion(tp=0, fp=0, tn=4, fn=3)
    assert never.precision is None and never.recall == 0.0 and never.f1 is None
    # P = R = 0 (no true positive, both denominators non-zero): F1 is 0, not 0/0
    wrong = Confusion(tp=0, fp=2, tn=1, fn=3)
    assert (wrong.precision, wrong.recall, wrong.f1) == (0.0, 0.0, 0.0)
    assert wrong.accuracy == pytest.approx(1 / 6)


def test_confusion_perfect_and_sum() -> None:
    perfect = Confusion(tp=5, fp=0, tn=5, fn=0)
    assert (perfect.precision, perfect.recall, perfect.f1, perfect.accuracy) == (1.0,) * 4
    assert Confusion(1, 2, 3, 4) + Confusion(10, 20, 30, 40) == Confusion(11, 22, 33, 44)


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (8, 10, 0.490, 0.943),        # the textbook 8 of 10
        # Newcombe (1998), Stat Med 17:857, Table I, method 3 (score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_published_values(successes: int, n: int, low: float, high: float) -> None:
    interval = wilson_interval(successes, n)
    assert interval is not None
    digits = 3 if (successes, n) == (8, 10) else 4
    assert round(interval[0], digits) == low
    assert round(interval[1], digits) == high


def test_wilson_hand_computed_and_edges() -> None:
    # 8/10, z = 1.96: centre = (0.8 + 3.8416/20) / (1 + 3.8416/10) = 0.99208 / 1.38416,
    # half = 1.96 * sqrt(0.8 * 0.2 / 10 + 3.8416 / 400) / 1.38416
    centre = 0.99208 / 1.38416
    half = 1.96 * math.sqrt(0.016 + 0.009604) / 1.38416
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 0) is None
    # all successes: the upper end is clamped to exactly 1, the lower is 20/(20 + z^2)
    assert wilson_interval(20, 20) == pytest.approx((20 / (20 + 1.96 ** 2), 1.0))
    assert wilson_interval(20, 20)[1] == 1.0  # type: ignore[index]
    assert wilson_interval(0, 20)[0] == 0.0  # type: ignore[index]


# --------------------------------------------------------------------------- kappa


def test_kappa_textbook_tables() -> None:
    # Cohen's kappa, the two tables of equal observed agreement (po = 0.60, n = 100) in the
    # Wikipedia article "Cohen's kappa":
    # yes/yes 45, yes/no 15, no/yes 25, no/no 15: A says yes 60, B 70;
    # pe = .6*.7 + .4*.3 = .54; kappa = (.60 - .54) / .46 = 0.1304
    first = Agreement(n11=45, n10=15, n01=25, n00=15)
    assert first.agreement == pytest.approx(0.60)
    assert first.kappa == pytest.approx(0.06 / 0.46)
    assert round(first.kappa or 0, 4) == 0.1304
    # 25 / 35 / 5 / 35: A yes 60, B 30; pe = .6*.3 + .4*.7 = .46; kappa = .14 / .54 = 0.2593
    second = Agreement(n11=25, n10=35, n01=5, n00=35)
    assert round(second.kappa or 0, 4) == 0.2593
    # the worked example of the same article: 20 / 5 / 10 / 15 -> po .7, pe .5, kappa .4
    table = Agreement(20, 5, 10, 15)
    assert (table.n, table.n_agree) == (50, 35)
    assert table.kappa == pytest.approx(0.4)


def test_kappa_from_pairs_and_edges() -> None:
    pairs = [(1, 1)] * 20 + [(1, 0)] * 5 + [(0, 1)] * 10 + [(0, 0)] * 15
    assert Agreement.from_pairs(pairs) == Agreement(20, 5, 10, 15)
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([]) is None
    assert Agreement().agreement is None
    assert Agreement(n11=5).kappa is None            # both always 1: pe = 1, undefined
    assert Agreement(n10=2, n01=2).kappa == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="0 or 1"):
        cohen_kappa([(1, 2)])


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_chi_square_textbook() -> None:
    # Agresti, Categorical Data Analysis, presidential approval: 794 / 150 / 86 / 570.
    # Discordant b = 150, c = 86; corrected chi2 = (|150 - 86| - 1)^2 / 236 = 3969 / 236
    result = mcnemar_test(150, 86)
    assert result.method == METHOD_CHI2
    assert result.chi2 == result.statistic == pytest.approx(3969 / 236)  # 16.818
    assert result.p == result.p_chi2 == pytest.approx(math.erfc(math.sqrt(3969 / 472)))
    assert result.p == pytest.approx(4.115e-5, rel=1e-3)
    assert result.p_exact < 1e-4


def test_mcnemar_exact_hand_computed() -> None:
    # b = 0, c = 5: 2 * C(5, 0) / 2^5 = 2/32
    result = mcnemar_test(0, 5)
    assert result.method == METHOD_EXACT and result.statistic is None
    assert result.p == result.p_exact == pytest.approx(0.0625)
    # chi2 still reported: (5 - 1)^2 / 5 = 3.2, p = erfc(sqrt(1.6))
    assert result.chi2 == pytest.approx(3.2)
    assert result.p_chi2 == pytest.approx(math.erfc(math.sqrt(1.6)))
    # b = 2, c = 8: 2 * (1 + 10 + 45) / 1024 = 112/1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    none = mcnemar_test(0, 0)
    assert (none.chi2, none.p_chi2, none.p, none.method) == (None, None, 1.0, METHOD_EXACT)


def test_mcnemar_exact_is_stats_for_large_counts() -> None:
    from asyncrunner.results import stats

    def integer_tail(b: int, c: int) -> float:  # the formula metrics used before stats.py
        n = b + c
        return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)

    for b, c in [(0, 0), (0, 5), (2, 8), (10, 2), (100, 130), (1000, 1100), (2500, 2400)]:
        assert mcnemar_exact(b, c) == stats.mcnemar_exact(b, c)
        assert abs(mcnemar_exact(b, c) - integer_tail(b, c)) <= 1e-12
    p = mcnemar_exact(40_000, 41_000)
    assert p == stats.mcnemar_exact(40_000, 41_000) and 0.0 < p < 1e-3
    assert mcnemar_test(40_000, 41_000).p_exact == p


def test_mcnemar_switches_method_at_threshold() -> None:
    assert mcnemar_test(EXACT_BELOW - 1, 0).method == METHOD_EXACT
    at = mcnemar_test(EXACT_BELOW, 0)
    assert at.method == METHOD_CHI2
    assert at.statistic == pytest.approx((EXACT_BELOW - 1) ** 2 / EXACT_BELOW)


# --------------------------------------------------------------------------- from SQLite


def add_result(conn: sqlite3.Connection, eid: str, incident: str, ntype: str,
               detected: int | None, label: int | None, *, error: bool = False) -> None:
    conn.execute(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, detected, "
        "confidence, error_occurred, error_category, processed_at, manual_flag_ind) "
        "VALUES (?, ?, ?, ?, 0.9, ?, ?, '2026-11-23T12:00:00.000000Z', ?)",
        (eid, incident, ntype, None if error else detected, int(error),
         "timeout" if error else None, label))


# (type, detected, label, error, how many)
ROWS: list[tuple[str, int | None, int | None, bool, int]] = [
    ("LE", 1, 1, False, 3), ("LE", 1, 0, False, 1), ("LE", 0, 0, False, 2),
    ("LE", 0, 1, False, 1),
    ("LE", 1, None, False, 1),   # unlabelled: counted, not scored
    ("LE", None, 1, True, 1),    # error
    ("CME", 1, 1, False, 1), ("CME", 0, 0, False, 4), ("CME", 0, 1, False, 2),
    ("CME", None, 0, True, 2),
    ("ZZ", None, 1, True, 1),    # a type with nothing scored still gets its row
]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "x.db"
    conn = connect(path)
    i = 0
    for ntype, detected, label, error, count in ROWS:
        for _ in range(count):
            add_result(conn, EID, f"{i:04d}", ntype, detected, label, error=error)
            i += 1
    # another experiment's rows never count
    for j in range(5):
        add_result(conn, OTHER, f"{j:04d}", "LE", 1, 0)
    yield path, conn
    conn.close()


def test_report_from_sqlite_hand_computed(db: tuple[Path, sqlite3.Connection]) -> None:
    report = metrics_report(db[1], EID)
    # LE: TP 3, FP 1, TN 2, FN 1; CME: TP 1, FP 0, TN 4, FN 2; ZZ: nothing scored
    assert report.by_type == {"CME": Confusion(1, 0, 4, 2), "LE": Confusion(3, 1, 2, 1),
                              "ZZ": Confusion()}
    assert report.overall == Confusion(4, 1, 6, 3)
    assert report.unscored == Unscored(errors=4, unlabelled=1)
    o = report.overall
    # P = 4/5, R = 4/7, F1 = 2 * (4/5)(4/7) / (4/5 + 4/7) = (32/35) / (48/35) = 2/3
    assert o.n == 14 and o.precision == pytest.approx(0.8)
    assert o.recall == pytest.approx(4 / 7)
    assert o.f1 == pytest.approx(2 / 3) and o.accuracy == pytest.approx(10 / 14)
    cme = report.by_type["CME"]
    # P = 1/1, R = 1/3, F1 = 2 * 1 * (1/3) / (4/3) = 1/2
    assert cme.precision == 1.0 and cme.recall == pytest.approx(1 / 3)
    assert cme.f1 == pytest.approx(0.5)
    assert [k for k, _ in report.rows()] == ["overall", "CME", "LE", "ZZ"]
    assert report.get("overall") == o and report.get("LE") == Confusion(3, 1, 2, 1)
    assert report.get("nope") is None
    assert metrics_report(db[1], "77777777-7777-4777-8777-777777777777") == MetricsReport(
        Confusion(), (), Unscored())


def test_report_json_shape(db: tuple[Path, sqlite3.Connection]) -> None:
    data = json.loads(json.dumps(metrics_report(db[1], EID).to_dict()))
    assert list(data) == ["overall", "CME", "LE", "ZZ", "unscored"]
    assert data["unscored"] == {"errors": 4, "unlabelled": 1}
    for key in ("overall", "CME", "LE", "ZZ"):
        assert list(data[key]) == ["n_tp", "n_fp", "n_tn", "n_fn", "n", "precision",
                                   "recall", "f1", "accuracy", "intervals"]
        assert list(data[key]["intervals"]) == ["precision", "recall", "accuracy"]
    le = data["LE"]
    assert (le["n_tp"], le["n_fp"], le["n_tn"], le["n_fn"], le["n"]) == (3, 1, 2, 1, 7)
    assert (le["precision"], le["recall"], le["f1"]) == (0.75, 0.75, 0.75)
    assert le["accuracy"] == pytest.approx(5 / 7)
    assert le["intervals"]["precision"] == list(wilson_interval(3, 4) or ())
    assert le["intervals"]["accuracy"] == list(wilson_interval(5, 7) or ())
    zz = data["ZZ"]
    assert zz == {"n_tp": 0, "n_fp": 0, "n_tn": 0, "n_fn": 0, "n": 0, "precision": None,
                  "recall": None, "f1": None, "accuracy": None,
                  "intervals": {"precision": None, "recall": None, "accuracy": None}}


# metrics_json written for the `db` fixture by the code before metrics.py existed
# (finalize.metrics_report): the new module must reproduce it byte for byte.
STORED_BEFORE = (
    '{"overall": {"n_tp": 4, "n_fp": 1, "n_tn": 6, "n_fn": 3, "n": 14, "precision": 0.8, '
    '"recall": 0.5714285714285714, "f1": 0.6666666666666666, "accuracy": 0.7142857142857143, '
    '"intervals": {"precision": [0.3755282641185388, 0.9637768390302125], '
    '"recall": [0.2504542304090258, 0.8417830777373732], "accuracy": [0.4535045882751561, '
    '0.882788120898909]}}, "CME": {"n_tp": 1, "n_fp": 0, "n_tn": 4, "n_fn": 2, "n": 7, '
    '"precision": 1.0, "recall": 0.3333333333333333, "f1": 0.5, '
    '"accuracy": 0.7142857142857143, "intervals": {"precision": [0.20654329147389294, 1.0], '
    '"recall": [0.0614903152761605, 0.7923450448735121], "accuracy": [0.35892909014821267, '
    '0.9177828342909844]}}, "LE": {"n_tp": 3, "n_fp": 1, "n_tn": 2, "n_fn": 1, "n": 7, '
    '"precision": 0.75, "recall": 0.75, "f1": 0.75, "accuracy": 0.7142857142857143, '
    '"intervals": {"precision": [0.3006360524426366, 0.9544139373553637], '
    '"recall": [0.3006360524426366, 0.9544139373553637], "accuracy": [0.35892909014821267, '
    '0.9177828342909844]}}, "ZZ": {"n_tp": 0, "n_fp": 0, "n_tn": 0, "n_fn": 0, "n": 0, '
    '"precision": null, "recall": null, "f1": null, "accuracy": null, '
    '"intervals": {"precision": null, "recall": null, "accuracy": null}}, '
    '"unscored": {"errors": 4, "unlabelled": 1}}'
)


def test_report_reproduces_stored_json_and_round_trips(
        db: tuple[Path, sqlite3.Connection]) -> None:
    report = metrics_report(db[1], EID)
    assert json.dumps(report.to_dict()) == STORED_BEFORE
    assert MetricsReport.from_dict(json.loads(STORED_BEFORE)) == report


def test_finalize_stores_the_report_and_status_shows_it(
        db: tuple[Path, sqlite3.Connection], tmp_path: Path) -> None:
    path, conn = db
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, n_narratives_total, start_time) "
        "VALUES (?, 'm', 'running', 'm', 'openai', 0.0, 'v1', 18, '2026-11-23 12:00:00')",
        (EID,))
    result = finalize(conn, EID, tmp_path / "out")
    row = conn.execute(
        "SELECT status, n_tp, n_fp, n_tn, n_fn, precision, recall, f1, accuracy, "
        "metrics_json FROM experiments WHERE experiment_id = ?", (EID,)).fetchone()
    assert row[0] == "completed"
    assert tuple(row[1:5]) == (4, 1, 6, 3)
    assert tuple(row[5:9]) == (0.8, pytest.approx(4 / 7), pytest.approx(2 / 3),
                               pytest.approx(10 / 14))
    assert row[9] == STORED_BEFORE
    assert json.dumps(result["metrics"]) == STORED_BEFORE
    # status passes the stored JSON through to --json, and renders it as text
    info = status.collect(conn, path, EID)
    assert info is not None and json.dumps(info["metrics"]) == STORED_BEFORE
    text = status.render_detail(info)
    assert "    LE            7     3     1     2     1    0.750 [0.301,0.954]" in text
    assert "    ZZ            0     0     0     0     0" in text
    assert "not scored: 4 errors, 1 without a manual label" in text


def test_paired_counts_from_sqlite(db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    conn.execute("DELETE FROM narrative_results")
    # (exp 1 detected, exp 2 detected, label of exp 1, label of exp 2, how many)
    spec = [(1, 1, 1, 1, 4), (0, 0, 0, 0, 3),
            (1, 0, 1, 1, 2),   # b: only exp 1 right
            (0, 1, 1, 1, 1),   # c: only exp 2 right
            (1, 0, 0, 0, 1),   # c
            (1, 0, None, None, 2),  # unlabelled: agreement only
            (0, 1, 1, 0, 1)]   # the labels differ between runs: left out of McNemar
    i = 0
    for d1, d2, y1, y2, count in spec:
        for _ in range(count):
            add_result(conn, EID, f"{i:04d}", "LE", d1, y1)
            add_result(conn, OTHER, f"{i:04d}", "LE", d2, y2)
            i += 1
    add_result(conn, EID, "9000", "LE", 1, 1)                 # only in exp 1
    add_result(conn, EID, "9001", "LE", 1, 1)
    add_result(conn, OTHER, "9001", "LE", None, 1, error=True)  # error in exp 2
    counts = paired_counts(conn, EID, OTHER)
    assert counts.table == Agreement(n11=4, n10=5, n01=2, n00=3)
    assert (counts.table.n, counts.table.n_agree) == (14, 7)
    assert (counts.n_labelled, counts.b, counts.c) == (11, 2, 2)
    assert paired_counts(conn, EID, "77777777-7777-4777-8777-777777777777").table.n == 0
