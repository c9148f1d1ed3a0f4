"""The messages that flow along the pipeline.

producer --Narrative--> workers --Result--> writer

Messages carry only what the next stage needs; workers never see a database connection and
the writer never sees HTTP. No stage changes a message it was handed (a worker's second
answer is a new Result, via dataclasses.replace). They are not frozen dataclasses all the
same: one is made per narrative, and a frozen dataclass's __init__ makes a call to
object.__setattr__ per field (25 for a Result) where a plain one assigns.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncrunner.vocab import ErrorCategory


@dataclass(slots=True)
class Narrative:
    """One narrative to classify, as read from `source_narratives`."""

    narrative_id: int
    incident_id: str
    narrative_type: str
    text: str
    manual_flag_ind: int | None
    manual_flag: int | None


@dataclass(slots=True)
class Result:
    """The outcome of one narrative: an answer, or an error row. Never holds the text."""

    narrative_id: int
    incident_id: str
    narrative_type: str
    manual_flag_ind: int | None
    manual_flag: int | None
    processed_at: str
    attempt_count: int
    response_sec: float | None = None
    raw_response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    detected: int | None = None
    confidence: float | None = None
    indicators: str | None = None  # JSON array text
    rationale: str | None = None
    error_category: ErrorCategory | None = None
    error_message: str | None = None
    finish_reason: str | None = None
    answer_source: str | None = None   # first | repair | resample (None: no answer at all)
    # over every request this narrative took (parse retries included); prompt_tokens and
    # completion_tokens are the final request's
    prompt_tokens_total: int | None = None
    completion_tokens_total: int | None = None
    # A failure no other request can escape either (401/403/404, a refused request field):
    # the one line describing it. Such a result is never stored; it stops the run.
    fatal: str | None = None
    # The endpoint that answered, or failed last (its redacted URL): narrative_results.endpoint
    endpoint: str | None = None

    @property
    def error_occurred(self) -> int:
        return 0 if self.error_category is None else 1
