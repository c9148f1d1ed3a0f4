"""One batch line, one narrative: the request lines a batch sends and the reading of the
answer lines it returns, both the live client's own.

`custom_id` is "<incident_id>/<narrative_type>" (`custom_id`), read back by lookup among the
experiment's own keys. A line's body is the live request's body byte for byte
(LLMClient.encode_body: model, messages, temperature, max_tokens, seed, response_format,
extra_body). An answer line is read by the live client itself: its status and body go through
LLMClient (a replayed HTTP answer, `_Replay`), so a batch line gets the live categories (429
rate_limit, a 400 about the context length data_error, other statuses api_error, a
401/403/404 or a refused request field fatal), and the completion through workers.to_result
(lenient parsing, parse_error rows). Lines with error code batch_expired or batch_cancelled
hold no answer: their narratives stay remaining.

`response_format: auto` cannot be probed through a batch (`resolve_mode`): a new experiment
uses the first candidate (json_schema), recorded as its `response_format_used`, which a
resume reuses.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx
import structlog

from asyncrunner.db import batches, experiments
from asyncrunner.llm.answer_schema import candidate_formats
from asyncrunner.llm.batch_api import BATCH_ENDPOINT
from asyncrunner.llm.client import ClientSettings, Completion, LLMClient, RequestFailure
from asyncrunner.llm.throttle import AdaptiveLimiter
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.pipeline.workers import Prompt, to_result
from asyncrunner.vocab import ErrorCategory

log = structlog.get_logger("asyncrunner.pipeline.batch_codec")

NO_ANSWER_CODES = frozenset({"batch_expired", "batch_cancelled"})


def custom_id(incident_id: str, narrative_type: str) -> str:
    """A narrative's key in a batch line."""
    return f"{incident_id}/{narrative_type}"


def error_parts(error: Any) -> tuple[str, str]:
    """(code, message) of a batch line's or a batch's error object."""
    if isinstance(error, Mapping):
        return str(error.get("code") or ""), str(error.get("message") or "")
    return "", str(error or "")


def resolve_mode(conn: sqlite3.Connection, experiment_id: str, setting: str | None) -> str:
    """The response_format a batch sends: `auto` cannot be probed through a batch, so it is
    the mode this experiment used before, else the first candidate (recorded)."""
    setting = setting or "none"
    if setting != "auto":
        return setting
    used = batches.response_format_used(conn, experiment_id)
    if used:
        return str(used)
    mode = candidate_formats(setting)[0]
    experiments.record_response_format(conn, experiment_id, mode)
    log.info("response_format", mode=mode, message=(
        f"response_format {mode} (auto; not probed: a batch answers only when it ends)"))
    return mode


class _Replay:
    """An HttpSender that answers with the response it was handed: a batch line's answer
    goes through the live client's reading of an HTTP answer, without a network."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None

    async def send(self, request: httpx.Request) -> httpx.Response:
        response, self.response = self.response, None
        if response is None:
            raise httpx.ReadError("no batch answer to replay", request=request)
        return response

    async def aclose(self) -> None:
        return None


class BatchCodec:
    """Request lines out (the live bodies), answer lines in (the live reading)."""

    def __init__(self, settings: ClientSettings, prompt: Prompt, *,
                 max_answer_bytes: int | None = None) -> None:
        """`max_answer_bytes`: model.max_response_bytes, applied to each answer of a batch
        as the live transport applies it to each response (the output file as a whole
        holds a chunk's answers and is not bounded by it)."""
        self.prompt = prompt
        self.max_answer_bytes = max_answer_bytes
        self._replay = _Replay()
        self.client = LLMClient(replace(settings, max_attempts=1, api_key=None),
                                self._replay, AdaptiveLimiter(1))

    def line(self, n: Narrative) -> bytes:
        """One request line of the batch JSONL, newline included."""
        body = self.client.encode_body(self.prompt.system_prompt, self.prompt.render(n.text))
        head = json.dumps({"custom_id": custom_id(n.incident_id, n.narrative_type),
                           "method": "POST", "url": BATCH_ENDPOINT})
        return head[:-1].encode() + b', "body": ' + body + b"}\n"

    async def outcome(self, line: Mapping[str, Any]) -> Completion | RequestFailure | None:
        """What the live client makes of a line's answer; None: the line holds none."""
        response = line.get("response")
        error = line.get("error")
        if isinstance(response, Mapping) and isinstance(response.get("status_code"), int):
            body = response.get("body")
            if body is None and error:
                body = {"error": error}
            content = (body if isinstance(body, str)
                       else json.dumps(body) if body is not None else "").encode()
            if self.max_answer_bytes is not None and len(content) > self.max_answer_bytes:
                return RequestFailure(ErrorCategory.API_ERROR,
                                      f"answer larger than max_response_bytes="
                                      f"{self.max_answer_bytes}", 0.0, 1)
            self._replay.response = httpx.Response(int(response["status_code"]),
                                                   content=content)
            return await self.client.complete("", "")
        code, message = error_parts(error)
        if code in NO_ANSWER_CODES:
            return None
        if code == "request_timeout":
            return RequestFailure(ErrorCategory.TIMEOUT, f"batch: {message or code}", 0.0, 1,
                                  retryable=True)
        if code or message:
            return RequestFailure(ErrorCategory.API_ERROR,
                                  f"batch error {code or '?'}: {message}"[:500], 0.0, 1)
        return RequestFailure(ErrorCategory.API_ERROR,
                              "batch line holds neither a response nor an error", 0.0, 1)

    async def result(self, n: Narrative, line: Mapping[str, Any]) -> Result | None:
        """The row this line gives the narrative (a fatal one marked `fatal`, never to be
        stored), or None when the line holds no answer. A batch answer has no latency of
        its own: response_sec stays empty."""
        outcome = await self.outcome(line)
        if outcome is None:
            return None
        result = to_result(n, outcome, max_tokens=self.client.settings.max_tokens)
        return replace(result, response_sec=None)
