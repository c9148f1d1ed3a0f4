"""Property tests: whatever an operator's YAML, environment or data file holds, the tool
either takes it or says why in one line (a user-facing error of asyncrunner.errors).

In process and fast: no subprocess inside a property; the CLI side of the same promise is
in test_config_hostile.py and test_hostile.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import string
import tempfile
import typing
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from asyncrunner.config import (
    NUMERIC_RANGES,
    SECTIONS,
    Config,
    DataSection,
    build_config,
    config_from_dict,
    known_env_variables,
    unknown_env_variables,
)
from asyncrunner.db.ingest import ingest, read_digests
from asyncrunner.db.schema import connect
from asyncrunner.errors import AsyncRunnerError, ConfigError, UsageError
from asyncrunner.llm.client import normalize_api_url, redact_url

FAST = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message and "\r" not in message


# --------------------------------------------------------------------------- (a) config

TRICKY_TEXT = [
    "", " ", "<<TEXT>>", "Narrative:\n<<TEXT>>", "auto", "json_schema", "none", "openai", "mock",
    "system", "user", "repair", "off", "1e3", "1e400", "-1e400", ".inf", "nan", "8.5", "16",
    "yes", "null", "~", "2024-13-45", "OPENAI_API_KEY", "sk-live-123", "a\x00b", "line\nbreak",
    "\x1b[2J", "\u202e", "~no-such-user-xyz/x.csv", "data/cases.csv", "IncidentID",
    "http://localhost:1234/v1", "http://h/v1?api-version=2024-02-01", "https://h/v1/",
    "http://h/v1#frag", "ftp://h/v1", "http:///v1", "http://h:99999/v1", "http://xn--/v1",
    "http://[::1]:8080/v1", "http://h/v 1", "localhost:1234/v1", "http://u:p@h/v1?key=k",
]
HUGE_INTS = [2**63, -(2**63) - 1, 10**400, -(10**400)]
# Beyond 4300 digits Python makes no text of an int (and hypothesis cannot show it either,
# hence built by a map rather than listed).
huge_ints = st.sampled_from(HUGE_INTS) | st.just(5000).map(lambda digits: 10**digits)
SPECIAL_FLOATS = [math.inf, -math.inf, math.nan, -0.0, 1e-300, 8.5, 1e308]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=20),
    st.text(alphabet=st.characters(max_codepoint=0x9f), max_size=10),  # controls, C1
    st.sampled_from(TRICKY_TEXT),
    st.dates(),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), inner, max_size=4),
    max_leaves=12,
)


def typed_values(tp: Any) -> st.SearchStrategy[Any]:
    """Mostly values of the field's own type (near and far outside its bounds), so that
    examples get past the type checks to the range, URL and text checks behind them."""
    base = typing.get_args(tp)[0] if type(None) in typing.get_args(tp) else tp
    origin = typing.get_origin(base) or base
    own: st.SearchStrategy[Any]
    if origin is int:
        own = st.integers(-5, 2_000) | st.integers() | huge_ints
    elif origin is float:
        own = st.floats(-10, 100_000) | st.sampled_from(SPECIAL_FLOATS) | st.integers(-5, 100)
    elif origin is list:
        own = st.lists(st.sampled_from(TRICKY_TEXT) | st.text(max_size=8), max_size=4)
    elif origin is dict:
        own = st.dictionaries(st.sampled_from(["LE", "CME", "X"]) | st.text(max_size=5),
                              st.sampled_from(TRICKY_TEXT) | yaml_values, max_size=3)
    else:
        own = st.sampled_from(TRICKY_TEXT) | st.text(max_size=20)
    return st.one_of(own, own, own, yaml_values)


FIELD_VALUES = {name: {f: typed_values(tp) for f, tp in typing.get_type_hints(cls).items()}
                for name, cls in SECTIONS.items()}


def rarely(draw: st.DrawFn) -> bool:
    # Not 0: hypothesis draws the smallest value far more often than the others.
    return draw(st.integers(0, 19)) == 7


@st.composite
def raw_configs(draw: st.DrawFn) -> dict[Any, Any]:
    raw: dict[Any, Any] = {}
    for section, fields in FIELD_VALUES.items():
        if not draw(st.booleans()):
            continue
        if rarely(draw):
            raw[section] = draw(yaml_values)  # a section that is not a mapping
            continue
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True))
        raw[section] = {name: draw(fields[name]) for name in chosen}
        if rarely(draw):
            raw[section][draw(st.text(max_size=10) | st.integers())] = draw(yaml_values)
    if rarely(draw):
        raw[draw(st.text(max_size=8) | st.integers())] = draw(yaml_values)
    return raw


ENV_NAMES = sorted(known_env_variables())
env_names = st.sampled_from(ENV_NAMES) | st.text(
    alphabet=string.ascii_letters + string.digits + "_\n", max_size=20).map(
    lambda tail: "ASYNCRUNNER_" + tail)
env_values = st.sampled_from(TRICKY_TEXT) | st.text(max_size=20).map(
    lambda s: s.replace("\x00", ""))  # no environment holds a NUL
overrides = st.fixed_dictionaries({}, optional={
    "run.workers": st.none() | st.integers(),
    "run.batch_size": st.none() | st.integers(min_value=1),
    "run.max_narratives": st.none() | st.integers(min_value=1) | huge_ints,
})


@FAST
@given(raw=raw_configs(), env=st.dictionaries(env_names, env_values, max_size=4),
       flags=overrides)
def test_any_config_is_taken_or_refused_in_one_line(raw: dict[Any, Any], env: dict[str, str],
                                                     flags: dict[str, Any]) -> None:
    try:
        cfg = build_config(raw, env=env, overrides=flags)
    except ConfigError as exc:
        assert one_line(str(exc)), str(exc)
        return
    # Taken: it can be stored (JSON, no NaN), rebuilt as it was, and used by the client.
    stored = json.dumps(cfg.to_dict(), allow_nan=False)
    assert config_from_dict(json.loads(stored)) == cfg
    for key in NUMERIC_RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert value is None or math.isfinite(value), key
    url = normalize_api_url(cfg.model.api_url)
    assert httpx.URL(url).host
    assert redact_url(url) != "<invalid url>"


@FAST
@given(env=st.dictionaries(env_names | st.text(max_size=12), st.just("SECRET-VALUE"),
                           max_size=6))
def test_env_warnings_are_one_line_each_and_never_show_a_value(env: dict[str, str]) -> None:
    lines = unknown_env_variables(env)
    assert all(one_line(line) for line in lines)
    assert not any("SECRET-VALUE" in line for line in lines)
    unknown = [n for n in env if n.upper().startswith("ASYNCRUNNER_")
               and n not in known_env_variables()]
    assert len(lines) == len(unknown)


def test_a_config_from_the_property_alphabet_can_be_valid() -> None:
    # The property is not vacuous: the real keys with sane values are taken.
    assert isinstance(build_config({"run": {"workers": 8}}, env={}), Config)


# --------------------------------------------------------------------------- (b) ingest

REAL_COLUMNS = ["IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE", "ManualFlagCME",
                "ManualFlag"]
TRICKY_CELLS = [
    "", " ", "\t \n", "N/A", "-", "unknown", "=1+1", "=SUM(A1:A9)", "+cmd|' /C calc'!A0",
    "@SUM(1)", "-2+3", "yes", "no", "y", "n", "TRUE", "false", "1", "0", "1.0", "2", "maybe",
    "00101", "101", "x" * 300, "x" * 140_000, "line one\nline two", 'a "quoted", text',
    "\u202e evil", "caf\u00e9", "\U0001f600", "\ufeffIncidentID", "IncidentID",
]
cells = st.one_of(
    st.none(),
    st.sampled_from(TRICKY_CELLS),
    st.text(max_size=30),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, 12.5, 1e20, math.nan, math.inf]),
    st.booleans(),
)
headers = st.one_of(
    st.just(REAL_COLUMNS),
    st.permutations(REAL_COLUMNS),
    st.lists(st.sampled_from(REAL_COLUMNS) | st.text(max_size=12) | st.none(), max_size=8),
    st.permutations(REAL_COLUMNS).map(lambda cols: [*cols, cols[0]]),  # a duplicate column
)
# Mostly what each column should hold, so that loads succeed often enough to be checked too.
COLUMN_CELLS = {
    "IncidentID": st.sampled_from(["00101", "101", "102", 103, 104.0, 12.5, " 7 ", None]),
    "NarrativeLE": st.text(max_size=40) | st.sampled_from(TRICKY_CELLS),
    "NarrativeCME": st.text(max_size=40) | st.sampled_from(TRICKY_CELLS),
    "ManualFlagLE": st.sampled_from(["1", "0", "yes", "no", "Y", "", " ", None, 1, 0, 1.0,
                                     True, False]),
    "ManualFlagCME": st.sampled_from(["1", "0", "true", "FALSE", "n", None, 0, 1]),
    "ManualFlag": st.sampled_from(["yes", "no", "1", "0", None, True]),
}


@st.composite
def body_rows(draw: st.DrawFn, header: list[Any]) -> list[list[Any]]:
    out = []
    for _ in range(draw(st.integers(0, 8))):
        row = [draw(cells if draw(st.integers(0, 9)) == 0 or col not in COLUMN_CELLS
                    else COLUMN_CELLS[col]) for col in header]
        out.append(row[:draw(st.integers(0, len(row)))] if draw(st.integers(0, 9)) == 0
                   else row)  # short rows: trailing cells left out
    return out


# Configured column or sheet names with a line break are checked by the last test below.
DATA_SECTIONS = [
    DataSection(),
    DataSection(case_flag=None),
    DataSection(flags={}),
    DataSection(narratives={"LE": "NarrativeLE"}, flags={"LE": "ManualFlagLE"}),
    DataSection(placeholders=[]),
    DataSection(sheet="Cases"),
    DataSection(sheet="NoSuchSheet"),
]


def csv_bytes(header: list[Any], body: list[list[Any]], encoding: str) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in [header, *body]:
        writer.writerow(["" if v is None else v for v in row])
    text = buf.getvalue()
    if encoding == "cp1252":  # a spreadsheet saved as "CSV" on Windows: not UTF-8
        return text.encode("cp1252", errors="replace") + "caf\u00e9\n".encode("cp1252")
    if encoding == "garbage-bytes":
        return text.encode() + b"\xff\xfe\x00\x80bad,\xc3\x28\n"
    return text.encode(encoding)


def xlsx_bytes(header: list[Any], body: list[list[Any]], sheet: str) -> bytes:
    book = Workbook()
    ws = book.active
    ws.title = sheet
    for row in [header, *body]:
        # openpyxl refuses control characters a workbook cannot hold; Excel can't either.
        ws.append([ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v
                   for v in row])
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, content) of a CSV or workbook an operator might hand over."""
    header = draw(headers)
    body = draw(body_rows(header))
    kind = draw(st.sampled_from(["csv", "csv", "xlsx", "xlsx", "broken-xlsx", "other"]))
    if kind == "csv":
        encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16",
                                         "cp1252", "garbage-bytes"]))
        return "cases.csv", csv_bytes(header, body, encoding)
    if kind == "xlsx":
        return "cases.xlsx", xlsx_bytes(header, body, draw(st.sampled_from(["Cases", "Sheet"])))
    if kind == "broken-xlsx":
        whole = xlsx_bytes(header, body, "Cases")
        cut = draw(st.integers(0, len(whole) - 1))
        return "cases.xlsx", draw(st.sampled_from([whole[:cut], b"", b"PK\x03\x04junk",
                                                   b"a,b\n1,2\n"]))
    return draw(st.sampled_from(["cases.txt", "cases", "cases.XLSX", "cases.CSV"])), \
        draw(st.binary(max_size=64))


def count_narratives(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(file=data_files(), data=st.sampled_from(DATA_SECTIONS))
def test_any_data_file_is_loaded_or_refused_in_one_line(file: tuple[str, bytes],
                                                        data: DataSection) -> None:
    name, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        with closing(connect(Path(tmp) / "x.db")) as conn:
            try:
                report = ingest(conn, data, path)
            except AsyncRunnerError as exc:
                assert isinstance(exc, UsageError), repr(exc)  # exit 2: a bad input file
                assert one_line(str(exc)), str(exc)
                assert count_narratives(conn) == 0  # nothing half-loaded
                return
            assert report.loaded
            assert count_narratives(conn) == report.n_narratives
            again = ingest(conn, data, path)  # read once per content: not parsed again
            assert not again.loaded and again.n_narratives == report.n_narratives
            digests = read_digests(data, path)
            assert (digests.n_rows, digests.rows_digest, digests.content_digest) == (
                report.n_rows, report.rows_digest, report.content_digest)


@pytest.mark.parametrize("data", [DataSection(id_column="Incident\nID"),
                                  DataSection(sheet="Cases\n2024")],
                         ids=["column", "sheet"])
def test_names_with_line_breaks_in_ingest_messages(tmp_path: Path, data: DataSection) -> None:
    path = tmp_path / "cases.xlsx"
    path.write_bytes(xlsx_bytes(REAL_COLUMNS, [["1", "text", "", "1", "", "1"]], "Cases"))
    with closing(connect(tmp_path / "x.db")) as conn, pytest.raises(UsageError) as info:
        ingest(conn, data, path)
    assert one_line(str(info.value)), str(info.value)
