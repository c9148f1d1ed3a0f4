"""Ingest: one spreadsheet or CSV -> rows of `source_narratives`, once per file content.

This module owns reading the operator's data file and nothing after it. It

  * identifies a file by the MD5 of its bytes plus the column mapping (`ingests` table), so
    a file already loaded is never parsed again and a changed file loads beside the old rows;
  * turns the wide sheet (one row per case, one column per narrative type) into long rows
    (one per case x narrative type), keeping IDs as the text an operator sees ("00123");
  * reads the manual labels in the spellings hand-kept sheets use (1/0, yes/no, y/n,
    true/false, blank = unknown) and refuses anything else, naming row and column;
  * writes everything, including the `ingests` record, in one transaction.

It is synchronous (sqlite3) and runs before any event loop exists. Errors are `InputError`
with one-line messages that name the file, row and column, never narrative text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import warnings
import zipfile
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from asyncrunner.config import DataSection
from asyncrunner.errors import InputError

CHECKSUM_CHUNK_BYTES = 1 << 20
INSERT_CHUNK_ROWS = 5_000
# A label longer than this cannot be a label: it is probably a narrative column mapped as a
# flag, so the message describes the value instead of quoting it.
MAX_QUOTED_LABEL = 20

_TRUE = frozenset({"1", "true", "yes", "y"})
_FALSE = frozenset({"0", "false", "no", "n"})

_INSERT_SQL = (
    "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
    "manual_flag_ind, manual_flag, data_source, data_checksum, loaded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

Row = tuple[int, Sequence[Any]]  # (spreadsheet row number, header = 1; cell values)


@dataclass(frozen=True, slots=True)
class IngestReport:
    data_file: str
    data_checksum: str
    loaded: bool  # False when this checksum + mapping was already in the DB (file not parsed)
    n_rows: int
    n_narratives: int
    n_blank: int
    n_duplicates: int


@dataclass(slots=True)
class _Counts:
    n_rows: int = 0
    n_narratives: int = 0
    n_blank: int = 0
    n_duplicates: int = 0


# ---------------------------------------------------------------------------------------
# Public API


def file_checksum(path: Path) -> str:
    """MD5 hex digest of the file's bytes, read in chunks so large files stay cheap."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHECKSUM_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def mapping_json(data: DataSection) -> str:
    """The column mapping that, with the checksum, identifies one load of a file."""
    return json.dumps(
        {
            "id_column": data.id_column,
            "narratives": data.narratives,
            "flags": data.flags,
            "case_flag": data.case_flag,
            "sheet": data.sheet,
        },
        sort_keys=True,
    )


def ingest(conn: sqlite3.Connection, data: DataSection, path: Path) -> IngestReport:
    """Load `path` into source_narratives unless this content + mapping is already there."""
    path = Path(path)
    checksum = _checksum_or_error(path)
    mapping = mapping_json(data)
    stored = _stored_report(conn, path, checksum, mapping)
    if stored is not None:
        return stored

    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have loaded the same file while we waited for the write lock.
        report = _stored_report(conn, path, checksum, mapping)
        if report is None:
            report = _load(conn, data, path, checksum, mapping)
        conn.execute("COMMIT")
    except BaseException:
        # BaseException too: Ctrl-C or SIGTERM mid-ingest must leave no partial load.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return report


# ---------------------------------------------------------------------------------------
# Loading (inside the caller's transaction)


def _load(conn: sqlite3.Connection, data: DataSection, path: Path, checksum: str,
          mapping: str) -> IngestReport:
    loaded_at = _utc_seconds()
    counts = _Counts()
    with closing(_read_rows(path, data.sheet)) as rows:
        records = _narrative_records(rows, data, path, counts)
        _insert_in_chunks(conn, (
            (incident_id, ntype, text, flag_ind, flag, str(path), checksum, loaded_at)
            for incident_id, ntype, text, flag_ind, flag in records
        ))
    # The file was hashed before it was read; a writer replacing it in between would leave
    # rows under a checksum they do not belong to.
    if _checksum_or_error(path) != checksum:
        raise InputError(f"data file {path} changed while it was being read; run again")
    conn.execute(
        "INSERT INTO ingests (data_checksum, mapping_json, data_source, n_rows, n_narratives, "
        "n_blank, n_duplicates, loaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (checksum, mapping, str(path), counts.n_rows, counts.n_narratives, counts.n_blank,
         counts.n_duplicates, loaded_at),
    )
    return IngestReport(str(path), checksum, True, counts.n_rows, counts.n_narratives,
                        counts.n_blank, counts.n_duplicates)


def _insert_in_chunks(conn: sqlite3.Connection, records: Iterable[tuple[Any, ...]]) -> None:
    # Chunks keep memory flat on big files while executemany keeps the insert fast.
    it = iter(records)
    while chunk := list(islice(it, INSERT_CHUNK_ROWS)):
        conn.executemany(_INSERT_SQL, chunk)


def _stored_report(conn: sqlite3.Connection, path: Path, checksum: str,
                   mapping: str) -> IngestReport | None:
    rows = conn.execute(
        "SELECT mapping_json, n_rows, n_narratives, n_blank, n_duplicates FROM ingests "
        "WHERE data_checksum = ?",
        (checksum,),
    ).fetchall()
    for row in rows:
        if row[0] == mapping:
            return IngestReport(str(path), checksum, False, row[1] or 0, row[2] or 0,
                                row[3] or 0, row[4] or 0)
    if rows:
        # Loading again under the same checksum would mix two readings of one file in the
        # set that experiments select by checksum.
        raise InputError(
            f"data file {path} (checksum {checksum}) is already loaded with a different "
            "column mapping; use the original data.id_column/narratives/flags/case_flag/"
            "sheet settings or a separate database"
        )
    return None


def _checksum_or_error(path: Path) -> str:
    try:
        return file_checksum(path)
    except OSError as exc:
        raise InputError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


def _utc_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# Wide -> long


def _narrative_records(rows: Iterator[Row], data: DataSection, path: Path,
                       counts: _Counts) -> Iterator[tuple[str, str, str, int | None, int | None]]:
    """(incident_id, narrative_type, text, manual_flag_ind, manual_flag) per kept narrative."""
    header_number, header = _first_nonempty(rows, path)
    columns = _column_index(header, header_number, data, path)
    id_at = columns[data.id_column]
    case_at = columns[data.case_flag] if data.case_flag is not None else None
    seen: set[tuple[str, str]] = set()
    for number, values in rows:
        if _is_empty_row(values):
            continue  # formatted-but-empty rows that spreadsheets keep at the end
        counts.n_rows += 1
        incident_id = _cell_text(_cell(values, id_at))
        if incident_id is None:
            # Without an ID none of the row's narratives can be stored.
            counts.n_blank += len(data.narratives)
            continue
        case_flag = (None if case_at is None
                     else _label(_cell(values, case_at), number, data.case_flag or "", path))
        for ntype, column in data.narratives.items():
            flag_column = data.flags.get(ntype)
            flag_ind = (None if flag_column is None
                        else _label(_cell(values, columns[flag_column]), number,
                                    flag_column, path))
            text = _cell_text(_cell(values, columns[column]))
            if text is None:
                counts.n_blank += 1
                continue
            key = (incident_id, ntype)
            if key in seen:
                counts.n_duplicates += 1
                continue
            seen.add(key)
            counts.n_narratives += 1
            yield incident_id, ntype, text, flag_ind, case_flag


def _first_nonempty(rows: Iterator[Row], path: Path) -> Row:
    for number, values in rows:
        if not _is_empty_row(values):
            return number, values
    raise InputError(f"data file {path} has no header row")


def _column_index(header: Sequence[Any], header_number: int, data: DataSection,
                  path: Path) -> dict[str, int]:
    """Configured column name -> position; names every missing column at once."""
    wanted = _configured_columns(data)
    positions: dict[str, int] = {}
    for at, value in enumerate(header):
        name = _cell_text(value)
        if name not in wanted:
            continue
        if name in positions:
            raise InputError(
                f"data file {path}: column '{name}' appears more than once in the header "
                f"(row {header_number})"
            )
        positions[name] = at
    missing = [name for name in wanted if name not in positions]
    if missing:
        raise InputError(
            f"data file {path} lacks configured column(s): "
            + ", ".join(f"'{name}'" for name in missing)
        )
    return positions


def _configured_columns(data: DataSection) -> list[str]:
    names = [data.id_column, *data.narratives.values(), *data.flags.values()]
    if data.case_flag is not None:
        names.append(data.case_flag)
    return list(dict.fromkeys(names))  # config order, each once


def _cell(values: Sequence[Any], at: int) -> Any:
    # Rows may be shorter than the header (CSV, or sheets whose trailing cells are empty).
    return values[at] if at < len(values) else None


def _is_empty_row(values: Sequence[Any]) -> bool:
    return all(_cell_text(v) is None for v in values)


def _cell_text(value: Any) -> str | None:
    """A cell as the text an operator sees; None when blank."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).upper()  # how spreadsheets display booleans
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Spreadsheets store every number as a float: 123.0 is the ID 123.
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def _label(value: Any, row: int, column: str, path: Path) -> int | None:
    """0/1 from the spellings hand-kept sheets use; None for blank (unknown)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _TRUE:
            return 1
        if text in _FALSE:
            return 0
    raise InputError(
        f"data file {path}, row {row}, column '{column}': cannot read {_describe(value)} as "
        "a flag (use 1/0, yes/no, y/n, true/false, or leave blank for unknown)"
    )


def _describe(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_QUOTED_LABEL or "\n" in text:
        return f"a {type(value).__name__} value of {len(text)} characters"
    return repr(value)


# ---------------------------------------------------------------------------------------
# File formats


def _read_rows(path: Path, sheet: str | None) -> Generator[Row, None, None]:
    """(row number, values) for every row of the file, header included, streamed."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return _xlsx_rows(path, sheet)
    if suffix == ".csv":
        return _csv_rows(path)
    raise InputError(
        f"data file {path}: unsupported file type '{path.suffix or '(none)'}'; "
        "use .xlsx or .csv"
    )


def _csv_rows(path: Path) -> Generator[Row, None, None]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            # Record numbers, not line numbers: a quoted narrative may span lines, and the
            # operator finds the row by opening the file in a spreadsheet.
            yield from enumerate(csv.reader(fh), start=1)
    except UnicodeDecodeError:
        raise InputError(f"data file {path} is not UTF-8 text; save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise InputError(f"data file {path} is not a readable CSV: {exc}") from None
    except OSError as exc:
        raise InputError(f"data file {path} cannot be read: {exc.strerror or exc}") from None


# What openpyxl raises for files that are not (intact) workbooks; XML parse errors of both
# the stdlib and lxml derive from SyntaxError.
_XLSX_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, KeyError, ValueError, TypeError, IndexError,
    AttributeError, EOFError, OSError, SyntaxError,
)


def _xlsx_rows(path: Path, sheet: str | None) -> Generator[Row, None, None]:
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    errors = (*_XLSX_ERRORS, InvalidFileException)
    try:
        with warnings.catch_warnings():
            # Warnings about workbook features openpyxl drops (data validation, styles)
            # concern writing; only cell values are read here.
            warnings.simplefilter("ignore", UserWarning)
            book = load_workbook(path, read_only=True, data_only=True)
    except errors as exc:
        raise InputError(_unreadable_xlsx(path, exc)) from None
    try:
        worksheet = _worksheet(book, sheet, path)
        # Some writers store a wrong <dimension>; trusting it would cut rows or columns.
        worksheet.reset_dimensions()
        try:
            # iter_rows starts at row 1 and fills gaps, so enumerate gives the sheet's row.
            yield from enumerate(worksheet.iter_rows(values_only=True), start=1)
        except errors as exc:
            raise InputError(_unreadable_xlsx(path, exc)) from None
    finally:
        book.close()


def _worksheet(book: Any, sheet: str | None, path: Path) -> Any:
    names = [ws.title for ws in book.worksheets]
    if sheet is None:
        if not names:
            raise InputError(f"data file {path} has no worksheet")
        return book.worksheets[0]
    if sheet not in names:
        raise InputError(
            f"data file {path} has no sheet '{sheet}' (sheets: "
            + ", ".join(f"'{name}'" for name in names) + ")"
        )
    return book[sheet]


def _unreadable_xlsx(path: Path, exc: BaseException) -> str:
    detail = (str(exc).splitlines() or [""])[0][:120]
    return (f"data file {path} is not a readable .xlsx workbook "
            f"({type(exc).__name__}{': ' + detail if detail else ''})")
