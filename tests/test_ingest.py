"""Ingest: real SQLite files, real workbooks (openpyxl) and CSVs (csv module)."""

from __future__ import annotations

import csv
import hashlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from openpyxl import Workbook

from asyncrunner.config import DataSection
from asyncrunner.db import ingest as ingest_mod
from asyncrunner.db.ingest import (
    IngestReport,
    file_checksum,
    ingest,
    mapping_json,
    read_digests,
)
from asyncrunner.db.schema import connect
from asyncrunner.errors import InputError

HEADER = ["IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE", "ManualFlagCME",
          "ManualFlag"]
SECRET = "Confidential narrative words"

ROWS: list[list[Any]] = [
    ["00123", "LE one", "CME one", 1, 0, "yes"],
    [123, "LE two", "CME two", "0", "1", True],
    [124.0, "  LE three  ", None, 1.0, None, "n"],
    [12.5, "LE four", "   ", "Y", "", "FALSE"],
]


def write_xlsx(path: Path, rows: Sequence[Sequence[Any]], header: Sequence[Any] = HEADER,
               *, sheet: str = "Cases", extra_sheets: Sequence[str] = ()) -> Path:
    book = Workbook()
    ws = book.active
    ws.title = sheet
    ws.append(list(header))
    for row in rows:
        ws.append(list(row))
    for name in extra_sheets:
        book.create_sheet(name)
    book.save(path)
    return path


def write_csv(path: Path, rows: Sequence[Sequence[Any]], header: Sequence[Any] = HEADER,
              *, encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "x.db")
    yield c
    c.close()


def narratives(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT incident_id, narrative_type, narrative_text, manual_flag_ind, manual_flag "
        "FROM source_narratives ORDER BY narrative_id")]


def count(conn: sqlite3.Connection, table: str) -> int:
    return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_wide_to_long_xlsx(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "data.xlsx", ROWS)
    report = ingest(conn, DataSection(), path)

    checksum = hashlib.md5(path.read_bytes()).hexdigest()
    digests = read_digests(DataSection(), path)
    assert report == IngestReport(str(path), checksum, True, n_rows=4, n_narratives=6,
                                  n_blank=2, n_duplicates=0, n_placeholder=0, n_no_id=0,
                                  rows_digest=digests.rows_digest,
                                  content_digest=digests.content_digest,
                                  loaded_at=report.loaded_at)
    assert narratives(conn) == [
        ("00123", "LE", "LE one", 1, 1),
        ("00123", "CME", "CME one", 0, 1),
        ("123", "LE", "LE two", 0, 1),
        ("123", "CME", "CME two", 1, 1),
        ("124", "LE", "LE three", 1, 0),
        ("12.5", "LE", "LE four", 1, 0),
    ]
    stored = conn.execute(
        "SELECT DISTINCT data_source, data_checksum, loaded_at FROM source_narratives"
    ).fetchall()
    assert len(stored) == 1
    assert tuple(stored[0])[:2] == (str(path), checksum)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stored[0][2])
    ing = conn.execute("SELECT * FROM ingests").fetchall()
    assert len(ing) == 1
    assert dict(ing[0]) == {
        "data_checksum": checksum, "mapping_json": mapping_json(DataSection()),
        "data_source": str(path), "n_rows": 4, "n_narratives": 6, "n_blank": 2,
        "n_duplicates": 0, "loaded_at": stored[0][2], "n_placeholder": 0, "n_no_id": 0,
        "rows_digest": digests.rows_digest, "content_digest": digests.content_digest,
        "data_path": str(path.resolve()), "origin": None,
    }
    assert count(conn, "ingest_drops") == 2  # the two blank CME narratives


def test_file_checksum_is_md5_of_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 10_000)  # several chunks
    assert file_checksum(path) == hashlib.md5(path.read_bytes()).hexdigest()


def test_second_ingest_does_not_parse(conn: sqlite3.Connection, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_xlsx(tmp_path / "data.xlsx", ROWS)
    first = ingest(conn, DataSection(), path)

    def must_not_parse(*args: object) -> Iterator[Any]:
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(ingest_mod, "_read_rows", must_not_parse)
    again = ingest(conn, DataSection(), path)
    assert again.loaded is False
    assert (again.n_rows, again.n_narratives, again.n_blank, again.n_duplicates) == (
        first.n_rows, first.n_narratives, first.n_blank, first.n_duplicates)
    assert again.data_checksum == first.data_checksum
    assert count(conn, "source_narratives") == 6
    assert count(conn, "ingests") == 1


def test_changed_file_loads_beside_old_rows(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "data.xlsx", ROWS)
    old = ingest(conn, DataSection(), path)
    write_xlsx(path, [*ROWS, ["200", "LE new", "CME new", 0, 0, 0]])
    new = ingest(conn, DataSection(), path)

    assert new.loaded and new.data_checksum != old.data_checksum
    assert new.n_narratives == old.n_narratives + 2
    by_checksum = dict(conn.execute(
        "SELECT data_checksum, COUNT(*) FROM source_narratives GROUP BY data_checksum"))
    assert by_checksum == {old.data_checksum: 6, new.data_checksum: 8}
    assert count(conn, "ingests") == 2


def test_same_file_different_mapping_refused(conn: sqlite3.Connection,
                                             tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "data.xlsx", ROWS)
    ingest(conn, DataSection(), path)
    with pytest.raises(InputError, match="different column mapping") as err:
        ingest(conn, DataSection(case_flag=None), path)
    assert str(path) in str(err.value)
    assert count(conn, "source_narratives") == 6
    assert count(conn, "ingests") == 1


def test_ids_stay_as_operators_see_them(conn: sqlite3.Connection, tmp_path: Path) -> None:
    rows = [[" 00123 ", "a", None, None, None, None], [123, "b", None, None, None, None],
            [123.0, "c", None, None, None, None], [7.25, "d", None, None, None, None]]
    report = ingest(conn, DataSection(), write_xlsx(tmp_path / "ids.xlsx", rows))
    ids = [r[0] for r in narratives(conn)]
    # 123 and 123.0 are the same ID: the second is a duplicate of the first.
    assert ids == ["00123", "123", "7.25"]
    assert report.n_duplicates == 1


def test_blanks_and_duplicates_counted(conn: sqlite3.Connection, tmp_path: Path) -> None:
    rows = [
        ["1", "LE a", "CME a", 1, 1, 1],
        ["1", "LE again", "CME again", 0, 0, 0],   # duplicate case: both types
        ["2", None, "CME b", None, 0, 0],          # blank LE
        ["3", "   ", "\t\n", None, None, None],    # whitespace-only: both blank
        [None, "LE orphan", "CME orphan", 1, 1, 1],  # blank ID: the row's narratives
        ["  ", "LE orphan", "CME orphan", 1, 1, 1],  # whitespace ID is blank too
        [None, None, None, None, None, None],      # fully empty row: ignored
        ["4", "LE d", None, None, None, None],
    ]
    report = ingest(conn, DataSection(), write_xlsx(tmp_path / "b.xlsx", rows))
    assert (report.n_rows, report.n_narratives, report.n_blank, report.n_duplicates,
            report.n_no_id) == (7, 4, 4, 2, 4)
    assert narratives(conn) == [
        ("1", "LE", "LE a", 1, 1), ("1", "CME", "CME a", 1, 1),
        ("2", "CME", "CME b", 0, 0), ("4", "LE", "LE d", None, None),
    ]
    # Every narrative slot of a counted row is accounted for exactly once, and recorded.
    assert report.n_rows * 2 == report.n_narratives + report.n_dropped
    assert count(conn, "ingest_drops") == report.n_dropped


@pytest.mark.parametrize(("value", "expected"), [
    (1, 1), (0, 0), (1.0, 1), (0.0, 0), (True, 1), (False, 0),
    ("1", 1), ("0", 0), (" TRUE ", 1), ("false", 0), ("Yes", 1), ("NO", 0),
    ("y", 1), ("N", 0), (None, None), ("", None), ("  ", None),
])
def test_label_spellings_xlsx(conn: sqlite3.Connection, tmp_path: Path, value: Any,
                              expected: int | None) -> None:
    ingest(conn, DataSection(), write_xlsx(tmp_path / "l.xlsx",
                                           [["9", "text", None, value, None, value]]))
    assert narratives(conn) == [("9", "LE", "text", expected, expected)]


def test_label_spellings_csv(conn: sqlite3.Connection, tmp_path: Path) -> None:
    spellings = ["1", "0", "true", "False", "YES", "no", "y", "N", ""]
    rows = [[str(i), "t", None, s, None, None] for i, s in enumerate(spellings)]
    ingest(conn, DataSection(), write_csv(tmp_path / "l.csv", rows))
    assert [r[3] for r in narratives(conn)] == [1, 0, 1, 0, 1, 0, 1, 0, None]


@pytest.mark.parametrize("bad", ["maybe", 2, 0.5, "10"])
def test_bad_label_names_row_and_column(conn: sqlite3.Connection, tmp_path: Path,
                                        bad: Any) -> None:
    rows = [["1", SECRET, None, 1, 0, 1], ["2", SECRET, None, 0, bad, 0]]
    path = write_xlsx(tmp_path / "bad.xlsx", rows)
    with pytest.raises(InputError) as err:
        ingest(conn, DataSection(), path)
    message = str(err.value)
    assert "row 3" in message and "'ManualFlagCME'" in message and repr(bad) in message
    assert str(path) in message
    assert SECRET not in message


def test_narrative_mapped_as_flag_is_not_quoted(conn: sqlite3.Connection,
                                                tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "bad.xlsx", [["1", SECRET, "x", 1, 0, 1]])
    data = DataSection(flags={"LE": "NarrativeLE"})
    with pytest.raises(InputError, match="row 2, column 'NarrativeLE'") as err:
        ingest(conn, data, path)
    assert SECRET not in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_columns_all_named(conn: sqlite3.Connection, tmp_path: Path) -> None:
    header = ["IncidentID", "NarrativeLE", "ManualFlagLE"]
    path = write_xlsx(tmp_path / "m.xlsx", [["1", "a", 1]], header=header)
    with pytest.raises(InputError) as err:
        ingest(conn, DataSection(), path)
    message = str(err.value)
    for name in ("NarrativeCME", "ManualFlagCME", "ManualFlag"):
        assert f"'{name}'" in message
    assert "'NarrativeLE'" not in message
    assert str(path) in message
    assert count(conn, "ingests") == 0


def test_optional_flags(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "o.xlsx", [["1", "le", "cme"]],
                      header=["Case", "LE text", "CME text"])
    data = DataSection(id_column="Case", narratives={"LE": "LE text", "CME": "CME text"},
                       flags={}, case_flag=None)
    report = ingest(conn, data, path)
    assert report.n_narratives == 2
    assert narratives(conn) == [("1", "LE", "le", None, None), ("1", "CME", "cme", None, None)]


def test_named_sheet_and_missing_sheet(conn: sqlite3.Connection, tmp_path: Path) -> None:
    book = Workbook()
    book.active.title = "Notes"
    book.active.append(["nothing here"])
    cases = book.create_sheet("Cases")
    cases.append(HEADER)
    cases.append(["1", "le", "cme", 1, 1, 1])
    path = tmp_path / "sheets.xlsx"
    book.save(path)

    with pytest.raises(InputError) as err:
        ingest(conn, DataSection(sheet="Data"), path)
    message = str(err.value)
    assert "'Data'" in message and "'Notes'" in message and "'Cases'" in message

    # Without a sheet name the first sheet is read, which lacks the columns.
    with pytest.raises(InputError, match="lacks configured column"):
        ingest(conn, DataSection(), path)

    assert ingest(conn, DataSection(sheet="Cases"), path).n_narratives == 2


@pytest.mark.parametrize("content", [
    b"IncidentID,NarrativeLE\n1,hello\n",            # a text file named .xlsx
    b"PK\x03\x04 truncated zip header",
    b"",
])
def test_corrupt_xlsx_is_one_line_input_error(conn: sqlite3.Connection, tmp_path: Path,
                                              content: bytes) -> None:
    path = tmp_path / "broken.xlsx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"not a readable \.xlsx workbook") as err:
        ingest(conn, DataSection(), path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_zip_that_is_not_a_workbook(conn: sqlite3.Connection, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "other.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "not a workbook")
    with pytest.raises(InputError, match=r"not a readable \.xlsx workbook"):
        ingest(conn, DataSection(), path)


def test_unsupported_suffix_and_missing_file(conn: sqlite3.Connection,
                                             tmp_path: Path) -> None:
    path = tmp_path / "data.xls"
    path.write_bytes(b"whatever")
    with pytest.raises(InputError, match=r"unsupported file type '\.xls'"):
        ingest(conn, DataSection(), path)
    with pytest.raises(InputError, match="cannot be read"):
        ingest(conn, DataSection(), tmp_path / "nope.csv")


def test_csv_path(conn: sqlite3.Connection, tmp_path: Path) -> None:
    rows = [
        ["00123", "line one\nline two", "cme", "1", "0", "yes"],
        ["00124", "le", "", "no", "", ""],
        ["00124", "le dup", "cme", "no", "", ""],
    ]
    # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM that must not stick to the header.
    path = write_csv(tmp_path / "data.csv", rows, encoding="utf-8-sig")
    report = ingest(conn, DataSection(), path)
    assert (report.n_rows, report.n_narratives, report.n_blank, report.n_duplicates) == (
        3, 4, 1, 1)
    assert narratives(conn) == [
        ("00123", "LE", "line one\nline two", 1, 1), ("00123", "CME", "cme", 0, 1),
        ("00124", "LE", "le", 0, None), ("00124", "CME", "cme", None, None),
    ]


def test_csv_row_numbers_count_records_not_lines(conn: sqlite3.Connection,
                                                 tmp_path: Path) -> None:
    rows = [["1", "two\nlines", "", "1", "", ""], ["2", "x", "", "perhaps", "", ""]]
    with pytest.raises(InputError, match="row 3, column 'ManualFlagLE'"):
        ingest(conn, DataSection(), write_csv(tmp_path / "r.csv", rows))


def test_csv_not_utf8(conn: sqlite3.Connection, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "latin.csv", [["1", "caf\xe9", "", "", "", ""]],
                     encoding="latin-1")
    with pytest.raises(InputError, match="not UTF-8"):
        ingest(conn, DataSection(), path)


def test_error_on_late_row_leaves_nothing(conn: sqlite3.Connection, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_mod, "INSERT_CHUNK_ROWS", 7)  # many chunks before the error
    rows = [[str(i), "le", "cme", 1, 0, 0] for i in range(100)]
    rows.append(["100", "le", "cme", "bogus", 0, 0])
    with pytest.raises(InputError, match="row 102"):
        ingest(conn, DataSection(), write_xlsx(tmp_path / "late.xlsx", rows))
    assert count(conn, "source_narratives") == 0
    assert count(conn, "ingests") == 0
    assert not conn.in_transaction


def test_interrupt_mid_ingest_leaves_nothing(conn: sqlite3.Connection, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_mod, "INSERT_CHUNK_ROWS", 5)
    real = ingest_mod._read_rows

    def interrupted(path: Path, sheet: str | None, hashing: Any = None) -> Iterator[Any]:
        for number, values in real(path, sheet, hashing):
            if number == 40:
                raise KeyboardInterrupt
            yield number, values

    monkeypatch.setattr(ingest_mod, "_read_rows", interrupted)
    rows = [[str(i), "le", "cme", 1, 0, 0] for i in range(60)]
    path = write_csv(tmp_path / "big.csv", rows)
    with pytest.raises(KeyboardInterrupt):
        ingest(conn, DataSection(), path)
    assert count(conn, "source_narratives") == 0
    assert count(conn, "ingests") == 0
    assert not conn.in_transaction

    monkeypatch.setattr(ingest_mod, "_read_rows", real)
    assert ingest(conn, DataSection(), path).n_narratives == 120


def test_csv_changed_after_hashing_is_refused(conn: sqlite3.Connection, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed, then changed before it is parsed: the bytes parsed are not the checksum's
    (a CSV is hashed again as it is parsed)."""
    real = ingest_mod._read_rows

    def modify_first(path: Path, sheet: str | None, hashing: Any = None) -> Iterator[Any]:
        with path.open("a", encoding="utf-8") as fh:
            fh.write("9,late,late,1,1,1\n")
        yield from real(path, sheet, hashing)

    monkeypatch.setattr(ingest_mod, "_read_rows", modify_first)
    path = write_csv(tmp_path / "moving.csv", [["1", "a", "b", 1, 1, 1]])
    with pytest.raises(InputError, match="changed while it was being read"):
        ingest(conn, DataSection(), path)
    assert count(conn, "source_narratives") == 0


def test_workbook_changed_while_reading_is_refused(conn: sqlite3.Connection, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A workbook is read at random, not streamed: it is hashed again after reading."""
    real = ingest_mod._read_rows
    path = write_xlsx(tmp_path / "moving.xlsx", [["1", "a", "b", 1, 1, 1]])

    def then_replace(path: Path, sheet: str | None, hashing: Any = None) -> Iterator[Any]:
        yield from real(path, sheet, hashing)
        write_xlsx(path, [["1", "a", "b", 1, 1, 1], ["2", "c", "d", 0, 0, 0]])

    monkeypatch.setattr(ingest_mod, "_read_rows", then_replace)
    with pytest.raises(InputError, match="changed while it was being read"):
        ingest(conn, DataSection(), path)
    assert count(conn, "source_narratives") == 0


def test_csv_hashed_as_parsed_matches_the_file_checksum(tmp_path: Path) -> None:
    """The streamed hash is the file's MD5 whatever the buffering: a BOM, quoted line
    breaks, non-ASCII text and a file larger than one read."""
    rows = [[f"{i}", f"line one\r\nline two {i} " * 50, "é ü", 1, 0, ""] for i in range(3000)]
    path = write_csv(tmp_path / "big.csv", rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert path.stat().st_size > ingest_mod.CHECKSUM_CHUNK_BYTES
    hashing = hashlib.md5(usedforsecurity=False)
    with closing(ingest_mod._read_rows(path, None, hashing)) as read:
        n = sum(1 for _ in read)
    assert n == 3001
    assert hashing.hexdigest() == ingest_mod.file_checksum(path)


def test_42000_narratives(conn: sqlite3.Connection, tmp_path: Path) -> None:
    """A file of the size of the study's. How long it takes is bin/bench's to measure
    (--scale), not a test's: only what is stored is asserted here."""
    rows = [[f"{i:06d}", f"LE narrative {i} " * 20, f"CME narrative {i} " * 20,
             i % 2, "yes" if i % 3 else "no", ""] for i in range(21_000)]
    path = write_csv(tmp_path / "big.csv", rows)
    report = ingest(conn, DataSection(), path)
    assert report.n_narratives == 42_000 and report.n_rows == 21_000
    assert count(conn, "source_narratives") == 42_000
