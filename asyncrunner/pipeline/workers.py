"""Workers: receive a narrative, call the model, parse the answer, send a result message.

A worker holds no database connection and handles no signals. A narrative whose call is
cancelled (shutdown) produces no result at all, so it stays "remaining" and is redone on
resume; every other outcome, success or failure, produces exactly one `Result`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from asyncrunner.clock import utc_now
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


def _base(n: Narrative, attempts: int) -> dict[str, object]:
    return {
        "narrative_id": n.narrative_id,
        "incident_id": n.incident_id,
        "narrative_type": n.narrative_type,
        "manual_flag_ind": n.manual_flag_ind,
        "manual_flag": n.manual_flag,
        "processed_at": utc_now(),
        "attempt_count": attempts,
    }


def to_result(n: Narrative, outcome: Completion | RequestFailure) -> Result:
    """Turn a client outcome into the one row this narrative gets."""
    if isinstance(outcome, RequestFailure):
        return Result(**_base(n, outcome.attempts), response_sec=outcome.response_sec,  # type: ignore[arg-type]
                      raw_response=outcome.raw, error_category=outcome.category,
                      error_message=outcome.message)
    common = dict(
        response_sec=outcome.response_sec, raw_response=outcome.raw,
        prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
    )
    try:
        answer = parse_answer(outcome.content, outcome.finish_reason)
    except AnswerParseError as exc:
        return Result(**_base(n, outcome.attempts), **common,  # type: ignore[arg-type]
                      error_category=ErrorCategory.PARSE_ERROR, error_message=str(exc))
    return Result(
        **_base(n, outcome.attempts), **common,  # type: ignore[arg-type]
        detected=int(answer.detected), confidence=answer.confidence,
        indicators=json.dumps(list(answer.indicators)), rationale=answer.rationale,
    )


async def classify(client: LLMClient, prompt: Prompt, n: Narrative) -> Result:
    # Bound once here, the narrative's key reaches every log line of its retries too.
    with structlog.contextvars.bound_contextvars(incident_id=n.incident_id,
                                                 narrative_type=n.narrative_type):
        outcome = await client.complete(prompt.system_prompt, prompt.render(n.text))
        result = to_result(n, outcome)
        if result.error_category is not None:
            status = outcome.status if isinstance(outcome, RequestFailure) else None
            # info, not warning: an errored narrative is recorded and counted on the progress
            # display; one console line per failure would drown the display in a 429 storm.
            log.info("narrative_error", category=result.error_category, status=status,
                     attempts=result.attempt_count)
    return result


async def worker(client: LLMClient, prompt: Prompt, narratives: ObjectReceiveStream[Narrative],
                 results: ObjectSendStream[Result]) -> None:
    """Run until the producer closes its end of the narrative stream."""
    async with narratives, results:
        async for narrative in narratives:
            await results.send(await classify(client, prompt, narrative))
