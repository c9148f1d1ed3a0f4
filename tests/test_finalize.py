"""finalize.export: every result of the experiment, in result_id order, streamed from the
database; CSV and JSON carry the same rows; a failed export leaves no file behind."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from pipeline_helpers import EXPERIMENT_ID, database, make_result

from asyncrunner.db.schema import connect
from asyncrunner.pipeline.writer import _row, insert_rows
from asyncrunner.results.finalize import EXPORT_COLUMNS, export, export_files, spreadsheet_safe

db = pytest.fixture(name="db")(database)


@pytest.fixture
def stored(db: Path) -> Iterator[list[tuple[object, ...]]]:
    """Results of EXPERIMENT_ID with errors interleaved (and another experiment's rows in
    between), as a plain query returns them in result_id order."""
    with closing(connect(db)) as conn:
        for i in range(40):
            experiment = "other" if i % 7 == 3 else EXPERIMENT_ID
            category = "timeout" if i % 3 == 0 or i in (10, 11, 12) else None
            insert_rows(conn, [_row(experiment, make_result(i, error_category=category))])
        conn.row_factory = None
        rows = conn.execute(
            f"SELECT {', '.join(EXPORT_COLUMNS)} FROM narrative_results "
            "WHERE experiment_id = ? ORDER BY result_id", (EXPERIMENT_ID,)).fetchall()
    assert {r[EXPORT_COLUMNS.index("error_occurred")] for r in rows} == {0, 1}
    yield rows


def test_csv_and_json_hold_every_row_in_result_id_order(
        db: Path, stored: list[tuple[object, ...]], tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        out_csv = export(conn, EXPERIMENT_ID, "csv", tmp_path / "out" / "r.csv")
        out_json = export(conn, EXPERIMENT_ID, "json", tmp_path / "out" / "r.json")
        assert not conn.in_transaction
    with out_csv.open(newline="", encoding="utf-8") as fh:
        header, *lines = list(csv.reader(fh))
    assert tuple(header) == EXPORT_COLUMNS
    assert lines == [["" if v is None else str(v) for v in row] for row in stored]
    records = json.loads(out_json.read_text(encoding="utf-8"))
    assert records == [dict(zip(EXPORT_COLUMNS, row, strict=True)) for row in stored]
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["r.csv", "r.json"]


def test_an_export_inside_a_callers_transaction_leaves_it_open(
        db: Path, stored: list[tuple[object, ...]], tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("BEGIN")
        export(conn, EXPERIMENT_ID, "json", tmp_path / "r.json")
        assert conn.in_transaction
        conn.execute("COMMIT")
    assert len(json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))) == len(stored)


def test_a_failed_export_leaves_no_partial_file(db: Path, stored: list[tuple[object, ...]],
                                                tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE narrative_results SET raw_response = ? WHERE result_id = "
                     "(SELECT MAX(result_id) FROM narrative_results WHERE experiment_id = ?)",
                     (b"\xff not text", EXPERIMENT_ID))
        with pytest.raises(TypeError):                 # bytes are not JSON
            export(conn, EXPERIMENT_ID, "json", tmp_path / "out" / "r.json")
        assert not conn.in_transaction
    assert list((tmp_path / "out").iterdir()) == []


def test_both_files_from_one_reading_match_the_single_exports(
        db: Path, stored: list[tuple[object, ...]], tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE narrative_results SET rationale = '=1+2' WHERE result_id % 5 = 0")
        conn.commit()
        both = export_files(conn, EXPERIMENT_ID, {"csv": tmp_path / "both" / "r.csv",
                                                  "json": tmp_path / "both" / "r.json"},
                            with_text=True)
        single = {fmt: export(conn, EXPERIMENT_ID, fmt, tmp_path / "one" / f"r.{fmt}",
                              with_text=True) for fmt in ("csv", "json")}
    for fmt in ("csv", "json"):
        assert both[fmt].read_bytes() == single[fmt].read_bytes()
    assert "'=1+2" in both["csv"].read_text(encoding="utf-8")
    assert len(json.loads(both["json"].read_text(encoding="utf-8"))) == len(stored)


def test_a_failed_export_of_both_files_leaves_neither(
        db: Path, stored: list[tuple[object, ...]], tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        conn.execute("UPDATE narrative_results SET raw_response = ? WHERE result_id = "
                     "(SELECT MAX(result_id) FROM narrative_results WHERE experiment_id = ?)",
                     (b"\xff not text", EXPERIMENT_ID))
        with pytest.raises(TypeError):                 # bytes are not JSON
            export_files(conn, EXPERIMENT_ID, {"csv": tmp_path / "out" / "r.csv",
                                               "json": tmp_path / "out" / "r.json"})
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_experiment_exports_empty_files(db: Path, tmp_path: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        assert export(conn, EXPERIMENT_ID, "json", tmp_path / "r.json").read_text() == "[\n]\n"
        export(conn, EXPERIMENT_ID, "csv", tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == [",".join(EXPORT_COLUMNS)]


@pytest.mark.parametrize(("value", "expected"), [
    ("=HYPERLINK(\"http://x\",\"y\")", "'=HYPERLINK(\"http://x\",\"y\")"),
    ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
    ("-1+1", "'-1+1"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("-1.5", "-1.5"), ("+3", "+3"), ("1e-3", "1e-3"), ("plain", "plain"), (0.25, 0.25),
    (-3, -3), (None, None), ("", ""),
])
def test_spreadsheet_safe_neutralises_formulas_and_keeps_numbers(value: object,
                                                                 expected: object) -> None:
    assert spreadsheet_safe(value) == expected


def test_csv_export_neutralises_formula_cells_from_ids_and_model_output(
        db: Path, tmp_path: Path) -> None:
    with closing(connect(db)) as conn:
        insert_rows(conn, [_row(EXPERIMENT_ID, make_result(1))])
        conn.execute("UPDATE narrative_results SET incident_id = '=1+2', "
                     "rationale = '@SUM(A1:A9)', indicators = '[\"-x\"]'")
        out_csv = export(conn, EXPERIMENT_ID, "csv", tmp_path / "r.csv")
        out_json = export(conn, EXPERIMENT_ID, "json", tmp_path / "r.json")
    with out_csv.open(newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert row["incident_id"] == "'=1+2" and row["rationale"] == "'@SUM(A1:A9)"
    assert row["indicators"] == '["-x"]'          # starts with '[': not a formula
    record = json.loads(out_json.read_text(encoding="utf-8"))[0]
    assert record["incident_id"] == "=1+2"          # JSON keeps the stored value
