"""Structured outputs: the answer's JSON Schema, the `response_format` payloads, and how to
read an endpoint's refusal of them.

The schema (`answer_schema`) says what the prompt asks for: an object with exactly the keys
`detected` (boolean), `confidence` (number 0..1), `indicators` (array of strings) and
`rationale` (string), all required, no others. Every size in it is bounded, because a
constrained decoder follows the schema to the letter: measured on a llama.cpp server with a
small model (gemma-3-270m), an unbounded strict schema gave 0 of 30 valid answers (the model
kept adding indicators until max_tokens ran out), while the same schema with `maxItems: 3`
and `maxLength` 60/200 gave 30 of 30, three times faster.

How the bounds follow from `max_tokens` (`bounds_for`): the largest of the tiers in `TIERS`
whose worst-case answer fits into `max_tokens`, the worst case counted as
`WORST_CASE_OVERHEAD_TOKENS` tokens for the JSON around the values plus every string at its
`maxLength` at `WORST_CASE_CHARS_PER_TOKEN` characters a token, and two tokens of quotes and
comma per indicator. English runs at about four characters a token, so a bounded answer ends
well inside `max_tokens`. Below the smallest tier's worst case (66 tokens) the smallest tier
is used all the same (`AnswerBounds.fits` says so).

    max_tokens   maxItems   indicator maxLength   rationale maxLength   worst case
    < 108            1              40                    60                66 tokens
    108-162          2              50                   120               108
    163-308          3              60                   200               163 (measured)
    309-517          5              80                   400               309
    >= 518           8             100                   600               518

Response formats (`response_format_payload`):
    json_schema   {"type": "json_schema", "json_schema": {"name", "strict": true, "schema"}},
                  the OpenAI form, which vLLM, llama.cpp's server, LM Studio, Ollama and
                  OpenAI accept
    json_object   {"type": "json_object"}: any JSON object (JSON mode)
    none          no field at all

Reading a refusal (`judge_format_response`): an endpoint that cannot honour a response
format answers with an error, and what that error means decides what `auto` does next. The
decision uses the status and the message, never the status alone; see `FormatVerdict`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "ANSWER_KEYS",
    "AUTO_ORDER",
    "RESPONSE_FORMATS",
    "SCHEMA_NAME",
    "TIERS",
    "AnswerBounds",
    "FormatVerdict",
    "answer_schema",
    "bounds_for",
    "candidate_formats",
    "error_message",
    "judge_format_response",
    "names_response_format",
    "response_format_payload",
]

SCHEMA_NAME = "narrative_classification"
ANSWER_KEYS = ("detected", "confidence", "indicators", "rationale")

# The modes a run can use; "none" sends no response_format field. `auto` tries them in
# this order and keeps the first the endpoint accepts.
RESPONSE_FORMATS = ("json_schema", "json_object", "none")
AUTO_ORDER = RESPONSE_FORMATS

WORST_CASE_CHARS_PER_TOKEN = 3
WORST_CASE_OVERHEAD_TOKENS = 30
_TOKENS_PER_INDICATOR = 2      # its quotes and the comma


@dataclass(frozen=True, slots=True)
class AnswerBounds:
    """The size limits written into the schema."""

    max_indicators: int
    indicator_chars: int
    rationale_chars: int

    @property
    def worst_case_tokens(self) -> int:
        """Tokens of the largest answer the schema allows, at 3 characters a token."""
        per_indicator = (math.ceil(self.indicator_chars / WORST_CASE_CHARS_PER_TOKEN)
                         + _TOKENS_PER_INDICATOR)
        return (WORST_CASE_OVERHEAD_TOKENS + self.max_indicators * per_indicator
                + math.ceil(self.rationale_chars / WORST_CASE_CHARS_PER_TOKEN))

    def fits(self, max_tokens: int) -> bool:
        return self.worst_case_tokens <= max_tokens


TIERS: tuple[AnswerBounds, ...] = (
    AnswerBounds(1, 40, 60),
    AnswerBounds(2, 50, 120),
    AnswerBounds(3, 60, 200),
    AnswerBounds(5, 80, 400),
    AnswerBounds(8, 100, 600),
)


def bounds_for(max_tokens: int) -> AnswerBounds:
    """The largest tier whose worst-case answer fits into `max_tokens` (else the smallest)."""
    chosen = TIERS[0]
    for tier in TIERS:
        if tier.fits(max_tokens):
            chosen = tier
    return chosen


def answer_schema(max_tokens: int | None = None, *,
                  bounds: AnswerBounds | None = None) -> dict[str, Any]:
    """The answer's JSON Schema, bounded for `max_tokens` (or by explicit `bounds`).

    Without either, the schema is unbounded: that is the variant that loops on small
    models, kept only so the difference can be measured (bin/real-llm)."""
    if bounds is None and max_tokens is not None:
        bounds = bounds_for(max_tokens)
    indicator: dict[str, Any] = {"type": "string"}
    indicators: dict[str, Any] = {"type": "array", "items": indicator}
    rationale: dict[str, Any] = {"type": "string"}
    if bounds is not None:
        indicator["maxLength"] = bounds.indicator_chars
        indicators["maxItems"] = bounds.max_indicators
        rationale["maxLength"] = bounds.rationale_chars
    return {
        "type": "object",
        "properties": {
            "detected": {"type": "boolean"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "indicators": indicators,
            "rationale": rationale,
        },
        "required": list(ANSWER_KEYS),
        "additionalProperties": False,
    }


def response_format_payload(mode: str | None, max_tokens: int | None = None, *,
                            schema: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The request's `response_format` value for a mode; None for "none" (no field)."""
    if mode in (None, "none"):
        return None
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": SCHEMA_NAME, "strict": True,
            "schema": schema if schema is not None else answer_schema(max_tokens)}}
    raise ValueError(f"unknown response format {mode!r}; expected one of "
                     f"{', '.join(RESPONSE_FORMATS)}")


def candidate_formats(setting: str | None) -> tuple[str, ...]:
    """What a probe tries for a `model.response_format` setting: `auto` (or unset) falls
    back json_schema -> json_object -> none; an explicit mode is tried alone."""
    if setting in (None, "auto"):
        return AUTO_ORDER
    if setting not in RESPONSE_FORMATS:
        raise ValueError(f"unknown response format {setting!r}; expected auto or one of "
                         f"{', '.join(RESPONSE_FORMATS)}")
    return (setting,)


# --- reading an endpoint's answer to a response_format ------------------------------------


class FormatVerdict(StrEnum):
    """What one answer to a request with a response format means.

    accepted     2xx: the endpoint takes this format.
    unsupported  an error whose message (or OpenAI's `param`) names the response format or
                 its schema (any status but 401/403/404/429): fall back to the next format.
    rejected     another 400/405/415/422/501: a refusal that does not say why. Fall back too;
                 the last candidate, `none`, sends no response_format, so if it is refused
                 as well the request itself is wrong (fail fast).
    fatal        401/403 (bad or missing key) or 404 (unknown model or path): no format
                 can help; stop.
    unavailable  429, other 5xx, or no answer: the endpoint is busy or down, which says
                 nothing about the format. Fall back (a server that crashes on the field
                 answers the next format), and give up if nothing is accepted.
    """

    ACCEPTED = "accepted"
    UNSUPPORTED = "unsupported"
    REJECTED = "rejected"
    FATAL = "fatal"
    UNAVAILABLE = "unavailable"


FATAL_STATUS = frozenset({401, 403, 404})
_REFUSAL_STATUS = frozenset({400, 405, 415, 422, 501})

# Phrases that tie an error to the response format. Checked case-insensitively against
# the message, e.g. llama.cpp's 'JSON schema conversion failed', its 'response_format type
# must be one of "text" or "json_object", but got: json_schema', OpenAI's "Invalid
# parameter: 'response_format' of type 'json_object' is not supported with this model.",
# LM Studio's "'response_format.type' must be 'json_schema' or 'text'", vLLM's "The provided
# JSON schema contains features not supported by xgrammar."
_FORMAT_WORDS = re.compile(
    r"response[_ .-]?format|json[_ ]?schema|json[_ ]?object|json[_ ]mode|structured[_ ]output"
    r"|guided[_ ]decoding|\bgrammar\b|\bschema\b",
    re.IGNORECASE)


def error_message(body: str) -> tuple[str, str | None]:
    """(message, OpenAI `param`) of an error body: `{"error": {"message", "param"}}`,
    `{"error": "text"}`, vLLM's older `{"object": "error", "message": ...}`, or the text."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body, None
    if not isinstance(payload, dict):
        return body, None
    err = payload.get("error")
    if isinstance(err, dict):
        param = err.get("param")
        return str(err.get("message") or ""), param if isinstance(param, str) else None
    if isinstance(err, str):
        return err, None
    message = payload.get("message") or payload.get("detail")
    if message:
        return message if isinstance(message, str) else json.dumps(message), None
    return body, None


def names_response_format(message: str, param: str | None = None) -> bool:
    """True when an error is about the response format (by its message or `param`)."""
    if param is not None and param.split(".")[0] == "response_format":
        return True
    return bool(_FORMAT_WORDS.search(message))


def judge_format_response(status: int | None, body: str = "") -> FormatVerdict:
    """What an endpoint's answer (`status` None: none came) to a request carrying a response
    format means for `auto`; see `FormatVerdict`."""
    if status is None:
        return FormatVerdict.UNAVAILABLE
    if 200 <= status < 300:
        return FormatVerdict.ACCEPTED
    if status in FATAL_STATUS:
        return FormatVerdict.FATAL
    message, param = error_message(body)
    if status != 429 and names_response_format(message, param):
        return FormatVerdict.UNSUPPORTED
    if status in _REFUSAL_STATUS:
        return FormatVerdict.REJECTED
    if status == 429 or status >= 500:
        return FormatVerdict.UNAVAILABLE
    return FormatVerdict.REJECTED
