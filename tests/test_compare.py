"""compare.py: hand-computed kappa and McNemar values, SQL-built experiments, and one
end-to-end comparison of two real runs against the mock server."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv

from asyncrunner.db.schema import connect
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results.compare import Comparison, compare, render_text, to_json
from asyncrunner.results.metrics import (
    METHOD_CHI2,
    METHOD_EXACT,
    cohen_kappa,
    mcnemar,
    mcnemar_chi2,
    mcnemar_exact,
    metrics_report,
)
from asyncrunner.sim import MockServer

ID1 = "11111111-1111-4111-8111-111111111111"
ID2 = "22222222-2222-4222-8222-222222222222"
ID3 = "33333333-3333-4333-8333-333333333333"


# --------------------------------------------------------------------------- SQL fixtures


def add_experiment(conn: sqlite3.Connection, eid: str, *, temperature: float = 0.0,
                   checksum: str = "abc") -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, data_checksum, n_narratives_total, "
        "start_time) VALUES (?, 'sql', 'completed', 'm', 'openai', ?, 'v1', ?, 0, "
        "'2026-11-23 12:00:00')", (eid, temperature, checksum))


def add_result(conn: sqlite3.Connection, eid: str, incident: str, ntype: str,
               detected: int | None, label: int | None, *, error: bool = False,
               confidence: float = 0.8) -> None:
    conn.execute(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, detected, "
        "confidence, rationale, error_occurred, error_category, processed_at, "
        "manual_flag_ind) VALUES (?, ?, ?, ?, ?, 'r', ?, ?, '2026-11-23T12:00:00.000000Z', ?)",
        (eid, incident, ntype, None if error else detected, None if error else confidence,
         int(error), "timeout" if error else None, label))


def add_pairs(conn: sqlite3.Connection, spec: list[tuple[int, int, int | None, int]],
              start: int = 0) -> int:
    """spec: (detected by exp 1, detected by exp 2, manual label, how many)."""
    i = start
    for d1, d2, label, count in spec:
        for _ in range(count):
            ntype = "LE" if i % 2 else "CME"
            add_result(conn, ID1, f"{i:04d}", ntype, d1, label)
            add_result(conn, ID2, f"{i:04d}", ntype, d2, label)
            i += 1
    return i


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "exp.db")
    add_experiment(c, ID1)
    add_experiment(c, ID2, temperature=0.7)
    yield c
    c.close()


# --------------------------------------------------------------------------- kappa


def table_pairs(n11: int, n10: int, n01: int, n00: int) -> list[tuple[int, int]]:
    """A 2x2 table of (rater 1, rater 2) counts as a list of pairs."""
    return [(1, 1)] * n11 + [(1, 0)] * n10 + [(0, 1)] * n01 + [(0, 0)] * n00


def test_kappa_balanced_table() -> None:
    # 20 pairs: 7 both-1, 7 both-0, 3 each way apart.
    # observed agreement po = 14/20 = 0.7; each rater says 1 ten times of 20 (0.5),
    # expected pe = 0.5*0.5 + 0.5*0.5 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4
    assert cohen_kappa(table_pairs(7, 3, 3, 7)) == pytest.approx(0.4)


def test_kappa_unbalanced_margins() -> None:
    # 50 pairs: 20 both-1, 5 (1,0), 10 (0,1), 15 both-0.  po = 35/50 = 0.7
    # rater 1 says 1 in 25/50 = 0.5; rater 2 in 30/50 = 0.6
    # pe = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7-0.5)/0.5 = 0.4
    assert cohen_kappa(table_pairs(20, 5, 10, 15)) == pytest.approx(0.4)
    # 10 pairs: 4 both-1, 1 (1,0), 2 (0,1), 3 both-0. po = 7/10 = 0.7
    # rater 1: 5/10 = 0.5 say 1; rater 2: 6/10 = 0.6; pe = 0.5*0.6 + 0.5*0.4 = 0.5
    # kappa = 0.2/0.5 = 0.4; and one more: 6 both-1, 0, 4 (0,1), 0 -> po = 0.6,
    # rater 1 = 0.6, rater 2 = 1.0, pe = 0.6*1 + 0.4*0 = 0.6 -> kappa = 0/0.4 = 0
    assert cohen_kappa(table_pairs(4, 1, 2, 3)) == pytest.approx(0.4)
    assert cohen_kappa(table_pairs(6, 0, 4, 0)) == pytest.approx(0.0)


def test_kappa_edges() -> None:
    assert cohen_kappa([]) is None
    # both always say 1: pe = 1*1 = 1 -> undefined
    assert cohen_kappa(table_pairs(5, 0, 0, 0)) is None
    # perfect agreement with both labels used: po = 1, pe = .5 -> 1
    assert cohen_kappa(table_pairs(3, 0, 0, 3)) == pytest.approx(1.0)
    # always opposite, each constant: po = 0, pe = 1*0 + 0*1 = 0 -> 0
    assert cohen_kappa(table_pairs(0, 4, 0, 0)) == pytest.approx(0.0)
    # systematic disagreement: po = 0, pe = .5 -> (0-.5)/.5 = -1
    assert cohen_kappa(table_pairs(0, 2, 2, 0)) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_chi_square_hand_computed() -> None:
    # b=10, c=2: chi2 = (|10-2| - 1)^2 / (10+2) = 49/12 = 4.08333
    # p = P(chi2_1 > 4.0833) = erfc(sqrt(4.0833/2)) = erfc(1.42887) = 0.04331
    stat, p = mcnemar_chi2(10, 2)
    assert stat == pytest.approx(49 / 12)
    assert p == pytest.approx(0.04331, abs=5e-5)
    # the chi-square 1-df critical value 3.841 has p = 0.05
    assert mcnemar_chi2(0, 0) == (None, None)


def test_mcnemar_exact_hand_computed() -> None:
    # b=1, c=5: n=6, p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7/64 = 0.21875
    assert mcnemar_exact(1, 5) == pytest.approx(0.21875)
    assert mcnemar_exact(5, 1) == pytest.approx(0.21875)
    # b=10, c=2: n=12, 2 * (1 + 12 + 66) / 4096 = 158/4096 = 0.0385742
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    # b=c: the doubled tail exceeds 1 and is capped; b=c=0 -> 1
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_chooses_exact_below_25_discordant() -> None:
    assert mcnemar(10, 2) == (None, pytest.approx(158 / 4096), METHOD_EXACT)
    assert mcnemar(0, 0) == (None, 1.0, METHOD_EXACT)
    assert mcnemar(12, 12)[2] == METHOD_EXACT  # 24
    # b=20, c=5 (25 discordant): chi2 = (15-1)^2/25 = 196/25 = 7.84
    # p = erfc(sqrt(3.92)) = erfc(1.97990) = 0.005110
    stat, p, method = mcnemar(20, 5)
    assert method == METHOD_CHI2
    assert stat == pytest.approx(7.84)
    assert p == pytest.approx(0.005110, abs=5e-6)
    assert p == pytest.approx(math.erfc(math.sqrt(7.84 / 2)))


# --------------------------------------------------------------------------- compare on SQL


SPEC: list[tuple[int, int, int | None, int]] = [
    (1, 1, 1, 6),     # both correct
    (0, 0, 0, 4),     # both correct
    (1, 0, 1, 3),     # b: only exp 1 correct
    (0, 1, 0, 2),     # b
    (0, 1, 1, 1),     # c: only exp 2 correct
    (1, 1, 0, 1),     # both wrong
    (1, 0, None, 1),  # unlabelled: counts for agreement/kappa, not McNemar
    (0, 0, None, 2),
]


def test_compare_hand_computed_fixture(conn: sqlite3.Connection) -> None:
    n = add_pairs(conn, SPEC)
    # not paired: an error in exp 2, and a narrative only exp 1 has
    add_result(conn, ID1, "9000", "LE", 0, 0)
    add_result(conn, ID2, "9000", "LE", None, 0, error=True)
    add_result(conn, ID1, "9001", "LE", 1, 1)
    c = compare(conn, ID1, ID2)
    assert n == 20 and c.n_paired == 20
    # agree: (1,1) 6+1 = 7, (0,0) 4+2 = 6 -> 13/20 = 0.65
    assert c.n_agree == 13 and c.agreement == pytest.approx(0.65)
    # exp 1 says 1 in 6+3+1+1 = 11/20 = 0.55; exp 2 in 6+2+1+1 = 10/20 = 0.5
    # pe = 0.55*0.5 + 0.45*0.5 = 0.5; kappa = (0.65-0.5)/0.5 = 0.3
    assert c.kappa == pytest.approx(0.3)
    # labelled pairs 20 - 3 = 17; b = 3 + 2 = 5, c = 1
    assert (c.n_labelled, c.mcnemar_b, c.mcnemar_c) == (17, 5, 1)
    # chi2 = (|5-1|-1)^2/6 = 9/6 = 1.5, p = erfc(sqrt(0.75)) = 0.2207
    assert c.mcnemar_chi2 == pytest.approx(1.5)
    assert c.mcnemar_p_chi2 == pytest.approx(0.2207, abs=1e-4)
    # b+c = 6 < 25 -> exact: 2*(C(6,0)+C(6,1))/64 = 0.21875
    assert c.mcnemar_method == METHOD_EXACT and c.mcnemar_statistic is None
    assert c.mcnemar_p == c.mcnemar_p_exact == pytest.approx(0.21875)
    assert c.metrics_1 == metrics_report(conn, ID1)
    assert c.metrics_2 == metrics_report(conn, ID2)
    # exp 1 over all its scored rows: TP 6+3+1(9001) = 10, FP 1, TN 4+2+1(9000) = 7, FN 1
    o = c.metrics_1.to_dict()["overall"]
    assert (o["n_tp"], o["n_fp"], o["n_tn"], o["n_fn"]) == (10, 1, 7, 1)
    assert {"LE", "CME"} <= set(c.metrics_1.to_dict())
    assert c.same_data


def test_compare_chi_square_branch(conn: sqlite3.Connection) -> None:
    add_pairs(conn, [(1, 0, 1, 20), (0, 1, 1, 5), (1, 1, 1, 3)])
    c = compare(conn, ID1, ID2)
    # b=20, c=5 -> chi2 = 196/25 = 7.84, p = 0.005110 (see above)
    assert (c.mcnemar_b, c.mcnemar_c) == (20, 5)
    assert c.mcnemar_method == METHOD_CHI2
    assert c.mcnemar_statistic == pytest.approx(7.84)
    assert c.mcnemar_p == pytest.approx(0.005110, abs=5e-6)
    # exact reported as well: 2 * sum_{k<=5} C(25,k) / 2^25
    tail = sum(math.comb(25, k) for k in range(6))
    assert c.mcnemar_p_exact == pytest.approx(2 * tail / 2 ** 25)


def test_compare_refuses_unknown_and_unpaired(conn: sqlite3.Connection) -> None:
    with pytest.raises(RefusedError, match=ID3):
        compare(conn, ID1, ID3)
    add_experiment(conn, ID3)
    add_result(conn, ID1, "1", "LE", 1, 1)
    add_result(conn, ID3, "1", "LE", None, 1, error=True)
    with pytest.raises(UsageError, match="nothing to compare"):
        compare(conn, ID1, ID3)


def test_undefined_kappa_renders_dash_and_json_is_serialisable(
        conn: sqlite3.Connection) -> None:
    add_pairs(conn, [(1, 1, 1, 3), (1, 1, None, 2)])
    c = compare(conn, ID1, ID2)
    assert c.kappa is None and c.agreement == 1.0
    text = render_text(c)
    assert "Cohen's kappa  -" in text
    assert "agreement      1.000 (5/5)" in text
    assert "exact binomial" in text and ID1 in text and ID2 in text
    assert "overall" in text and "LE" in text and "CME" in text
    data = json.loads(json.dumps(to_json(c)))
    assert data["kappa"] is None
    assert data["mcnemar_b"] == data["mcnemar_c"] == 0
    assert data["mcnemar_method"] == METHOD_EXACT
    assert data["metrics_1"]["overall"]["n_tp"] == 3
    assert set(data) >= {f.name for f in fields(Comparison)}


def test_render_warns_on_different_data(conn: sqlite3.Connection) -> None:
    add_experiment(conn, ID3, checksum="other")
    add_result(conn, ID1, "1", "LE", 1, 1)
    add_result(conn, ID3, "1", "LE", 0, 1)
    c = compare(conn, ID1, ID3)
    assert not c.same_data
    assert "different data" in render_text(c)
    assert "chi2 = - (no discordant pairs)" not in render_text(c)  # b=1: chi2 = 0


# --------------------------------------------------------------------------- end to end


def test_two_real_runs_compare_identically(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    db = tmp_path / "exp.db"
    ids = []
    for temp in (0.0, 0.7):
        cfg = write_config(tmp_path, data, mock_server.url, name=f"t{temp}.yaml",
                           model={"temperature": temp})
        proc = run_cli("run", str(cfg), "--db", str(db),
                       env=cli_env(ASYNCRUNNER_TEST_KEY="k"))
        assert proc.returncode == 0, proc.stderr
        ids.append(experiment_id_from(proc.stdout))
    conn = connect(db)
    try:
        c = compare(conn, ids[0], ids[1])
    finally:
        conn.close()
    # the mock answers each text the same way whatever the temperature
    assert c.n_paired == 9 and c.agreement == 1.0 and c.kappa == pytest.approx(1.0)
    assert (c.mcnemar_b, c.mcnemar_c) == (0, 0)
    assert c.mcnemar_p == 1.0 and c.mcnemar_method == METHOD_EXACT
    assert "T=0.0" in c.describe_1 and "T=0.7" in c.describe_2
    for m in (c.metrics_1, c.metrics_2):  # the hand-computed matrix of test_e2e
        o = m.to_dict()["overall"]
        assert (o["n_tp"], o["n_fp"], o["n_tn"], o["n_fn"]) == (2, 2, 4, 1)
