"""The closed vocabularies: experiment statuses, error categories, why an ingest dropped a
narrative, and how a session ended.

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


class DropReason(StrEnum):
    """`ingest_drops.reason`: why a narrative slot of the data file was not loaded."""

    BLANK = "blank"              # empty or whitespace
    PLACEHOLDER = "placeholder"  # N/A, -, unknown, punctuation only... (data.placeholders)
    DUPLICATE = "duplicate"      # a second row for the same (incident_id, narrative_type)
    NO_ID = "no_id"              # the row has no incident id


class SessionEnd(StrEnum):
    """`sessions.ended_as`: how a session ended (NULL while it runs)."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    DIED = "died"                # no clean end: found open by a later session


# Retried by default by --retry-errors-only: every category but data_error (the same input
# would fail the same way), which is retried only when --category names it.
RETRYABLE: frozenset[ErrorCategory] = frozenset(ErrorCategory) - {ErrorCategory.DATA_ERROR}

# Resumable without --force (`running` only when no live process holds its lock).
RESUMABLE: frozenset[Status] = frozenset({Status.RUNNING, Status.INTERRUPTED, Status.FAILED})
