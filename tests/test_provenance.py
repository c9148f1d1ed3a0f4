"""Provenance (issue #10, item 7): what produced an experiment's answers is stored and shown,
`export --with-text` is explicit, and a new run backs up a database that holds experiments."""

from __future__ import annotations

import csv
import io
import json
import platform
from contextlib import closing
from pathlib import Path

from conftest import FIXTURE_ROWS, run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row

from asyncrunner import __version__
from asyncrunner.db.schema import connect
from asyncrunner.llm.parsing import PARSER_VERSION
from asyncrunner.plan import RunRequest
from asyncrunner.results.report import write_report
from asyncrunner.session import execute

SYSTEM = "Classify <carefully> & answer in JSON."


def run(tmp_path: Path, db: Path) -> str:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1",
                       model={"max_tokens": 300, "response_format": "json_object",
                              "extra_body": {"top_p": 0.8}})
    text = cfg.read_text() + f"prompt: {{system_prompt: {json.dumps(SYSTEM)}, version: p7}}\n"
    cfg.write_text(text)
    return execute(RunRequest(db_path=db, config_path=str(cfg), env={}), io.StringIO(),
                   transport=FakeLLM().transport()).experiment_id


def test_the_experiment_row_and_the_report_say_what_produced_the_answers(
        tmp_path: Path, console: io.StringIO) -> None:
    db = tmp_path / "runs.db"
    eid = run(tmp_path, db)
    row = experiment_row(db, eid)
    assert (row["asyncrunner_version"], row["parser_version"], row["python_version"]) == (
        __version__, PARSER_VERSION, platform.python_version())
    assert row["platform"] == platform.platform()
    with closing(connect(db)) as conn:
        page = write_report(conn, eid, tmp_path / "r.html").read_text()
    assert '<section id="provenance">' in page
    for expected in (f"<td>asyncrunner version</td><td>{__version__}</td>",
                     f"<td>Parser version</td><td>{PARSER_VERSION}</td>",
                     "<td>Seed</td><td>1024</td>", "<td>max_tokens</td><td>300</td>",
                     "<td>Response format</td><td>json_object (setting json_object)</td>",
                     "<td>Extra request fields</td><td>{&quot;top_p&quot;: 0.8}</td>",
                     "<td>Prompt version</td><td>p7</td>",
                     "<pre>Classify &lt;carefully&gt; &amp; answer in JSON.</pre>",
                     "<pre>Narrative:\n&lt;&lt;TEXT&gt;&gt;</pre>"):
        assert expected in page, expected
    assert "ASYNCRUNNER_TEST_KEY" not in page
    for row_ in FIXTURE_ROWS:
        assert row_[1] not in page


def test_export_with_text_is_explicit(tmp_path: Path, console: io.StringIO) -> None:
    db = tmp_path / "runs.db"
    eid = run(tmp_path, db)
    plain, with_text = tmp_path / "plain.csv", tmp_path / "text.csv"
    assert run_cli("export", eid, "--out", str(plain), "--db", str(db)).returncode == 0
    proc = run_cli("export", eid, "--with-text", "--out", str(with_text), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    plain_rows = list(csv.DictReader(io.StringIO(plain.read_text())))
    text_rows = list(csv.DictReader(io.StringIO(with_text.read_text())))
    assert "narrative_text" not in plain_rows[0]
    assert len(text_rows) == len(plain_rows) == 9
    texts = {(r["incident_id"], r["narrative_type"]): r["narrative_text"] for r in text_rows}
    assert texts[("00101", "LE")] == FIXTURE_ROWS[0][1]
    as_json = tmp_path / "text.json"
    assert run_cli("export", eid, "--with-text", "--format", "json", "--out", str(as_json),
                   "--db", str(db)).returncode == 0
    assert all(r["narrative_text"] for r in json.loads(as_json.read_text()))


def test_a_new_run_backs_up_a_database_that_holds_experiments(
        tmp_path: Path, console: io.StringIO) -> None:
    db = tmp_path / "runs.db"
    run(tmp_path, db)
    assert not list(tmp_path.glob("runs.db.pre_run_backup_*"))   # nothing to protect yet
    run(tmp_path, db)
    backups = list(tmp_path.glob("runs.db.pre_run_backup_*"))
    assert len(backups) == 1
    with closing(connect(backups[0], migrate_schema=False)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 1
    assert "backup written" in console.getvalue()
