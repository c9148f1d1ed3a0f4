"""Workers: take a narrative, call the model, parse the answer, send a result message.

A worker holds no database connection and handles no signals. A narrative whose call is
cancelled (shutdown) produces no result at all, so it stays "remaining" and is redone on
resume; every other outcome, success or failure, produces exactly one `Result` (a fatal
failure's is marked `fatal` and never stored: see runner.py).

An answer that does not parse gets one second chance (`run.parse_retry`): `repair` sends
the invalid answer back with a repair instruction (not for an answer cut off at max_tokens,
which a repair cannot recover), `resample` sends the same request with another seed
(parsing.resample_seed), `off` none. The row records which answer it holds
(`answer_source` first | repair | resample), the final request's finish_reason and tokens,
and the tokens over every request (`prompt_tokens_total`, `completion_tokens_total`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog
from anyio import CancelScope, EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectSendStream

from asyncrunner.clock import utc_now
from asyncrunner.config import TEXT_PLACEHOLDER
from asyncrunner.llm.client import Completion, LLMClient, RequestFailure, describe_fatal
from asyncrunner.llm.parsing import (
    Answer,
    AnswerParseError,
    indicators_json,
    parse_answer,
    repair_messages,
    resample_seed,
)
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.vocab import ErrorCategory

log = structlog.get_logger("asyncrunner.pipeline.workers")

# Result.answer_source
FIRST = "first"
REPAIR = "repair"
RESAMPLE = "resample"
PARSE_RETRY_OFF = "off"


@dataclass(frozen=True, slots=True)
class Prompt:
    system_prompt: str
    user_template: str
    parse_retry: str = "repair"      # run.parse_retry: repair | resample | off

    def render(self, text: str) -> str:
        return self.user_template.replace(TEXT_PLACEHOLDER, text)




def _parsed(outcome: Completion, max_tokens: int | None) -> Answer | AnswerParseError:
    try:
        return parse_answer(outcome.content, outcome.finish_reason, max_tokens)
    except AnswerParseError as exc:
        return exc


def _total(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def to_result(n: Narrative, outcome: Completion | RequestFailure, *,
              max_tokens: int | None = None, source: str = FIRST,
              earlier: tuple[Completion | RequestFailure, ...] = ()) -> Result:
    """Turn a client outcome into the one row this narrative gets. `earlier`: the requests
    this narrative took before `outcome` (a parse retry's first answer); their attempts and
    tokens count in the row's totals. Built in one go: this runs once per narrative."""
    response_sec, attempts = outcome.response_sec, outcome.attempts
    prompt_total = completion_total = None
    if earlier:
        completions = [o for o in (*earlier, outcome) if isinstance(o, Completion)]
        response_sec += sum(o.response_sec for o in earlier)
        attempts += sum(o.attempts for o in earlier)
        prompt_total = _total([c.prompt_tokens for c in completions])
        completion_total = _total([c.completion_tokens for c in completions])
    elif isinstance(outcome, Completion):     # one request: its own figures are the totals
        prompt_total, completion_total = outcome.prompt_tokens, outcome.completion_tokens
    # Every field of the row set once, then one Result (no keyword dicts merged).
    prompt_tokens = completion_tokens = finish_reason = None
    detected = confidence = indicators = rationale = answer_source = None
    error_category: ErrorCategory | None = None
    error_message = fatal = None
    if isinstance(outcome, RequestFailure):
        error_category, error_message = outcome.category, outcome.message
        fatal = describe_fatal(outcome) if outcome.fatal else None
    else:
        prompt_tokens, completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
        finish_reason = outcome.finish_reason
        answer = _parsed(outcome, max_tokens)
        if isinstance(answer, AnswerParseError):
            error_category, error_message = ErrorCategory.PARSE_ERROR, str(answer)
        else:
            detected, confidence = int(answer.detected), answer.confidence
            indicators, rationale = indicators_json(answer.indicators), answer.rationale
            answer_source = source
    return Result(n.narrative_id, n.incident_id, n.narrative_type, n.manual_flag_ind,
                  n.manual_flag, utc_now(), attempts, response_sec=response_sec,
                  raw_response=outcome.raw, prompt_tokens=prompt_tokens,
                  completion_tokens=completion_tokens, detected=detected,
                  confidence=confidence, indicators=indicators, rationale=rationale,
                  error_category=error_category, error_message=error_message,
                  finish_reason=finish_reason, answer_source=answer_source,
                  prompt_tokens_total=prompt_total, completion_tokens_total=completion_total,
                  fatal=fatal, endpoint=outcome.endpoint)


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
    """The request, and for an answer that does not parse one second chance
    (`prompt.parse_retry`): a repair turn (not for a cut-off answer: a repair cannot
    recover one), or the same request with another seed."""
    system_prompt, user_prompt = prompt.system_prompt, prompt.render(n.text)
    max_tokens = client.settings.max_tokens
    outcome = await client.complete(system_prompt, user_prompt)
    result = to_result(n, outcome, max_tokens=max_tokens)
    if (result.error_category is ErrorCategory.PARSE_ERROR and isinstance(outcome, Completion)
            and prompt.parse_retry != PARSE_RETRY_OFF):
        error = _parsed(outcome, max_tokens)
        assert isinstance(error, AnswerParseError)
        second: Completion | RequestFailure | None = None
        if prompt.parse_retry == REPAIR and not error.truncated:
            second = await client.complete(system_prompt, user_prompt,
                                           followup=repair_messages(outcome.content, str(error)))
        elif prompt.parse_retry == RESAMPLE:
            second = await client.complete(system_prompt, user_prompt,
                                           seed=resample_seed(client.settings.seed, 2))
        if isinstance(second, Completion) or (isinstance(second, RequestFailure)
                                              and second.fatal):
            result = to_result(n, second, max_tokens=max_tokens, source=prompt.parse_retry,
                               earlier=(outcome,))
        elif second is not None:      # the retry request failed: the first answer's error
            result = replace(result, attempt_count=result.attempt_count + second.attempts)
    if result.error_category is not None:
        status = outcome.status if isinstance(outcome, RequestFailure) else None
        # info, not warning: an errored narrative is recorded and counted on the progress
        # display; one console line per failure would drown the display in a 429 storm.
        log.info("narrative_error", category=result.error_category, status=status,
                 attempts=result.attempt_count)
    return result


async def worker(client: LLMClient, prompt: Prompt, handout: Handout,
                 results: MemoryObjectSendStream[Result],
                 gate: Callable[[Result], bool] | None = None,
                 stopped: Callable[[], bool] | None = None) -> None:
    """Run until the producer has ended the hand-out and nothing is left in it.

    A worker is a task of its own, so its context variables are its own: the narrative's
    key is bound once per narrative (each binding replaces the last) and needs no unbinding.
    Neither side costs a trip round the event loop where none is needed: a result goes
    into the writer's buffer at once while it has room, and the next narrative is taken at
    once while the hand-out has one.

    `gate(result)` (the runner's fail-fast and circuit breaker) sees every result before it
    is sent; False: the result is dropped (a fatal failure: the narrative stays remaining).
    `stopped()` True: the run was told to stop now (its work scope was cancelled).
    """
    bind = structlog.contextvars.bind_contextvars
    async with results:
        while True:
            # A halt (fail-fast, breaker, second signal) cancels the workers' scope, but the
            # path below can reach the socket without an await that would deliver it: the
            # hand-out's, the limiter's and the pool's fast paths do not yield. Without this
            # check a worker would start one more request after the run was told to stop.
            # (A flag read on the way, the checkpoint that delivers the cancellation only
            # once it is set: this runs once per narrative.)
            if stopped is not None and stopped():
                await checkpoint()
            try:
                narrative = handout.take_nowait() or await handout.take()
            except EndOfStream:
                return
            bind(incident_id=narrative.incident_id, narrative_type=narrative.narrative_type)
            result = await _classify(client, prompt, narrative)
            if gate is not None and not gate(result):
                continue
            try:
                results.send_nowait(result)
            except WouldBlock:
                # A finished result is never lost to a stop: the writer reads until every
                # worker has left (or its stream breaks, which ends the wait too).
                with CancelScope(shield=True):
                    await results.send(result)
