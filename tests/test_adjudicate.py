"""adjudicate.py: a real database built with SQL, real workbooks edited with openpyxl the way
a reviewer's spreadsheet program would, and the real command in a subprocess."""

from __future__ import annotations

import sqlite3
import stat
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from openpyxl import load_workbook

from asyncrunner.db.schema import connect, connect_existing, connect_readonly
from asyncrunner.errors import RefusedError, UsageError
from asyncrunner.results import adjudicate
from asyncrunner.results.labels import narrative_label_sql
from asyncrunner.results.workbook import (
    KEYS_SHEET,
    REVIEW_SHEET,
    CellAnswer,
    ReviewRow,
    ReviewWorkbookError,
    read_review_workbook,
    write_review_workbook,
)

STUDY = "5a5a5a5a-0000-4000-8000-000000000001"
OTHER_STUDY = "5a5a5a5a-0000-4000-8000-000000000002"
E1 = "11111111-1111-4111-8111-111111111111"
E2 = "22222222-2222-4222-8222-222222222222"
E3 = "33333333-3333-4333-8333-333333333333"      # another data file, not in the study
CHECKSUM = "sum-a"
OTHER_CHECKSUM = "sum-b"
FORMULA = '=HYPERLINK("http://evil.example","click")'

ERR = "error"
NONE = "none"                                      # no result row at all
# (incident, type): (manual label, E1's answer, E2's answer)
NARRATIVES: dict[tuple[str, str], tuple[int | None, Any, Any]] = {
    ("0001", "CME"): (1, 1, 1),                    # both right
    ("0001", "LE"): (0, 1, 0),                     # FP in 1 of 2
    ("0002", "CME"): (1, 0, 0),                    # FN in 2 of 2
    ("0002", "LE"): (None, 1, 0),                  # unlabelled, cells disagree
    ("0003", "CME"): (0, 0, 0),                    # both right
    ("0003", "LE"): (0, ERR, 1),                   # FP in 1 of 1 (the error is ignored)
    ("0004", "CME"): (None, 1, 1),                 # unlabelled, agree
    ("0004", "LE"): (1, ERR, 0),                   # FN in 1 of 1
    ("0005", "CME"): (0, 1, NONE),                 # FP; E2 has no result
    ("0005", "LE"): (1, ERR, 1),                   # right where answered
}
FLAGGED = [("0001", "LE"), ("0002", "CME"), ("0002", "LE"), ("0003", "LE"), ("0004", "LE"),
           ("0005", "CME")]
REASONS = ["false positive in 1 of 2", "false negative in 2 of 2",
           "cells disagree (1 yes, 1 no)", "false positive in 1 of 1",
           "false negative in 1 of 1", "false positive in 1 of 1"]


def text_of(key: tuple[str, str]) -> str:
    return FORMULA if key == ("0002", "LE") else f"Narrative {key[0]} {key[1]}."


# -- the database ----------------------------------------------------------------------------

def add_experiment(conn: sqlite3.Connection, eid: str, *, name: str | None = "sql",
                   checksum: str = CHECKSUM, study: str | None = None,
                   cell: str | None = None, repeat: int | None = None) -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "temperature, prompt_version, data_checksum, n_narratives_total, study_id, study_cell, "
        "study_repeat) VALUES (?, ?, 'completed', 'm', 0.0, 'v1', ?, 10, ?, ?, ?)",
        (eid, name, checksum, study, cell, repeat))


def add_result(conn: sqlite3.Connection, eid: str, key: tuple[str, str], answer: Any,
               label: int | None) -> None:
    if answer == NONE:
        return
    error = answer == ERR
    conn.execute(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, detected, "
        "confidence, indicators, rationale, error_occurred, error_category, manual_flag_ind, "
        "manual_flag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (eid, *key, None if error else answer, None if error else 0.75,
         None if error else '["weapon", "threat"]', None if error else f"because {eid[:2]}",
         int(error), "timeout" if error else None, label, label))


def add_narrative(conn: sqlite3.Connection, key: tuple[str, str], label: int | None,
                  *, checksum: str = CHECKSUM, text: str | None = None) -> None:
    conn.execute(
        "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
        "manual_flag_ind, manual_flag, data_source, data_checksum) "
        "VALUES (?, ?, ?, ?, ?, 'test.csv', ?)",
        (*key, text if text is not None else text_of(key), label, label, checksum))


def build(path: Path, *, study: str = STUDY, e1: str = E1, e2: str = E2) -> Path:
    with closing(connect(path)) as conn:
        # Inserted in reverse so the export's order (cell, then repeat) is its own doing.
        add_experiment(conn, e2, study=study, cell="temperature=0.7", repeat=1)
        add_experiment(conn, e1, study=study, cell="temperature=0.0", repeat=1)
        for key, (label, a1, a2) in NARRATIVES.items():
            add_narrative(conn, key, label)
            # The same keys in another data file, with other texts.
            add_narrative(conn, key, label, checksum=OTHER_CHECKSUM, text="OTHER FILE")
            add_result(conn, e1, key, a1, label)
            add_result(conn, e2, key, a2, label)
        # A narrative of the data file that no experiment classified.
        add_narrative(conn, ("0006", "LE"), 0)
        # An experiment on the other data file, with a result the study does not have.
        add_experiment(conn, E3, checksum=OTHER_CHECKSUM)
        add_narrative(conn, ("0007", "LE"), 0, checksum=OTHER_CHECKSUM)
        add_result(conn, E3, ("0007", "LE"), 1, 0)
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return build(tmp_path / "exp.db")


def export(db: Path, out: Path, ids: list[str] | None = None,
           study: str | None = STUDY) -> str:
    with closing(connect_readonly(db)) as conn:
        return adjudicate.export_workbook(conn, ids or [], None if ids else study, out)


def import_(db: Path, path: Path) -> str:
    with closing(connect_existing(db)) as conn:
        summary = adjudicate.import_workbook(conn, path)
        assert not conn.in_transaction
        return summary


def rows_of(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(connect(db, migrate_schema=False)) as conn:
        return [tuple(row) for row in conn.execute(sql, params)]


def label_sets(db: Path) -> list[tuple[Any, ...]]:
    return rows_of(db, "SELECT * FROM label_sets ORDER BY incident_id, narrative_type")


def effective_labels(db: Path, eid: str) -> dict[tuple[str, str], int | None]:
    expr = narrative_label_sql("adjudicated", checksum="e.data_checksum")
    return {(row[0], row[1]): row[2] for row in rows_of(
        db, f"SELECT r.incident_id, r.narrative_type, {expr} FROM narrative_results r "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE r.experiment_id = ?", (eid,))}


# -- the reviewer ----------------------------------------------------------------------------

def headers(sheet: Any) -> list[Any]:
    return [cell.value for cell in sheet[1]]


def sheet_rows(path: Path) -> list[dict[str, Any]]:
    sheet = load_workbook(path)[REVIEW_SHEET]
    names = headers(sheet)
    return [dict(zip(names, (cell.value for cell in row), strict=True))
            for row in sheet.iter_rows(min_row=2)]


def review(path: Path, decisions: dict[tuple[str, str], str],
           notes: dict[tuple[str, str], str] | None = None, *, sort: bool = True) -> None:
    """Type decisions and notes into the rows of these keys, then sort the rows by the
    narrative text (descending), as a reviewer's spreadsheet program would; save."""
    book = load_workbook(path)
    sheet = book[REVIEW_SHEET]
    names = headers(sheet)
    decision, note = names.index("decision"), names.index("note")
    body = [[(cell.value, cell.data_type) for cell in row] for row in sheet.iter_rows(min_row=2)]
    for cells in body:
        key = (cells[0][0], cells[1][0])
        if key in decisions:
            cells[decision] = (decisions[key], "s")
        if notes and key in notes:
            cells[note] = (notes[key], "s")
    if sort:
        body.sort(key=lambda cells: str(cells[3][0]), reverse=True)
    for row_number, cells in enumerate(body, start=2):
        for column_number, (value, data_type) in enumerate(cells, start=1):
            cell = sheet.cell(row_number, column_number)
            cell.value = value
            cell.data_type = data_type
    book.save(path)


@pytest.fixture
def exported(db: Path, tmp_path: Path) -> Path:
    out = tmp_path / "review.xlsx"
    export(db, out)
    return out


DECIDED = {("0001", "LE"): "positive",      # manual 0 -> 1
           ("0002", "CME"): "negative",     # manual 1 -> 0
           ("0002", "LE"): "yes",           # unlabelled -> 1
           ("0003", "LE"): "unsure"}        # no decision


# -- export --------------------------------------------------------------------------------

def test_export_lists_fp_fn_and_disagreements_one_row_each_in_key_order(
        db: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.xlsx"
    summary = export(db, out)
    assert summary == (f"wrote {out}: 6 narratives to review (FP 3, FN 2, disagreements 1) "
                       "from 2 experiments")
    rows = sheet_rows(out)
    assert [(r["incident id"], r["narrative type"]) for r in rows] == FLAGGED
    assert [r["reason"] for r in rows] == REASONS
    assert [r["narrative text"] for r in rows] == [text_of(k) for k in FLAGGED]
    assert [r["manual label"] for r in rows] == [
        "negative", "positive", None, "negative", "positive", "negative"]
    first = rows[0]
    assert first["temperature=0.0 #1 answer"] == "positive"
    assert first["temperature=0.7 #1 answer"] == "negative"
    assert first["temperature=0.0 #1 confidence"] == 0.75
    assert first["temperature=0.0 #1 indicators"] == "weapon; threat"
    assert first["temperature=0.7 #1 rationale"] == "because 22"
    assert rows[3]["temperature=0.0 #1 answer"] == "error: timeout"
    assert rows[5]["temperature=0.7 #1 answer"] == "error: no result"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert read_review_workbook(out).source == STUDY


def test_cells_are_ordered_by_study_cell_then_repeat(db: Path, tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE experiments SET study_cell = 'temperature=0.0', study_repeat = 2 "
                     "WHERE experiment_id = ?", (E2,))
    out = tmp_path / "review.xlsx"
    export(db, out)
    names = headers(load_workbook(out)[REVIEW_SHEET])
    assert names[5] == "temperature=0.0 #1 answer"
    assert names[9] == "temperature=0.0 #2 answer"


def test_export_by_ids_keeps_their_order_names_cells_uniquely_and_sorts_the_source(
        db: Path, tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE experiments SET study_id = NULL, study_cell = NULL, "
                     "study_repeat = NULL")
    out = tmp_path / "review.xlsx"
    summary = export(db, out, ids=[E2, E1, E2])
    assert "from 2 experiments" in summary
    names = headers(load_workbook(out)[REVIEW_SHEET])
    assert names[5] == "sql (22222222) answer"     # both are named "sql"
    assert names[9] == "sql (11111111) answer"
    assert read_review_workbook(out).source == f"experiments:{E1},{E2}"


def test_cell_names_fall_back_to_short_then_full_ids() -> None:
    def experiment(eid: str, name: str | None) -> adjudicate.Experiment:
        return adjudicate.Experiment(eid, name, CHECKSUM, None, None)

    assert adjudicate.cell_names([experiment(E1, None), experiment(E2, "  a\tb ")]) == [
        "11111111", "a b"]
    twins = [experiment("abcdefgh-1", "X"), experiment("abcdefgh-2", "x")]
    assert adjudicate.cell_names(twins) == ["X (abcdefgh-1)", "x (abcdefgh-2)"]


def test_a_single_experiment_shows_its_own_errors_only(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.xlsx"
    assert "3 narratives to review (FP 2, FN 1, disagreements 0) from 1 experiment" in export(
        db, out, ids=[E1])
    assert [r["reason"] for r in sheet_rows(out)] == [
        "false positive", "false negative", "false positive"]


def test_nothing_to_review_still_writes_an_empty_workbook(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "review.xlsx"
    out.write_bytes(b"an older export")
    assert export(db, out, ids=[E3, E3]) == (
        f"wrote {out}: 1 narrative to review (FP 1, FN 0, disagreements 0) from 1 experiment")
    # E3's only answer was a false positive; now nothing is wrong:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE narrative_results SET detected = 0 WHERE experiment_id = ?", (E3,))
    summary = export(db, out, ids=[E3])
    assert "nothing to review" in summary and "\n" not in summary
    assert sheet_rows(out) == []
    assert read_review_workbook(out).undecided == 0


def test_experiments_of_two_data_files_are_a_usage_error(db: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="one set of narratives") as info:
        export(db, tmp_path / "r.xlsx", ids=[E1, E3])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r.xlsx").exists()


def test_unknown_experiment_or_study_is_refused(db: Path, tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match="no experiment 99999999"):
        export(db, tmp_path / "r.xlsx", ids=[E1, "99999999-9999-4999-8999-999999999999"])
    with pytest.raises(RefusedError, match=f"study {OTHER_STUDY}"):
        export(db, tmp_path / "r.xlsx", study=OTHER_STUDY)
    with closing(connect_readonly(db)) as conn, pytest.raises(UsageError, match="not both"):
        adjudicate.export_workbook(conn, [E1], STUDY, tmp_path / "r.xlsx")
    assert not (tmp_path / "r.xlsx").exists()


# -- import --------------------------------------------------------------------------------

def test_round_trip_stores_exactly_the_decisions_and_changes_only_their_labels(
        db: Path, exported: Path) -> None:
    results_before = rows_of(db, "SELECT * FROM narrative_results ORDER BY result_id")
    manual = effective_labels(db, E1)
    review(exported, DECIDED, notes={("0001", "LE"): "threat is explicit",
                                     ("0003", "LE"): "can't tell"})
    checksum = read_review_workbook(exported).checksum

    summary = import_(db, exported)

    assert summary == (f"imported {exported}: 3 decisions stored (3 new, 0 changed, "
                       "0 unchanged) in label set 'adjudicated'; 3 left undecided")
    stored = label_sets(db)
    assert [row[:8] for row in stored] == [
        ("adjudicated", CHECKSUM, "0001", "LE", 1, "threat is explicit", STUDY, checksum),
        ("adjudicated", CHECKSUM, "0002", "CME", 0, None, STUDY, checksum),
        ("adjudicated", CHECKSUM, "0002", "LE", 1, None, STUDY, checksum),
    ]
    assert all(row[8].endswith("Z") for row in stored)
    # The effective labels changed exactly as decided; the manual ones did not change.
    expected = manual | {("0001", "LE"): 1, ("0002", "CME"): 0, ("0002", "LE"): 1}
    assert effective_labels(db, E1) == expected
    assert rows_of(db, "SELECT * FROM narrative_results ORDER BY result_id") == results_before


def test_importing_the_same_workbook_again_changes_nothing(db: Path, exported: Path) -> None:
    review(exported, DECIDED)
    import_(db, exported)
    first = label_sets(db)
    summary = import_(db, exported)
    assert "3 decisions stored (0 new, 0 changed, 3 unchanged)" in summary
    assert label_sets(db) == first                 # imported_at included


def test_a_re_reviewed_workbook_replaces_changed_decisions_only(
        db: Path, exported: Path, tmp_path: Path) -> None:
    review(exported, DECIDED)
    import_(db, exported)
    before = {row[2:4]: row for row in label_sets(db)}

    again = tmp_path / "again.xlsx"
    export(db, again)
    review(again, {("0001", "LE"): "negative", ("0002", "CME"): "negative",
                   ("0002", "LE"): "positive", ("0004", "LE"): "no"},
           notes={("0002", "LE"): "second look"}, sort=False)
    summary = import_(db, again)

    assert "4 decisions stored (1 new, 2 changed, 1 unchanged)" in summary
    after = {row[2:4]: row for row in label_sets(db)}
    assert after[("0001", "LE")][4] == 0
    assert after[("0002", "LE")][4:6] == (1, "second look")
    assert after[("0002", "CME")] == before[("0002", "CME")]     # untouched
    assert after[("0004", "LE")][4] == 0
    # Blank and "unsure" never remove a stored decision.
    review(again, {("0001", "LE"): "unsure", ("0002", "CME"): ""}, sort=False)
    assert "(0 new, 0 changed, 2 unchanged)" in import_(db, again)
    assert {row[2:4]: row for row in label_sets(db)} == after


@pytest.mark.parametrize("tamper", ["hidden key", "visible key"])
def test_a_tampered_workbook_is_refused_and_nothing_is_written(
        db: Path, exported: Path, tamper: str) -> None:
    review(exported, DECIDED)
    import_(db, exported)
    before = label_sets(db)
    review(exported, {("0001", "LE"): "negative"})
    book = load_workbook(exported)
    if tamper == "hidden key":
        book[KEYS_SHEET]["A5"] = '"0009"'
    else:
        sheet = book[REVIEW_SHEET]
        row = next(r for r in range(2, sheet.max_row + 1) if sheet.cell(r, 1).value == "0002")
        sheet.cell(row, 1).value = "0006"         # a narrative that was not exported
    book.save(exported)

    with pytest.raises(ReviewWorkbookError) as info:
        import_(db, exported)
    assert "\n" not in str(info.value)
    assert label_sets(db) == before


def forged(path: Path, keys: list[tuple[str, str]], *, source: str = STUDY) -> Path:
    """A workbook that passes every check of the file itself (as anyone could write one),
    with a decision on each of these keys."""
    answers = (CellAnswer(True, 0.5, "", ""), CellAnswer(False, 0.5, "", ""))
    write_review_workbook(path, source=source, cell_names=("a", "b"), rows=[
        ReviewRow(incident_id=i, narrative_type=t, text="t", manual=None, reason="r",
                  answers=answers) for i, t in keys])
    review(path, dict.fromkeys(keys, "positive"), sort=False)
    return path


@pytest.mark.parametrize("bad", [
    ("0006", "LE"),        # in the data file, but no experiment of the study classified it
    ("0007", "LE"),        # another data file's narrative, classified by another experiment
    ("0001", "XX"),        # no such narrative at all
])
def test_keys_that_are_not_part_of_the_experiments_are_refused(
        db: Path, tmp_path: Path, bad: tuple[str, str]) -> None:
    path = forged(tmp_path / "forged.xlsx", [("0001", "LE"), bad, ("0002", "LE")])
    with pytest.raises(RefusedError) as info:
        import_(db, path)
    message = str(info.value)
    assert "keys that are not part of the experiment are refused" in message
    assert repr(bad[0]) in message and repr(bad[1]) in message and "\n" not in message
    assert label_sets(db) == []


def test_a_workbook_of_another_database_or_study_is_refused(db: Path, tmp_path: Path) -> None:
    other = build(tmp_path / "other.db", study=OTHER_STUDY,
                  e1="44444444-4444-4444-8444-444444444444",
                  e2="55555555-5555-4555-8555-555555555555")
    from_other = tmp_path / "other.xlsx"
    export(other, from_other, study=OTHER_STUDY)
    review(from_other, DECIDED)
    with pytest.raises(RefusedError, match=f"exported from study '{OTHER_STUDY}', which is "
                                           "not in this database"):
        import_(db, from_other)

    by_ids = tmp_path / "by_ids.xlsx"
    export(other, by_ids, ids=["44444444-4444-4444-8444-444444444444"])
    review(by_ids, {("0001", "LE"): "positive"})
    with pytest.raises(RefusedError, match="exported from experiment '44444444-"):
        import_(db, by_ids)
    assert label_sets(db) == []
    # Into its own database it goes.
    assert "1 decision stored (1 new" in import_(other, by_ids)


def test_a_forged_source_of_experiments_from_two_data_files_is_a_usage_error(
        db: Path, tmp_path: Path) -> None:
    path = forged(tmp_path / "f.xlsx", [("0001", "LE")],
                  source=adjudicate.experiments_source([E1, E3]))
    with pytest.raises(UsageError, match="one set of narratives"):
        import_(db, path)
    assert label_sets(db) == []


def test_a_failure_half_way_rolls_back_every_decision(db: Path, exported: Path) -> None:
    review(exported, DECIDED)
    with closing(connect(db)) as conn:
        conn.execute("CREATE TRIGGER no_0002 BEFORE INSERT ON label_sets "
                     "WHEN NEW.incident_id = '0002' BEGIN SELECT RAISE(ABORT, 'boom'); END")
    with closing(connect_existing(db)) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="boom"):
            adjudicate.import_workbook(conn, exported)
        assert not conn.in_transaction
    assert label_sets(db) == []                    # ("0001", "LE") went in first


def test_formula_looking_narrative_text_stays_text(exported: Path) -> None:
    sheet = load_workbook(exported)[REVIEW_SHEET]
    cells = [row[3] for row in sheet.iter_rows(min_row=2) if row[0].value == "0002"
             and row[1].value == "LE"]
    assert [(c.value, c.data_type) for c in cells] == [(FORMULA, "s")]


def test_export_never_writes_to_the_database(db: Path, tmp_path: Path) -> None:
    with closing(connect_readonly(db)) as conn:
        changes = conn.total_changes
        adjudicate.export_workbook(conn, [], STUDY, tmp_path / "r.xlsx")
        assert conn.total_changes == changes and not conn.in_transaction


# -- the command -----------------------------------------------------------------------------

def one_line_error(result: Any, code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncrunner: error: ")
    return str(lines[0])


def test_cli_export_review_import_and_import_again(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.xlsx"
    result = run_cli("adjudicate", "export", "--study", STUDY, "--out", str(out),
                     "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        f"wrote {out}: 6 narratives to review (FP 3, FN 2, disagreements 1) "
        "from 2 experiments"]
    review(out, DECIDED)

    first = run_cli("adjudicate", "import", str(out), "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "3 decisions stored (3 new, 0 changed, 0 unchanged)" in first.stdout
    again = run_cli("adjudicate", "import", str(out), "--db", str(db))
    assert again.returncode == 0, again.stderr
    assert "(0 new, 0 changed, 3 unchanged)" in again.stdout
    assert len(label_sets(db)) == 3


def test_cli_refusals_are_one_line(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.xlsx"
    unknown = run_cli("adjudicate", "export", "--study", OTHER_STUDY, "--out", str(out),
                      "--db", str(db))
    assert "no experiments of study" in one_line_error(unknown, 3)
    mixed = run_cli("adjudicate", "export", E1, E3, "--out", str(out), "--db", str(db))
    assert "one set of narratives" in one_line_error(mixed, 2)
    assert not out.exists()

    assert run_cli("adjudicate", "export", E1, E2, "--out", str(out),
                   "--db", str(db)).returncode == 0
    review(out, DECIDED)
    book = load_workbook(out)
    book[KEYS_SHEET]["A5"] = '"0009"'
    book.save(out)
    tampered = run_cli("adjudicate", "import", str(out), "--db", str(db))
    assert f"hidden sheet '{KEYS_SHEET}' was changed" in one_line_error(tampered, 3)

    forged(out, [("0006", "LE")], source=adjudicate.experiments_source([E1, E2]))
    foreign_key = run_cli("adjudicate", "import", str(out), "--db", str(db))
    assert "not part of the experiment" in one_line_error(foreign_key, 3)
    assert label_sets(db) == []


def test_cli_export_leaves_a_read_only_database_byte_identical(
        db: Path, tmp_path: Path) -> None:
    before = db.read_bytes()
    db.chmod(0o444)
    try:
        out = tmp_path / "f.xlsx"
        result = run_cli("adjudicate", "export", "--study", STUDY, "--out", str(out),
                         "--db", str(db))
        assert result.returncode == 0, result.stderr
        assert out.is_file()
        assert db.read_bytes() == before
    finally:
        db.chmod(0o644)
