"""Workers in-process, the LLM behind httpx.MockTransport: one narrative -> exactly one
Result (answer, parse error or request failure), the prompt as sent, no narrative text in
results or logs, and no Result for a cancelled request."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import structlog
from pipeline_helpers import incident, make_narrative
from structlog.testing import capture_logs

from asyncrunner.llm.client import ClientSettings, Completion, LLMClient, RequestFailure
from asyncrunner.llm.parsing import resample_seed
from asyncrunner.llm.throttle import AdaptiveLimiter
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.pipeline.workers import Prompt, classify, to_result, worker
from asyncrunner.vocab import ErrorCategory

SECRET = "SENTINEL-NARRATIVE-7f3a: he choked her in the car"
PROMPT = Prompt(system_prompt="You classify narratives.",
                user_template="Narrative:\n<<TEXT>>\nAnswer in JSON. (<<TEXT>>)")
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
ANSWER = json.dumps({"detected": True, "confidence": 0.8, "indicators": ["threat"],
                     "rationale": "a threat is described"})


def answer_response(content: str | None = ANSWER, *,
                    finish_reason: str | None = "stop") -> httpx.Response:
    return httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7},
    })


@asynccontextmanager
async def llm_client(handler: Handler, *, ceiling: int = 4) -> AsyncIterator[LLMClient]:
    """An LLMClient whose only fake part is the transport."""
    settings = ClientSettings(api_url="http://llm.test/v1", model="m", temperature=0.0,
                              max_tokens=64, timeout_s=5, max_attempts=3, backoff_base_s=0.0)
    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport) as http:
        yield LLMClient(settings, http, AdaptiveLimiter(ceiling))


def always(response: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler giving the same answer (or raising the same error) every time, and its log."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(response, Exception):
            raise response
        return response
    return handler, seen


async def classify_one(handler: Handler, narrative: Narrative | None = None, *,
                       prompt: Prompt = PROMPT,
                       ) -> tuple[Result, list[MutableMapping[str, Any]]]:
    """classify() one narrative; also return the structlog events it emitted."""
    async with llm_client(handler) as client:
        # merge_contextvars as in logs.configure: classify binds the narrative's key there
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            result = await classify(client, prompt, narrative or make_narrative(3, text=SECRET))
    return result, events


def assert_no_text(result: Result, events: list[MutableMapping[str, Any]]) -> None:
    assert "text" not in {f.name for f in dataclasses.fields(Result)}
    assert SECRET not in repr(result)
    assert SECRET not in repr(events) and "choked" not in repr(events)


def assert_identifies(result: Result, n: Narrative) -> None:
    assert (result.narrative_id, result.incident_id, result.narrative_type) == (
        n.narrative_id, n.incident_id, n.narrative_type)
    assert (result.manual_flag_ind, result.manual_flag) == (n.manual_flag_ind, n.manual_flag)
    assert result.processed_at.endswith("Z")


# --- classify: one narrative, one result ---------------------------------------------------


async def test_an_answer_becomes_a_result_with_the_parsed_fields() -> None:
    response = answer_response()
    handler, seen = always(response)
    n = make_narrative(5, text=SECRET)
    result, events = await classify_one(handler, n)
    assert len(seen) == 1
    assert_identifies(result, n)
    assert (result.detected, result.confidence) == (1, 0.8)
    assert result.rationale == "a threat is described"
    assert json.loads(result.indicators or "") == ["threat"]
    assert (result.error_category, result.error_message, result.error_occurred) == (None, None, 0)
    assert (result.prompt_tokens, result.completion_tokens, result.attempt_count) == (11, 7, 1)
    assert result.raw_response == response.text
    assert result.response_sec is not None and result.response_sec >= 0
    assert events == []                      # a success logs nothing per narrative


def answers(*responses: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    """A handler giving these answers in turn, and its log."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[len(seen) - 1]
    return handler, seen


async def test_a_repair_turn_recovers_an_invalid_answer_and_totals_add_up() -> None:
    bad = answer_response("Sure! The narrative mentions a threat.")
    handler, seen = answers(bad, answer_response())
    result, events = await classify_one(handler)
    assert len(seen) == 2
    first, second = (json.loads(r.content) for r in seen)
    assert second["messages"][:2] == first["messages"]
    assert second["messages"][2] == {"role": "assistant",
                                     "content": "Sure! The narrative mentions a threat."}
    assert second["messages"][3]["role"] == "user"
    assert "no JSON object" in second["messages"][3]["content"]
    assert SECRET not in second["messages"][3]["content"]
    assert (result.error_category, result.detected, result.answer_source) == (None, 1, "repair")
    assert (result.prompt_tokens_total, result.completion_tokens_total) == (22, 14)
    assert (result.prompt_tokens, result.completion_tokens, result.attempt_count) == (11, 7, 2)
    assert events == []


async def test_a_resample_sends_the_same_prompt_with_another_seed() -> None:
    handler, seen = answers(answer_response('{"detected": "maybe"}'), answer_response())
    prompt = dataclasses.replace(PROMPT, parse_retry="resample")
    result, _ = await classify_one(handler, prompt=prompt)
    first, second = (json.loads(r.content) for r in seen)
    assert first["messages"] == second["messages"]
    assert first.get("seed") != second["seed"] == resample_seed(None, 2)
    assert (result.answer_source, result.detected) == ("resample", 1)


async def test_a_fatal_failure_of_the_repair_request_is_the_result() -> None:
    refused = httpx.Response(401, json={"error": {"message": "bad key"}})
    handler, _ = answers(answer_response("no json here"), refused)
    result, _ = await classify_one(handler)
    assert (result.error_category, result.attempt_count) == ("api_error", 2)
    assert result.error_message is not None and "401" in result.error_message


async def test_the_prompt_is_rendered_into_the_request() -> None:
    handler, seen = always(answer_response())
    await classify_one(handler)
    messages = json.loads(seen[0].content)["messages"]
    assert messages == [
        {"role": "system", "content": "You classify narratives."},
        {"role": "user", "content": f"Narrative:\n{SECRET}\nAnswer in JSON. ({SECRET})"},
    ]
    assert PROMPT.render("x") == "Narrative:\nx\nAnswer in JSON. (x)"
    assert Prompt("s", "no placeholder").render("x") == "no placeholder"


@pytest.mark.parametrize(("content", "finish_reason", "parse_retry", "requests"), [
    ("I believe this narrative describes abuse.", "stop", "off", 1),
    ('{"detected": "maybe"}', "stop", "off", 1),
    ('{"detected": true, "confid', "length", "off", 1),
    (None, "stop", "off", 1),
    ("I believe this narrative describes abuse.", "stop", "repair", 2),
    ('{"detected": "maybe"}', "stop", "resample", 2),
    ('{"detected": true, "confid', "length", "repair", 1),   # a repair cannot un-cut
    ('{"detected": true, "confid', "length", "resample", 2),
    (None, "stop", "repair", 2),
])
async def test_an_unparseable_answer_is_a_parse_error_row_keeping_the_raw_response(
        content: str | None, finish_reason: str, parse_retry: str, requests: int) -> None:
    response = answer_response(content, finish_reason=finish_reason)
    handler, seen = always(response)
    prompt = dataclasses.replace(PROMPT, parse_retry=parse_retry)
    result, events = await classify_one(handler, prompt=prompt)
    assert len(seen) == requests             # at most one second chance, never a third
    assert (result.error_category, result.error_occurred) == ("parse_error", 1)
    assert result.error_message and "\n" not in result.error_message
    assert result.raw_response == response.text
    assert (result.detected, result.confidence, result.indicators) == (None, None, None)
    assert (result.prompt_tokens, result.completion_tokens) == (11, 7)   # the last request's
    assert (result.prompt_tokens_total, result.completion_tokens_total) == (
        11 * requests, 7 * requests)
    assert result.attempt_count == requests and result.answer_source is None
    assert result.finish_reason == finish_reason
    assert [e["event"] for e in events] == ["narrative_error"]
    assert events[0]["category"] == "parse_error" and events[0]["incident_id"] == incident(3)
    assert_no_text(result, events)


@pytest.mark.parametrize(("response", "category", "attempts", "status"), [
    (httpx.Response(500, text="upstream exploded"), "api_error", 3, 500),
    (httpx.Response(429, text="slow down"), "rate_limit", 3, 429),
    (httpx.Response(401, json={"error": {"message": "bad key"}}), "api_error", 1, 401),
    (httpx.Response(400, json={"error": {"message": "maximum context length exceeded"}}),
     "data_error", 1, 400),
    (httpx.ReadTimeout("slow"), "timeout", 3, None),
])
async def test_a_request_failure_is_an_error_row_with_its_category_and_attempts(
        response: httpx.Response | Exception, category: str, attempts: int,
        status: int | None) -> None:
    handler, seen = always(response)
    n = make_narrative(8, text=SECRET)
    result, events = await classify_one(handler, n)
    assert len(seen) == attempts
    assert_identifies(result, n)
    assert (result.error_category, result.attempt_count, result.error_occurred) == (
        category, attempts, 1)
    assert result.error_message and result.detected is None
    if isinstance(response, httpx.Response):
        assert result.raw_response == response.text
        assert str(status) in result.error_message
    error = [e for e in events if e["event"] == "narrative_error"]
    assert len(error) == 1 and error[0]["status"] == status and error[0]["attempts"] == attempts
    assert [e["event"] for e in events].count("retry") == attempts - 1
    assert all(e["incident_id"] == incident(8) for e in events)
    assert_no_text(result, events)


def test_to_result_maps_a_failure_and_a_completion() -> None:
    n = make_narrative(2)
    failed = to_result(n, RequestFailure(ErrorCategory.TIMEOUT, "no response within 5s", 12.5, 4,
                                         retryable=True, status=None, raw=None))
    assert (failed.error_category, failed.error_message, failed.attempt_count) == (
        "timeout", "no response within 5s", 4)
    assert (failed.response_sec, failed.raw_response, failed.prompt_tokens) == (12.5, None, None)
    done = to_result(n, Completion('{"detected": "no", "confidence": "80%"}', "stop", None, 3,
                                   0.5, 2, "raw body"))
    assert (done.detected, done.confidence, done.indicators, done.rationale) == (0, 0.8, "[]", None)
    assert (done.attempt_count, done.raw_response, done.completion_tokens) == (2, "raw body", 3)
    assert_identifies(done, n)


# --- worker: the stream loop ---------------------------------------------------------------


def rows(narratives: list[Narrative]) -> list[tuple[object, ...]]:
    return [(n.narrative_id, n.incident_id, n.narrative_type, n.text, n.manual_flag_ind,
             n.manual_flag) for n in narratives]


async def run_workers(client: LLMClient, narratives: list[Narrative], workers: int) -> list[Result]:
    handout = Handout()
    r_send, r_recv = anyio.create_memory_object_stream[Result](len(narratives))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with r_send:
                for _ in range(workers):
                    tg.start_soon(worker, client, PROMPT, handout, r_send.clone())
            for row in rows(narratives):      # one at a time, each put once a worker waits
                await anyio.wait_all_tasks_blocked()
                handout.put([row])
            handout.end()
    async with r_recv:
        return [r async for r in r_recv]     # ends: every worker closed its results clone


async def test_workers_turn_each_narrative_into_exactly_one_result() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][1]["content"]
        if "#3" in user:
            return httpx.Response(401, text="no")
        return answer_response("nonsense" if "#5" in user else ANSWER)

    narratives = [make_narrative(i, text=f"narrative #{i}") for i in range(12)]
    async with llm_client(handler) as client:
        results = await run_workers(client, narratives, workers=4)
    assert sorted(r.narrative_id for r in results) == list(range(12))
    by_id = {r.narrative_id: r for r in results}
    assert by_id[3].error_category == "api_error" and by_id[5].error_category == "parse_error"
    assert sum(r.error_occurred for r in results) == 2
    assert client.limiter.stats().in_flight == 0


def hanging(started: anyio.Event) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")
    return handler


async def cancel_in_flight(client: LLMClient, started: anyio.Event) -> list[Result]:
    """One worker, one narrative; cancel the worker while its request is in flight. Return
    what reached the results stream (draining it ends at once: the worker closed its end)."""
    handout = Handout()
    r_send, r_recv = anyio.create_memory_object_stream[Result](1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, client, PROMPT, handout, r_send)
            handout.put(rows([make_narrative(1)]))
            await started.wait()
            tg.cancel_scope.cancel()
    with anyio.fail_after(1):
        async with r_recv:
            return [r async for r in r_recv]


async def test_a_cancelled_request_yields_no_result() -> None:
    started = anyio.Event()
    async with llm_client(hanging(started)) as client:
        assert await cancel_in_flight(client, started) == []


async def test_a_cancelled_request_gives_back_its_concurrency_slot() -> None:
    """BUG: LLMClient._attempt returns the limiter slot in `finally: await limiter.release()`,
    but release() first takes the limiter's condition lock, and taking a lock inside a
    cancelled scope raises at once, so in_flight is never decremented: every cancelled request
    leaks a slot. Latent today (the runner cancels all workers at once and builds a new limiter
    per run), but any limiter that outlives one cancelled request loses capacity for good."""
    started = anyio.Event()
    async with llm_client(hanging(started), ceiling=2) as client:
        await cancel_in_flight(client, started)
    assert client.limiter.stats().in_flight == 0


async def test_log_lines_of_a_worker_carry_the_narrative_they_are_about() -> None:
    """worker() binds each narrative's key in its own task: retries and the error line of a
    failing narrative name it, also after other narratives went through the same worker."""
    def handler(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][1]["content"]
        return httpx.Response(500, text="no") if "#4" in user else answer_response()

    narratives = [make_narrative(i, text=f"narrative #{i}") for i in range(6)]
    async with llm_client(handler) as client:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            results = await run_workers(client, narratives, workers=1)
    assert len(results) == 6
    assert [e["event"] for e in events] == ["retry", "retry", "narrative_error"]
    key = (incident(4), narratives[4].narrative_type)
    assert all((e["incident_id"], e["narrative_type"]) == key for e in events)
    assert structlog.contextvars.get_contextvars() == {}   # nothing leaked into this task
