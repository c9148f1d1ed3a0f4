"""Every refusal an operator can meet, one function each, so a message is worded once.

Each returns (never raises) a `RefusedError` (exit 3) whose text says what is wrong and what
to do; the caller writes `raise refusals.x(...)` so the raise stays visible where it happens.
"""

from __future__ import annotations

from pathlib import Path

from asyncrunner.errors import RefusedError


def no_experiment(experiment_id: str, db_path: str | Path | None = None) -> RefusedError:
    where = f"in {db_path}" if db_path is not None else "in this database"
    return RefusedError(f"no experiment {experiment_id} {where}; list them with "
                        "`asyncrunner status` (check --db / EXPERIMENTS_DB)")


def resume_needs_id() -> RefusedError:
    return RefusedError("RESUME=1 needs EXPERIMENT_ID=<uuid> (or --experiment-id); "
                        "`asyncrunner resume --latest` finds the newest resumable one")


def database_missing(db_path: str | Path) -> RefusedError:
    return RefusedError(f"database {db_path} does not exist; check --db / EXPERIMENTS_DB")


def no_resumable() -> RefusedError:
    return RefusedError("no resumable experiment (running with a dead lock, interrupted or "
                        "failed) in this database")


def completed(experiment_id: str) -> RefusedError:
    return RefusedError(f"experiment {experiment_id} is completed; nothing to resume "
                        "(start a new experiment to run it again)")


def nothing_to_retry(experiment_id: str,
                     categories: tuple[str, ...] | None = None) -> RefusedError:
    which = f" in categories {', '.join(categories)}" if categories else ""
    return RefusedError(f"experiment {experiment_id} has no error rows{which}; "
                        "nothing to retry")


def cancelled(experiment_id: str) -> RefusedError:
    return RefusedError(f"experiment {experiment_id} was cancelled; resume it with --force "
                        "if you mean to")


def cannot_cancel(experiment_id: str, status: str) -> RefusedError:
    return RefusedError(f"experiment {experiment_id} is {status}; nothing to cancel")


def unknown_status(experiment_id: str, status: object) -> RefusedError:
    return RefusedError(f"experiment {experiment_id} has unknown status {status!r}")


def data_missing(experiment_id: str, data_file: str | None) -> RefusedError:
    return RefusedError(f"data file {data_file} of experiment {experiment_id} is missing; "
                        "restore it (same content) to resume")


def data_changed(experiment_id: str, data_file: str | None, *, old: str | None = None,
                 new: str | None = None, loaded_at: str | None = None,
                 detail: str | None = None) -> RefusedError:
    sums = f": checksum {old} (loaded {loaded_at or 'by the R version'}) is now {new}" \
        if old and new else ""
    why = f"; {detail}" if detail else ""
    return RefusedError(
        f"data file {data_file} has changed since experiment {experiment_id} started "
        f"(checksum mismatch{sums}{why}); restore the original file to resume, or start a "
        "new experiment with the new file")


def legacy_set_unknown(experiment_id: str, data_file: str | None) -> RefusedError:
    return RefusedError(
        f"experiment {experiment_id} has no stored checksum (R version) and the database "
        f"holds narratives of several files without one, none named {data_file}; cannot tell "
        "which it ran on: start a new experiment")


def legacy_subset_unknown(experiment_id: str, n_total: int, n_rows: int) -> RefusedError:
    return RefusedError(
        f"experiment {experiment_id} (R version) covered {n_total} of the {n_rows} narratives "
        "of its file, but not the first ones in file order; cannot tell which: start a new "
        "experiment")


def locked(experiment_id: str, pid: object, lock_file: Path) -> RefusedError:
    return RefusedError(f"experiment {experiment_id} is locked by running process PID {pid} "
                        f"(lock file {lock_file}); wait for it to finish or stop it first")


def locked_by_pid_file(experiment_id: str, pid: object, lock_file: Path) -> RefusedError:
    return RefusedError(
        f"experiment {experiment_id} is locked by running process PID {pid}: its lock file "
        f"{lock_file} holds a bare PID as the R version wrote it (no OS lock to check); wait "
        f"for that run to finish, or if PID {pid} is not running this experiment, delete the "
        "lock file and try again")
