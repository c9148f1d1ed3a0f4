"""What an operator sees: the live bar on a terminal, plain lines elsewhere, the ETA of a
resumed session, the structured log, `status --json`, and --help on every command."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_ROWS,
    ROOT,
    cli_env,
    experiment_id_from,
    run_cli,
    write_config,
    write_fixture_csv,
)
from test_resume import cases, finish, start, wait_for_results

from asyncrunner.cli import build_parser
from asyncrunner.sim import FaultConfig, MockServer


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "asyncrunner", *args], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break  # the child closed the terminal
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_live_bar_on_a_terminal(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(latency_ms=20)
    data = write_fixture_csv(tmp_path / "cases.csv", cases(60))
    cfg = write_config(tmp_path, data, server.url, workers=4, batch_size=10)
    code, screen = run_in_pty(["run", str(cfg), "--db", str(tmp_path / "exp.db")],
                              cli_env(TERM="xterm-256color", COLUMNS="160"))
    assert code == 0, screen
    assert "classifying" in screen and "120/120" in screen
    assert "━" in screen  # the bar itself
    assert "ETA" in screen and "concurrency" in screen and "tok/s" in screen
    assert "[PROGRESS]" not in screen


def test_plain_lines_when_not_a_terminal(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(30))
    cfg = write_config(tmp_path, data, mock_server.url, batch_size=10)
    proc = run_cli("run", str(cfg), "--db", str(tmp_path / "exp.db"))
    assert proc.returncode == 0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[PROGRESS]")]
    pattern = re.compile(r"^\[PROGRESS\] \d+/60 \(\d+\.\d%\) \| Rate: \d+\.\d\d/sec \| "
                         r"ETA: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|unknown) \| Elapsed: \S+( \S+)?$")
    # one line per commit; a commit may take more than batch_size when results pile up
    assert len(lines) >= 2 and all(pattern.match(line) for line in lines), lines
    assert lines[-1].startswith("[PROGRESS] 60/60 (100.0%)")
    assert "\r" not in proc.stdout and "\x1b[" not in proc.stdout


def test_eta_after_resume_uses_only_the_new_session(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    fast = server_factory(latency_ms=5)
    data = write_fixture_csv(tmp_path / "cases.csv", cases(150))
    cfg = write_config(tmp_path, data, fast.url, workers=8, batch_size=10)
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 150)
    proc.send_signal(signal.SIGINT)
    out, _ = finish(proc)
    eid = experiment_id_from(out)
    slow = server_factory(latency_ms=100)
    cfg2 = write_config(tmp_path, data, slow.url, name="slow.yaml", workers=1, batch_size=2)
    resumed = run_cli("resume", eid, "--config", str(cfg2), "--db", str(db), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    rates = [float(m) for m in re.findall(r"Rate: ([\d.]+)/sec", resumed.stdout)]
    assert rates
    # one worker at 100 ms is ~10/s; counting the first session's 150+ as this session's
    # work would show hundreds per second
    assert max(rates) < 20, rates


def test_structured_log_events_and_no_narrative_text(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(faults=FaultConfig(error_rate=0.3), seed=4, latency_ms=10)
    data = write_fixture_csv(tmp_path / "cases.csv", FIXTURE_ROWS + cases(60))
    cfg = write_config(tmp_path, data, server.url, workers=2, batch_size=5, max_attempts=2)
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 20)
    proc.send_signal(signal.SIGTERM)
    out, _ = finish(proc)
    eid = experiment_id_from(out)
    assert run_cli("resume", eid, "--db", str(db)).returncode == 0
    log_file = tmp_path / "logs" / eid / "run.jsonl"
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    names = [e["event"] for e in events]
    for expected in ("run_start", "config", "commit", "retry", "signal", "run_interrupted",
                     "resume", "backup", "run_finished"):
        assert expected in names, expected
    assert all(e["experiment_id"] == eid and "timestamp" in e for e in events)
    assert len({e["session"] for e in events}) == 2  # appended across the resume
    retries = [e for e in events if e["event"] == "retry"]
    # the response-format probe's retries (before any narrative) carry no narrative key;
    # it sends at most one request per mode of auto per session, each retried once here
    probe_retries = [e for e in retries if "incident_id" not in e]
    assert len(probe_retries) <= 2 * 3
    narrative_retries = [e for e in retries if "incident_id" in e]
    assert narrative_retries
    for retry in narrative_retries:
        assert {"incident_id", "narrative_type", "status", "wait_s"} <= retry.keys()
    text = log_file.read_text()
    for row in FIXTURE_ROWS:
        for narrative in row[1:3]:
            if narrative:
                assert narrative not in text


def test_status_json_schema(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    eid = experiment_id_from(run_cli("run", str(cfg), "--db", str(db)).stdout)
    listing = json.loads(run_cli("status", "--json", "--db", str(db)).stdout)
    assert listing[0].keys() >= {"experiment_id", "name", "status", "done", "total", "errors",
                                 "eta"}
    detail = json.loads(run_cli("status", eid, "--json", "--db", str(db)).stdout)
    assert detail.keys() >= {"experiment_id", "status", "done", "total", "errors",
                             "errors_by_category", "rate_per_s", "eta", "lock", "tokens",
                             "metrics"}
    assert detail["lock"] == {"held": False, "pid": None}
    overall = detail["metrics"]["overall"]
    assert overall["n_tp"] == 2 and len(overall["intervals"]["precision"]) == 2
    assert set(detail["metrics"]) >= {"overall", "LE", "CME"}
    text = run_cli("status", eid, "--db", str(db)).stdout
    assert "precision" in text and "LE" in text and "CME" in text


def test_every_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        proc = run_cli(name, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout, name


@pytest.mark.parametrize("args", [["status", "--db", "/nonexistent/x.db"],
                                  ["export", "not-a-uuid"], ["run", "--workers", "0", "c.yaml"],
                                  ["frobnicate"]])
def test_bad_usage_is_one_line_not_a_traceback(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode in (2, 3)
    assert "Traceback" not in proc.stderr


def test_report_and_compare_commands(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    first = run_cli("run", str(cfg), "--db", str(db))
    second = run_cli("run", str(cfg), "--db", str(db))
    id1, id2 = experiment_id_from(first.stdout), experiment_id_from(second.stdout)
    # a finished run writes its report beside the exports and names it last
    assert first.stdout.strip().splitlines()[-1] == (
        f"report: {tmp_path / 'out' / (id1 + '_report.html')}")
    out = tmp_path / "r.html"
    proc = run_cli("report", id1, "--out", str(out), "--db", str(db))
    assert proc.returncode == 0 and out.exists() and "Confusion matrix" in out.read_text()
    proc = run_cli("compare", id1, id2, "--json", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["agreement"] == 1.0 and result["n_paired"] == 9
    assert (result["mcnemar_b"], result["mcnemar_c"]) == (0, 0)
    text = run_cli("compare", id1, id2, "--db", str(db)).stdout
    assert "kappa" in text.lower()
    missing = run_cli("compare", id1, "00000000-0000-4000-8000-000000000000", "--db", str(db))
    assert missing.returncode == 3
