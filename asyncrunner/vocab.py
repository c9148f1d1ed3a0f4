"""The closed vocabularies: experiment statuses and error categories.

Both are `StrEnum`s whose values are exactly the strings stored in the database and named by
the contract, so a member compares equal to its stored text and can be bound as an SQL
parameter as it is. Which status may follow which lives in `experiments.py`, with the record.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """`experiments.status`."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """A status that sets `end_time`: no session works on the experiment."""
        return self is not Status.RUNNING


class ErrorCategory(StrEnum):
    """`narrative_results.error_category`, in the contract's order."""

    API_ERROR = "api_error"
    RATE_LIMIT = "rate_limit"
    TIMEOUT = "timeout"
    PARSE_ERROR = "parse_error"
    DATA_ERROR = "data_error"
    UNKNOWN = "unknown"


# Resumable without --force (`running` only when no live process holds its lock).
RESUMABLE: frozenset[Status] = frozenset({Status.RUNNING, Status.INTERRUPTED, Status.FAILED})
