"""The adjudication workbook: real .xlsx files in tmp_path, edited with openpyxl the way a
reviewer's spreadsheet program would (decisions typed, rows sorted, filtered, deleted)."""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from openpyxl import Workbook, load_workbook

from asyncrunner.errors import RefusedError
from asyncrunner.results.workbook import (
    CELL_LIMIT,
    KEYS_SHEET,
    REVIEW_SHEET,
    CellAnswer,
    Decision,
    ReviewRow,
    ReviewWorkbookError,
    key_checksum,
    read_review_workbook,
    write_review_workbook,
)

CELLS = ("gpt-a", "gpt-b")
SOURCE = "study-7f3a"


def answer(detected: bool | None, confidence: float | None = 0.9) -> CellAnswer:
    return CellAnswer(detected=detected, confidence=confidence, indicators="weapon; threat",
                      rationale="The narrative mentions a weapon.",
                      error="timeout" if detected is None else None)


def review_row(incident_id: str, narrative_type: str = "LE", *, text: str = "",
               manual: bool | None = True, reason: str = "false negative",
               answers: tuple[CellAnswer, ...] | None = None) -> ReviewRow:
    return ReviewRow(incident_id=incident_id, narrative_type=narrative_type,
                     text=text or f"Narrative of {incident_id}.", manual=manual, reason=reason,
                     answers=answers if answers is not None else (answer(False), answer(None)))


def rows(n: int) -> list[ReviewRow]:
    # Texts in reverse alphabetical order of the ids, so sorting by text reverses the rows.
    return [review_row(f"INC-{i:03d}", "LE" if i % 2 else "CME",
                       text=f"{chr(ord('z') - i)} narrative {i}") for i in range(n)]


@pytest.fixture
def book_path(tmp_path: Path) -> Path:
    path = tmp_path / "review.xlsx"
    write_review_workbook(path, source=SOURCE, cell_names=CELLS, rows=rows(6))
    return path


def headers(sheet: Any) -> list[Any]:
    return [cell.value for cell in sheet[1]]


def column(sheet: Any, header: str) -> int:
    return headers(sheet).index(header) + 1


def row_of(sheet: Any, incident_id: str) -> int:
    for (cell,) in sheet.iter_rows(min_row=2, max_col=1):
        if cell.value == incident_id:
            return int(cell.row)
    raise AssertionError(incident_id)


def edit(path: Path, decisions: dict[str, Any], notes: dict[str, str] | None = None) -> None:
    """Type decisions (and notes) into the rows of these incident ids, as a reviewer would."""
    book = load_workbook(path)
    sheet = book[REVIEW_SHEET]
    for incident_id, value in decisions.items():
        sheet.cell(row_of(sheet, incident_id), column(sheet, "decision")).value = value
    for incident_id, note in (notes or {}).items():
        sheet.cell(row_of(sheet, incident_id), column(sheet, "note")).value = note
    book.save(path)


def sort_rows(sheet: Any, header: str, *, reverse: bool = False) -> None:
    """What a spreadsheet's sort does: whole rows move, cell types and all."""
    by = column(sheet, header) - 1
    body = [[(cell.value, cell.data_type) for cell in row]
            for row in sheet.iter_rows(min_row=2)]
    body.sort(key=lambda cells: str(cells[by][0]), reverse=reverse)
    for row_number, cells in enumerate(body, start=2):
        for column_number, (value, data_type) in enumerate(cells, start=1):
            cell = sheet.cell(row_number, column_number)
            cell.value = value
            cell.data_type = data_type


def all_cells(path: Path) -> Iterator[Any]:
    book = load_workbook(path)
    for sheet in book.worksheets:
        for row in sheet.iter_rows():
            yield from row


def refusal(path: Path) -> str:
    with pytest.raises(ReviewWorkbookError) as info:
        read_review_workbook(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the round trip ------------------------------------------------------------------------

def test_decisions_come_back_by_key_after_sorting_and_filtering(book_path: Path) -> None:
    edit(book_path, {"INC-000": "positive", "INC-001": " Negative ", "INC-002": "unsure",
                     "INC-004": "YES"},
         notes={"INC-000": "clear threat  ", "INC-002": "ambiguous", "INC-003": "no label"})
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sort_rows(sheet, "narrative text")
    assert sheet.cell(2, 1).value == "INC-005"           # the order really changed
    sheet.row_dimensions[3].hidden = True                 # a filter hides a decided row
    book.save(book_path)

    result = read_review_workbook(book_path)

    assert result.source == SOURCE
    assert result.decisions == (
        Decision("INC-000", "CME", True, "clear threat"),
        Decision("INC-001", "LE", False, ""),
        Decision("INC-004", "CME", True, ""),
    )
    assert result.undecided == 3                          # unsure, a note only, untouched
    keys = [(row.incident_id, row.narrative_type) for row in rows(6)]
    assert result.checksum == key_checksum(SOURCE, keys)


def test_deleted_rows_are_undecided_and_moved_columns_are_found(book_path: Path) -> None:
    edit(book_path, {"INC-001": "positive", "INC-003": "negative", "INC-005": "no"})
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.delete_rows(row_of(sheet, "INC-003"))
    sheet.insert_cols(1)                                  # the reviewer's own column
    sheet.cell(1, 1).value = "my remarks"
    sheet.cell(2, 1).value = "look again"
    book.save(book_path)

    result = read_review_workbook(book_path)

    assert [(d.incident_id, d.label) for d in result.decisions] == [
        ("INC-001", True), ("INC-005", False)]
    assert result.undecided == 4


@pytest.mark.parametrize(("typed", "label"), [
    ("positive", True), ("POSITIVE", True), ("yes", True), ("True", True), ("1", True),
    (True, True), (1, True), (1.0, True),
    ("negative", False), (" no ", False), ("false", False), ("0", False), (False, False),
    (0, False),
])
def test_accepted_decision_words(book_path: Path, typed: object, label: bool) -> None:
    edit(book_path, {"INC-002": typed})
    assert read_review_workbook(book_path).decisions == (
        Decision("INC-002", "CME", label, ""),)


@pytest.mark.parametrize("typed", ["unsure", " Unsure", "", "   ", None])
def test_unsure_and_blank_are_no_decision(book_path: Path, typed: object) -> None:
    edit(book_path, {"INC-002": typed}, notes={"INC-002": "not sure at all"})
    result = read_review_workbook(book_path)
    assert result.decisions == ()
    assert result.undecided == 6


def test_a_workbook_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.xlsx"
    write_review_workbook(path, source=SOURCE, cell_names=CELLS, rows=[])
    assert read_review_workbook(path) == read_review_workbook(path)
    assert read_review_workbook(path).decisions == ()
    assert read_review_workbook(path).undecided == 0


# -- what the reviewer sees ----------------------------------------------------------------

def test_layout_header_filter_widths_and_hidden_keys(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    assert book.sheetnames == [REVIEW_SHEET, KEYS_SHEET]
    assert book.active.title == REVIEW_SHEET
    assert headers(sheet) == [
        "incident id", "narrative type", "reason", "narrative text", "manual label",
        "gpt-a answer", "gpt-a confidence", "gpt-a indicators", "gpt-a rationale",
        "gpt-b answer", "gpt-b confidence", "gpt-b indicators", "gpt-b rationale",
        "decision", "note"]
    assert sheet.freeze_panes == "A2"
    assert sheet.auto_filter.ref == "A1:O7"
    assert sheet.column_dimensions["D"].width == 80
    assert all(sheet.column_dimensions[c].width <= 40 for c in "ABCEFGHIJKLMNO")
    assert all(cell.alignment.wrap_text for row in sheet.iter_rows() for cell in row)
    assert book[KEYS_SHEET].sheet_state in ("hidden", "veryHidden")
    assert SOURCE in book.properties.title


def test_cell_values_labels_and_numbers(book_path: Path) -> None:
    sheet = load_workbook(book_path)[REVIEW_SHEET]
    first = {h: sheet.cell(2, i).value for i, h in enumerate(headers(sheet), start=1)}
    assert first["manual label"] == "positive"
    assert first["gpt-a answer"] == "negative"
    assert first["gpt-b answer"] == "error: timeout"
    assert first["gpt-a confidence"] == 0.9
    assert sheet.cell(2, column(sheet, "gpt-a confidence")).data_type == "n"
    assert first["decision"] is None and first["note"] is None


def test_unlabelled_and_non_finite_confidence_are_blank(tmp_path: Path) -> None:
    path = tmp_path / "r.xlsx"
    row = review_row("INC-1", manual=None, reason="cells disagree",
                     answers=(answer(True, float("nan")), answer(False, float("inf"))))
    write_review_workbook(path, source=SOURCE, cell_names=CELLS, rows=[row])
    sheet = load_workbook(path)[REVIEW_SHEET]
    assert sheet.cell(2, column(sheet, "manual label")).value is None
    assert sheet.cell(2, column(sheet, "gpt-a confidence")).value is None
    assert sheet.cell(2, column(sheet, "gpt-b confidence")).value is None


def test_decision_column_has_a_drop_down(book_path: Path) -> None:
    sheet = load_workbook(book_path)[REVIEW_SHEET]
    validations = sheet.data_validations.dataValidation
    assert len(validations) == 1
    (validation,) = validations
    assert validation.type == "list"
    assert validation.formula1 == '"positive,negative,unsure"'
    assert validation.allow_blank
    assert str(validation.sqref) == "N2:N7"
    assert column(sheet, "decision") == 14                 # N


# -- text that a spreadsheet would run, or that XML cannot carry ---------------------------

FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+SUM(A1:A9)", "-2+3", "@cmd",
            "=1+1", "\tTAB", "#N/A"]


def test_formula_looking_text_is_stored_as_text_and_reads_back_identical(
        tmp_path: Path) -> None:
    path = tmp_path / "r.xlsx"
    source = "=source"
    review_rows = [
        review_row(value, "@LE" if i % 2 else "-CME", text=value, reason=value,
                   answers=(CellAnswer(True, -0.5, value, value), answer(None)))
        for i, value in enumerate(FORMULAS)]
    write_review_workbook(path, source=source, cell_names=("=cell", "+cell"),
                          rows=review_rows)

    cells = list(all_cells(path))
    assert not [c.coordinate for c in cells if c.data_type == "f"]
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.startswith("xl/worksheets/"):
                assert b"<f>" not in archive.read(name) and b"<f " not in archive.read(name)
    sheet = load_workbook(path)[REVIEW_SHEET]
    for row_number, value in enumerate(FORMULAS, start=2):
        for header in ("incident id", "narrative text", "reason", "=cell rationale",
                       "=cell indicators"):
            cell = sheet.cell(row_number, column(sheet, header))
            assert (cell.value, cell.data_type) == (value, "s")
        assert sheet.cell(row_number, column(sheet, "=cell confidence")).value == -0.5
    assert sheet.cell(1, column(sheet, "=cell answer")).data_type == "s"

    edit(path, dict.fromkeys(FORMULAS, "positive"))
    result = read_review_workbook(path)
    assert result.source == source
    assert [(d.incident_id, d.narrative_type) for d in result.decisions] == [
        (r.incident_id, r.narrative_type) for r in review_rows]


def test_characters_xml_cannot_carry_are_replaced_and_the_key_survives(
        tmp_path: Path) -> None:
    path = tmp_path / "r.xlsx"
    weird_id = "INC\x07-1\r"
    text = "a\x00b\x01c\x0bd\x1fe\ud800f\uffffg\r\nh\ri\tj"
    write_review_workbook(path, source="src\x1b", cell_names=CELLS,
                          rows=[review_row(weird_id, text=text)])
    sheet = load_workbook(path)[REVIEW_SHEET]
    assert sheet.cell(2, column(sheet, "narrative text")).value == (
        "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf\ufffdg\nh\ni\tj")
    assert sheet.cell(2, 1).value == "INC\ufffd-1\n"

    edit(path, {"INC\ufffd-1\n": "negative"})
    result = read_review_workbook(path)
    assert result.source == "src\x1b"
    assert result.decisions == (Decision(weird_id, "LE", False, ""),)


# 40,000 characters; 20,000 characters that Excel counts as 40,000 (UTF-16 pairs).
@pytest.mark.parametrize("text", ["x" * 40_000, "\U0001F600" * 20_000])
def test_over_long_text_is_cut_with_a_visible_marker(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.xlsx"
    write_review_workbook(path, source=SOURCE, cell_names=CELLS,
                          rows=[review_row("INC-1", text=text)])
    stored = load_workbook(path)[REVIEW_SHEET].cell(2, 4).value
    assert len(stored.encode("utf-16-le")) // 2 <= CELL_LIMIT
    kept, marker = stored.rsplit("… [cut: ", 1)
    assert text.startswith(kept)
    assert marker == f"{len(text) - len(kept)} characters more]"
    assert len(kept.encode("utf-16-le")) // 2 > CELL_LIMIT - 40    # cut no more than needed


# -- the file itself -----------------------------------------------------------------------

def test_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "r.xlsx"
    path.write_bytes(b"old")
    path.chmod(0o644)
    previous = os.umask(0)
    try:
        write_review_workbook(path, source=SOURCE, cell_names=CELLS, rows=rows(2))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["r.xlsx"]


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.xlsx"
    path.write_bytes(b"previous export")

    def broken_save(self: Workbook, filename: object) -> None:
        # Part of the file is written before the failure.
        filename.write(b"PK partial")              # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Workbook, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        write_review_workbook(path, source=SOURCE, cell_names=CELLS, rows=rows(3))
    assert [p.name for p in tmp_path.iterdir()] == ["r.xlsx"]
    assert path.read_bytes() == b"previous export"

    with pytest.raises(OSError, match="No space"):
        write_review_workbook(tmp_path / "new.xlsx", source=SOURCE, cell_names=CELLS,
                              rows=rows(3))
    assert [p.name for p in tmp_path.iterdir()] == ["r.xlsx"]


def test_an_unwritable_place_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(OSError):
        write_review_workbook(blocker / "r.xlsx", source=SOURCE, cell_names=CELLS,
                              rows=rows(1))
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-directory"]


@pytest.mark.parametrize("bad", [
    [review_row("INC-1"), review_row("INC-1")],
    [review_row("")],
    [review_row("INC-1", answers=(answer(True),))],
])
def test_rows_a_workbook_cannot_represent_are_refused_before_writing(
        tmp_path: Path, bad: Sequence[ReviewRow]) -> None:
    with pytest.raises(ValueError):
        write_review_workbook(tmp_path / "r.xlsx", source=SOURCE, cell_names=CELLS, rows=bad)
    assert list(tmp_path.iterdir()) == []


def test_cell_names_that_collide_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same header"):
        write_review_workbook(tmp_path / "r.xlsx", source=SOURCE, cell_names=("a", "A "),
                              rows=[])


# -- workbooks that cannot be trusted ------------------------------------------------------

def test_invalid_decision_is_refused_naming_row_and_value(book_path: Path) -> None:
    edit(book_path, {"INC-003": "maybe\nlater"})
    row = row_of(load_workbook(book_path)[REVIEW_SHEET], "INC-003")
    message = refusal(book_path)
    assert f"row {row}" in message and "'maybe\\nlater'" in message and "INC-003" in message


@pytest.mark.parametrize("typed", ["=1", 2, 0.5, "pos"])
def test_other_decision_values_are_refused(book_path: Path, typed: object) -> None:
    edit(book_path, {"INC-003": typed})
    assert "decision" in refusal(book_path)


def test_an_edited_visible_key_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(row_of(sheet, "INC-004"), 1).value = "INC-404"
    book.save(book_path)
    message = refusal(book_path)
    assert "row 6" in message and "INC-404" in message


def test_an_edited_narrative_type_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(row_of(sheet, "INC-004"), 2).value = "LE"     # it was CME
    book.save(book_path)
    assert "not one of the exported" in refusal(book_path)


def test_a_key_on_two_rows_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(3, 1).value = sheet.cell(2, 1).value
    sheet.cell(3, 2).value = sheet.cell(2, 2).value
    book.save(book_path)
    message = refusal(book_path)
    assert "row 3" in message and "row 2" in message


def test_a_decision_without_a_key_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(9, column(sheet, "decision")).value = "positive"
    book.save(book_path)
    assert "row 9" in refusal(book_path)


@pytest.mark.parametrize("change", ["key", "added key", "source", "checksum", "count"])
def test_an_edited_hidden_key_list_is_refused(book_path: Path, change: str) -> None:
    book = load_workbook(book_path)
    keys = book[KEYS_SHEET]
    if change == "key":
        keys["A5"] = '"INC-999"'
    elif change == "added key":
        keys.append(['"INC-999"', '"LE"'])
        keys["B4"] = 7
    elif change == "source":
        keys["B2"] = '"another-study"'
    elif change == "checksum":
        keys["B3"] = "0" * 64
    else:
        keys["B4"] = 5
    book.save(book_path)
    assert f"hidden sheet '{KEYS_SHEET}' was changed" in refusal(book_path)


def test_a_missing_hidden_sheet_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    del book[KEYS_SHEET]
    book.save(book_path)
    assert f"no sheet '{KEYS_SHEET}'" in refusal(book_path)


def test_a_missing_decision_column_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(1, column(sheet, "decision")).value = "verdict"
    book.save(book_path)
    assert "no column 'decision'" in refusal(book_path)


def test_a_second_decision_column_is_refused(book_path: Path) -> None:
    book = load_workbook(book_path)
    sheet = book[REVIEW_SHEET]
    sheet.cell(1, sheet.max_column + 1).value = "Decision"
    book.save(book_path)
    assert "more than one column 'decision'" in refusal(book_path)


@pytest.mark.parametrize("content", [b"incident id,decision\nINC-1,positive\n", b"",
                                     b"PK\x03\x04 not really a zip"])
def test_a_file_that_is_not_a_workbook_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "review.xlsx"
    path.write_bytes(content)
    assert "not a readable .xlsx workbook" in refusal(path)


def test_a_missing_file_and_a_foreign_workbook_are_refused(tmp_path: Path) -> None:
    assert "not a readable .xlsx workbook" in refusal(tmp_path / "nowhere.xlsx")
    foreign = tmp_path / "foreign.xlsx"
    Workbook().save(foreign)
    assert "no sheet" in refusal(foreign)


def test_the_error_is_a_refusal_with_exit_code_3() -> None:
    assert issubclass(ReviewWorkbookError, RefusedError)
    assert ReviewWorkbookError("x").exit_code == 3


def test_reading_does_not_change_the_file(book_path: Path) -> None:
    edit(book_path, {"INC-001": "positive"})
    before = book_path.read_bytes()
    first = read_review_workbook(book_path)
    assert read_review_workbook(book_path) == first
    assert book_path.read_bytes() == before
