"""The database schema: frozen migrations, pragmas, and the ways to open a database.

`PRAGMA user_version` records how many migrations a database has had. Each migration is a
named function holding its own literal SQL as of the day it was written, so "migration 2"
means the same thing forever; it runs in the same transaction as the bump of
`user_version`, so a crash leaves either the old or the new version, never half of one.
A new column or index is a new migration appended to `MIGRATIONS` (and a line in `TABLES`,
which describes the current schema for tests and readers; no migration reads it).

Databases written by the earlier R version have the three contract tables but
`user_version = 0`; the migrations bring them forward without losing a row (except
duplicate results, which the unique index cannot admit: the newest of each set is kept).
Version 5 rebuilds R's source_narratives without its UNIQUE(incident_id, narrative_type);
version 6 adds what issue #10 records (sessions, config and metrics history, dropped rows,
content digests, provenance) and backfills R's progress counters; version 7 (issue #15) the
probe's response format, each answer's finish reason, source and token totals over its
attempts, and rewrites stored indicators as JSON arrays; version 10 remembers data files'
checksums by file identity (db/checksums.py). Before migrating a
database that holds data, the writable opens take a backup (`backup_before_migrating`).

Four ways in: `connect` (create if missing, migrate: `run`), `connect_existing` (an
existing asyncrunner database, migrated: `cancel`, `resume --latest`), `migrate_existing`
(`asyncrunner migrate`) and `connect_readonly` (never creates, migrates or writes:
`status`, `export`, `report`, `compare`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import aiosqlite
import anyio

from asyncrunner.errors import RunFailed, UsageError

BUSY_TIMEOUT_MS = 30_000

# The tables of the contract; a database without them is not one of ours.
CONTRACT_TABLES = ("source_narratives", "experiments", "narrative_results")

# ---------------------------------------------------------------------------------------
# The current schema, for tests and documentation. Migrations never read it: a column
# added here needs a migration that adds it too (tests/test_schema.py checks they agree).

SOURCE_COLUMNS: dict[str, str] = {
    "narrative_id": "INTEGER PRIMARY KEY",
    "incident_id": "TEXT NOT NULL",
    "narrative_type": "TEXT NOT NULL",
    "narrative_text": "TEXT",
    "manual_flag_ind": "INTEGER",
    "manual_flag": "INTEGER",
    "data_source": "TEXT",
    "data_checksum": "TEXT",
    "loaded_at": "TEXT",
}

EXPERIMENT_COLUMNS: dict[str, str] = {
    "experiment_id": "TEXT PRIMARY KEY",
    "experiment_name": "TEXT",
    "status": "TEXT",
    "model_name": "TEXT",
    "model_provider": "TEXT",
    "temperature": "REAL",
    "api_url": "TEXT",
    "system_prompt": "TEXT",
    "user_template": "TEXT",
    "prompt_version": "TEXT",
    "run_seed": "INTEGER",
    "data_file": "TEXT",
    "data_checksum": "TEXT",
    "max_narratives": "INTEGER",
    "n_narratives_total": "INTEGER",
    "n_narratives_processed": "INTEGER DEFAULT 0",
    "n_narratives_completed": "INTEGER DEFAULT 0",
    "last_progress_update": "TEXT",
    "estimated_completion_time": "TEXT",
    "start_time": "TEXT",
    "end_time": "TEXT",
    "log_dir": "TEXT",
    "n_tp": "INTEGER",
    "n_fp": "INTEGER",
    "n_tn": "INTEGER",
    "n_fn": "INTEGER",
    "precision": "REAL",
    "recall": "REAL",
    "f1": "REAL",
    "accuracy": "REAL",
    "metrics_json": "TEXT",
    "config_json": "TEXT",
    "failure_reason": "TEXT",
    # version 6: provenance
    "asyncrunner_version": "TEXT",
    "parser_version": "TEXT",
    "python_version": "TEXT",
    "platform": "TEXT",
    # version 7: the structured-output mode the probe chose (issue #15)
    "response_format_used": "TEXT",
    # version 8: a sweep's cell (see studies) and a sample's definition
    "study_id": "TEXT",
    "study_cell": "TEXT",
    "study_repeat": "INTEGER",
    "sample_json": "TEXT",
}

RESULT_COLUMNS: dict[str, str] = {
    "result_id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "experiment_id": "TEXT NOT NULL",
    "incident_id": "TEXT NOT NULL",
    "narrative_type": "TEXT NOT NULL",
    "detected": "INTEGER",
    "confidence": "REAL",
    "indicators": "TEXT",
    "rationale": "TEXT",
    "raw_response": "TEXT",
    "response_sec": "REAL",
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "error_occurred": "INTEGER NOT NULL DEFAULT 0",
    "error_message": "TEXT",
    "error_category": "TEXT",
    "attempt_count": "INTEGER DEFAULT 1",
    "first_error_message": "TEXT",
    "last_attempt_at": "TEXT",
    "processed_at": "TEXT",
    "manual_flag_ind": "INTEGER",
    "manual_flag": "INTEGER",
    # version 7: how the answer was obtained, and what all its attempts cost (issue #15)
    "finish_reason": "TEXT",
    "answer_source": "TEXT",
    "prompt_tokens_total": "INTEGER",
    "completion_tokens_total": "INTEGER",
    # version 9: the endpoint of a pool that answered (its redacted URL)
    "endpoint": "TEXT",
}

INGEST_COLUMNS: dict[str, str] = {
    "data_checksum": "TEXT NOT NULL",
    "mapping_json": "TEXT NOT NULL",
    "data_source": "TEXT",
    "n_rows": "INTEGER",
    "n_narratives": "INTEGER",
    "n_blank": "INTEGER",
    "n_duplicates": "INTEGER",
    "loaded_at": "TEXT",
    # version 6
    "n_placeholder": "INTEGER",
    "n_no_id": "INTEGER",
    "rows_digest": "TEXT",
    "content_digest": "TEXT",
    "data_path": "TEXT",
    "origin": "TEXT",
}

# Version 6: one row per narrative slot the ingest did not load (never its text).
INGEST_DROP_COLUMNS: dict[str, str] = {
    "data_checksum": "TEXT NOT NULL",
    "row_number": "INTEGER",
    "incident_id": "TEXT",
    "narrative_type": "TEXT",
    "reason": "TEXT NOT NULL",
    "manual_flag_ind": "INTEGER",
    "manual_flag": "INTEGER",
    "kept_row_number": "INTEGER",
    "has_text": "INTEGER",
    "label_conflict": "INTEGER",
    "text_differs": "INTEGER",
}

# Version 6: one row per session (a new run, a resume, a retry of error rows).
SESSION_COLUMNS: dict[str, str] = {
    "session_id": "TEXT PRIMARY KEY",
    "experiment_id": "TEXT NOT NULL",
    "intent": "TEXT NOT NULL",
    "pid": "INTEGER",
    "host": "TEXT",
    "started_at": "TEXT NOT NULL",
    "ended_at": "TEXT",
    "ended_as": "TEXT",
    "end_reason": "TEXT",
    "target": "INTEGER",
    "n_done": "INTEGER",
    "n_errors": "INTEGER",
    "retry_categories": "TEXT",
    "settings_hash": "TEXT",
    "settings_json": "TEXT",
    "settings_diff": "TEXT",
    "allowed_drift": "TEXT",
    "asyncrunner_version": "TEXT",
    "parser_version": "TEXT",
    # version 9: per endpoint of a pool, as of the session's last commit
    "endpoints_json": "TEXT",
}

# Version 6: every change of an experiment's stored configuration after it started.
CONFIG_HISTORY_COLUMNS: dict[str, str] = {
    "history_id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "experiment_id": "TEXT NOT NULL",
    "session_id": "TEXT",
    "changed_at": "TEXT NOT NULL",
    "key": "TEXT NOT NULL",
    "old_value": "TEXT",
    "new_value": "TEXT",
    "reason": "TEXT NOT NULL",
}

# Version 6: the metrics a completed experiment had before a retry session replaced them.
METRICS_HISTORY_COLUMNS: dict[str, str] = {
    "history_id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "experiment_id": "TEXT NOT NULL",
    "recorded_at": "TEXT NOT NULL",
    "superseded_by_session": "TEXT",
    "completed_at": "TEXT",
    "n_results": "INTEGER",
    "n_errors": "INTEGER",
    "n_tp": "INTEGER",
    "n_fp": "INTEGER",
    "n_tn": "INTEGER",
    "n_fn": "INTEGER",
    "precision": "REAL",
    "recall": "REAL",
    "f1": "REAL",
    "accuracy": "REAL",
    "metrics_json": "TEXT",
}

# Version 8: a sweep's cells are experiments tagged with its study_id.
STUDY_COLUMNS: dict[str, str] = {
    "study_id": "TEXT PRIMARY KEY",
    "name": "TEXT",
    "sweep_file": "TEXT",
    "sweep_checksum": "TEXT NOT NULL",
    "spec_json": "TEXT NOT NULL",
    "created_at": "TEXT NOT NULL",
}

# Version 8: the narrative keys a sampled experiment scores (data.sample).
SAMPLE_COLUMNS: dict[str, str] = {
    "experiment_id": "TEXT NOT NULL",
    "incident_id": "TEXT NOT NULL",
    "narrative_type": "TEXT NOT NULL",
}

# Version 8: labels beside the manual ones (label_set 'adjudicated': a reviewer's decisions).
LABEL_SET_COLUMNS: dict[str, str] = {
    "label_set": "TEXT NOT NULL",
    "data_checksum": "TEXT NOT NULL",
    "incident_id": "TEXT NOT NULL",
    "narrative_type": "TEXT NOT NULL",
    "label": "INTEGER NOT NULL",
    "note": "TEXT",
    "source": "TEXT",
    "workbook_checksum": "TEXT",
    "imported_at": "TEXT NOT NULL",
}

# Version 9: the Batch API's batches and the narratives each carries (see migration 9).
BATCH_COLUMNS: dict[str, str] = {
    "batch_id": "TEXT PRIMARY KEY",
    "experiment_id": "TEXT NOT NULL",
    "chunk": "INTEGER NOT NULL",
    "input_file_id": "TEXT",
    "output_file_id": "TEXT",
    "error_file_id": "TEXT",
    "status": "TEXT NOT NULL",
    "n_requests": "INTEGER NOT NULL",
    "n_completed": "INTEGER",
    "n_failed": "INTEGER",
    "submitted_at": "TEXT NOT NULL",
    "updated_at": "TEXT",
    "imported_at": "TEXT",
}
BATCH_ITEM_COLUMNS: dict[str, str] = {
    "batch_id": "TEXT NOT NULL",
    "incident_id": "TEXT NOT NULL",
    "narrative_type": "TEXT NOT NULL",
}

# A data file's checksum with the file identity it was read from (db/checksums.py).
DATA_FILE_CHECKSUM_COLUMNS: dict[str, str] = {
    "path": "TEXT PRIMARY KEY",
    "data_checksum": "TEXT NOT NULL",
    "device": "INTEGER NOT NULL",
    "inode": "INTEGER NOT NULL",
    "size": "INTEGER NOT NULL",
    "mtime_ns": "INTEGER NOT NULL",
    "ctime_ns": "INTEGER NOT NULL",
    "checked_at": "TEXT NOT NULL",
}

TABLES: dict[str, dict[str, str]] = {
    "source_narratives": SOURCE_COLUMNS,
    "experiments": EXPERIMENT_COLUMNS,
    "narrative_results": RESULT_COLUMNS,
    "ingests": INGEST_COLUMNS,
    "ingest_drops": INGEST_DROP_COLUMNS,
    "sessions": SESSION_COLUMNS,
    "config_history": CONFIG_HISTORY_COLUMNS,
    "metrics_history": METRICS_HISTORY_COLUMNS,
    "studies": STUDY_COLUMNS,
    "experiment_sample": SAMPLE_COLUMNS,
    "label_sets": LABEL_SET_COLUMNS,
    "batches": BATCH_COLUMNS,
    "batch_items": BATCH_ITEM_COLUMNS,
    "data_file_checksums": DATA_FILE_CHECKSUM_COLUMNS,
}

# ---------------------------------------------------------------------------------------
# Migrations. Frozen: never edit one that has shipped; append a new one instead.

# Version 1. The text is kept byte for byte as the first releases generated it, so
# `sqlite_master` of a database created today equals that of one created back then.
_M1_CREATE_TABLES = (
    """CREATE TABLE IF NOT EXISTS source_narratives (
  narrative_id INTEGER PRIMARY KEY,
  incident_id TEXT NOT NULL,
  narrative_type TEXT NOT NULL,
  narrative_text TEXT,
  manual_flag_ind INTEGER,
  manual_flag INTEGER,
  data_source TEXT,
  data_checksum TEXT,
  loaded_at TEXT
)""",
    """CREATE TABLE IF NOT EXISTS experiments (
  experiment_id TEXT PRIMARY KEY,
  experiment_name TEXT,
  status TEXT,
  model_name TEXT,
  model_provider TEXT,
  temperature REAL,
  api_url TEXT,
  system_prompt TEXT,
  user_template TEXT,
  prompt_version TEXT,
  run_seed INTEGER,
  data_file TEXT,
  data_checksum TEXT,
  max_narratives INTEGER,
  n_narratives_total INTEGER,
  n_narratives_processed INTEGER DEFAULT 0,
  n_narratives_completed INTEGER DEFAULT 0,
  last_progress_update TEXT,
  estimated_completion_time TEXT,
  start_time TEXT,
  end_time TEXT,
  log_dir TEXT,
  n_tp INTEGER,
  n_fp INTEGER,
  n_tn INTEGER,
  n_fn INTEGER,
  precision REAL,
  recall REAL,
  f1 REAL,
  accuracy REAL,
  metrics_json TEXT,
  config_json TEXT,
  failure_reason TEXT
)""",
    """CREATE TABLE IF NOT EXISTS narrative_results (
  result_id INTEGER PRIMARY KEY AUTOINCREMENT,
  experiment_id TEXT NOT NULL,
  incident_id TEXT NOT NULL,
  narrative_type TEXT NOT NULL,
  detected INTEGER,
  confidence REAL,
  indicators TEXT,
  rationale TEXT,
  raw_response TEXT,
  response_sec REAL,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  error_occurred INTEGER NOT NULL DEFAULT 0,
  error_message TEXT,
  error_category TEXT,
  attempt_count INTEGER DEFAULT 1,
  first_error_message TEXT,
  last_attempt_at TEXT,
  processed_at TEXT,
  manual_flag_ind INTEGER,
  manual_flag INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS ingests (
  data_checksum TEXT NOT NULL,
  mapping_json TEXT NOT NULL,
  data_source TEXT,
  n_rows INTEGER,
  n_narratives INTEGER,
  n_blank INTEGER,
  n_duplicates INTEGER,
  loaded_at TEXT
)""",
)

# Version 2: every non-key column of the three R tables as version 1 defines them, in the
# form ALTER TABLE accepts (no PRIMARY KEY, no NOT NULL). R databases differ in which they
# have: R's ensure_resume_columns() added data_checksum, the progress columns and the
# attempt tracking only to databases it ran on. So each is added only where missing; on a
# database that version 1 created, this adds nothing.
_M2_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # source_narratives: R had all but data_checksum.
    ("source_narratives", "incident_id", "TEXT"),
    ("source_narratives", "narrative_type", "TEXT"),
    ("source_narratives", "narrative_text", "TEXT"),
    ("source_narratives", "manual_flag_ind", "INTEGER"),
    ("source_narratives", "manual_flag", "INTEGER"),
    ("source_narratives", "data_source", "TEXT"),
    ("source_narratives", "data_checksum", "TEXT"),
    ("source_narratives", "loaded_at", "TEXT"),
    # experiments: R lacked data_checksum, max_narratives, the progress columns (unless
    # ensure_resume_columns ran), metrics_json, config_json, failure_reason.
    ("experiments", "experiment_name", "TEXT"),
    ("experiments", "status", "TEXT"),
    ("experiments", "model_name", "TEXT"),
    ("experiments", "model_provider", "TEXT"),
    ("experiments", "temperature", "REAL"),
    ("experiments", "api_url", "TEXT"),
    ("experiments", "system_prompt", "TEXT"),
    ("experiments", "user_template", "TEXT"),
    ("experiments", "prompt_version", "TEXT"),
    ("experiments", "run_seed", "INTEGER"),
    ("experiments", "data_file", "TEXT"),
    ("experiments", "data_checksum", "TEXT"),
    ("experiments", "max_narratives", "INTEGER"),
    ("experiments", "n_narratives_total", "INTEGER"),
    ("experiments", "n_narratives_processed", "INTEGER DEFAULT 0"),
    ("experiments", "n_narratives_completed", "INTEGER DEFAULT 0"),
    ("experiments", "last_progress_update", "TEXT"),
    ("experiments", "estimated_completion_time", "TEXT"),
    ("experiments", "start_time", "TEXT"),
    ("experiments", "end_time", "TEXT"),
    ("experiments", "log_dir", "TEXT"),
    ("experiments", "n_tp", "INTEGER"),
    ("experiments", "n_fp", "INTEGER"),
    ("experiments", "n_tn", "INTEGER"),
    ("experiments", "n_fn", "INTEGER"),
    ("experiments", "precision", "REAL"),
    ("experiments", "recall", "REAL"),
    ("experiments", "f1", "REAL"),
    ("experiments", "accuracy", "REAL"),
    ("experiments", "metrics_json", "TEXT"),
    ("experiments", "config_json", "TEXT"),
    ("experiments", "failure_reason", "TEXT"),
    # narrative_results: R lacked error_category and the attempt tracking (unless
    # ensure_resume_columns ran).
    ("narrative_results", "experiment_id", "TEXT"),
    ("narrative_results", "incident_id", "TEXT"),
    ("narrative_results", "narrative_type", "TEXT"),
    ("narrative_results", "detected", "INTEGER"),
    ("narrative_results", "confidence", "REAL"),
    ("narrative_results", "indicators", "TEXT"),
    ("narrative_results", "rationale", "TEXT"),
    ("narrative_results", "raw_response", "TEXT"),
    ("narrative_results", "response_sec", "REAL"),
    ("narrative_results", "prompt_tokens", "INTEGER"),
    ("narrative_results", "completion_tokens", "INTEGER"),
    ("narrative_results", "error_occurred", "INTEGER DEFAULT 0"),
    ("narrative_results", "error_message", "TEXT"),
    ("narrative_results", "error_category", "TEXT"),
    ("narrative_results", "attempt_count", "INTEGER DEFAULT 1"),
    ("narrative_results", "first_error_message", "TEXT"),
    ("narrative_results", "last_attempt_at", "TEXT"),
    ("narrative_results", "processed_at", "TEXT"),
    ("narrative_results", "manual_flag_ind", "INTEGER"),
    ("narrative_results", "manual_flag", "INTEGER"),
)


def _existing_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _m1_create_tables(conn: sqlite3.Connection) -> None:
    """The tables of the contract. IF NOT EXISTS, so an R-era database keeps its tables."""
    for ddl in _M1_CREATE_TABLES:
        conn.execute(ddl)


def _m2_add_missing_columns(conn: sqlite3.Connection) -> None:
    """R-era databases lack the resume, progress and diagnostics columns; add them empty."""
    have: dict[str, set[str]] = {}
    for table, column, decl in _M2_COLUMNS:
        if table not in have:
            have[table] = _existing_columns(conn, table)
        if column not in have[table]:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    # Rows written before attempt tracking existed were one attempt each.
    conn.execute("UPDATE narrative_results SET attempt_count = 1 WHERE attempt_count IS NULL")
    conn.execute(
        "UPDATE narrative_results SET error_occurred = 0 WHERE error_occurred IS NULL"
    )


def _m3_unique_results(conn: sqlite3.Connection) -> None:
    """Never two results for one narrative: drop older duplicates, then enforce it."""
    conn.execute(
        """
        DELETE FROM narrative_results
        WHERE result_id NOT IN (
            SELECT MAX(result_id) FROM narrative_results
            GROUP BY experiment_id, incident_id, narrative_type
        )
        """
    )
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS uq_result_per_exp_narrative "
        "ON narrative_results(experiment_id, incident_id, narrative_type)"
    )


def _m4_lookup_indexes(conn: sqlite3.Connection) -> None:
    """Resume selects remaining work by checksum and walks it by narrative_id."""
    conn.execute(
        "CREATE INDEX IF NOT EXISTS ix_source_checksum "
        "ON source_narratives(data_checksum, narrative_id)"
    )
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS uq_ingest ON ingests(data_checksum, mapping_json)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS ix_experiments_status ON experiments(status)")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS ix_results_errors "
        "ON narrative_results(experiment_id, error_occurred)"
    )


# Version 5: the R version declared source_narratives with UNIQUE(incident_id,
# narrative_type), so a changed file could never be loaded beside the old rows (`run` died on
# an IntegrityError). Such a table is rebuilt as version 1 defines it, rows and narrative_ids
# kept, in this migration's one transaction. Version 1's NOT NULL on incident_id and
# narrative_type is kept only where every row satisfies it (R did not declare it), so no
# row is ever dropped. Other indexes on the table (R's own) are recreated as they were.
_M5_SOURCE_R_ERA = "_source_narratives_r_era"
_M5_SOURCE_NULLABLE = """CREATE TABLE source_narratives (
  narrative_id INTEGER PRIMARY KEY,
  incident_id TEXT,
  narrative_type TEXT,
  narrative_text TEXT,
  manual_flag_ind INTEGER,
  manual_flag INTEGER,
  data_source TEXT,
  data_checksum TEXT,
  loaded_at TEXT
)"""
_M5_SOURCE_COLUMNS = ("narrative_id, incident_id, narrative_type, narrative_text, "
                      "manual_flag_ind, manual_flag, data_source, data_checksum, loaded_at")
_M5_CHECKSUM_INDEX = ("CREATE INDEX IF NOT EXISTS ix_source_checksum "
                      "ON source_narratives(data_checksum, narrative_id)")


def _has_unique_constraint(conn: sqlite3.Connection, table: str) -> bool:
    """A UNIQUE in the table's declaration (origin 'u'), not one of our unique indexes."""
    return any(row[3] == "u" for row in conn.execute(f"PRAGMA index_list({table})"))


def _m5_rebuild_r_era_source(conn: sqlite3.Connection) -> None:
    """Drop the R version's UNIQUE(incident_id, narrative_type) from source_narratives."""
    if not _has_unique_constraint(conn, "source_narratives"):
        return
    own_indexes = [row[0] for row in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = "
        "'source_narratives' AND sql IS NOT NULL AND name != 'ix_source_checksum'")]
    nulls = conn.execute("SELECT COUNT(*) FROM source_narratives WHERE incident_id IS NULL "
                         "OR narrative_type IS NULL").fetchone()[0]
    conn.execute(f"ALTER TABLE source_narratives RENAME TO {_M5_SOURCE_R_ERA}")
    conn.execute(_M1_CREATE_TABLES[0] if nulls == 0 else _M5_SOURCE_NULLABLE)
    conn.execute(f"INSERT INTO source_narratives ({_M5_SOURCE_COLUMNS}) "
                 f"SELECT {_M5_SOURCE_COLUMNS} FROM {_M5_SOURCE_R_ERA} ORDER BY narrative_id")
    conn.execute(f"DROP TABLE {_M5_SOURCE_R_ERA}")
    conn.execute(_M5_CHECKSUM_INDEX)
    for ddl in own_indexes:
        conn.execute(ddl)


# Version 6: what issue #10 records. Sessions, the history of an experiment's stored
# configuration and metrics, the narratives an ingest dropped and why, the content digests
# of a loaded file, and the provenance of an experiment. R-era experiments get their
# progress counters from the results they hold (R left them at 0).
_M6_TABLES = (
    """CREATE TABLE IF NOT EXISTS ingest_drops (
  data_checksum TEXT NOT NULL,
  row_number INTEGER,
  incident_id TEXT,
  narrative_type TEXT,
  reason TEXT NOT NULL,
  manual_flag_ind INTEGER,
  manual_flag INTEGER,
  kept_row_number INTEGER,
  has_text INTEGER,
  label_conflict INTEGER,
  text_differs INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS sessions (
  session_id TEXT PRIMARY KEY,
  experiment_id TEXT NOT NULL,
  intent TEXT NOT NULL,
  pid INTEGER,
  host TEXT,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  ended_as TEXT,
  end_reason TEXT,
  target INTEGER,
  n_done INTEGER,
  n_errors INTEGER,
  retry_categories TEXT,
  settings_hash TEXT,
  settings_json TEXT,
  settings_diff TEXT,
  allowed_drift TEXT,
  asyncrunner_version TEXT,
  parser_version TEXT
)""",
    """CREATE TABLE IF NOT EXISTS config_history (
  history_id INTEGER PRIMARY KEY AUTOINCREMENT,
  experiment_id TEXT NOT NULL,
  session_id TEXT,
  changed_at TEXT NOT NULL,
  key TEXT NOT NULL,
  old_value TEXT,
  new_value TEXT,
  reason TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS metrics_history (
  history_id INTEGER PRIMARY KEY AUTOINCREMENT,
  experiment_id TEXT NOT NULL,
  recorded_at TEXT NOT NULL,
  superseded_by_session TEXT,
  completed_at TEXT,
  n_results INTEGER,
  n_errors INTEGER,
  n_tp INTEGER,
  n_fp INTEGER,
  n_tn INTEGER,
  n_fn INTEGER,
  precision REAL,
  recall REAL,
  f1 REAL,
  accuracy REAL,
  metrics_json TEXT
)""",
    "CREATE INDEX IF NOT EXISTS ix_ingest_drops ON ingest_drops(data_checksum, reason)",
    "CREATE INDEX IF NOT EXISTS ix_sessions_experiment ON sessions(experiment_id, started_at)",
    "CREATE INDEX IF NOT EXISTS ix_config_history ON config_history(experiment_id)",
    "CREATE INDEX IF NOT EXISTS ix_metrics_history ON metrics_history(experiment_id)",
)
_M6_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ingests", "n_placeholder", "INTEGER"),
    ("ingests", "n_no_id", "INTEGER"),
    ("ingests", "rows_digest", "TEXT"),
    ("ingests", "content_digest", "TEXT"),
    ("ingests", "data_path", "TEXT"),
    ("ingests", "origin", "TEXT"),
    ("experiments", "asyncrunner_version", "TEXT"),
    ("experiments", "parser_version", "TEXT"),
    ("experiments", "python_version", "TEXT"),
    ("experiments", "platform", "TEXT"),
)
_M6_BACKFILL_COUNTERS = """
UPDATE experiments SET
  n_narratives_completed = (SELECT COUNT(*) FROM narrative_results r
                            WHERE r.experiment_id = experiments.experiment_id),
  n_narratives_processed = (SELECT COUNT(*) FROM narrative_results r
                            WHERE r.experiment_id = experiments.experiment_id)
WHERE COALESCE(n_narratives_completed, -1) != (SELECT COUNT(*) FROM narrative_results r
                                               WHERE r.experiment_id = experiments.experiment_id)
"""


def _m6_sessions_drops_provenance(conn: sqlite3.Connection) -> None:
    for ddl in _M6_TABLES:
        conn.execute(ddl)
    have: dict[str, set[str]] = {}
    for table, column, decl in _M6_COLUMNS:
        if table not in have:
            have[table] = _existing_columns(conn, table)
        if column not in have[table]:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    conn.execute(_M6_BACKFILL_COUNTERS)


# Version 7 (issue #15): the probe's chosen response format per experiment; per result the
# finish reason, where the answer came from (first | repair | resample) and the tokens over
# all its attempts (the existing prompt_tokens/completion_tokens are the final attempt's,
# so the totals start equal to them). Stored indicators become JSON arrays of strings
# (older versions stored object-shaped indicators as Python reprs).
_M7_COLUMNS = (
    ("experiments", "response_format_used", "TEXT"),
    ("narrative_results", "finish_reason", "TEXT"),
    ("narrative_results", "answer_source", "TEXT"),
    ("narrative_results", "prompt_tokens_total", "INTEGER"),
    ("narrative_results", "completion_tokens_total", "INTEGER"),
)
_M7_BACKFILL_TOTALS = """
UPDATE narrative_results SET prompt_tokens_total = prompt_tokens,
    completion_tokens_total = completion_tokens
WHERE prompt_tokens_total IS NULL AND completion_tokens_total IS NULL
"""
_M7_NORMALIZE_INDICATORS = """
UPDATE narrative_results SET indicators = norm_ind(indicators)
WHERE indicators IS NOT NULL AND indicators IS NOT norm_ind(indicators)
"""


def _m7_answer_provenance(conn: sqlite3.Connection) -> None:
    from asyncrunner.llm.parsing import normalize_stored_indicators

    have: dict[str, set[str]] = {}
    for table, column, decl in _M7_COLUMNS:
        if table not in have:
            have[table] = _existing_columns(conn, table)
        if column not in have[table]:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    conn.execute(_M7_BACKFILL_TOTALS)
    conn.create_function("norm_ind", 1, normalize_stored_indicators, deterministic=True)
    conn.execute(_M7_NORMALIZE_INDICATORS)


# Version 8 (issue #12): studies (a sweep's cells grouped under one id, each cell an
# ordinary experiment tagged with it), the narratives a sampled experiment scores (the keys
# themselves, so every resume and every cell of a study scores the same ones), and label
# sets beside the manual labels (a reviewer's decisions; the manual labels are never
# overwritten).
_M8_TABLES = (
    """CREATE TABLE IF NOT EXISTS studies (
        study_id TEXT PRIMARY KEY,
        name TEXT,
        sweep_file TEXT,
        sweep_checksum TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idx_studies_checksum ON studies (sweep_checksum)",
    """CREATE TABLE IF NOT EXISTS experiment_sample (
        experiment_id TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        narrative_type TEXT NOT NULL,
        PRIMARY KEY (experiment_id, incident_id, narrative_type)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS label_sets (
        label_set TEXT NOT NULL,
        data_checksum TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        narrative_type TEXT NOT NULL,
        label INTEGER NOT NULL CHECK (label IN (0, 1)),
        note TEXT,
        source TEXT,
        workbook_checksum TEXT,
        imported_at TEXT NOT NULL,
        PRIMARY KEY (label_set, data_checksum, incident_id, narrative_type)
    )""",
)
_M8_COLUMNS = (
    ("experiments", "study_id", "TEXT"),
    ("experiments", "study_cell", "TEXT"),
    ("experiments", "study_repeat", "INTEGER"),
    ("experiments", "sample_json", "TEXT"),
)


def _m8_studies_samples_labels(conn: sqlite3.Connection) -> None:
    for ddl in _M8_TABLES:
        conn.execute(ddl)
    have = _existing_columns(conn, "experiments")
    for table, column, decl in _M8_COLUMNS:
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    conn.execute("CREATE INDEX IF NOT EXISTS idx_experiments_study ON experiments (study_id)")


# Version 9 (issue #13): which endpoint of a pool answered each narrative; the Batch API's
# batches (committed before polling, so a kill during a 24-hour window resumes polling the
# same batch instead of paying twice) and which narratives each one carries.
_M9_TABLES = (
    """CREATE TABLE IF NOT EXISTS batches (
        batch_id TEXT PRIMARY KEY,
        experiment_id TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        input_file_id TEXT,
        output_file_id TEXT,
        error_file_id TEXT,
        status TEXT NOT NULL,
        n_requests INTEGER NOT NULL,
        n_completed INTEGER,
        n_failed INTEGER,
        submitted_at TEXT NOT NULL,
        updated_at TEXT,
        imported_at TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS idx_batches_experiment ON batches (experiment_id, status)",
    """CREATE TABLE IF NOT EXISTS batch_items (
        batch_id TEXT NOT NULL,
        incident_id TEXT NOT NULL,
        narrative_type TEXT NOT NULL,
        PRIMARY KEY (batch_id, incident_id, narrative_type)
    ) WITHOUT ROWID""",
)


def _m9_endpoints_and_batches(conn: sqlite3.Connection) -> None:
    for ddl in _M9_TABLES:
        conn.execute(ddl)
    if "endpoint" not in _existing_columns(conn, "narrative_results"):
        conn.execute("ALTER TABLE narrative_results ADD COLUMN endpoint TEXT")
    if "endpoints_json" not in _existing_columns(conn, "sessions"):
        conn.execute("ALTER TABLE sessions ADD COLUMN endpoints_json TEXT")


# Version 10: data files' checksums remembered by file identity, so that an unchanged
# file is not read again at every run and resume; the checksum index covers result keys.
_M10_DATA_FILE_CHECKSUMS = """CREATE TABLE IF NOT EXISTS data_file_checksums (
    path TEXT PRIMARY KEY,
    data_checksum TEXT NOT NULL,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    checked_at TEXT NOT NULL
)"""


# The producer's page passes every narrative already done (a resume's first page, all
# of them); with the result key in the index it never reads those rows' text.
_M10_SOURCE_INDEX = ("CREATE INDEX IF NOT EXISTS ix_source_checksum_keys ON source_narratives"
                     "(data_checksum, narrative_id, incident_id, narrative_type)")


def _m10_data_file_checksums(conn: sqlite3.Connection) -> None:
    conn.execute(_M10_DATA_FILE_CHECKSUMS)
    conn.execute(_M10_SOURCE_INDEX)
    conn.execute("DROP INDEX IF EXISTS ix_source_checksum")   # a prefix of the new one


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m1_create_tables,
    _m2_add_missing_columns,
    _m3_unique_results,
    _m4_lookup_indexes,
    _m5_rebuild_r_era_source,
    _m6_sessions_drops_provenance,
    _m7_answer_provenance,
    _m8_studies_samples_labels,
    _m9_endpoints_and_batches,
    _m10_data_file_checksums,
]
SCHEMA_VERSION = len(MIGRATIONS)


def configure(conn: sqlite3.Connection) -> None:
    """Pragmas every connection needs: WAL so monitors can read during a run."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode is durable across process crashes (only an OS crash may lose the
    # last commits), which is the failure this tool must survive at full speed.
    conn.execute("PRAGMA synchronous = NORMAL")


def _newer_message(version: int) -> str:
    return (f"database schema version {version} is newer than this asyncrunner "
            f"understands ({SCHEMA_VERSION}); upgrade asyncrunner")


MIGRATION_BACKUP = "pre_migration_backup"


def backup_before_migrating(conn: sqlite3.Connection, db: Path) -> Path | None:
    """A consistent copy of a database that holds data and is about to be migrated
    (`<db>.pre_migration_backup_<time>`, the newest three kept); None when there is nothing
    to migrate or nothing to lose (a new or empty file)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION or not _tables(conn):
        return None
    from asyncrunner.db import backup  # backup.py needs nothing from here

    backup.check_disk(db, 0, with_backup=True)
    return backup.make_backup(db, label=MIGRATION_BACKUP)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One BEGIN IMMEDIATE ... COMMIT on an autocommit connection, rolled back whole on any
    exception (BaseException too: Ctrl-C or SIGTERM mid-write must leave nothing half
    done). SQLite rolls some failures back by itself (a full disk among them): ROLLBACK
    only while a transaction is still open, or a second error would hide the first."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending migration; return the names of those applied."""
    applied: list[str] = []
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(_newer_message(version))
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        with transaction(conn):
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
        applied.append(step.__name__.lstrip("_"))
    return applied


@asynccontextmanager
async def open_async(path: str | Path) -> AsyncIterator[aiosqlite.Connection]:
    """An aiosqlite connection (autocommit) whose close survives cancellation.

    aiosqlite runs the connection in a thread; if opening or closing is cancelled with the
    task group (a failed or stopped run), that thread outlives the event loop and dies with
    a traceback when it tries to hand back its result. So both are shielded (opening a
    file is quick; a cancellation then arrives at the first await inside the block).
    """
    with anyio.CancelScope(shield=True):
        db = await aiosqlite.connect(str(path), isolation_level=None,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        yield db
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()


def connect(path: str | Path, *, migrate_schema: bool = True) -> sqlite3.Connection:
    """A configured synchronous connection (autocommit; callers use explicit BEGIN).

    Creates the file (and its directory) when missing: this is how `run` starts a database.
    """
    db = Path(path)
    require_writable(db)
    if db.parent and not db.parent.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        configure(conn)
        if migrate_schema:
            backup_before_migrating(conn, db)
            migrate(conn)
    except BaseException:
        # The caller never receives it, so nobody else could close it.
        conn.close()
        raise
    return conn


# ---------------------------------------------------------------------------------------
# Opening a database that must already exist.


def _not_found(db: Path) -> UsageError:
    return UsageError(f"database not found: {db} (set --db or EXPERIMENTS_DB)")


def _not_ours(db: Path) -> UsageError:
    return UsageError(f"{db} is not an asyncrunner database")


def _unreadable(db: Path, exc: sqlite3.Error) -> UsageError:
    if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB":
        return _not_ours(db)
    return UsageError(f"cannot open database {db}: {exc}")


def _uri(db: Path, query: str) -> str:
    # as_uri() percent-encodes, so a path with '?', '#' or '%' in it stays one path.
    return f"{db.resolve().as_uri()}?{query}"


def _open_existing(db: Path, query: str) -> sqlite3.Connection:
    """Open without ever creating the file (`mode=ro` or `mode=rw` in `query`) and probe
    that it is SQLite. sqlite3.Error from either step reaches the caller to word."""
    if not db.is_file():
        raise _not_found(db) if not db.exists() else _not_ours(db)
    conn = sqlite3.connect(_uri(db, query), uri=True, isolation_level=None,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        # The first read is where SQLite notices a file that is not a database.
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _is_ours(conn: sqlite3.Connection) -> bool:
    return set(CONTRACT_TABLES) <= _tables(conn)


def _open_readonly(db: Path) -> sqlite3.Connection:
    try:
        return _open_existing(db, "mode=ro")
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorname", None) not in (
                "SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN"):
            raise _unreadable(db, exc) from None
        for suffix in ("-wal", "-journal"):
            if db.with_name(db.name + suffix).exists():
                raise UsageError(
                    f"cannot read database {db}: SQLite needs to create files beside it "
                    f"(it has a {suffix} file) and {db.parent} is not writable; run as a "
                    "user who can write there") from None
    # A WAL database in a directory we cannot write, with no -wal file: no writer has it
    # open (a writer's -wal exists until the last connection closes; a crashed one's is
    # left behind), so the main file holds every commit and can be read without locks.
    # A writer starting during this short read is the one risk left; it could make this
    # read fail or see a mid-checkpoint page, never harm the database.
    try:
        return _open_existing(db, "mode=ro&immutable=1")
    except sqlite3.Error as exc:
        raise _unreadable(db, exc) from None


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """A connection that cannot create, migrate or write: for status, export, report, compare.

    Raises a one-line `UsageError` when the file is missing, is not an asyncrunner
    database, or is at another schema version than this asyncrunner's. Reading a database
    in WAL mode may leave the empty `-wal`/`-shm` files SQLite's readers need beside it;
    the database file itself is never touched.
    """
    db = Path(path)
    conn = _open_readonly(db)
    try:
        if not _is_ours(conn):
            raise _not_ours(db)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            raise UsageError(
                f"database {db} is at schema version {version}, this asyncrunner needs "
                f"{SCHEMA_VERSION}: run `asyncrunner migrate`")
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"database {db} is at schema version {version}, newer than this "
                f"asyncrunner understands ({SCHEMA_VERSION}): upgrade asyncrunner")
    except sqlite3.Error as exc:
        conn.close()
        raise _unreadable(db, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def require_writable(db: Path) -> None:
    """Refuse at once, in one line, a database a writing command could not write: a
    read-only file (or -wal/-shm file), or a directory where SQLite cannot make its
    journal files and we cannot put the lock file and backups."""
    for file in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if file.exists() and not os.access(file, os.W_OK):
            raise UsageError(
                f"{file} is read-only: this command writes to the database; make it "
                "writable or use a writable copy (status, export, report and compare read "
                "it as it is)")
    folder = db.parent if db.parent != Path("") else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write in {folder}: the database's journal (-wal, -shm), its lock file "
            "and its backups are made beside it; use a writable directory for --db")


def _open_writable(db: Path, *, allow_empty: bool) -> sqlite3.Connection:
    """An existing asyncrunner database (or, if allowed, an empty one), configured."""
    if db.is_file():
        require_writable(db)
    try:
        conn = _open_existing(db, "mode=rw")
    except sqlite3.Error as exc:
        raise _unreadable(db, exc) from None
    try:
        tables = _tables(conn)
        if not (set(CONTRACT_TABLES) <= tables or (allow_empty and not tables)):
            raise _not_ours(db)
        configure(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise _unreadable(db, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def connect_existing(path: str | Path) -> sqlite3.Connection:
    """An existing asyncrunner database, migrated, for commands that write (cancel) or are
    about to resume a run (which migrates anyway). Never creates a file."""
    db = Path(path)
    conn = _open_writable(db, allow_empty=False)
    try:
        backup_before_migrating(conn, db)
        migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise RunFailed(f"migrating {db} failed: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def migrate_existing(path: str | Path) -> tuple[list[str], Path | None]:
    """`asyncrunner migrate`: bring an existing file to SCHEMA_VERSION; return the steps run
    and the backup taken before them.

    An empty database (a 0-byte file, say) gets the current schema; a database holding
    other tables than ours is refused, so nothing is added to someone else's file.
    """
    db = Path(path)
    with closing(_open_writable(db, allow_empty=True)) as conn:
        try:
            copy = backup_before_migrating(conn, db)
            return migrate(conn), copy
        except sqlite3.Error as exc:
            # Each step is its own transaction: the file is at the last completed version.
            raise RunFailed(f"migrating {db} failed: {exc}") from None
