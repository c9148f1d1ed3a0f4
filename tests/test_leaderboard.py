"""leaderboard.py: every figure of a small hand-computed board (3 experiments over 10
labelled narratives of 5 cases), a study with repeats, adjudicated labels, refusals, the
HTML page and JSON, and `compare` through the real CLI."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from conftest import run_cli

from asyncrunner.db.schema import connect
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results import leaderboard
from asyncrunner.results.stats import f1_interval, proportion_interval

A = "aaaaaaaa-0000-4000-8000-000000000001"   # the best
B = "bbbbbbbb-0000-4000-8000-000000000002"
C = "cccccccc-0000-4000-8000-000000000003"   # never says yes
STUDY = "5d5d5d5d-0000-4000-8000-000000000000"
R1 = "11111111-0000-4000-8000-00000000000a"
R2 = "22222222-0000-4000-8000-00000000000b"
R3 = "33333333-0000-4000-8000-00000000000c"
SOLO = "44444444-0000-4000-8000-00000000000d"
UNKNOWN = "99999999-0000-4000-8000-000000000009"
CHECKSUM = "abc"
PRICES = {"model": {"price_per_1k_input": 0.5, "price_per_1k_output": 1.0}}

# Ten narratives of five cases: (incident, type, narrative label, case label).
NARRATIVES = [
    ("c1", "CME", 1, 1), ("c1", "LE", 1, 1),
    ("c2", "CME", 1, 1), ("c2", "LE", 0, 1),
    ("c3", "CME", 0, 0), ("c3", "LE", 0, 0),
    ("c4", "CME", 1, 1), ("c4", "LE", 0, 1),
    ("c5", "CME", 0, 0), ("c5", "LE", 0, 0),
]
# Answers per narrative (None: an error row).
ANSWERS: dict[str, list[int | None]] = {
    #    n0 n1 n2 n3 n4 n5 n6 n7 n8 n9
    A: [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],        # FN at n6 only
    B: [1, 0, 1, 1, 0, 0, 1, 0, 1, None],     # FN n1, FP n3 and n8, error at n9
    C: [0] * 10,
}


# --------------------------------------------------------------------------- fixtures


def add_experiment(conn: sqlite3.Connection, eid: str, *, name: str = "sql",
                   checksum: str = CHECKSUM, study: tuple[str, str, int] | None = None,
                   config: dict[str, Any] | None = None) -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, data_checksum, n_narratives_total, "
        "start_time, end_time, config_json, study_id, study_cell, study_repeat) "
        "VALUES (?, ?, 'completed', 'm', 'openai', 0.0, 'v1', ?, 10, "
        "'2026-11-23 12:00:00', '2026-11-23 13:30:00', ?, ?, ?, ?)",
        (eid, name, checksum, json.dumps(config or {}), *(study or (None, None, None))))


def add_answers(conn: sqlite3.Connection, eid: str, answers: Sequence[int | None],
                narratives: Sequence[tuple[str, str, int, int]] = NARRATIVES) -> None:
    for (incident, ntype, label, case_label), answer in zip(narratives, answers,
                                                            strict=False):
        error = answer is None
        conn.execute(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, confidence, error_occurred, error_category, processed_at, "
            "manual_flag_ind, manual_flag, prompt_tokens_total, completion_tokens_total) "
            "VALUES (?, ?, ?, ?, 0.9, ?, ?, '2026-11-23T12:00:00.000000Z', ?, ?, 100, 10)",
            (eid, incident, ntype, answer, int(error), "timeout" if error else None, label,
             case_label))


def add_ingest(conn: sqlite3.Connection, checksum: str = CHECKSUM) -> None:
    """A load that dropped 2 blank and 1 duplicate narrative slot."""
    conn.execute(
        "INSERT INTO ingests (data_checksum, mapping_json, data_source, n_rows, "
        "n_narratives, n_blank, n_duplicates, loaded_at, n_placeholder, n_no_id) "
        "VALUES (?, '{\"placeholders\": []}', 'cases.csv', 7, 10, 2, 1, "
        "'2026-11-23 11:00:00', 0, 0)", (checksum,))


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "exp.db")
    add_ingest(c)
    for eid, name in ((B, "second"), (A, "first"), (C, "never")):
        add_experiment(c, eid, name=name, config=PRICES if eid == A else None)
        add_answers(c, eid, ANSWERS[eid])
    yield c
    c.close()


def entry(board: leaderboard.Board, eid: str) -> dict[str, Any]:
    data = leaderboard.to_json(board)
    return next(e for e in data["experiments"] if e["experiment_id"] == eid)


def versus(board: leaderboard.Board, eid: str) -> dict[str, Any]:
    data = leaderboard.to_json(board)
    return next(v for v in data["versus_best"] if v["experiment_2"] == eid)


# --------------------------------------------------------------------------- figures


def test_narrative_figures_hand_computed(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [B, A, C])
    assert [e.experiment_id for e in board.entries] == [B, A, C]  # the order given
    a = entry(board, A)["narrative"]
    # A: TP n0 n1 n2 = 3, FN n6 = 1, no FP, TN 6.
    assert (a["n_tp"], a["n_fp"], a["n_fn"], a["n_tn"], a["n"]) == (3, 0, 1, 6, 10)
    assert a["precision"] == 1.0 and a["recall"] == 0.75
    assert a["f1"] == pytest.approx(6 / 7) and a["accuracy"] == pytest.approx(0.9)
    # Wilson for 3/3: lower end n / (n + z^2) = 3 / 6.8415 = 0.4385, upper 1.
    assert a["precision_ci"] == [pytest.approx(0.4385, abs=1e-4), 1.0]
    assert a["recall_ci"] == list(proportion_interval(3, 4))
    assert a["accuracy_ci"] == list(proportion_interval(9, 10))
    assert a["f1_ci"] == list(f1_interval(3, 0, 1))
    # B (error at n9 left out): TP n0 n2 n6 = 3, FN n1, FP n3 n8, TN n4 n5 n7.
    b = entry(board, B)
    assert b["errors"] == 1 and b["n_results"] == 10
    n = b["narrative"]
    assert (n["n_tp"], n["n_fp"], n["n_fn"], n["n_tn"]) == (3, 2, 1, 3)
    assert n["precision"] == pytest.approx(0.6) and n["recall"] == pytest.approx(0.75)
    assert n["f1"] == pytest.approx(6 / 9) and n["accuracy"] == pytest.approx(6 / 9)
    # C never says yes: precision undefined, recall and F1 0, accuracy 6/10.
    c = entry(board, C)["narrative"]
    assert c["precision"] is None and c["precision_ci"] is None
    assert c["recall"] == 0.0 and c["f1"] == 0.0 and c["accuracy"] == pytest.approx(0.6)


def test_kappa_against_the_labels_hand_computed(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [B, A, C])
    # A: po = 0.9; says yes 3/10, labels yes 4/10: pe = .3*.4 + .7*.6 = .54;
    # kappa = .36 / .46.
    assert entry(board, A)["kappa"] == pytest.approx(0.36 / 0.46)
    # B on 9: po = 6/9; yes 5/9 and 4/9: pe = 40/81; kappa = (54-40)/81 / (41/81) = 14/41.
    assert entry(board, B)["kappa"] == pytest.approx(14 / 41)
    # C: po = pe = 0.6 -> 0.
    assert entry(board, C)["kappa"] == pytest.approx(0.0)


def test_case_figures_hand_computed(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [B, A, C])
    # A: c1 c2 TP, c3 c5 TN, c4 (0, 0 against label 1) FN.
    a = entry(board, A)["case"]
    assert (a["n_tp"], a["n_fp"], a["n_fn"], a["n_tn"]) == (2, 0, 1, 2)
    assert (a["precision"], a["recall"], a["f1"]) == (1.0, pytest.approx(2 / 3), 0.8)
    # B: c1 c2 c4 TP, c3 TN, c5 (n8 yes, n9 an error) FP.
    b = entry(board, B)["case"]
    assert (b["n_tp"], b["n_fp"], b["n_fn"], b["n_tn"]) == (3, 1, 0, 1)
    assert (b["precision"], b["recall"], b["f1"]) == (0.75, 1.0, pytest.approx(6 / 7))
    c = entry(board, C)["case"]
    assert (c["n_tp"], c["n_fp"], c["n_fn"], c["n_tn"]) == (0, 0, 3, 2)
    assert (c["precision"], c["recall"], c["f1"]) == (None, 0.0, 0.0)


def test_best_and_mcnemar_with_holm_hand_computed(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [B, A, C])
    assert board.best == A
    assert [entry(board, e)["rank"] for e in (A, B, C)] == [1, 2, 3]
    # A vs B on n0..n8: only A right at n1 n3 n8 (b = 3), only B right at n6 (c = 1);
    # exact p = 2 (C(4,0) + C(4,1)) / 2^4 = 10/16.
    vb = versus(board, B)
    assert (vb["n_paired"], vb["n_labelled"], vb["mcnemar_b"], vb["mcnemar_c"]) == (9, 9, 3, 1)
    assert vb["mcnemar_p_exact"] == pytest.approx(0.625)
    # A vs C on all 10: only A right at n0 n1 n2 (b = 3), n6 both wrong (c = 0); p = 2/8.
    vc = versus(board, C)
    assert (vc["n_paired"], vc["mcnemar_b"], vc["mcnemar_c"]) == (10, 3, 0)
    assert vc["mcnemar_p_exact"] == pytest.approx(0.25)
    # Holm over m = 2: 0.25 * 2 = 0.5; then 0.625 * 1 = 0.625 (no smaller than 0.5).
    assert vc["mcnemar_p_holm"] == pytest.approx(0.5)
    assert vb["mcnemar_p_holm"] == pytest.approx(0.625)
    # agreement A/C: both say no at n3..n9 (7 of 10)
    assert vc["agreement"] == pytest.approx(0.7)
    text = leaderboard.render_text(board)
    assert "Holm-adjusted over 2 comparisons" in text
    assert "b = 3 (only the best right), c = 1 (only this right), p = 0.625, Holm p = 0.625" \
        in text
    assert "p = 0.25, Holm p = 0.5" in text
    assert f"best: #2 {A} (F1 0.857)" in text
    assert "labels: manual" in text


def test_cost_tokens_wall_time_and_drops(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [B, A, C])
    a, b = entry(board, A), entry(board, B)
    # 10 rows of 100 prompt and 10 completion tokens: 1000 / 1000 * 0.5 + 100 / 1000 * 1.0
    assert a["tokens"] == {"prompt": 1000, "completion": 100}
    assert a["cost"] == pytest.approx(0.6)
    assert b["cost"] is None                  # no price in its config: tokens only
    assert a["wall_s"] == 5400.0
    data = leaderboard.to_json(board)
    assert data["same_data"] and data["warnings"] == []
    [dropped] = data["dropped"]
    assert dropped["data_checksum"] == CHECKSUM
    assert dropped["summary"]["by_reason"]["blank"] == 2
    assert dropped["summary"]["by_reason"]["duplicate"] == 1
    text = leaderboard.render_text(board)
    assert f"not sent to the model (data {CHECKSUM}): 3 of 13 narrative slots" in text
    assert "1h 30m" in text and "0.6000" in text


def test_different_data_is_allowed_with_a_warning(conn: sqlite3.Connection) -> None:
    other = "dddddddd-0000-4000-8000-000000000004"
    add_experiment(conn, other, checksum="other")
    add_answers(conn, other, ANSWERS[A])
    board = leaderboard.build(conn, [A, other])
    assert not board.same_data
    assert "not scored over the same narratives" in leaderboard.render_text(board)
    assert [d["data_checksum"] for d in leaderboard.to_json(board)["dropped"]] == [
        CHECKSUM, "other"]


def test_conflicting_case_labels_are_left_out_and_said(conn: sqlite3.Connection) -> None:
    odd = "eeeeeeee-0000-4000-8000-000000000005"
    add_experiment(conn, odd)
    narratives = [*NARRATIVES[:3], ("c2", "LE", 0, 0), *NARRATIVES[4:]]  # c2: 1 and 0
    add_answers(conn, odd, ANSWERS[A], narratives)
    board = leaderboard.build(conn, [A, odd])
    case = entry(board, odd)["case"]
    assert case["conflicting_labels"] == 1 and case["n"] == 4
    assert "1 cases whose narratives carry different case labels" in \
        leaderboard.render_text(board)


# --------------------------------------------------------------------------- two experiments


def test_two_experiments_keep_compare_output(conn: sqlite3.Connection) -> None:
    board = leaderboard.build(conn, [A, B])
    data = leaderboard.to_json(board)
    # compare's flat keys, experiment 1 = the first id
    assert (data["experiment_1"], data["experiment_2"]) == (A, B)
    assert (data["n_paired"], data["mcnemar_b"], data["mcnemar_c"]) == (9, 3, 1)
    # agree at n0 n2 n4 n5 n7 = 5 of 9
    assert data["agreement"] == pytest.approx(5 / 9)
    assert data["pair"]["n_agree"] == 5
    text = leaderboard.render_text(board)
    assert "agreement      0.556 (5/9)" in text
    assert "McNemar on 9 labelled pairs: b = 3 (only exp 1 correct), c = 1" in text
    assert "exact binomial p = 0.625" in text
    assert "Holm" not in text  # one comparison: nothing to adjust


# --------------------------------------------------------------------------- adjudicated


def test_adjudicated_decision_changes_exactly_the_expected_figures(
        conn: sqlite3.Connection) -> None:
    manual = leaderboard.to_json(leaderboard.build(conn, [B, A, C]))
    # A reviewer says n6 (c4 CME) is negative after all.
    conn.execute(
        "INSERT INTO label_sets (label_set, data_checksum, incident_id, narrative_type, "
        "label, imported_at) VALUES ('adjudicated', ?, 'c4', 'CME', 0, '2026-11-24')",
        (CHECKSUM,))
    board = leaderboard.build(conn, [B, A, C], labels="adjudicated")
    adjudicated = leaderboard.to_json(board)
    assert leaderboard.to_json(leaderboard.build(conn, [B, A, C])) == manual  # manual kept
    assert adjudicated["adjudicated_decisions"] == 1
    assert "labels: adjudicated (1 decisions)" in leaderboard.render_text(board)
    a, b, c = (entry(board, e) for e in (A, B, C))
    # n6: A's no becomes a TN, B's yes an FP, C's no a TN.
    assert tuple(a["narrative"][k] for k in ("n_tp", "n_fp", "n_fn", "n_tn")) == (3, 0, 0, 7)
    assert a["narrative"]["f1"] == 1.0 and a["narrative"]["accuracy"] == 1.0
    assert tuple(b["narrative"][k] for k in ("n_tp", "n_fp", "n_fn", "n_tn")) == (2, 3, 1, 3)
    assert b["narrative"]["f1"] == pytest.approx(4 / 8)  # 2TP / (2TP + FP + FN)
    assert tuple(c["narrative"][k] for k in ("n_tp", "n_fp", "n_fn", "n_tn")) == (0, 0, 3, 7)
    # c4's case label follows its narratives' effective labels (0, 0): negative now.
    assert tuple(a["case"][k] for k in ("n_tp", "n_fp", "n_fn", "n_tn")) == (2, 0, 0, 3)
    assert tuple(b["case"][k] for k in ("n_tp", "n_fp", "n_fn", "n_tn")) == (2, 2, 0, 1)
    # McNemar: n6 moves from c to b against B, and out of the discordant pairs against C.
    vb, vc = versus(board, B), versus(board, C)
    assert (vb["mcnemar_b"], vb["mcnemar_c"]) == (4, 0)
    assert vb["mcnemar_p_exact"] == pytest.approx(2 / 16)
    assert (vc["mcnemar_b"], vc["mcnemar_c"]) == (3, 0)
    # Holm: 0.125 * 2 = 0.25; 0.25 * 1 = 0.25.
    assert vb["mcnemar_p_holm"] == vc["mcnemar_p_holm"] == pytest.approx(0.25)
    # Nothing else moved: errors, tokens, the unlabelled and the drops are the same.
    for before, after in zip(manual["experiments"], adjudicated["experiments"], strict=True):
        for key in ("errors", "n_results", "unlabelled", "tokens", "cost", "wall_s"):
            assert before[key] == after[key]
    assert manual["dropped"] == adjudicated["dropped"]


# --------------------------------------------------------------------------- study


# Six narratives answered by three repeats of cell "a" (None: an error).
REPEATS: dict[str, list[int | None]] = {
    #     n0 n1 n2 n3 n4 n5
    R1: [1, 1, 0, 0, 1, 0],
    R2: [1, 0, 0, 0, 1, None],
    R3: [1, 1, 0, 1, 1, 0],
}


def add_study(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO studies (study_id, name, sweep_checksum, spec_json, created_at) "
                 "VALUES (?, 's', 'x', '{}', '2026-11-23')", (STUDY,))
    # inserted out of order: the board orders by cell, then repeat
    for eid, cell, repeat in ((SOLO, "b", 1), (R3, "a", 3), (R1, "a", 1), (R2, "a", 2)):
        add_experiment(conn, eid, name=f"{cell}{repeat}", study=(STUDY, cell, repeat))
        add_answers(conn, eid, REPEATS.get(eid, [0] * 6), NARRATIVES[:6])


def test_study_repeats_fleiss_kappa_and_flip_share(conn: sqlite3.Connection) -> None:
    add_study(conn)
    board = leaderboard.build(conn, [], study_id=STUDY)
    assert [e.experiment_id for e in board.entries] == [R1, R2, R3, SOLO]
    [group] = board.repeats  # cell "b" has a single repeat: no agreement to measure
    assert group.cell == "a" and group.experiment_ids == (R1, R2, R3)
    # Every repeat answered n0..n4: [yes, no] = [3,0] [2,1] [0,3] [1,2] [3,0].
    # P_i = (sum of squares - 3) / 6: 1, 1/3, 1, 1/3, 1 -> P_bar = 11/15.
    # Yes 9 of 15 ratings: P_e = 0.6^2 + 0.4^2 = 0.52. kappa = (11/15 - 0.52) / 0.48 = 4/9.
    assert group.n_all_answered == 5
    assert group.fleiss_kappa == pytest.approx(4 / 9)
    # Flips: n1 (1, 0, 1) and n3 (0, 0, 1) of the six with two answers or more.
    assert group.n_narratives == 6
    assert group.flip_share == pytest.approx(2 / 6)
    text = leaderboard.render_text(board)
    assert f"of study {STUDY}" in text
    assert "cell a (3 repeats: #1, #2, #3): Fleiss' kappa 0.444 on 5 narratives" in text
    assert "flips on 0.333" in text
    data = leaderboard.to_json(board)
    assert data["repeats"][0]["fleiss_kappa"] == pytest.approx(4 / 9)
    assert data["pair"] is None and "n_paired" not in data


def test_study_and_extra_ids_combine(conn: sqlite3.Connection) -> None:
    add_study(conn)
    board = leaderboard.build(conn, [A, R1], study_id=STUDY)
    assert [e.experiment_id for e in board.entries] == [R1, R2, R3, SOLO, A]


# --------------------------------------------------------------------------- refusals


def test_unknown_id_and_empty_study_are_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(RefusedError, match=UNKNOWN):
        leaderboard.build(conn, [A, UNKNOWN])
    with pytest.raises(RefusedError, match=f"no study {STUDY}"):
        leaderboard.build(conn, [], study_id=STUDY)
    conn.execute("INSERT INTO studies (study_id, name, sweep_checksum, spec_json, created_at) "
                 "VALUES (?, 's', 'x', '{}', '2026-11-23')", (STUDY,))
    with pytest.raises(RefusedError, match="has no experiment yet"):
        leaderboard.build(conn, [], study_id=STUDY)
    with pytest.raises(UsageError):
        leaderboard.build(conn, [A, B], labels="guessed")


# --------------------------------------------------------------------------- output


def test_json_is_plain_and_has_no_nan(conn: sqlite3.Connection) -> None:
    empty = "ffffffff-0000-4000-8000-000000000006"
    add_experiment(conn, empty)  # no result at all: every figure undefined
    data = leaderboard.to_json(leaderboard.build(conn, [A, B, C, empty]))
    text = json.dumps(data, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == data
    nothing = entry(leaderboard.build(conn, [A, empty]), empty)
    assert nothing["narrative"]["f1"] is None and nothing["kappa"] is None
    assert nothing["rank"] is None


def test_html_escapes_names_and_embeds_the_chart(conn: sqlite3.Connection,
                                                 tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    conn.execute("UPDATE experiments SET experiment_name = ?, model_name = ? "
                 "WHERE experiment_id = ?", (evil, evil, B))
    board = leaderboard.build(conn, [B, A, C])
    out = leaderboard.write_html(board, tmp_path / "sub" / "board.html")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<svg") == 1 and "<img" not in page
    chart = ElementTree.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])
    assert chart.get("aria-label") == "F1 with its 95% interval per experiment"
    labels = [t.text for t in chart.iter("text")]  # the names as text, never as markup
    assert "#1 <script>alert(1)</script>" in labels and "#2 first" in labels
    assert A in page and "Holm" in page and "not sent to the model" in page.lower()
    assert not list(out.parent.glob(".*partial"))  # written atomically


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "cli.db"
    with closing(connect(path)) as c:
        add_ingest(c)
        for eid in (A, B, C):
            add_experiment(c, eid, config=PRICES if eid == A else None)
            add_answers(c, eid, ANSWERS[eid])
        add_study(c)
    return path


def test_cli_compare_study_json(db: Path) -> None:
    proc = run_cli("compare", "--study", STUDY, "--json", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [e["experiment_id"] for e in data["experiments"]] == [R1, R2, R3, SOLO]
    assert data["repeats"][0]["fleiss_kappa"] == pytest.approx(4 / 9)
    assert data["labels"] == "manual" and data["study_id"] == STUDY


def test_cli_compare_two_ids(db: Path, tmp_path: Path) -> None:
    proc = run_cli("compare", A, B, "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "McNemar on 9 labelled pairs: b = 3 (only exp 1 correct), c = 1" in proc.stdout
    assert "Cohen's kappa" in proc.stdout and "case level" in proc.stdout
    proc = run_cli("compare", A, B, "--json", "--db", str(db))
    data = json.loads(proc.stdout)
    assert data["n_paired"] == 9 and len(data["experiments"]) == 2
    page = tmp_path / "board.html"
    proc = run_cli("compare", A, B, C, "--html", str(page), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert f"leaderboard: {page}" in proc.stdout and page.exists()
    missing = run_cli("compare", A, UNKNOWN, "--db", str(db))
    assert missing.returncode == 3 and UNKNOWN in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
