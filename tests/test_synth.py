"""Synthetic sample data: deterministic, messy in the intended ways, readable back."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import openpyxl
import pytest

from asyncrunner.sim import classify_text, find_cues
from asyncrunner.sim.synth import COLUMNS, generate_cases, main, write_csv, write_workbook

ROOT = Path(__file__).resolve().parent.parent
YES = (1, "yes", True)
NO = (0, "no", False)


def flag(value: object) -> int | None:
    """Test-local reading of the mixed spellings (ingest has its own)."""
    if value in YES:
        return 1
    if value in NO:
        return 0
    assert value is None, value
    return None


def blank(text: object) -> bool:
    return text is None or not str(text).strip()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    return generate_cases(500)


def test_deterministic_for_a_seed(rows: list[dict[str, object]]) -> None:
    assert generate_cases(500) == rows
    assert generate_cases(500, seed=7) == rows
    assert generate_cases(500, seed=8) != rows
    assert generate_cases(0) == []


def test_columns_and_row_count(rows: list[dict[str, object]]) -> None:
    assert len(rows) == 500
    assert all(tuple(row) == COLUMNS for row in rows)
    assert COLUMNS == ("IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE",
                       "ManualFlagCME", "ManualFlag")


def test_id_formats(rows: list[dict[str, object]]) -> None:
    ids = [row["IncidentID"] for row in rows]
    padded = [i for i in ids if isinstance(i, str)]
    plain = [i for i in ids if isinstance(i, int)]
    assert len(padded) + len(plain) == len(ids)
    assert 0.35 < len(padded) / len(ids) < 0.65
    assert all(i.startswith("0") and i.isdigit() for i in padded)
    # A padded id and an int never name the same case, however ids are normalised.
    assert not {int(i) for i in padded} & set(plain)


def test_label_spellings_and_blanks(rows: list[dict[str, object]]) -> None:
    values = Counter(repr(row[col]) for row in rows
                     for col in ("ManualFlagLE", "ManualFlagCME", "ManualFlag"))
    for spelling in ("1", "0", "'yes'", "'no'", "True", "False", "None"):
        assert values[spelling] > 0, spelling
    for row in rows:
        case, le, cme = (flag(row[c]) for c in ("ManualFlag", "ManualFlagLE", "ManualFlagCME"))
        if case is not None and le is not None and cme is not None:
            assert case == int(bool(le or cme))
        spellings = {type(row[c]) for c in ("ManualFlagLE", "ManualFlagCME", "ManualFlag")
                     if row[c] is not None}
        assert len(spellings) <= 1  # one spelling per row, mixed across rows


def test_positive_share(rows: list[dict[str, object]]) -> None:
    cases = {str(r["IncidentID"]): flag(r["ManualFlag"]) for r in rows}
    known = [v for v in cases.values() if v is not None]
    assert 0.22 < sum(known) / len(known) < 0.38


def test_blank_narratives_and_duplicates(rows: list[dict[str, object]]) -> None:
    blanks = [(row, col) for row in rows for col in ("NarrativeLE", "NarrativeCME")
              if blank(row[col])]
    assert 0.01 < len(blanks) / (2 * len(rows)) < 0.03
    assert {row[col] for row, col in blanks} >= {None, ""}
    # A blank narrative never carries a positive label.
    for row, col in blanks:
        assert flag(row[col.replace("Narrative", "ManualFlag")]) != 1
    counts = Counter(str(row["IncidentID"]) for row in rows)
    repeated = [i for i, n in counts.items() if n > 1]
    assert 3 <= len(repeated) <= 8
    for incident in repeated:
        copies = [row for row in rows if str(row["IncidentID"]) == incident]
        assert all(copy == copies[0] for copy in copies)
        assert copies[0] is not copies[1]  # distinct dicts, not aliases


def test_small_samples_have_no_duplicates() -> None:
    rows = generate_cases(10, seed=1)
    assert len({str(r["IncidentID"]) for r in rows}) == 10


def test_narratives_look_like_case_narratives(rows: list[dict[str, object]]) -> None:
    le = [str(r["NarrativeLE"]) for r in rows if not blank(r["NarrativeLE"])]
    cme = [str(r["NarrativeCME"]) for r in rows if not blank(r["NarrativeCME"])]
    assert all(text.count(". ") >= 3 for text in le + cme)  # several sentences
    assert all("year" in text and "decedent" in text.lower() for text in le + cme)
    assert len(set(le)) > 0.95 * len(le)  # templates vary enough to be distinct


def test_keyword_rule_scores_well_but_not_perfectly(rows: list[dict[str, object]]) -> None:
    def scores(predict: object) -> tuple[float, float]:
        tp = fp = fn = 0
        for row in rows:
            for col in ("NarrativeLE", "NarrativeCME"):
                truth = flag(row[col.replace("Narrative", "ManualFlag")])
                if truth is None or blank(row[col]):
                    continue
                guess = predict(str(row[col]))  # type: ignore[operator]
                tp += guess and truth
                fp += guess and not truth
                fn += truth and not guess
        return tp / (tp + fp), tp / (tp + fn)

    precision, recall = scores(lambda text: bool(find_cues(text)))
    assert 0.85 <= precision < 0.99 and 0.85 <= recall < 0.99
    # The simulated model adds its 8% stable noise on top of the keyword rule.
    precision, recall = scores(lambda text: classify_text("Narrative:\n" + text).detected)
    assert 0.65 <= precision < 0.95 and 0.75 <= recall < 0.95


def read_xlsx(path: Path) -> list[tuple[object, ...]]:
    wb = openpyxl.load_workbook(path, read_only=True)
    try:
        ws = wb["narratives"]
        # Read-only rows stop at their last non-empty cell; max_col pads them back out.
        return [tuple(r) for r in ws.iter_rows(values_only=True, max_col=len(COLUMNS))]
    finally:
        wb.close()


def test_workbook_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cases.xlsx"
    summary = write_workbook(path, 120, seed=3)
    table = read_xlsx(path)
    assert table[0] == COLUMNS
    expected = [tuple(row[c] for c in COLUMNS) for row in generate_cases(120, seed=3)]
    # Empty text becomes an empty cell; everything else keeps its type.
    assert table[1:] == [tuple(None if v == "" else v for v in row) for row in expected]
    assert summary.rows == 120 and summary.unique_ids < 120


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cases.csv"
    write_csv(path, 120, seed=3)
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == COLUMNS
    expected = [["" if row[c] is None else str(row[c]) for c in COLUMNS]
                for row in generate_cases(120, seed=3)]
    assert table[1:] == expected
    assert any(r[0].startswith("0") for r in table[1:])  # leading zeros kept as text
    assert {"True", "False", "yes", "no", "1", "0", ""} <= {v for r in table[1:] for v in r[3:]}


def test_cli_writes_by_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cases", "30", "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["--cases", "30", "--out", str(tmp_path / "b.xlsx"), "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "a.csv" in lines[0] and "30 rows" in lines[0]
    assert read_xlsx(tmp_path / "b.xlsx")[0] == COLUMNS
    with pytest.raises(SystemExit) as exc:
        main(["--cases", "3", "--out", str(tmp_path / "c.txt")])
    assert exc.value.code == 2


def test_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    done = subprocess.run([sys.executable, "-m", "asyncrunner.sim.synth", "--cases", "5",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and str(out) in done.stdout
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


def test_bundled_sample_is_small_and_current() -> None:
    path = ROOT / "data" / "sample_narratives.xlsx"
    assert path.stat().st_size < 100_000
    table = read_xlsx(path)
    assert table[0] == COLUMNS and len(table) == 151
    expected = [tuple(None if row[c] == "" else row[c] for c in COLUMNS)
                for row in generate_cases(150, seed=7)]
    assert table[1:] == expected  # regenerate with: python -m asyncrunner.sim.synth --cases 150
