"""Workers: receive a narrative, call the model, parse the answer, send a result message.

A worker holds no database connection and handles no signals. A narrative whose call is
cancelled (shutdown) produces no result at all, so it stays "remaining" and is redone on
resume; every other outcome, success or failure, produces exactly one `Result`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import structlog
from anyio import EndOfStream, WouldBlock
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncrunner.config import TEXT_PLACEHOLDER
from asyncrunner.llm.client import Completion, LLMClient, RequestFailure
from asyncrunner.llm.parsing import AnswerParseError, parse_answer
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.vocab import ErrorCategory

log = structlog.get_logger("asyncrunner.pipeline.workers")


@dataclass(frozen=True, slots=True)
class Prompt:
    system_prompt: str
    user_template: str

    def render(self, text: str) -> str:
        return self.user_template.replace(TEXT_PLACEHOLDER, text)


class _UtcStamps:
    """`clock.utc_now()`'s format at a fraction of its cost: the part down to the second is
    formatted once per second, the microseconds appended."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        return f"{self._prefix}{int((now - second) * 1_000_000):06d}Z"


_stamp = _UtcStamps()


def to_result(n: Narrative, outcome: Completion | RequestFailure) -> Result:
    """Turn a client outcome into the one row this narrative gets."""
    if isinstance(outcome, RequestFailure):
        return Result(n.narrative_id, n.incident_id, n.narrative_type, n.manual_flag_ind,
                      n.manual_flag, _stamp(), outcome.attempts,
                      response_sec=outcome.response_sec, raw_response=outcome.raw,
                      error_category=outcome.category, error_message=outcome.message)
    try:
        answer = parse_answer(outcome.content, outcome.finish_reason)
    except AnswerParseError as exc:
        return Result(n.narrative_id, n.incident_id, n.narrative_type, n.manual_flag_ind,
                      n.manual_flag, _stamp(), outcome.attempts,
                      response_sec=outcome.response_sec, raw_response=outcome.raw,
                      prompt_tokens=outcome.prompt_tokens,
                      completion_tokens=outcome.completion_tokens,
                      error_category=ErrorCategory.PARSE_ERROR, error_message=str(exc))
    return Result(n.narrative_id, n.incident_id, n.narrative_type, n.manual_flag_ind,
                  n.manual_flag, _stamp(), outcome.attempts,
                  response_sec=outcome.response_sec, raw_response=outcome.raw,
                  prompt_tokens=outcome.prompt_tokens,
                  completion_tokens=outcome.completion_tokens,
                  detected=int(answer.detected), confidence=answer.confidence,
                  indicators=json.dumps(answer.indicators) if answer.indicators else "[]",
                  rationale=answer.rationale)


async def classify(client: LLMClient, prompt: Prompt, n: Narrative) -> Result:
    """One narrative, one result; the narrative's key is bound to every log line of its
    retries and errors, and unbound again afterwards."""
    tokens = structlog.contextvars.bind_contextvars(incident_id=n.incident_id,
                                                    narrative_type=n.narrative_type)
    try:
        return await _classify(client, prompt, n)
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


async def _classify(client: LLMClient, prompt: Prompt, n: Narrative) -> Result:
    outcome = await client.complete(prompt.system_prompt, prompt.render(n.text))
    result = to_result(n, outcome)
    if result.error_category is not None:
        status = outcome.status if isinstance(outcome, RequestFailure) else None
        # info, not warning: an errored narrative is recorded and counted on the progress
        # display; one console line per failure would drown the display in a 429 storm.
        log.info("narrative_error", category=result.error_category, status=status,
                 attempts=result.attempt_count)
    return result


async def worker(client: LLMClient, prompt: Prompt,
                 narratives: MemoryObjectReceiveStream[Narrative],
                 results: MemoryObjectSendStream[Result]) -> None:
    """Run until the producer closes its end of the narrative stream.

    A worker is a task of its own, so its context variables are its own: the narrative's
    key is bound once per narrative (each binding replaces the last) and needs no unbinding.
    Streams are used without a trip round the event loop where none is needed: a result
    goes into the writer's buffer at once while it has room, and the next narrative is
    taken at once when the producer is already offering one.
    """
    bind = structlog.contextvars.bind_contextvars
    async with narratives, results:
        while True:
            try:
                narrative = narratives.receive_nowait()
            except WouldBlock:
                try:
                    narrative = await narratives.receive()
                except EndOfStream:
                    return
            except EndOfStream:
                return
            bind(incident_id=narrative.incident_id, narrative_type=narrative.narrative_type)
            result = await _classify(client, prompt, narrative)
            try:
                results.send_nowait(result)
            except WouldBlock:
                await results.send(result)
