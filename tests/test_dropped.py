"""What a run never sends is part of its result; a changed file is announced (issue #10,
items 2 and 3).

A fixture with every kind of loss: blank text with a positive label, placeholder texts,
duplicates whose labels contradict the kept row, a row without an id. The counts reach
`status --json`, the status text, the run log, the report and `compare`. A file re-saved
with the same cells is told apart from a changed one, for new runs and for resumes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row

from asyncrunner.config import DataSection
from asyncrunner.db.drops import drop_summary
from asyncrunner.db.ingest import ingest, mapping_json
from asyncrunner.db.schema import connect
from asyncrunner.errors import InputError, RefusedError, Stopped
from asyncrunner.plan import RunRequest
from asyncrunner.results.compare import compare, render_text, to_json
from asyncrunner.results.report import write_report
from asyncrunner.session import execute

HEADER = ["IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE", "ManualFlagCME",
          "ManualFlag"]
LOSSY_ROWS = [
    ("001", "Her husband hit her.", "Decedent at home.", "1", "0", "1"),    # row 2
    ("002", "", "Autopsy pending.", "1", "0", "1"),                       # 3: blank, label 1
    ("003", "N/A", "unknown", "0", "1", "1"),                             # 4: placeholders
    ("004", " - ", "...", "", "", "0"),                                   # 5: punctuation
    ("005", "Boyfriend arrested.", "Notes.", "1", "0", "1"),              # 6
    ("005", "Boyfriend arrested.", "Other notes.", "0", "0", "1"),        # 7: duplicates
    ("", "Orphan narrative.", "", "1", "", "1"),                          # 8: no id
    ("006", "None", "Wife reported abuse.", "0", "1", "0"),               # 9: placeholder
    ("007", "NA", "Examiner notes.", "", "", ""),                         # 10: placeholder
]
LOADED = 7


def start(db: Path, cfg: Path, fake: FakeLLM | None = None) -> str:
    out = io.StringIO()
    summary = execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                      transport=(fake or FakeLLM()).transport())
    return summary.experiment_id


def check_summary(s: dict[str, Any]) -> None:
    assert s["n_rows"] == 9 and s["n_loaded"] == LOADED and s["n_dropped"] == 11
    assert s["by_reason"] == {"blank": 1, "placeholder": 6, "duplicate": 2, "no_id": 2}
    assert s["by_type"] == {"LE": {"blank": 1, "duplicate": 1, "no_id": 1, "placeholder": 4},
                            "CME": {"duplicate": 1, "no_id": 1, "placeholder": 2}}
    positive = [(r["row_number"], r["incident_id"], r["narrative_type"], r["reason"])
                for r in s["positive_label"]["rows"]]
    assert positive == [(3, "002", "LE", "blank"), (4, "003", "CME", "placeholder"),
                        (8, None, "CME", "no_id"), (8, None, "LE", "no_id")]
    assert s["positive_label"]["count"] == 4
    assert s["label_conflicts"]["count"] == 1
    conflict = s["label_conflicts"]["rows"][0]
    assert (conflict["row_number"], conflict["incident_id"], conflict["narrative_type"],
            conflict["kept_row_number"], conflict["manual_flag_ind"]) == (7, "005", "LE", 6, 0)
    assert s["duplicates_with_other_text"] == 1
    assert s["no_id"] == {"rows": 1, "narratives_with_text": 1, "row_numbers": [8]}


def test_every_loss_is_counted_and_shown_everywhere(tmp_path: Path,
                                                    console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "lossy.csv", LOSSY_ROWS)
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1")
    db = tmp_path / "runs.db"
    fake = FakeLLM()
    eid = start(db, cfg, fake)
    assert fake.requests == LOADED
    sent = {json.loads(json.dumps(b))["messages"][-1]["content"] for b in fake.bodies}
    assert not any(t.endswith(("N/A", "None", "NA", "unknown", "...", "-")) for t in sent)
    # the run log and the console
    shown = console.getvalue()
    assert "not sent to the model: 11 of 18 narrative slots not loaded: 1 blank, " \
           "6 placeholder, 2 duplicate, 2 without an id" in shown
    assert "WARNING: 4 dropped with a positive manual label: row 3 002/LE (blank)" in shown
    assert "1 duplicates with labels that contradict the kept row: row 7 005/LE vs kept " \
           "row 6" in shown
    assert "1 rows without an id (1 narratives with text lost): rows 8" in shown
    log = (tmp_path / "logs" / eid / "run.jsonl").read_text()
    event = next(json.loads(line) for line in log.splitlines()
                 if json.loads(line)["event"] == "ingest")
    check_summary(event["dropped"])
    assert "Orphan narrative" not in log and "Her husband" not in log
    # status --json and text (a real CLI process)
    detail = json.loads(run_cli("status", eid, "--json", "--db", str(db)).stdout)
    check_summary(detail["dropped"])
    listing = json.loads(run_cli("status", "--json", "--db", str(db)).stdout)
    assert listing[0]["dropped"] == 11
    text = run_cli("status", eid, "--db", str(db)).stdout
    assert "dropped    11 of 18 narrative slots not loaded" in text
    assert "4 dropped with a positive manual label" in text
    # the report
    with closing(connect(db)) as conn:
        page = write_report(conn, eid, tmp_path / "r.html").read_text()
    assert '<section id="dropped">' in page and "Narratives not sent to the model" in page
    assert "Dropped with a positive manual label (4)" in page
    assert "Duplicates whose labels contradict the kept row (1)" in page
    assert "Orphan narrative" not in page
    # compare: a second experiment on the same load
    other = start(db, cfg)
    with closing(connect(db)) as conn:
        result = compare(conn, eid, other)
    check_summary(to_json(result)["dropped_1"])
    assert "not sent to the model (same data file load for both)" in render_text(result)


def test_placeholder_list_is_configurable_and_part_of_the_ingest_key(tmp_path: Path) -> None:
    data = write_fixture_csv(tmp_path / "p.csv", [
        ("1", "Not recorded", "Autopsy.", "", "", ""), ("2", "N/A", "x y", "", "", "")])
    with closing(connect(tmp_path / "x.db")) as conn:
        own = DataSection(placeholders=["not  RECORDED"])
        report = ingest(conn, own, data)
        # "N/A" is text now; "not recorded" (spacing and case ignored) is a placeholder
        assert (report.n_narratives, report.n_placeholder) == (3, 1)
        assert json.loads(mapping_json(own))["placeholders"] == ["not recorded"]
        with pytest.raises(InputError, match="placeholder list"):
            ingest(conn, DataSection(), data)


def test_a_load_from_before_placeholders_is_reused_with_a_warning(
        tmp_path: Path, console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "lossy.csv", LOSSY_ROWS)
    db = tmp_path / "runs.db"
    with closing(connect(db)) as conn:
        ingest(conn, DataSection(placeholders=[]), data)   # keeps N/A, None, NA, unknown
        old = json.loads(mapping_json(DataSection()))
        del old["placeholders"]                             # as an older asyncrunner wrote it
        conn.execute("UPDATE ingests SET mapping_json = ?, rows_digest = NULL, "
                     "content_digest = NULL", (json.dumps(old, sort_keys=True),))
        conn.execute("DELETE FROM ingest_drops")
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1")
    fake = FakeLLM()
    eid = start(db, cfg, fake)
    assert fake.requests == LOADED + 4
    assert "was loaded before placeholder texts counted as blank: 4 of its narratives are " \
           "placeholders" in console.getvalue()
    with closing(connect(db)) as conn:
        summary = drop_summary(conn, experiment_row(db, eid)["data_checksum"])  # type: ignore[arg-type]
    assert summary is not None and not summary["recorded"]
    assert not summary["placeholders_applied"]


# --------------------------------------------------------------------------- item 3


def resave(path: Path, rows: list[tuple[str, ...]], header: list[str] = HEADER) -> None:
    """The same cells written differently: every field quoted, CRLF line ends."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)


def test_changed_file_is_announced_naming_the_experiments_of_the_old_version(
        tmp_path: Path, console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "lossy.csv", LOSSY_ROWS)
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1")
    db = tmp_path / "runs.db"
    first = start(db, cfg)
    old_sum = experiment_row(db, first)["data_checksum"]
    console.seek(0)
    console.truncate(0)
    resave(data, LOSSY_ROWS)
    second = start(db, cfg)
    shown = console.getvalue()
    new_sum = experiment_row(db, second)["data_checksum"]
    assert new_sum != old_sum
    assert "has changed since it was loaded on " in shown
    assert (f"checksum {old_sum} (9 rows, 7 narratives) is now {new_sum}; experiments on "
            f"the old version: {first} 'test' (completed)") in shown
    # said before the new version is loaded
    assert shown.index("has changed since") < shown.index("data " + str(data))
    assert "9 rows / 7 narratives" in shown and "re-saved: the bytes changed, no cell did" \
        in shown
    console.seek(0)
    console.truncate(0)
    write_fixture_csv(data, [*LOSSY_ROWS, ("008", "New case.", "New notes.", "0", "0", "0")])
    start(db, cfg)
    shown = console.getvalue()
    assert f"experiments on the old version: {second} 'test' (completed)" in shown
    assert "-> 10 rows / 9 narratives" in shown and "cells the experiments read changed" in shown


def interrupted(db: Path, cfg: Path) -> str:
    out = io.StringIO()
    fake = FakeLLM(delay_s=0.01).after(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Stopped):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=fake.transport())
    return out.getvalue().splitlines()[0].removeprefix("experiment_id: ")


def resume(db: Path, eid: str) -> None:
    execute(RunRequest(db_path=db, config_path=None, resume=True, experiment_id=eid, env={}),
            io.StringIO(), transport=FakeLLM().transport())


def test_resume_on_a_resaved_file_is_allowed_a_changed_one_refused(
        tmp_path: Path, console: io.StringIO) -> None:
    rows = [(f"{i:03d}", f"Narrative {i}.", f"Notes {i}.", "0", "1", "0") for i in range(40)]
    data = write_fixture_csv(tmp_path / "cases.csv", rows)
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", workers=1, batch_size=2)
    db = tmp_path / "runs.db"
    eid = interrupted(db, cfg)
    stored = experiment_row(db, eid)["data_checksum"]
    resave(data, rows)
    resume(db, eid)
    assert ("but no cell changed; resuming on the stored narratives") in console.getvalue()
    assert experiment_row(db, eid)["status"] == "completed"
    assert experiment_row(db, eid)["data_checksum"] == stored
    # a column the experiment does not read
    eid2 = interrupted(db, cfg)
    resave(data, [(*r, "note") for r in rows], [*HEADER, "Reviewer"])
    resume(db, eid2)
    assert "only columns the experiment does not read changed" in console.getvalue()
    # a cell it reads: refused, saying both checksums
    eid3 = interrupted(db, cfg)
    write_fixture_csv(data, [*rows[:-1], ("039", "Edited.", "Notes 39.", "0", "1", "0")])
    with pytest.raises(RefusedError, match=r"checksum mismatch: checksum \w+ \(loaded "
                                           r"\S+\) is now \w+; cells the experiment reads"):
        resume(db, eid3)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT status FROM experiments WHERE experiment_id = ?",
                            (eid3,)).fetchone()[0] == "interrupted"
