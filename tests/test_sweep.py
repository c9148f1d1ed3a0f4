"""Sweeps: the matrix and its cells, a study run in process against the simulator, the same
grid refused a second time, a bad cell refused before anything is written, and a sweep
killed with SIGKILL mid-study then finished by `sweep --resume` in real processes."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, write_config, write_fixture_csv
from test_runner import cases

from asyncrunner.errors import (
    ConfigError,
    EndpointCannotServe,
    RefusedError,
    TooManyErrors,
    UsageError,
)
from asyncrunner.sim import FaultConfig, MockServer
from asyncrunner.study import matrix, spec
from asyncrunner.study.sweep import SweepRequest, run_sweep

N_CASES = 10
TOTAL = 2 * N_CASES
SEED = 1024
TWO_MODELS = {"model.name": ["mock-a", "mock-b"], "model.temperature": [0.7]}


def base_config(tmp_path: Path, url: str = "http://unused.invalid/v1", **model: Any) -> Path:
    data = tmp_path / "data.csv"
    if not data.exists():
        write_fixture_csv(data, cases(N_CASES))
    provider = {"provider": "mock"} if url.endswith(".invalid/v1") else {}
    return write_config(tmp_path, data, url, name="base.yaml",
                        model={"max_tokens": 256} | provider | model,
                        batch_size=4, commit_interval_s=0.05, seed=SEED, max_attempts=1)


def write_sweep(tmp_path: Path, grid: dict[str, list[Any]] | None = None, *,
                repeats: int = 2, name: str = "sweep.yaml", base: Any = "base.yaml",
                **extra: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": base, "name": "models x temperature",
                                    "matrix": grid if grid is not None else TWO_MODELS,
                                    "repeats": repeats} | extra, sort_keys=False))
    return path


def sweep(db: Path, sweep_path: Path | None = None, *, resume: str | None = None,
          workers: int | None = None) -> tuple[int, str]:
    out = io.StringIO()
    code = run_sweep(SweepRequest(db_path=db, sweep_path=str(sweep_path) if sweep_path else None,
                                  resume_study_id=resume, workers=workers, env={}), out)
    return code, out.getvalue()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return [tuple(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def study_spec(db: Path, study_id: str) -> dict[str, Any]:
    return dict(json.loads(query(db, "SELECT spec_json FROM studies WHERE study_id = ?",
                                 study_id)[0][0]))


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --------------------------------------------------------------------------- the matrix


def resolved(grid: dict[str, list[Any]], repeats: int = 1,
             base: dict[str, Any] | None = None) -> matrix.Sweep:
    return matrix.Sweep(base=matrix.resolve_base(base or {}, {}),
                        matrix=tuple((k, tuple(v)) for k, v in grid.items()),
                        cells=matrix.expand(grid), repeats=repeats)


def test_cells_are_the_product_of_the_values_first_key_slowest() -> None:
    cells = matrix.expand({"model.name": ["a", "b"], "model.temperature": [0.0, 0.7],
                           "run.max_narratives": [None]})
    assert [c.label for c in cells] == [
        "model.name=a, model.temperature=0.0, run.max_narratives=null",
        "model.name=a, model.temperature=0.7, run.max_narratives=null",
        "model.name=b, model.temperature=0.0, run.max_narratives=null",
        "model.name=b, model.temperature=0.7, run.max_narratives=null"]
    assert cells[1].overrides == (("model.name", "a"), ("model.temperature", 0.7),
                                  ("run.max_narratives", None))
    assert [c.label for c in matrix.expand({})] == ["(base)"]


def test_mappings_merge_into_what_is_there_and_scalars_replace() -> None:
    base = {"prompt": {"version": "v1", "system_prompt": "Be brief."},
            "model": {"extra_body": {"top_k": 5, "opts": {"a": 1}}}}
    grid = {"prompt": [{"version": "v2"}, {"version": "v3", "system_prompt": "Say more.\n"}],
            "model.extra_body": [{"top_p": 0.9, "opts": {"b": 2}}],
            "model.extra_body.top_k": [7], "model.name": ["other"]}
    s = resolved(grid, base=base)
    first, second = (matrix.cell_config(s, c, 1) for c in s.cells)
    assert (first.prompt.version, first.prompt.system_prompt) == ("v2", "Be brief.")
    assert (second.prompt.version, second.prompt.system_prompt) == ("v3", "Say more.\n")
    assert first.prompt.user_template == second.prompt.user_template  # the base's default
    assert first.model.extra_body == {"top_k": 7, "top_p": 0.9, "opts": {"a": 1, "b": 2}}
    assert first.model.name == "other"
    assert s.cells[1].label.startswith("prompt.version=v3, prompt.system_prompt=Say more.,")
    assert base["prompt"]["version"] == "v1"   # the base itself is never changed


@pytest.mark.parametrize("path", ["model.nmae", "modle.name", "model.name.first",
                                  "model..name", "run.seed.x"])
def test_a_path_that_is_no_config_key_is_refused_naming_it(path: str) -> None:
    with pytest.raises(ConfigError, match=f"'{path}' is not a config key") as err:
        matrix.expand({path: [1]})
    assert "\n" not in str(err.value)


def test_repeat_r_runs_with_seed_plus_r_minus_one_and_its_own_name() -> None:
    s = resolved({"model.name": ["a"], "run.seed": [7, 100]}, repeats=3,
                 base={"experiment": {"name": "grid"}})
    seeds = [[matrix.cell_config(s, c, r).run.seed for r in (1, 2, 3)] for c in s.cells]
    assert seeds == [[7, 8, 9], [100, 101, 102]]
    names = {matrix.cell_config(s, c, r).experiment.name for c in s.cells for r in (1, 2, 3)}
    assert len(names) == 6 and "grid [model.name=a, run.seed=7] repeat 2" in names
    assert matrix.cell_config(s, s.cells[0], 1, workers=9).run.workers == 9


@pytest.mark.parametrize(("text", "message"), [
    ("matrix: {model.name: [a]}", "'base' must be a run config file"),
    ("base: missing.yaml", "sweep key 'base': config file not found"),
    ("base: {}\nmatrix: {model.name: a}", "must be a non-empty list"),
    ("base: {}\nmatrix: {model.name: []}", "must be a non-empty list"),
    ("base: {}\nmatrix: {model.name: [a, b, a]}", "lists the value a twice"),
    ("base: {}\nmatrix: {prompt: [v2]}", "names a config section"),
    ("base: {}\nrepeats: 0", "'repeats' must be a whole number"),
    ("base: {}\nrepeats: true", "'repeats' must be a whole number"),
    ("base: {}\nmodel: {name: a}", "unknown sweep key 'model'"),
    ("base: {model: {temperature: 9}}", "sweep base (inline): config key 'model.temperature'"),
    ("base: {run: {seed: null}}\nrepeats: 2", "run.seed is empty"),
    ("base: {}\nmatrix: {run.workers: [0]}", "sweep cell run.workers=0: config key"),
])
def test_a_bad_sweep_file_is_one_line_naming_what_is_wrong(tmp_path: Path, text: str,
                                                           message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        s, _ = spec.read_sweep(path, {})
        matrix.configs(s)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_checksum_is_the_grid_not_its_ids_name_or_session_settings(tmp_path: Path) -> None:
    first = resolved(TWO_MODELS, repeats=2)
    again = spec.new_study(resolved(TWO_MODELS, repeats=2))
    assert matrix.checksum(first) == matrix.checksum(again.sweep)
    elsewhere = resolved(TWO_MODELS, repeats=2,
                         base={"model": {"api_url": "http://gpu:8000/v1"}, "run": {"workers": 32}})
    assert matrix.checksum(elsewhere) == matrix.checksum(first)
    assert matrix.checksum(resolved(TWO_MODELS, repeats=3)) != matrix.checksum(first)
    hotter = resolved({"model.name": ["mock-a", "mock-b"], "model.temperature": [0.8]}, 2)
    assert matrix.checksum(hotter) != matrix.checksum(first)
    # and the stored spec gives back the same grid and ids
    back = spec.from_json(again.study_id, json.loads(json.dumps(again.to_json())))
    assert back == again


# --------------------------------------------------------------------------- a study


def test_a_sweep_runs_every_cell_as_a_tagged_experiment(tmp_path: Path,
                                                        console: io.StringIO) -> None:
    base_config(tmp_path)
    path = write_sweep(tmp_path)
    db = tmp_path / "study.db"
    code, out = sweep(db, path, workers=2)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("study_id: ")
    study_id = lines[0].split(": ", 1)[1]
    assert "experiment_id: " not in out          # the sweep says which experiment runs
    assert f"asyncrunner compare --study {study_id}" in lines[-1]
    found = query(db, "SELECT experiment_id, status, model_name, temperature, run_seed, "
                      "study_cell, study_repeat, n_narratives_completed, config_json "
                      "FROM experiments WHERE study_id = ? ORDER BY rowid", study_id)
    assert [(r[1], r[2], r[3], r[4], r[6], r[7]) for r in found] == [
        ("completed", "mock-a", 0.7, SEED, 1, TOTAL),
        ("completed", "mock-a", 0.7, SEED + 1, 2, TOTAL),
        ("completed", "mock-b", 0.7, SEED, 1, TOTAL),
        ("completed", "mock-b", 0.7, SEED + 1, 2, TOTAL)]
    assert found[0][5] == "model.name=mock-a, model.temperature=0.7"
    assert {json.loads(r[8])["run"]["workers"] for r in found} == {2}   # --workers
    stored = study_spec(db, study_id)
    assert [e["experiment_id"] for c in stored["cells"] for e in c["experiments"]] == \
        [r[0] for r in found]
    assert stored["base"]["model"]["provider"] == "mock" and stored["repeats"] == 2
    for eid, *_ in found:
        assert query(db, "SELECT COUNT(*), COUNT(DISTINCT incident_id || narrative_type) "
                         "FROM narrative_results WHERE experiment_id = ?", eid) == [(TOTAL,
                                                                                     TOTAL)]

    # The same grid again (even with other session settings) is not a second study.
    with pytest.raises(RefusedError, match=f"already started as study {study_id}.*"
                                           f"sweep --resume {study_id}"):
        sweep(db, path, workers=3)
    assert len(query(db, "SELECT * FROM studies")) == 1
    # Resuming a finished study says so and changes nothing.
    code, out = sweep(db, resume=study_id)
    assert code == 0 and "every experiment is completed; nothing to do" in out
    assert out.startswith(f"study_id: {study_id}\n")
    assert len(query(db, "SELECT * FROM experiments")) == 4


def test_a_study_into_a_database_with_experiments_is_backed_up_once(
        tmp_path: Path, console: io.StringIO) -> None:
    """One copy before the study writes, not one per cell (a study of many cells over a
    large database would otherwise copy it again and again)."""
    base_config(tmp_path)
    db = tmp_path / "study.db"
    assert sweep(db, write_sweep(tmp_path, repeats=1))[0] == 0      # now holds experiments
    assert list(tmp_path.glob("study.db.pre_run_backup_*")) == []
    code, out = sweep(db, write_sweep(tmp_path, repeats=2, name="again.yaml"))
    assert code == 0, out
    assert len(list(tmp_path.glob("study.db.pre_run_backup_*"))) == 1
    assert len(query(db, "SELECT * FROM experiments")) == 2 + 4


def test_a_bad_cell_refuses_the_whole_sweep_with_nothing_written(tmp_path: Path) -> None:
    base_config(tmp_path)
    path = write_sweep(tmp_path, {"model.temperature": [0.0, 5]}, repeats=1)
    db = tmp_path / "never.db"
    res = run_cli("--db", str(db), "sweep", str(path), env=cli_env())
    assert res.returncode == 2 and res.stdout == ""
    line = one_line_error(res.stderr)
    assert "sweep cell model.temperature=5: config key 'model.temperature'" in line
    assert not db.exists()


def test_an_unknown_study_is_refused(tmp_path: Path) -> None:
    base_config(tmp_path)
    db = tmp_path / "study.db"
    unknown = str(uuid.uuid4())
    with pytest.raises(RefusedError, match="does not exist"):
        sweep(db, resume=unknown)
    with pytest.raises(UsageError, match="not both"):
        sweep(db, tmp_path / "sweep.yaml", resume=unknown)
    sweep_db = tmp_path / "other.db"
    sqlite3.connect(sweep_db).close()
    res = run_cli("--db", str(sweep_db), "sweep", "--resume", unknown)
    assert res.returncode == 3
    assert f"no study {unknown}" in one_line_error(res.stderr)


def test_an_endpoint_that_cannot_serve_stops_the_study(tmp_path: Path, server_factory: Any,
                                                       console: io.StringIO) -> None:
    server: MockServer = server_factory(fail_status=404)
    base_config(tmp_path, server.url)
    db = tmp_path / "study.db"
    with pytest.raises(EndpointCannotServe, match=r"stopped at experiment 1/4.*sweep --resume"):
        sweep(db, write_sweep(tmp_path))
    assert query(db, "SELECT status FROM experiments") == [("interrupted",)]


def test_a_cell_with_too_many_errors_is_done_and_the_sweep_goes_on(
        tmp_path: Path, server_factory: Any, console: io.StringIO) -> None:
    server: MockServer = server_factory(faults=FaultConfig(error_rate=0.5), seed=3)
    data = write_fixture_csv(tmp_path / "data.csv", cases(N_CASES))
    write_config(tmp_path, data, server.url, name="base.yaml", max_attempts=1,
                 max_error_share=0.05, breaker_window=1000, batch_size=4)
    db = tmp_path / "study.db"
    with pytest.raises(TooManyErrors, match="2 of 2 experiments"):
        sweep(db, write_sweep(tmp_path, {"model.name": ["mock-a", "mock-b"]}, repeats=1))
    assert query(db, "SELECT status FROM experiments") == [("completed",)] * 2


# --------------------------------------------------------------------------- kill -9


def results_of(db: Path, eid: str) -> list[tuple[Any, ...]]:
    return query(db, "SELECT result_id, incident_id, narrative_type, raw_response, "
                     "processed_at FROM narrative_results WHERE experiment_id = ? "
                     "ORDER BY result_id", eid)


def wait_for_second_cell(db: Path, timeout: float = 30) -> None:
    """Until the first experiment is completed and the second has stored a few results."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = query(db, "SELECT status, n_narratives_completed FROM experiments "
                             "ORDER BY rowid") if db.exists() else []
        except sqlite3.OperationalError:
            rows = []
        if len(rows) >= 2 and rows[0][0] == "completed" and (rows[1][1] or 0) >= 2:
            assert rows[1][0] == "running"
            return
        time.sleep(0.02)
    raise AssertionError("the sweep never reached its second experiment")


def test_a_sweep_killed_mid_study_is_finished_by_resume(tmp_path: Path,
                                                        server_factory: Any) -> None:
    server: MockServer = server_factory(latency_ms=100)
    base_config(tmp_path, server.url)
    path = write_sweep(tmp_path, repeats=2)
    db = tmp_path / "study.db"
    args = [sys.executable, "-m", "asyncrunner", "--db", str(db), "sweep", str(path),
            "--workers", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("study_id: "), first
        study_id = first.split(": ", 1)[1].strip()
        wait_for_second_cell(db)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ids = [e["experiment_id"] for c in study_spec(db, study_id)["cells"]
           for e in c["experiments"]]
    first_rows = results_of(db, ids[0])
    assert len(first_rows) == TOTAL

    res = run_cli("--db", str(db), "sweep", "--resume", study_id)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"study_id: {study_id}\n")
    assert "completed earlier, skipped" in res.stdout and "resume (running)" in res.stdout
    assert "Traceback" not in res.stderr
    assert "stale lock of study" in res.stderr and "stale lock from PID" in res.stderr
    assert query(db, "SELECT experiment_id, status, study_repeat FROM experiments "
                     "WHERE study_id = ? ORDER BY rowid", study_id) == [
        (ids[0], "completed", 1), (ids[1], "completed", 2), (ids[2], "completed", 1),
        (ids[3], "completed", 2)]
    for eid in ids:
        assert query(db, "SELECT COUNT(*), COUNT(DISTINCT incident_id || '/' || "
                         "narrative_type) FROM narrative_results WHERE experiment_id = ?",
                     eid) == [(TOTAL, TOTAL)]
    assert results_of(db, ids[0]) == first_rows          # the finished cell was not redone
    sessions = dict(query(db, "SELECT experiment_id, COUNT(*) FROM sessions GROUP BY 1"))
    assert [sessions[e] for e in ids] == [1, 2, 1, 1]

    done = run_cli("--db", str(db), "sweep", env=cli_env(RESUME="1", STUDY_ID=study_id))
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout
    refused = run_cli("--db", str(db), "sweep", str(path))
    assert refused.returncode == 3
    assert f"asyncrunner sweep --resume {study_id}" in one_line_error(refused.stderr)


def test_sigterm_stops_the_study_at_once_and_says_how_to_go_on(tmp_path: Path,
                                                                server_factory: Any) -> None:
    server: MockServer = server_factory(latency_ms=100)
    base_config(tmp_path, server.url)
    db = tmp_path / "study.db"
    proc = subprocess.Popen([sys.executable, "-m", "asyncrunner", "--db", str(db), "sweep",
                             str(write_sweep(tmp_path)), "--workers", "2"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_second_cell(db)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    study_id = out.splitlines()[0].split(": ", 1)[1]
    assert f"stopped at experiment 2/4; finished experiments and every stored result are " \
           f"kept; continue with `asyncrunner sweep --resume {study_id}`" in out
    assert "Traceback" not in err
    assert [r[0] for r in query(db, "SELECT status FROM experiments ORDER BY rowid")] == \
        ["completed", "interrupted"]
    assert not list(tmp_path.glob(".resume_lock_*"))     # the study's lock and the cell's


def test_the_stored_study_holds_no_credential_of_its_urls(tmp_path: Path,
                                                          console: io.StringIO) -> None:
    """studies.spec_json keeps endpoint URLs as every stored configuration does: without
    user:password or query (a resume takes credentials from the environment)."""
    base_config(tmp_path, api_url="http://user:pw-SECRET@127.0.0.1:9/v1?key=QSECRET",
                api_key_env=None, provider="mock")
    grid = {"model.endpoints": [[{"api_url": "http://u:pw-SECRET2@127.0.0.1:9/v1?k=Q2"}]]}
    db = tmp_path / "study.db"
    code, out = sweep(db, write_sweep(tmp_path, grid, repeats=1))
    study_id = out.splitlines()[0].split(": ", 1)[1]
    stored = query(db, "SELECT spec_json FROM studies")[0][0]
    assert "SECRET" not in stored and "QSECRET" not in stored and "Q2" not in stored
    assert "http://127.0.0.1:9/v1/chat/completions" in stored
    assert study_spec(db, study_id)["base"]["model"]["api_url"] == (
        "http://127.0.0.1:9/v1/chat/completions")
    assert code == 0, out
