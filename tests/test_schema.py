"""Migrations: a blank database, the R-era schema and every older version all reach the
schema a fresh database has, and the migrations are frozen (they never read TABLES)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from asyncrunner.db import schema
from asyncrunner.db.schema import SCHEMA_VERSION, TABLES, connect, migrate

# The schema the earlier R version wrote (design documents): no checksum, no progress
# columns, no attempt tracking, and no unique index on results, so duplicates could pile
# up. Its source_narratives was UNIQUE(incident_id, narrative_type), which a changed file at
# the same path cannot satisfy; migration 5 rebuilds that table without it.
LEGACY_DDL = """
CREATE TABLE source_narratives (
  narrative_id INTEGER PRIMARY KEY, incident_id TEXT, narrative_type TEXT,
  narrative_text TEXT, manual_flag_ind INTEGER, manual_flag INTEGER,
  data_source TEXT, loaded_at TEXT, UNIQUE(incident_id, narrative_type));
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

# What R's own migration script (ensure_resume_columns) did to the schema above, for the
# R databases it ran on: dedupe, the unique index, then the resume columns.
LEGACY_RESUMABLE_DDL = LEGACY_DDL + """
CREATE UNIQUE INDEX IF NOT EXISTS uq_result_per_exp_narrative
  ON narrative_results(experiment_id, incident_id, narrative_type);
ALTER TABLE source_narratives ADD COLUMN data_checksum TEXT;
ALTER TABLE experiments ADD COLUMN n_narratives_completed INTEGER DEFAULT 0;
ALTER TABLE experiments ADD COLUMN last_progress_update TEXT;
ALTER TABLE experiments ADD COLUMN estimated_completion_time TEXT;
ALTER TABLE narrative_results ADD COLUMN attempt_count INTEGER DEFAULT 1;
ALTER TABLE narrative_results ADD COLUMN first_error_message TEXT;
ALTER TABLE narrative_results ADD COLUMN last_attempt_at TEXT;
ALTER TABLE narrative_results ADD COLUMN error_category TEXT;
"""

# What an R-era database still differs in after migrating (see LEGACY_DDL): nothing since
# migration 5 rebuilt source_narratives without R's UNIQUE(incident_id, narrative_type).
R_LEFTOVER_INDEXES: set[str] = set()

LEGACY_RESULTS = [("e1", "1", "LE", 0, "old"), ("e1", "1", "LE", 1, "newer"),
                  ("e1", "1", "CME", 0, "only"), ("e1", "2", "LE", 1, "x"),
                  ("e1", "2", "LE", 0, "newest")]


def build_legacy(path: Path, ddl: str = LEGACY_DDL, *, duplicates: bool = True) -> None:
    """An R-era database (user_version 0) with three narratives, one running experiment
    and, unless the R unique index forbids it, duplicate results."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(ddl)
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text) "
            "VALUES (?, ?, ?)", [("1", "LE", "a"), ("1", "CME", "b"), ("2", "LE", "c")])
        conn.execute("INSERT INTO experiments (experiment_id, status, n_narratives_total) "
                     "VALUES ('e1', 'running', 3)")
        rows = LEGACY_RESULTS if duplicates else LEGACY_RESULTS[1:4]
        conn.executemany(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, rationale, error_occurred) VALUES (?, ?, ?, ?, ?, 0)", rows)
        conn.commit()


def build_at_version(path: Path, version: int) -> None:
    """A database an interrupted upgrade left at `version` (1..SCHEMA_VERSION), holding
    data, duplicate results included while no unique index forbids them."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        schema.configure(conn)
        for number, step in enumerate(schema.MIGRATIONS[:version], start=1):
            conn.execute("BEGIN IMMEDIATE")
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text) "
            "VALUES (?, ?, ?)", [("1", "LE", "a"), ("2", "LE", "c")])
        conn.execute("INSERT INTO experiments (experiment_id, status) VALUES ('e1', 'done')")
        rows = LEGACY_RESULTS if version < 3 else LEGACY_RESULTS[1:4]
        conn.executemany(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, rationale, error_occurred) VALUES (?, ?, ?, ?, ?, 0)", rows)


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def master(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master"))


def table_info(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(r) for r in conn.execute(f"PRAGMA table_info({t})")] for t in TABLES}


def indexes(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    """Index name -> (table, SQL with whitespace normalised: R wrote its own line breaks)."""
    return {r[0]: (r[1], " ".join((r[2] or "").split())) for r in conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'")}


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with closing(connect(tmp_path / "fresh.db")) as conn:
        yield conn


def test_blank_database_is_the_documented_schema(fresh: sqlite3.Connection) -> None:
    assert fresh.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    for table, cols in TABLES.items():
        # Same columns in the same order with the same declared type: a column added to
        # TABLES without a migration that adds it fails here.
        got = [(r[1], r[2]) for r in fresh.execute(f"PRAGMA table_info({table})")]
        assert got == [(name, decl.split()[0]) for name, decl in cols.items()], table
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(fresh) == []  # idempotent


def test_migrations_do_not_read_the_current_schema_description(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column added to TABLES changes no migration: it needs a migration of its own."""
    monkeypatch.setitem(schema.EXPERIMENT_COLUMNS, "future_column", "TEXT")
    monkeypatch.setitem(schema.TABLES, "future_table", {"x": "TEXT"})
    build_legacy(tmp_path / "legacy.db")
    for path in (tmp_path / "new.db", tmp_path / "legacy.db"):
        with closing(connect(path)) as conn:
            assert "future_column" not in columns(conn, "experiments")
            assert not columns(conn, "future_table")


def test_legacy_database_migrates_keeping_newest_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    build_legacy(path)
    with closing(connect(path, migrate_schema=False)) as conn:
        applied = migrate(conn)
        assert len(applied) == SCHEMA_VERSION
        for table, cols in TABLES.items():
            assert set(cols) <= columns(conn, table), table
        kept = conn.execute(
            "SELECT incident_id, narrative_type, rationale, attempt_count "
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


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_every_older_version_upgrades_to_exactly_the_fresh_schema(
        tmp_path: Path, fresh: sqlite3.Connection, version: int) -> None:
    path = tmp_path / f"v{version}.db"
    build_at_version(path, version)
    with closing(connect(path, migrate_schema=False)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
        applied = migrate(conn)
        assert len(applied) == SCHEMA_VERSION - version
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert master(conn) == master(fresh)
        assert table_info(conn) == table_info(fresh)
        assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0] == 2


@pytest.mark.parametrize("ddl", [LEGACY_DDL, LEGACY_RESUMABLE_DDL],
                         ids=["r-era", "r-era-after-ensure-resume-columns"])
def test_r_era_database_upgrades_to_the_fresh_schema(
        tmp_path: Path, fresh: sqlite3.Connection, ddl: str) -> None:
    """Version 0. ALTER TABLE appends columns and cannot add NOT NULL to R's own, so the
    column order and R's NOT NULL-less declarations stay; every column, type, default of
    an added column, table and index is the fresh database's."""
    path = tmp_path / "r.db"
    build_legacy(path, ddl, duplicates=ddl is LEGACY_DDL)
    with closing(sqlite3.connect(path)) as before:
        r_columns = {t: columns(before, t) for t in TABLES}
    with closing(connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        got, want = table_info(conn), table_info(fresh)
        for table in TABLES:
            have = {r[1]: r for r in got[table]}
            expected = {r[1]: r for r in want[table]}
            assert set(have) == set(expected), table
            for name, (_, _, type_, notnull, default, pk) in expected.items():
                assert (have[name][2], have[name][5]) == (type_, pk), (table, name)
                if name not in r_columns[table]:  # added by migration 2
                    assert (have[name][3], have[name][4]) == (notnull, default), (table, name)
        tables = {r[1] for r in master(conn) if r[0] == "table"}
        assert tables == {r[1] for r in master(fresh) if r[0] == "table"}
        got_ix, want_ix = indexes(conn), indexes(fresh)
        assert set(got_ix) - set(want_ix) == R_LEFTOVER_INDEXES
        assert {k: v for k, v in got_ix.items() if k in want_ix} == want_ix
        assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0] == 3
        assert conn.execute(
            "SELECT COUNT(*) FROM narrative_results WHERE attempt_count = 1").fetchone()[0] == 3
        # rebuilt as a fresh database declares it (R had no NULL ids, so NOT NULL holds)
        assert got["source_narratives"] == want["source_narratives"]
        assert [tuple(r) for r in conn.execute(
            "SELECT narrative_id, incident_id FROM source_narratives ORDER BY 1")] == [
            (1, "1"), (2, "1"), (3, "2")]
        # R left the progress counters at 0; they are backfilled from the results
        assert conn.execute("SELECT n_narratives_completed, n_narratives_processed "
                            "FROM experiments").fetchone()[:] == (3, 3)


def test_cli_migrate_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from asyncrunner.cli import main

    path = tmp_path / "legacy.db"
    build_legacy(path)
    assert main(["--db", str(path), "migrate"]) == 0
    assert "unique_results" in capsys.readouterr().out
    assert main(["--db", str(path), "migrate"]) == 0
    assert "already up to date" in capsys.readouterr().out


def test_r_era_source_with_null_ids_keeps_every_row(tmp_path: Path) -> None:
    """R did not declare NOT NULL: a row without an id survives the rebuild (the column
    stays nullable), and a second load of the same narratives is now possible."""
    path = tmp_path / "r.db"
    build_legacy(path)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO source_narratives (incident_id, narrative_type, "
                     "narrative_text) VALUES (NULL, 'LE', 'orphan')")
        conn.execute("CREATE INDEX r_own_index ON source_narratives(data_source)")
        conn.commit()
    with closing(connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone()[0] == 4
        assert "r_own_index" in indexes(conn) and "ix_source_checksum_keys" in indexes(conn)
        conn.execute("INSERT INTO source_narratives (incident_id, narrative_type, "
                     "narrative_text, data_checksum) VALUES ('1', 'LE', 'a', 'new')")
        assert conn.execute("SELECT COUNT(*) FROM source_narratives WHERE incident_id = '1' "
                            "AND narrative_type = 'LE'").fetchone()[0] == 2


def test_r_era_unique_constraint_made_run_crash_before_migration_5(tmp_path: Path) -> None:
    """The failure migration 5 removes: at version 4, loading a second version of a file
    into an R database was an IntegrityError."""
    path = tmp_path / "r.db"
    build_legacy(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for number, step in enumerate(schema.MIGRATIONS[:4], start=1):
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO source_narratives (incident_id, narrative_type, "
                         "data_checksum) VALUES ('1', 'LE', 'new')")
        migrate(conn)
        conn.execute("INSERT INTO source_narratives (incident_id, narrative_type, "
                     "data_checksum) VALUES ('1', 'LE', 'new')")
