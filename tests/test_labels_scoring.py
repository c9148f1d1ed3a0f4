"""Scoring against the adjudicated labels (label set 'adjudicated' in label_sets): every
figure that reads a label flips exactly where a reviewer's decision differs from the manual
label, at narrative and at case level; the manual figures (and the stored metrics_json)
never move; status and the report name the label set, through the real CLI too."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from asyncrunner.db.schema import connect
from asyncrunner.results import status
from asyncrunner.results.finalize import finalize
from asyncrunner.results.metrics import (
    Agreement,
    Confusion,
    LabelDecisions,
    Unscored,
    case_metrics,
    label_decisions,
    metrics_report,
    paired_counts,
)
from asyncrunner.results.report import write_report

EID = "77777777-7777-4777-8777-777777777777"
OTHER = "88888888-8888-4888-8888-888888888888"
CHECKSUM = "sum-a"

# Per case: (LE (detected, label), CME (detected, label), case label); detected None = error.
CASES: dict[str, tuple[tuple[int | None, int | None], tuple[int | None, int | None], int]] = {
    "c1": ((1, 1), (0, 0), 1),
    "c2": ((1, 0), (0, 0), 0),
    "c3": ((0, 1), (0, 1), 1),
    "c4": ((0, 0), (0, 0), 0),
    "c5": ((1, 1), (None, 0), 1),      # CME errored
    "c6": ((0, None), (1, 1), 1),      # LE unlabelled
    "c7": ((1, 1), (0, 0), 1),
}

# (label set, checksum, incident, type, label)
DECISIONS = [
    ("adjudicated", CHECKSUM, "c2", "LE", 1),   # 0 -> 1: LE FP -> TP; case FP -> TP
    ("adjudicated", CHECKSUM, "c3", "CME", 0),  # 1 -> 0: CME FN -> TN; case stays 1 (LE)
    ("adjudicated", CHECKSUM, "c4", "LE", 0),   # agrees with the manual label
    ("adjudicated", CHECKSUM, "c6", "LE", 1),   # unlabelled -> 1: LE FN
    ("adjudicated", CHECKSUM, "c7", "LE", 0),   # 1 -> 0: LE TP -> FP; case TP -> FP
    ("adjudicated", "another-load", "c1", "LE", 0),  # another load's: never applies
    ("adjudicated", CHECKSUM, "c9", "LE", 1),   # no result here: not counted
    ("draft", CHECKSUM, "c1", "CME", 1),        # another label set: ignored
]

MANUAL_LE = Confusion(tp=3, fp=1, tn=1, fn=1)
MANUAL_CME = Confusion(tp=1, fp=0, tn=4, fn=1)
ADJUDICATED_LE = Confusion(tp=3, fp=1, tn=1, fn=2)
ADJUDICATED_CME = Confusion(tp=1, fp=0, tn=5, fn=0)


def add_experiment(conn: sqlite3.Connection, eid: str, *, checksum: str = CHECKSUM) -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, data_file, data_checksum, "
        "n_narratives_total, start_time, config_json) VALUES (?, 'labels', 'running', 'm', "
        "'openai', 0.0, 'v1', 'cases.csv', ?, 14, '2026-11-23 12:00:00', '{}')",
        (eid, checksum))


def add_result(conn: sqlite3.Connection, eid: str, incident: str, ntype: str,
               detected: int | None, label: int | None, case_label: int) -> None:
    error = detected is None
    conn.execute(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, detected, "
        "confidence, error_occurred, error_category, processed_at, manual_flag_ind, "
        "manual_flag) VALUES (?, ?, ?, ?, 0.8, ?, ?, '2026-11-23T12:00:00.000000Z', ?, ?)",
        (eid, incident, ntype, detected, int(error), "timeout" if error else None, label,
         case_label))


def add_decisions(conn: sqlite3.Connection,
                  rows: list[tuple[str, str, str, str, int]] = DECISIONS) -> None:
    conn.executemany(
        "INSERT INTO label_sets (label_set, data_checksum, incident_id, narrative_type, "
        "label, note, source, imported_at) "
        "VALUES (?, ?, ?, ?, ?, 'reviewed', 'test', '2026-11-24T09:00:00.000000Z')", rows)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "x.db"
    conn = connect(path)
    add_experiment(conn, EID)
    for incident, (le, cme, case_label) in CASES.items():
        add_result(conn, EID, incident, "LE", *le, case_label)
        add_result(conn, EID, incident, "CME", *cme, case_label)
    yield path, conn
    conn.close()


# --------------------------------------------------------------------------- metrics


def test_manual_figures_hand_computed_and_unmoved_by_decisions(
        db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    before = metrics_report(conn, EID)
    assert before.by_type == {"CME": MANUAL_CME, "LE": MANUAL_LE}
    assert before.overall == Confusion(tp=4, fp=1, tn=5, fn=2)
    assert before.unscored == Unscored(errors=1, unlabelled=1)
    # cases: c1 TP, c2 FP, c3 FN, c4 TN, c5 TP (its error ignored), c6 TP, c7 TP
    assert case_metrics(conn, EID).confusion == Confusion(tp=4, fp=1, tn=1, fn=1)
    before_json = json.dumps(before.to_dict())
    add_decisions(conn)
    after = metrics_report(conn, EID)
    assert after == before and json.dumps(after.to_dict()) == before_json
    assert metrics_report(conn, EID, labels="manual") == before
    assert case_metrics(conn, EID, labels="manual") == case_metrics(conn, EID)


def test_adjudicated_flips_exactly_the_decided_narratives(
        db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    add_decisions(conn)
    report = metrics_report(conn, EID, labels="adjudicated")
    # LE: c2 FP -> TP, c6 unlabelled -> FN, c7 TP -> FP (c4 agrees: still TN)
    # CME: c3 FN -> TN
    assert report.by_type == {"CME": ADJUDICATED_CME, "LE": ADJUDICATED_LE}
    assert report.overall == Confusion(tp=4, fp=1, tn=6, fn=2)
    assert report.unscored == Unscored(errors=1, unlabelled=0)
    assert report.overall.precision == pytest.approx(4 / 5)
    assert report.overall.recall == pytest.approx(4 / 6)


def test_adjudicated_case_level(db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    add_decisions(conn)
    cases = case_metrics(conn, EID, labels="adjudicated")
    # c2: effective LE 1 -> case 1, answered 1: FP -> TP. c7: LE 0, CME 0 -> case 0,
    # answered 1: TP -> FP. c3: LE still 1 -> case 1: FN. c6: 1, answered 1: TP.
    # c1, c5: no decision on this load: their manual case label (1): TP.
    assert cases.confusion == Confusion(tp=4, fp=1, tn=1, fn=1)
    assert (cases.unlabelled, cases.conflicts) == (0, 0)
    # The same totals as manual, but made of other cases: c2 alone turned out positive,
    # c7 alone negative. Without c7's decision the flip of c2 shows in the totals.
    conn.execute("DELETE FROM label_sets WHERE incident_id = 'c7'")
    assert case_metrics(conn, EID, labels="adjudicated").confusion == Confusion(
        tp=5, fp=0, tn=1, fn=1)
    assert metrics_report(conn, EID, labels="adjudicated").by_type["LE"] == Confusion(
        tp=4, fp=0, tn=1, fn=2)


def test_decisions_counted_for_this_experiment_only(
        db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    assert label_decisions(conn, EID) == LabelDecisions(0, 0)
    add_decisions(conn)
    # c2, c3, c4, c6, c7 of this load; c4 agrees with its manual label; c6 had none
    assert label_decisions(conn, EID) == LabelDecisions(applied=5, changed=4)
    # an experiment over another load takes in none of them
    add_experiment(conn, OTHER, checksum="sum-b")
    add_result(conn, OTHER, "c2", "LE", 1, 0, 0)
    assert label_decisions(conn, OTHER) == LabelDecisions(0, 0)
    assert metrics_report(conn, OTHER, labels="adjudicated").overall == Confusion(fp=1)


def test_paired_counts_against_adjudicated_labels(db: tuple[Path, sqlite3.Connection]) -> None:
    conn = db[1]
    add_experiment(conn, OTHER)  # the same load: the same decisions apply to both
    for incident, (le, cme, case_label) in CASES.items():
        add_result(conn, OTHER, incident, "LE", 1, le[1], case_label)
        add_result(conn, OTHER, incident, "CME", 1, cme[1], case_label)
    add_decisions(conn)
    manual = paired_counts(conn, EID, OTHER)
    # 13 pairs (c5 CME errored in EID); OTHER always says 1
    assert manual.table == Agreement(n11=5, n10=0, n01=8, n00=0)
    # b: c1 CME, c2 CME, c4 LE, c4 CME, c7 CME; c: c3 LE, c3 CME; c6 LE unlabelled
    assert (manual.n_labelled, manual.b, manual.c) == (12, 5, 2)
    assert paired_counts(conn, EID, OTHER, labels="manual") == manual
    adjudicated = paired_counts(conn, EID, OTHER, labels="adjudicated")
    assert adjudicated.table == manual.table
    # c2 LE: both right now; c3 CME: only EID right (b); c6 LE: only OTHER right (c);
    # c7 LE: both wrong
    assert (adjudicated.n_labelled, adjudicated.b, adjudicated.c) == (13, 6, 2)


def test_unknown_label_set_is_refused(db: tuple[Path, sqlite3.Connection]) -> None:
    with pytest.raises(ValueError, match="labels must be one of"):
        metrics_report(db[1], EID, labels="reviewed")


# --------------------------------------------------------------------------- status


def test_finalize_stays_manual_and_status_names_the_labels(
        db: tuple[Path, sqlite3.Connection], tmp_path: Path) -> None:
    path, conn = db
    manual_json = json.dumps(metrics_report(conn, EID).to_dict())
    add_decisions(conn)
    finalize(conn, EID, tmp_path / "out")
    stored = conn.execute("SELECT metrics_json, n_tp, n_fp, n_tn, n_fn FROM experiments "
                          "WHERE experiment_id = ?", (EID,)).fetchone()
    assert stored[0] == manual_json and tuple(stored[1:]) == (4, 1, 5, 2)

    info = status.collect(conn, path, EID)
    assert info is not None
    assert (info["labels"], info["decisions"], info["decisions_available"]) == ("manual", 0, 5)
    assert json.dumps(info["metrics"]) == manual_json
    assert status.collect(conn, path, EID, labels="manual") == info
    text = status.render_detail(info)
    assert "  labels     manual (5 reviewer decisions available: --labels adjudicated)" in text
    assert "    cases         7     4     1     1     1" in text

    info = status.collect(conn, path, EID, labels="adjudicated")
    assert info is not None
    assert (info["labels"], info["decisions"], info["decisions_changing_label"]) == (
        "adjudicated", 5, 4)
    overall = info["metrics"]["overall"]
    assert (overall["n_tp"], overall["n_fp"], overall["n_tn"], overall["n_fn"]) == (4, 1, 6, 2)
    assert info["metrics"]["unscored"] == {"errors": 1, "unlabelled": 0}
    case = info["case_metrics"]
    assert (case["n_tp"], case["n_fp"], case["n_tn"], case["n_fn"]) == (4, 1, 1, 1)
    text = status.render_detail(info)
    assert ("  labels     adjudicated: manual labels with 5 reviewer decisions in their "
            "place (4 differ from the manual label)") in text
    assert "(results with a adjudicated label and no error" not in text
    assert "results with an adjudicated label and no error" in text
    assert "    LE            7     3     1     1     2" in text
    # the stored figures are untouched by having shown the adjudicated ones
    assert conn.execute("SELECT metrics_json FROM experiments WHERE experiment_id = ?",
                        (EID,)).fetchone()[0] == manual_json


# --------------------------------------------------------------------------- the CLI


def test_cli_status_and_report_with_adjudicated_labels(
        db: tuple[Path, sqlite3.Connection], tmp_path: Path) -> None:
    path, conn = db
    add_decisions(conn)
    finalize(conn, EID, tmp_path / "out")

    proc = run_cli("status", EID, "--labels", "adjudicated", "--json", "--db", str(path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["labels"], info["decisions"]) == ("adjudicated", 5)
    assert info["metrics"]["LE"]["n_fn"] == 2 and info["metrics"]["CME"]["n_tn"] == 5
    proc = run_cli("status", EID, "--json", "--db", str(path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["labels"] == "manual"
    assert json.loads(proc.stdout)["metrics"]["LE"]["n_fn"] == 1

    out = tmp_path / "f.html"
    proc = run_cli("report", EID, "--labels", "adjudicated", "--out", str(out),
                   "--db", str(path))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text(encoding="utf-8")
    assert ("Scored against the adjudicated labels: the manual labels with 5 reviewer "
            "decisions in their place (4 differ from the manual label)") in page
    assert "<th>adjudicated label 1</th>" in page
    for cell in ("TP 4", "FP 1", "TN 6", "FN 2"):
        assert f"<td>{cell}</td>" in page

    manual = tmp_path / "m.html"
    proc = run_cli("report", EID, "--out", str(manual), "--db", str(path))
    assert proc.returncode == 0, proc.stderr
    page = manual.read_text(encoding="utf-8")
    assert "Scored against the manual labels" in page and "adjudicated label 1" not in page
    for cell in ("TP 4", "FP 1", "TN 5", "FN 2"):
        assert f"<td>{cell}</td>" in page


def test_report_refuses_an_unknown_label_set(db: tuple[Path, sqlite3.Connection],
                                             tmp_path: Path) -> None:
    from asyncrunner.errors import UsageError

    with pytest.raises(UsageError, match="labels must be one of"):
        write_report(db[1], EID, tmp_path / "r.html", labels="draft")
    assert not (tmp_path / "r.html").exists()


def test_a_confirming_decision_changes_no_case(db: tuple[Path, sqlite3.Connection]) -> None:
    """c4's decision agrees with its manual label: the case keeps manual_flag. A case
    flagged positive with no positive narrative (the flag came from elsewhere in the file)
    stays positive when a reviewer only confirms its narratives."""
    conn = db[1]
    add_result(conn, EID, "c8", "LE", 0, 0, 1)
    conn.execute("INSERT INTO label_sets (label_set, data_checksum, incident_id, "
                 "narrative_type, label, imported_at) VALUES ('adjudicated', ?, 'c8', 'LE', "
                 "0, '2026-11-23T13:00:00Z')", (CHECKSUM,))
    manual = case_metrics(conn, EID, labels="manual").confusion
    assert case_metrics(conn, EID, labels="adjudicated").confusion == manual
