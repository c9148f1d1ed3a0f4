"""The main path end to end: real CLI processes, real HTTP on 127.0.0.1, real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    cli_env,
    experiment_id_from,
    run_cli,
    write_config,
    write_fixture_csv,
)

from asyncrunner.sim import MockServer, classify_text

MONITOR_SQL = ("SELECT n_narratives_completed, n_narratives_total, estimated_completion_time "
               "FROM experiments WHERE status = 'running'")


def results(db: Path, experiment_id: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM narrative_results WHERE experiment_id = ?",
                            (experiment_id,)).fetchall()
    finally:
        conn.close()


def experiment(db: Path, experiment_id: str) -> sqlite3.Row:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM experiments WHERE experiment_id = ?",
                            (experiment_id,)).fetchone()
    finally:
        conn.close()


def test_fixture_answers_are_what_the_keyword_rule_says() -> None:
    """Guards the hand-computed matrix below against a change of the mock's noise."""
    assert classify_text("Narrative:\nToxicology pending.").detected is False
    assert classify_text("Narrative:\nHusband reported prior abuse.").detected is True


def test_run_matches_hand_computed_confusion_matrix(tmp_path: Path,
                                                    mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    proc = run_cli("run", str(cfg), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    eid = experiment_id_from(proc.stdout)
    assert proc.stdout.splitlines()[0] == f"experiment_id: {eid}"
    rows = results(db, eid)
    # 5 cases x 2 types, one blank CME narrative skipped
    assert len(rows) == 9
    assert len({(r["incident_id"], r["narrative_type"]) for r in rows}) == 9
    assert {r["incident_id"] for r in rows} == {"00101", "00102", "103", "104", "105"}
    assert all(r["error_occurred"] == 0 and r["raw_response"] for r in rows)
    assert all(r["prompt_tokens"] and r["response_sec"] is not None for r in rows)
    exp = experiment(db, eid)
    assert exp["status"] == "completed" and exp["end_time"]
    assert (exp["n_tp"], exp["n_fp"], exp["n_tn"], exp["n_fn"]) == (2, 2, 4, 1)
    assert exp["precision"] == pytest.approx(0.5)
    assert exp["recall"] == pytest.approx(2 / 3)
    assert exp["f1"] == pytest.approx(4 / 7)
    assert exp["accuracy"] == pytest.approx(6 / 9)
    per_type = json.loads(exp["metrics_json"])
    assert [per_type["LE"][k] for k in ("n_tp", "n_fp", "n_tn", "n_fn")] == [2, 1, 2, 0]
    assert [per_type["CME"][k] for k in ("n_tp", "n_fp", "n_tn", "n_fn")] == [0, 1, 2, 1]
    assert exp["n_narratives_completed"] == exp["n_narratives_total"] == 9
    config = json.loads(exp["config_json"])
    assert config["run"]["batch_size"] == 5
    out = tmp_path / "out"
    assert (out / f"{eid}.csv").read_text().count("\n") == 10
    assert len(json.loads((out / f"{eid}.json").read_text())) == 9
    assert "[PROGRESS] 9/9 (100.0%)" in proc.stdout
    assert "precision" in proc.stdout  # status with metrics printed at the end


def test_second_run_reads_database_not_file(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    first = run_cli("run", str(cfg), "--db", str(db))
    second = run_cli("run", str(cfg), "--db", str(db))
    assert first.returncode == second.returncode == 0
    assert "file not re-read" in second.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0] == 9
    assert conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("run: {wrokers: 3}\n", "run.wrokers"),
        ("model: {temperature: warm}\n", "model.temperature"),
        ("prompt: {user_template: 'no placeholder'}\n", "prompt.user_template"),
        ("data: {file: /no/such/file.xlsx}\n", "/no/such/file.xlsx"),
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, yaml_text: str,
                                             named: str) -> None:
    cfg = tmp_path / "bad.yaml"
    data = write_fixture_csv(tmp_path / "cases.csv")
    if "data:" not in yaml_text:
        yaml_text += f"data: {{file: {data}}}\n"
    cfg.write_text(yaml_text)
    proc = run_cli("run", str(cfg), "--db", str(tmp_path / "x.db"))
    assert proc.returncode == 2
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_columns_exit_2(tmp_path: Path, mock_server: MockServer) -> None:
    data = tmp_path / "cases.csv"
    data.write_text("IncidentID,NarrativeLE\n1,text\n")
    cfg = write_config(tmp_path, data, mock_server.url)
    proc = run_cli("run", str(cfg), "--db", str(tmp_path / "x.db"))
    assert proc.returncode == 2
    assert "NarrativeCME" in proc.stderr and "Traceback" not in proc.stderr


def test_monitoring_query_answers_during_a_run(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(latency_ms=40)
    rows = [(str(i), f"Case {i}: found at home by a friend.", f"Report {i}.", "0", "0", "0")
            for i in range(150)]
    data = write_fixture_csv(tmp_path / "many.csv", rows)
    cfg = write_config(tmp_path, data, server.url, workers=4, batch_size=10)
    db = tmp_path / "exp.db"
    proc = subprocess.Popen([sys.executable, "-m", "asyncrunner", "run", str(cfg), "--db",
                             str(db)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, int, str | None]] = []
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if db.exists():
                monitor = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                try:
                    seen += [tuple(r) for r in monitor.execute(MONITOR_SQL)]
                except sqlite3.OperationalError:
                    pass  # tables not created yet
                finally:
                    monitor.close()
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    progress = [s for s in seen if s[0] > 0]
    assert len({s[0] for s in progress}) >= 3, seen[-5:]  # counts advanced while running
    assert all(total == 300 for _, total, _ in progress)
    assert any(eta for _, _, eta in progress)
    assert "[PROGRESS]" in out and "\r" not in out
