"""Bad input from the command line: one line on stderr, a non-zero exit, never a traceback,
and the database unchanged. One row per hostile input; each runs the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv

ESC_NAME = "evil \x1b]0;pwned\x07\x1b[2J name \u202e"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A database with one completed experiment whose name holds escape sequences."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = write_fixture_csv(tmp / "cases.csv")
    cfg = write_config(tmp, data, "http://unused.invalid/v1", model={"provider": "mock"})
    raw = yaml.safe_load(cfg.read_text())
    raw["experiment"]["name"] = ESC_NAME
    cfg.write_text(yaml.safe_dump(raw))
    db = tmp / "runs.db"
    proc = run_cli("run", str(cfg), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    return db, experiment_id_from(proc.stdout)


CASES = {
    "watch negative": ["status", "--watch", "-1"],
    "watch nan": ["status", "--watch", "nan"],
    "watch inf": ["status", "{id}", "--watch", "inf"],
    "export into a folder": ["export", "{id}", "--out", "."],
    "report into the root folder": ["report", "{id}", "--out", "/"],
    "export where nothing can be written": ["export", "{id}", "--out", "/proc/x.csv"],
    "report where nothing can be written": ["report", "{id}", "--out", "/proc/x/r.html"],
    "malformed id": ["export", "not-an-id"],
    "compare with one id": ["compare", "{id}"],
    "compare a malformed study id": ["compare", "--study", "nope"],
    "compare an unknown study": ["compare", "--study", "00000000-0000-4000-8000-000000000000"],
    "compare with unknown labels": ["compare", "{id}", "{id}", "--labels", "mine"],
    "report with unknown labels": ["report", "{id}", "--labels", "mine"],
    "sweep without a file": ["sweep"],
    "sweep a missing file": ["sweep", "/nonexistent/sweep.yaml"],
    "sweep --resume an unknown study": ["sweep", "--resume",
                                        "00000000-0000-4000-8000-000000000000"],
    "adjudicate export without ids": ["adjudicate", "export", "--out", "/tmp/x.xlsx"],
    "adjudicate import of a text file": ["adjudicate", "import", "/etc/hostname"],
    "plan a missing config": ["plan", "/nonexistent/cfg.yaml"],
    "plan with --probe 0": ["plan", "/nonexistent/cfg.yaml", "--probe", "0"],
    "batch-import a missing file": ["batch-import", "{id}", "/nonexistent/a.jsonl"],
    "batch-file without --out": ["batch-file", "/nonexistent/cfg.yaml"],
    "run --workers sometimes": ["run", "/nonexistent/cfg.yaml", "--workers", "sometimes"],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_hostile_arguments_get_one_line_and_leave_the_database_alone(
        finished: tuple[Path, str], argv: list[str]) -> None:
    db, eid = finished
    before = db.read_bytes()
    proc = run_cli(*[a.format(id=eid) for a in argv], "--db", str(db))
    assert proc.returncode in (2, 3), proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert db.read_bytes() == before


def test_escape_sequences_in_names_are_shown_not_executed(finished: tuple[Path, str]) -> None:
    db, eid = finished
    for argv in (["status"], ["status", eid]):
        proc = run_cli(*argv, "--db", str(db))
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\u202e" not in proc.stdout
        assert "evil \\x1b]0;pwned\\x07\\x1b[2J name \\u202e" in proc.stdout


def test_an_unknown_file_mode_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    proc = run_cli("status", "--db", str(db), env=cli_env(ASYNCRUNNER_FILE_MODE="world"))
    assert proc.returncode == 2 and "ASYNCRUNNER_FILE_MODE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not db.exists()


def test_a_long_csv_cell_is_taken_and_an_endless_one_is_one_line(tmp_path: Path) -> None:
    """The csv module's default limit (131,072 characters) no longer applies: a cell as
    large as a workbook takes is read; one beyond it (an unclosed quote swallowing the
    rest of the file, typically) names its row."""
    long_text = "He hit her. " + "x" * 200_000
    data = write_fixture_csv(tmp_path / "long.csv", [("1", long_text, "", "1", "", "1"),
                                                     ("2", "Found at home", "", "0", "", "0")])
    cfg = write_config(tmp_path, data, "http://unused.invalid/v1", model={"provider": "mock"})
    db = tmp_path / "runs.db"
    proc = run_cli("run", str(cfg), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    endless = tmp_path / "endless.csv"
    endless.write_text("IncidentID,NarrativeLE,NarrativeCME,ManualFlagLE,ManualFlagCME,"
                       "ManualFlag\n1,ok,,1,,1\n2,\"" + "y" * 1_100_000 + "\n")
    cfg = write_config(tmp_path, endless, "http://unused.invalid/v1", name="endless.yaml",
                       model={"provider": "mock"})
    before = db.read_bytes()
    proc = run_cli("run", str(cfg), "--db", str(db))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"asyncrunner: error: data file {endless}, row 3: a cell holds more "
                    "than 1,048,576 characters; is a closing quote missing?")
    assert db.read_bytes() == before
