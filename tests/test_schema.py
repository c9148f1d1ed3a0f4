"""Migrations: a blank database and the R-era schema both reach the current version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from asyncrunner.schema import SCHEMA_VERSION, TABLES, connect, migrate

# The schema the earlier R version wrote (design documents): no checksum, no progress
# columns, no attempt tracking, and no unique index, so duplicates could pile up.
LEGACY_DDL = """
CREATE TABLE source_narratives (
  narrative_id INTEGER PRIMARY KEY, incident_id TEXT, narrative_type TEXT,
  narrative_text TEXT, manual_flag_ind INTEGER, manual_flag INTEGER,
  data_source TEXT, loaded_at TEXT);
CREATE TABLE experiments (
  experiment_id TEXT PRIMARY KEY, experiment_name TEXT, status TEXT, model_name TEXT,
  model_provider TEXT, temperature REAL, api_url TEXT, system_prompt TEXT,
  user_template TEXT, prompt_version TEXT, run_seed INTEGER, data_file TEXT,
  n_narratives_total INTEGER, n_narratives_processed INTEGER, start_time TEXT,
  end_time TEXT, n_tp INTEGER, n_fp INTEGER, n_tn INTEGER, n_fn INTEGER,
  precision REAL, recall REAL, f1 REAL, accuracy REAL);
CREATE TABLE narrative_results (
  result_id INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id TEXT, incident_id TEXT,
  narrative_type TEXT, detected INTEGER, confidence REAL, indicators TEXT,
  rationale TEXT, raw_response TEXT, response_sec REAL, prompt_tokens INTEGER,
  completion_tokens INTEGER, error_occurred INTEGER, error_message TEXT,
  processed_at TEXT, manual_flag_ind INTEGER, manual_flag INTEGER);
"""


def build_legacy(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_DDL)
    conn.executemany(
        "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text) "
        "VALUES (?, ?, ?)", [("1", "LE", "a"), ("1", "CME", "b"), ("2", "LE", "c")])
    conn.execute("INSERT INTO experiments (experiment_id, status, n_narratives_total) "
                 "VALUES ('e1', 'running', 3)")
    rows = [("e1", "1", "LE", 0, "old"), ("e1", "1", "LE", 1, "newer"),
            ("e1", "1", "CME", 0, "only"), ("e1", "2", "LE", 1, "x"),
            ("e1", "2", "LE", 0, "newest")]
    conn.executemany(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
        "detected, rationale, error_occurred) VALUES (?, ?, ?, ?, ?, 0)", rows)
    conn.commit()
    conn.close()


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def test_blank_database_gets_every_column_and_version(tmp_path: Path) -> None:
    conn = connect(tmp_path / "new.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    for table, cols in TABLES.items():
        assert set(cols) <= columns(conn, table)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(conn) == []  # idempotent


def test_legacy_database_migrates_keeping_newest_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    build_legacy(path)
    conn = connect(path, migrate_schema=False)
    applied = migrate(conn)
    assert len(applied) == SCHEMA_VERSION
    for table, cols in TABLES.items():
        assert set(cols) <= columns(conn, table), table
    kept = conn.execute("SELECT incident_id, narrative_type, rationale, attempt_count "
                        "FROM narrative_results ORDER BY incident_id, narrative_type").fetchall()
    assert [tuple(r) for r in kept] == [("1", "CME", "only", 1), ("1", "LE", "newer", 1),
                                        ("2", "LE", "newest", 1)]
    # nothing else lost
    assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0] == 3
    assert conn.execute("SELECT status FROM experiments").fetchone()[0] == "running"
    # and the unique index now holds
    conn.execute("INSERT OR IGNORE INTO narrative_results (experiment_id, incident_id, "
                 "narrative_type, error_occurred) VALUES ('e1', '1', 'LE', 0)")
    assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 3


def test_each_migration_step_from_every_older_version(tmp_path: Path) -> None:
    """Stop a fresh database at each version, then finish: same result as all at once."""
    from asyncrunner import schema

    for stop_at in range(SCHEMA_VERSION + 1):
        conn = sqlite3.connect(tmp_path / f"v{stop_at}.db", isolation_level=None)
        for number, step in enumerate(schema.MIGRATIONS[:stop_at], start=1):
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
        migrate(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for table, cols in TABLES.items():
            assert set(cols) <= columns(conn, table)
        conn.close()


def test_cli_migrate_reports(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from asyncrunner.cli import main

    path = tmp_path / "legacy.db"
    build_legacy(path)
    assert main(["--db", str(path), "migrate"]) == 0
    assert "unique_results" in capsys.readouterr().out
    assert main(["--db", str(path), "migrate"]) == 0
    assert "already up to date" in capsys.readouterr().out
