"""The database schema: DDL, pragmas and versioned, append-only migrations.

`PRAGMA user_version` records how many migrations a database has had. Each migration is a
named function that says why it exists; it runs in the same transaction as the bump of
`user_version`, so a crash leaves either the old or the new version, never half of one.
Databases written by the earlier R version have the three tables but `user_version = 0`;
the migrations below bring them forward without losing a row (except duplicate results,
which the unique index cannot admit: the newest of each duplicate set is kept).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import anyio

BUSY_TIMEOUT_MS = 30_000

# Columns every current database has, by table. Migration 2 adds whichever a legacy one lacks.
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
}

TABLES: dict[str, dict[str, str]] = {
    "source_narratives": SOURCE_COLUMNS,
    "experiments": EXPERIMENT_COLUMNS,
    "narrative_results": RESULT_COLUMNS,
    "ingests": INGEST_COLUMNS,
}


def _create_table_sql(table: str, columns: dict[str, str]) -> str:
    body = ",\n  ".join(f"{name} {decl}" for name, decl in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  {body}\n)"


def _existing_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _m1_create_tables(conn: sqlite3.Connection) -> None:
    """The tables of the contract. IF NOT EXISTS, so an R-era database keeps its tables."""
    for table, columns in TABLES.items():
        conn.execute(_create_table_sql(table, columns))


def _m2_add_missing_columns(conn: sqlite3.Connection) -> None:
    """R-era databases lack the resume, progress and diagnostics columns; add them empty."""
    for table, columns in TABLES.items():
        have = _existing_columns(conn, table)
        for name, decl in columns.items():
            if name not in have:
                # ALTER TABLE cannot add PRIMARY KEY / NOT NULL-without-default columns.
                plain = decl.replace("PRIMARY KEY", "").replace("AUTOINCREMENT", "")
                plain = plain.replace("NOT NULL DEFAULT", "DEFAULT").replace("NOT NULL", "")
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {plain.strip()}")
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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m1_create_tables,
    _m2_add_missing_columns,
    _m3_unique_results,
    _m4_lookup_indexes,
]
SCHEMA_VERSION = len(MIGRATIONS)


def configure(conn: sqlite3.Connection) -> None:
    """Pragmas every connection needs: WAL so monitors can read during a run."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode is durable across process crashes (only an OS crash may lose the
    # last commits), which is the failure this tool must survive at full speed.
    conn.execute("PRAGMA synchronous = NORMAL")


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending migration; return the names of those applied."""
    applied: list[str] = []
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        from .errors import UsageError

        raise UsageError(
            f"database schema version {version} is newer than this asyncrunner "
            f"understands ({SCHEMA_VERSION}); upgrade asyncrunner"
        )
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(step.__name__.lstrip("_"))
    return applied


@asynccontextmanager
async def open_async(path: str | Path) -> AsyncIterator[aiosqlite.Connection]:
    """An aiosqlite connection (autocommit) whose close survives cancellation.

    aiosqlite runs the connection in a thread; if closing is cancelled with the task group
    (a failed or stopped run), that thread outlives the event loop and dies with a
    traceback when it tries to hand back its last result. So the close is shielded.
    """
    db = await aiosqlite.connect(str(path), isolation_level=None,
                                 timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        yield db
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()


def connect(path: str | Path, *, migrate_schema: bool = True) -> sqlite3.Connection:
    """A configured synchronous connection (autocommit; callers use explicit BEGIN)."""
    db = Path(path)
    if db.parent and not db.parent.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    configure(conn)
    if migrate_schema:
        migrate(conn)
    return conn
