"""The adjudication workbook: narratives for a human to label, and their decisions back.

`write_review_workbook` lays out the narratives a reviewer should decide (the model and the
manual label disagree, or several cells disagree) in an .xlsx; `read_review_workbook` takes
the filled-in file back and returns the decisions. The caller owns the database on both
sides: this module neither reads nor writes it, and reading is a pure function of the file
(applying the same import twice is the caller's concern).

Layout. Sheet "review" holds one row per narrative under a frozen header with an autofilter:
the key (incident id, narrative type), reason, text, manual label, four columns per cell
(answer, confidence, indicators, rationale), then "decision" (a drop-down of positive,
negative, unsure) and "note". A very hidden sheet "keys" holds the source (experiment or
study id), the exported keys in order and a SHA-256 over both; its strings are stored as
JSON, so any key survives exactly, even one with characters an .xlsx cannot carry.

Trust. The reviewer may sort, filter and delete rows, and add columns: rows are matched by
their key, never by position, and a deleted row is simply undecided. What cannot be told
apart from a mistake is refused in one line (`ReviewWorkbookError`): a key in "review" that
was not exported (an edited id), a key on two rows, an edited or missing "keys" sheet, a
missing header, a decision that is not one of the accepted words. The checksum catches
accidents, not forgery: anyone holding the file can recompute it.

Text. Every string is written as a string cell, never a formula, whatever it starts with
(`=`, `+`, `-`, `@`, tab, CR are formulas to a spreadsheet; OWASP's CSV-injection list), so
the reviewer sees the exact value; those cells also get Excel's quote prefix, so editing
one does not turn it into a formula. Characters XML cannot hold become U+FFFD, line breaks
become LF (XML readers turn a raw CR into LF anyway), and text over Excel's 32,767-character
cell limit is cut with a visible marker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import Workbook, load_workbook
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.utils.exceptions import InvalidFileException
from openpyxl.worksheet.datavalidation import DataValidation

from asyncrunner.errors import RefusedError

REVIEW_SHEET = "review"
KEYS_SHEET = "keys"
FORMAT = "asyncrunner-review/1"

ID_HEADER = "incident id"
TYPE_HEADER = "narrative type"
REASON_HEADER = "reason"
TEXT_HEADER = "narrative text"
MANUAL_HEADER = "manual label"
DECISION_HEADER = "decision"
NOTE_HEADER = "note"
CELL_FIELDS = ("answer", "confidence", "indicators", "rationale")
DECISION_CHOICES = ("positive", "negative", "unsure")

# What a reviewer may type, after strip and casefold; None is "no decision". Excel turns a
# typed TRUE or 1 into a boolean or a number, which _decision_word maps back to these.
_DECISION_WORDS: dict[str, bool | None] = {
    "positive": True, "yes": True, "true": True, "1": True,
    "negative": False, "no": False, "false": False, "0": False,
    "unsure": None, "": None,
}

CELL_LIMIT = 32_767                       # Excel's limit, in UTF-16 code units
# The "keys" sheet needs four rows above the keys; Excel stops at 1,048,576 rows.
MAX_ROWS = 1_048_576 - 4
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# openpyxl's ILLEGAL_CHARACTERS_RE, plus what it lets through but no XML reader accepts
# back (surrogates, U+FFFE, U+FFFF): such a file would save and then never open again.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_LINE_BREAK = re.compile("\r\n?")

# Column widths (in characters): the narrative is what the reviewer reads, so it gets the
# room; the rest stays narrow and wraps.
_FIXED_WIDTHS = (16, 10, 16, 80, 10)      # id, type, reason, text, manual label
_CELL_WIDTHS = (12, 11, 28, 40)           # answer, confidence, indicators, rationale
_TO_FILL_WIDTHS = (12, 30)                # decision, note
_WRAP = Alignment(wrap_text=True, vertical="top")
_BOLD = Font(bold=True)
_TO_FILL = PatternFill("solid", start_color="FFF2CC")     # the columns the reviewer fills

# What openpyxl raises for files that are not (intact) workbooks, as in db/ingest.py; XML
# parse errors of both the stdlib and lxml derive from SyntaxError.
_XLSX_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, KeyError, ValueError, TypeError, IndexError,
    AttributeError, EOFError, OSError, SyntaxError, InvalidFileException,
)


class ReviewWorkbookError(RefusedError):
    """A review workbook cannot be imported as it is; the message names the file and, where
    there is one, the row (exit 3, like every refused guard)."""


@dataclass(frozen=True, slots=True)
class CellAnswer:
    """One experiment's (cell's) answer for one narrative."""

    detected: bool | None                 # None: the request failed
    confidence: float | None
    indicators: str                       # already joined
    rationale: str
    error: str | None = None              # the error category when detected is None


@dataclass(frozen=True, slots=True)
class ReviewRow:
    incident_id: str
    narrative_type: str
    text: str
    manual: bool | None                   # None: unlabelled
    reason: str                           # "false positive", "false negative", "cells disagree"
    answers: tuple[CellAnswer, ...]       # one per cell, in the order of cell_names


@dataclass(frozen=True, slots=True)
class Decision:
    incident_id: str
    narrative_type: str
    label: bool                           # True: positive
    note: str                             # '' if none


@dataclass(frozen=True, slots=True)
class ReviewImport:
    source: str
    decisions: tuple[Decision, ...]       # in export order, whatever order the rows are in now
    undecided: int                        # exported, no decision: blank, unsure or deleted
    checksum: str


Key = tuple[str, str]


# -- writing -------------------------------------------------------------------------------

def write_review_workbook(path: Path, *, source: str, cell_names: Sequence[str],
                          rows: Sequence[ReviewRow]) -> None:
    """Write the adjudication workbook to `path` atomically, readable by the owner only.

    ValueError for input no workbook could represent faithfully: duplicate keys, an empty
    incident id, a row whose answers do not match cell_names, headers that collide."""
    headers = review_headers(cell_names)
    keys = _checked_keys(rows, len(cell_names))
    book = Workbook()
    book.properties.title = cell_text(f"Adjudication: {source}")
    review = book.active
    review.title = REVIEW_SHEET
    _fill_review(review, headers, len(cell_names), rows)
    keys_sheet = book.create_sheet(KEYS_SHEET)
    _fill_keys(keys_sheet, source, keys)
    # Hidden from the sheet tabs and from Excel's Unhide menu: nobody edits it by accident.
    keys_sheet.sheet_state = "veryHidden"
    _save_private(book, path)


def review_headers(cell_names: Sequence[str]) -> list[str]:
    """The header row of the review sheet for these cells."""
    if any(not name.strip() for name in cell_names):
        raise ValueError("every cell needs a name")
    headers = [ID_HEADER, TYPE_HEADER, REASON_HEADER, TEXT_HEADER, MANUAL_HEADER]
    headers += [f"{name} {field}" for name in cell_names for field in CELL_FIELDS]
    headers += [DECISION_HEADER, NOTE_HEADER]
    folded = [_header_form(cell_text(h)) for h in headers]
    if len(set(folded)) != len(folded):
        raise ValueError(f"cell names {list(cell_names)!r} give two columns the same header")
    return headers


def _checked_keys(rows: Sequence[ReviewRow], n_cells: int) -> list[Key]:
    if len(rows) > MAX_ROWS:
        raise ValueError(f"{len(rows)} rows do not fit in one worksheet (at most {MAX_ROWS})")
    keys: list[Key] = []
    shown: set[Key] = set()
    for row in rows:
        key = (row.incident_id, row.narrative_type)
        if not row.incident_id:
            raise ValueError("a review row has an empty incident id")
        if len(row.answers) != n_cells:
            raise ValueError(f"row {key!r} has {len(row.answers)} answers for {n_cells} cells")
        # The import finds a row by the key as the sheet shows it, so two keys must not be
        # shown alike (only possible when they differ in characters a cell cannot hold).
        if _shown(key) in shown:
            raise ValueError(f"key {key!r} appears twice (or looks like another in a cell)")
        shown.add(_shown(key))
        keys.append(key)
    return keys


def _fill_review(sheet: Any, headers: list[str], n_cells: int,
                 rows: Sequence[ReviewRow]) -> None:
    widths = [*_FIXED_WIDTHS, *_CELL_WIDTHS * n_cells, *_TO_FILL_WIDTHS]
    for column, (header, width) in enumerate(zip(headers, widths, strict=True), start=1):
        cell = sheet.cell(1, column)
        _put(cell, header)
        cell.font = _BOLD
        cell.alignment = _WRAP
        if header in (DECISION_HEADER, NOTE_HEADER):
            cell.fill = _TO_FILL
        sheet.column_dimensions[get_column_letter(column)].width = width
    for row_number, row in enumerate(rows, start=2):
        for column, value in enumerate(_review_values(row), start=1):
            cell = sheet.cell(row_number, column)
            _put(cell, value)
            cell.alignment = _WRAP
            if isinstance(value, float):
                cell.number_format = "0.00"
    last = get_column_letter(len(headers))
    sheet.freeze_panes = "A2"
    sheet.auto_filter.ref = f"A1:{last}{len(rows) + 1}"
    decision = get_column_letter(len(headers) - 1)
    choices = ", ".join(DECISION_CHOICES)
    validation = DataValidation(
        type="list", formula1='"' + ",".join(DECISION_CHOICES) + '"', allow_blank=True,
        showErrorMessage=True, errorTitle="decision", error=f"Choose one of {choices}.",
        showInputMessage=True, promptTitle="decision", prompt=f"{choices}, or leave blank")
    validation.add(f"{decision}2:{decision}{max(len(rows), 1) + 1}")
    sheet.add_data_validation(validation)


def _review_values(row: ReviewRow) -> Iterator[str | float | None]:
    yield row.incident_id
    yield row.narrative_type
    yield row.reason
    yield row.text
    yield _label_word(row.manual)
    for answer in row.answers:
        if answer.detected is None:
            yield "error" + (f": {answer.error}" if answer.error else "")
        else:
            yield _label_word(answer.detected)
        confidence = answer.confidence
        # Excel has no NaN or infinity; such a number would make the file unreadable to it.
        yield float(confidence) if confidence is not None and math.isfinite(confidence) else None
        yield answer.indicators
        yield answer.rationale
    yield None                            # decision
    yield None                            # note


def _label_word(label: bool | None) -> str | None:
    return None if label is None else "positive" if label else "negative"


def _fill_keys(sheet: Any, source: str, keys: list[Key]) -> None:
    sheet.append(["format", FORMAT])
    sheet.append(["source", _json_cell(source)])
    sheet.append(["checksum", key_checksum(source, keys)])
    sheet.append(["keys", len(keys)])
    for incident_id, narrative_type in keys:
        sheet.append([_json_cell(incident_id), _json_cell(narrative_type)])
    for row in sheet.iter_rows():
        for cell in row:
            if isinstance(cell.value, str):
                cell.data_type = "s"


def _json_cell(value: str) -> str:
    # ASCII-only JSON: every character XML cannot carry is an escape, and the value starts
    # with a quote, never with a formula character.
    encoded = json.dumps(value, ensure_ascii=True)
    if len(encoded) > CELL_LIMIT:
        raise ValueError(f"key or source {value[:40]!r}… is too long for a workbook cell")
    return encoded


def key_checksum(source: str, keys: Sequence[Key]) -> str:
    """SHA-256 over the format, the source and the ordered keys (one JSON document, so no
    two different inputs share a serialization)."""
    document = json.dumps([FORMAT, source, [list(key) for key in keys]], ensure_ascii=True,
                          separators=(",", ":"))
    return hashlib.sha256(document.encode("ascii")).hexdigest()


def _put(cell: Any, value: str | float | None) -> None:
    cell.value = cell_text(value) if isinstance(value, str) else value
    if isinstance(value, str):
        # openpyxl makes a str starting with '=' a formula and '#N/A' an error value; a
        # string cell shows the exact text.
        cell.data_type = "s"
        if value.startswith(_FORMULA_START):
            cell.quotePrefix = True


def cell_text(text: str) -> str:
    """`text` as a workbook cell can hold it: characters XML cannot carry replaced by
    U+FFFD, CR and CRLF as LF, and cut to Excel's cell limit with a visible marker."""
    text = _LINE_BREAK.sub("\n", _NOT_XML.sub("\ufffd", text))
    if _utf16_length(text) <= CELL_LIMIT:
        return text
    # The marker's number is at most len(text), so reserve room for that many digits.
    budget = CELL_LIMIT - _utf16_length(_cut_marker(len(text)))
    kept = 0
    used = 0
    for char in text:
        used += 2 if ord(char) > 0xFFFF else 1
        if used > budget:
            break
        kept += 1
    return text[:kept] + _cut_marker(len(text) - kept)


def _cut_marker(n_cut: int) -> str:
    return f"… [cut: {n_cut} characters more]"


def _utf16_length(text: str) -> int:
    # Excel counts UTF-16 code units: a character beyond the BMP (an emoji) counts twice.
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def _save_private(book: Any, path: Path) -> None:
    """Temp file in the same directory, then rename: the path holds the old file or the
    whole new one, never part of one. The workbook holds narrative text, so it is 0600
    whatever the umask (mkstemp creates it so; fchmod makes sure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            book.save(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- reading -------------------------------------------------------------------------------

def read_review_workbook(path: Path) -> ReviewImport:
    """The reviewer's decisions in a workbook written by write_review_workbook.

    Rows are matched by key, so sorting, filtering and deleting rows are harmless; a
    deleted row counts as undecided, like a blank or "unsure" one. Decisions come back in
    export order. ReviewWorkbookError (one line) for anything that is not such a workbook
    or was changed where the reviewer should not change it."""
    book = _open(path)
    try:
        source, keys, checksum = _read_keys(book, path)
        labels = _read_decisions(book, path, keys)
    except _XLSX_ERRORS as exc:           # a damaged part of the file, read lazily
        raise ReviewWorkbookError(_unreadable(path, exc)) from None
    finally:
        book.close()
    decisions = tuple(labels[key] for key in keys if key in labels)
    return ReviewImport(source=source, decisions=decisions,
                        undecided=len(keys) - len(decisions), checksum=checksum)


def _open(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # Warnings about workbook features openpyxl drops (Excel's extensions) concern
            # writing; only values are read here.
            warnings.simplefilter("ignore", UserWarning)
            # Not data_only: a formula the reviewer typed is read as its text and refused,
            # instead of its cached value (which a file saved by openpyxl does not have).
            return load_workbook(path, read_only=True, data_only=False)
    except _XLSX_ERRORS as exc:
        raise ReviewWorkbookError(_unreadable(path, exc)) from None


def _unreadable(path: Path, exc: BaseException) -> str:
    detail = (str(exc).splitlines() or [""])[0][:120]
    return (f"review workbook {path} is not a readable .xlsx workbook "
            f"({type(exc).__name__}{': ' + detail if detail else ''})")


def _sheet(book: Any, name: str, path: Path) -> Any:
    if name not in book.sheetnames:
        raise ReviewWorkbookError(
            f"review workbook {path} has no sheet '{name}'; it was not written by asyncrunner "
            "or was altered: export a new one")
    sheet = book[name]
    # Some writers store a wrong <dimension>; trusting it would cut rows or columns.
    sheet.reset_dimensions()
    return sheet


def _read_keys(book: Any, path: Path) -> tuple[str, list[Key], str]:
    rows = list(_sheet(book, KEYS_SHEET, path).iter_rows(values_only=True))

    def damaged(what: str) -> ReviewWorkbookError:
        return ReviewWorkbookError(
            f"review workbook {path}: its hidden sheet '{KEYS_SHEET}' was changed ({what}); "
            "export a new one")

    def cell(row: int, column: int) -> object:
        return rows[row][column] if row < len(rows) and column < len(rows[row]) else None

    if cell(0, 1) != FORMAT:
        raise damaged(f"format is {_quote(cell(0, 1))}, not {FORMAT!r}")
    count = cell(3, 1)
    if type(count) is not int or count != len(rows) - 4:
        raise damaged("the number of keys does not match")
    try:
        source = _json_text(cell(1, 1))
        keys = [(_json_text(cell(r, 0)), _json_text(cell(r, 1))) for r in range(4, len(rows))]
    except ValueError:
        raise damaged("a value is not what was written") from None
    checksum = cell(2, 1)
    if not isinstance(checksum, str) or checksum != key_checksum(source, keys):
        raise damaged("its checksum does not match its keys")
    if len({_shown(key) for key in keys}) != len(keys):
        raise damaged("a key appears twice")
    return source, keys, checksum


def _json_text(value: object) -> str:
    decoded = json.loads(value) if isinstance(value, str) else None
    if not isinstance(decoded, str):
        raise ValueError(value)
    return decoded


def _read_decisions(book: Any, path: Path, keys: list[Key]) -> dict[Key, Decision]:
    # Closed explicitly: a refusal half-way would otherwise leave the sheet's file open.
    with closing(_sheet(book, REVIEW_SHEET, path).iter_rows(values_only=True)) as rows:
        return _decisions(rows, path, keys)


def _decisions(rows: Iterator[tuple[object, ...]], path: Path,
               keys: list[Key]) -> dict[Key, Decision]:
    columns = _columns(next(rows, ()), path)
    by_shown = {_shown(key): key for key in keys}
    seen: dict[Key, int] = {}
    decisions: dict[Key, Decision] = {}
    for row_number, row in enumerate(rows, start=2):
        id_value, type_value, decision, note = (
            row[c] if c < len(row) else None for c in columns)
        if all(_is_blank(v) for v in (id_value, type_value, decision, note)):
            continue                      # an emptied row, or the sheet's blank tail
        shown = (_as_text(id_value), _as_text(type_value))
        where = f"review workbook {path}, sheet '{REVIEW_SHEET}', row {row_number}"
        key = by_shown.get(shown)
        if key is None:
            raise ReviewWorkbookError(
                f"{where}: incident {_quote(shown[0])} type {_quote(shown[1])} is not one of "
                "the exported narratives (was its id or type edited?)")
        if key in seen:
            raise ReviewWorkbookError(
                f"{where}: incident {_quote(shown[0])} type {_quote(shown[1])} is also on "
                f"row {seen[key]}; keep one of the two rows")
        seen[key] = row_number
        word = _decision_word(decision)
        if word not in _DECISION_WORDS:
            raise ReviewWorkbookError(
                f"{where} (incident {_quote(shown[0])}): decision {_quote(decision)} is not "
                "positive, negative or unsure (or yes/no, true/false, 1/0, or blank)")
        label = _DECISION_WORDS[word]
        if label is not None:
            decisions[key] = Decision(incident_id=key[0], narrative_type=key[1], label=label,
                                      note=_as_text(note).strip())
    return decisions


def _columns(header: Sequence[object], path: Path) -> tuple[int, int, int, int]:
    """Where the key, decision and note columns are now: by name, as the reviewer may have
    moved or added columns."""
    found: dict[str, list[int]] = {}
    for index, value in enumerate(header):
        found.setdefault(_header_form(_as_text(value)), []).append(index)
    needed = (ID_HEADER, TYPE_HEADER, DECISION_HEADER, NOTE_HEADER)
    for name in needed:
        places = found.get(_header_form(name), [])
        if len(places) != 1:
            problem = "has no" if not places else "has more than one"
            raise ReviewWorkbookError(
                f"review workbook {path}: sheet '{REVIEW_SHEET}' {problem} column '{name}' "
                "in its first row")
    first = [found[_header_form(name)][0] for name in needed]
    return first[0], first[1], first[2], first[3]


def _header_form(text: str) -> str:
    return " ".join(text.split()).casefold()


def _decision_word(value: object) -> str | None:
    """The cell as a key of _DECISION_WORDS, or None for a value of no accepted type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and value in (0, 1):
        return str(int(value))
    if isinstance(value, str):
        return value.strip().casefold()
    return "" if value is None else None


def _shown(key: Key) -> Key:
    """A key as its cells in the review sheet read back."""
    return cell_text(key[0]), cell_text(key[1])


def _as_text(value: object) -> str:
    if value is None:
        return ""
    # An id retyped in Excel comes back as a number; 12345.0 is the id "12345".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _quote(value: object) -> str:
    """A value from the file in an error message: one line, at most about 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
