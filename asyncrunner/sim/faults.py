"""Fault injection: which requests go wrong, and what each fault looks like on the wire.

This module owns `FaultConfig` (per-request probabilities, Retry-After, hang length), the
seeded draw that picks one outcome per request, and the shape of each fault: the HTTP error
answers (500, 429, 503, an nginx-style HTML 502, the overload 429 of `max_concurrent`) and
the damaged 200 answers (prose instead of JSON, fenced JSON, a harmony reasoning channel,
JSON cut short with finish_reason "length", indicators as objects). Hangs and resets have no
answer to shape; `server.py` carries them out on the connection.

Besides the per-request draw, some answers are decided per narrative or per request shape
(server.py applies them): `invalid_first_rate` picks narratives (by text hash) whose first
request gets invalid JSON and every later one (a repair turn or a resample) the valid answer;
and the refusals of whole endpoints (`format_rejection`: a response_format the server does
not take, as llama.cpp and LM Studio word it; `status_failure`: 401/403/404 on every request,
as OpenAI words them).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .api import Headers, error_response
from .http import HttpResponse

OK = "ok"
HANG = "hang"
RESET = "reset"

_BAD_GATEWAY_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
_REASONING = ("The user wants an IPV assessment. I will check the narrative for partner "
              "violence cues and answer with the requested JSON object.")
_FINAL_MARKER = "<|start|>assistant<|channel|>final<|message|>"


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Per-request fault probabilities (each 0..1, sum <= 1), drawn with a seeded RNG."""

    error_rate: float = 0.0        # HTTP 500 JSON error
    rate_429: float = 0.0          # HTTP 429, with Retry-After unless retry_after_s is None
    rate_503: float = 0.0          # HTTP 503 JSON error
    rate_502_html: float = 0.0     # HTTP 502 with an HTML body (a proxy in front of the model)
    hang_rate: float = 0.0         # never answer (until the client leaves or hang_s passes)
    reset_rate: float = 0.0        # drop the connection without any response
    malformed_rate: float = 0.0    # 200, content is prose, not JSON
    fenced_rate: float = 0.0       # 200, JSON inside ```json fences with prose around it
    reasoning_rate: float = 0.0    # 200, harmony-style analysis channel before the final JSON
    truncate_rate: float = 0.0     # 200, JSON cut in half, finish_reason "length"
    retry_after_s: float | None = 1.0
    hang_s: float = 3600.0
    object_indicators_rate: float = 0.0   # 200, indicators as {"indicator", "evidence"} objects
    invalid_first_rate: float = 0.0       # per narrative, not drawn: see the module doc

    def __post_init__(self) -> None:
        total = 0.0
        for name, rate in self.rates():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be within 0..1, got {rate!r}")
            total += rate
        if not 0.0 <= self.invalid_first_rate <= 1.0:
            raise ValueError("FaultConfig.invalid_first_rate must be within 0..1, "
                             f"got {self.invalid_first_rate!r}")
        if total > 1.0 + 1e-9:
            raise ValueError(f"FaultConfig rates add up to {total:g}; they must not exceed 1")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("FaultConfig.retry_after_s must be >= 0 or None")
        if self.hang_s < 0:
            raise ValueError("FaultConfig.hang_s must be >= 0")

    def rates(self) -> tuple[tuple[str, float], ...]:
        """(outcome name, probability) in the fixed order faults are drawn."""
        return (
            ("error_500", self.error_rate),
            ("rate_limited", self.rate_429),
            ("unavailable", self.rate_503),
            ("bad_gateway_html", self.rate_502_html),
            (HANG, self.hang_rate),
            (RESET, self.reset_rate),
            ("malformed", self.malformed_rate),
            ("fenced", self.fenced_rate),
            ("reasoning", self.reasoning_rate),
            ("truncated", self.truncate_rate),
            # new outcomes go last: earlier configurations keep their seeded sequences
            ("object_indicators", self.object_indicators_rate),
        )

    def draw(self, rng: random.Random) -> str:
        """One outcome name; "ok" when no fault fires. Exactly one RNG draw per request."""
        u = rng.random()
        edge = 0.0
        for name, rate in self.rates():
            edge += rate
            if u < edge:
                return name
        return OK

    def retry_after_header(self) -> Headers:
        value = self.retry_after_s
        if value is None:
            return ()
        return (("Retry-After", f"{value:g}" if value != int(value) else str(int(value))),)


class FaultDraws:
    """The outcome sequence of one server: the same seed gives the same sequence."""

    __slots__ = ("_quiet", "_rng", "config")

    def __init__(self, config: FaultConfig, seed: int) -> None:
        self.config = config
        self._rng = random.Random(seed)
        # Without faults no draw is needed; skipping it keeps the common case cheap.
        self._quiet = all(rate == 0.0 for _, rate in config.rates())

    def next(self) -> str:
        return OK if self._quiet else self.config.draw(self._rng)


def error_answer(outcome: str, config: FaultConfig) -> HttpResponse | None:
    """The HTTP error a fault outcome answers with; None for outcomes that answer 200."""
    if outcome == "error_500":
        return error_response(500, "simulated internal server error", "server_error")
    if outcome == "rate_limited":
        return error_response(429, "rate limit reached; slow down", "rate_limit_error",
                              config.retry_after_header())
    if outcome == "unavailable":
        return error_response(503, "model is loading; try again", "service_unavailable")
    if outcome == "bad_gateway_html":
        return HttpResponse(502, _BAD_GATEWAY_HTML, "text/html; charset=utf-8")
    return None


def overloaded_answer(config: FaultConfig) -> HttpResponse:
    """The 429 for a request beyond `max_concurrent` in flight."""
    return error_response(429, "too many concurrent requests; slow down", "rate_limit_error",
                          config.retry_after_header())


# llama.cpp's server (the version before json_schema was a type it knew) and LM Studio.
_FORMAT_REJECTIONS = {
    "json_schema": {"error": {
        "code": 400, "type": "invalid_request_error",
        "message": "JSON schema conversion failed:\nUnrecognized schema: "
                   '{"type":"json_schema","json_schema":{...}}'}},
    "json_object": {"error": "'response_format.type' must be 'json_schema' or 'text'"},
}
_OTHER_FORMAT = 'response_format type must be one of "text" or "json_object", but got: '

# OpenAI's wording.
_STATUS_FAILURES = {
    401: ("Incorrect API key provided: sk-***. You can find your API key in your account "
          "settings.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to use this model with this API key.", "permission_error",
          "forbidden"),
    404: ("The model `{model}` does not exist or you do not have access to it.",
          "invalid_request_error", "model_not_found"),
}
FAIL_STATUSES = tuple(_STATUS_FAILURES)


def format_rejection(kind: str) -> HttpResponse:
    """The 400 of a server that does not take response_format `kind`."""
    payload = _FORMAT_REJECTIONS.get(kind)
    if payload is None:
        payload = {"error": {"code": 400, "type": "invalid_request_error",
                             "message": _OTHER_FORMAT + kind[:50]}}
    return HttpResponse(400, json.dumps(payload).encode())


def status_failure(status: int, model: str) -> HttpResponse:
    """A 401, 403 or 404 as OpenAI answers it (a bad key, no access, an unknown model)."""
    message, err_type, code = _STATUS_FAILURES[status]
    return HttpResponse(status, json.dumps({"error": {
        "message": message.replace("{model}", model[:100]), "type": err_type, "param": None,
        "code": code}}).encode())


def invalid_json(answer_json: str) -> str:
    """The answer as a small model sometimes writes it: a Python dict, not JSON."""
    return repr(json.loads(answer_json))


def shape_content(outcome: str, answer_json: str) -> tuple[str, str]:
    """(content, finish_reason) of a 200 answer, damaged the way `outcome` says."""
    if outcome == "malformed":
        return "I cannot answer that.", "stop"
    if outcome == "fenced":
        return ("Here is my assessment of the narrative:\n\n```json\n" + answer_json
                + "\n```\n\nLet me know if you need anything else."), "stop"
    if outcome == "reasoning":
        return ("<|channel|>analysis<|message|>" + _REASONING + "<|end|>" + _FINAL_MARKER
                + answer_json), "stop"
    if outcome == "truncated":
        return answer_json[: len(answer_json) // 2], "length"
    if outcome == "object_indicators":
        answer = json.loads(answer_json)
        answer["indicators"] = [{"indicator": cue, "evidence": f"the narrative mentions {cue}"}
                                for cue in answer["indicators"]]
        return json.dumps(answer), "stop"
    return answer_json, "stop"
