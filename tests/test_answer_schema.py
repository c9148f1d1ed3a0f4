"""The answer's JSON Schema, the response_format payloads, and reading an endpoint's refusal
of them (with error bodies as llama.cpp, LM Studio, vLLM, Ollama and OpenAI send them)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asyncrunner.llm.answer_schema import (
    ANSWER_KEYS,
    TIERS,
    AnswerBounds,
    FormatVerdict,
    answer_schema,
    bounds_for,
    candidate_formats,
    error_message,
    judge_format_response,
    response_format_payload,
)
from asyncrunner.llm.parsing import parse_answer


def test_the_measured_schema_is_the_one_for_small_budgets() -> None:
    # maxItems 3, maxLength 60/200: 30 of 30 valid answers from gemma-3-270m on llama.cpp
    assert bounds_for(256) == AnswerBounds(3, 60, 200)
    schema = answer_schema(256)
    props = schema["properties"]
    assert props["indicators"]["maxItems"] == 3
    assert props["indicators"]["items"] == {"type": "string", "maxLength": 60}
    assert props["rationale"] == {"type": "string", "maxLength": 200}
    assert props["detected"] == {"type": "boolean"}
    assert props["confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
    assert schema["required"] == list(ANSWER_KEYS) == list(props)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(("max_tokens", "expected"), [
    (1, TIERS[0]), (64, TIERS[0]), (107, TIERS[0]), (108, TIERS[1]), (162, TIERS[1]),
    (163, TIERS[2]), (308, TIERS[2]), (309, TIERS[3]), (512, TIERS[3]), (518, TIERS[4]),
    (4096, TIERS[4]),
])
def test_bounds_grow_with_max_tokens(max_tokens: int, expected: AnswerBounds) -> None:
    assert bounds_for(max_tokens) == expected


@pytest.mark.parametrize("max_tokens", [66, 100, 200, 256, 400, 512, 1024, 8192])
def test_the_largest_answer_the_schema_allows_fits_into_max_tokens(max_tokens: int) -> None:
    bounds = bounds_for(max_tokens)
    assert bounds.fits(max_tokens)
    # the largest answer, written out: every string at its maxLength, all indicators
    widest = json.dumps({"detected": False, "confidence": 0.123456,
                         "indicators": ["x" * bounds.indicator_chars] * bounds.max_indicators,
                         "rationale": "y" * bounds.rationale_chars})
    assert len(widest) / 3 <= max_tokens          # even at 3 characters a token
    assert parse_answer(widest).indicators[0] == "x" * bounds.indicator_chars


def test_tiers_are_ordered_and_below_the_smallest_it_says_it_does_not_fit() -> None:
    worst = [t.worst_case_tokens for t in TIERS]
    assert worst == sorted(worst) and worst == [66, 108, 163, 309, 518]
    assert not bounds_for(40).fits(40)


def test_the_unbounded_schema_has_no_size_limits() -> None:
    text = json.dumps(answer_schema())
    assert "maxItems" not in text and "maxLength" not in text
    assert answer_schema(bounds=AnswerBounds(2, 10, 20))["properties"]["indicators"][
        "maxItems"] == 2


def test_response_format_payloads() -> None:
    assert response_format_payload(None) is None
    assert response_format_payload("none") is None
    assert response_format_payload("json_object") == {"type": "json_object"}
    payload = response_format_payload("json_schema", 512)
    assert payload == {"type": "json_schema", "json_schema": {
        "name": "narrative_classification", "strict": True, "schema": answer_schema(512)}}
    custom: dict[str, Any] = {"type": "object"}
    schema_payload = response_format_payload("json_schema", schema=custom)
    assert schema_payload is not None and schema_payload["json_schema"]["schema"] is custom
    with pytest.raises(ValueError, match="json_schema, json_object, none"):
        response_format_payload("xml")


def test_candidate_formats() -> None:
    assert candidate_formats("auto") == ("json_schema", "json_object", "none")
    assert candidate_formats(None) == ("json_schema", "json_object", "none")
    assert candidate_formats("json_object") == ("json_object",)
    assert candidate_formats("none") == ("none",)
    with pytest.raises(ValueError):
        candidate_formats("yaml")


def llama_cpp(message: str, code: int = 400, err_type: str = "invalid_request_error") -> str:
    return json.dumps({"error": {"code": code, "message": message, "type": err_type}})


def openai(message: str, err_type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": err_type, "param": param,
                                 "code": code}})


def vllm_old(message: str, code: int = 400, err_type: str = "BadRequestError") -> str:
    return json.dumps({"object": "error", "message": message, "type": err_type, "param": None,
                       "code": code})


@pytest.mark.parametrize(("status", "body", "verdict"), [
    # llama.cpp: the schema cannot be turned into a grammar
    (400, llama_cpp("JSON schema conversion failed:\nUnrecognized schema: {\"maxItems\":3}"),
     "unsupported"),
    (400, llama_cpp("JSON schema error at /properties/indicators: maxItems must be a "
                    "non-negative integer"), "unsupported"),
    # llama.cpp before json_schema was a type: lists the types it takes
    (400, llama_cpp('response_format type must be one of "text" or "json_object", but got: '
                    "json_schema"), "unsupported"),
    # LM Studio: rejects json_object, a plain string error
    (400, json.dumps({"error": "'response_format.type' must be 'json_schema' or 'text'"}),
     "unsupported"),
    (400, json.dumps({"error": "'response_format.json_schema.schema' must be an object"}),
     "unsupported"),
    # OpenAI: a model without JSON mode, and a schema strict mode does not take
    (400, openai("Invalid parameter: 'response_format' of type 'json_object' is not supported "
                 "with this model.", param="response_format"), "unsupported"),
    (400, openai("Invalid schema for response_format 'narrative_classification': In "
                 "context=('properties', 'rationale'), 'maxLength' is not permitted.",
                 param="response_format", code="invalid_json_schema"), "unsupported"),
    # OpenAI naming the field only in `param`
    (400, openai("Invalid value: 'json_schemaa'.", param="response_format.type"),
     "unsupported"),
    # vLLM (older error shape; current one is OpenAI's) and its FastAPI validation (422)
    (400, vllm_old("The provided JSON schema contains features not supported by xgrammar."),
     "unsupported"),
    (422, json.dumps({"detail": [{"loc": ["body", "response_format", "type"],
                                  "msg": "Input should be 'text', 'json_object' or "
                                         "'json_schema'", "type": "literal_error"}]}),
     "unsupported"),
    # a server that crashes on the field, saying so
    (500, llama_cpp("JSON schema conversion failed", 500, "server_error"), "unsupported"),
    # bad key, no access, unknown model or path: no format helps
    (401, openai("Incorrect API key provided: sk-***.", code="invalid_api_key"), "fatal"),
    (401, llama_cpp("Invalid API Key", 401, "authentication_error"), "fatal"),
    (403, openai("You are not allowed to use this model.", "permission_error"), "fatal"),
    (404, openai("The model `gemma-9` does not exist or you do not have access to it.",
                 code="model_not_found"), "fatal"),
    (404, vllm_old("The model `gemma-9` does not exist.", 404, "NotFoundError"), "fatal"),
    (404, json.dumps({"error": "model 'gemma-9' not found, try pulling it first"}), "fatal"),
    (404, "<html><title>404 Not Found</title></html>", "fatal"),
    # a 401 that mentions the format is still about the key
    (401, openai("response_format needs a paid key"), "fatal"),
    # a refusal that does not say why
    (400, llama_cpp("Bad request"), "rejected"),
    (400, "", "rejected"),
    (415, "unsupported media type", "rejected"),
    # busy or down: says nothing about the format
    (429, openai("Rate limit reached for requests; response_format requests too",
                 "requests"), "unavailable"),
    (503, llama_cpp("Loading model", 503, "unavailable_error"), "unavailable"),
    (502, "<html><title>502 Bad Gateway</title></html>", "unavailable"),
    (500, json.dumps({"error": {"message": "", "type": "InternalServerError", "param": None,
                                "code": 500}}), "unavailable"),
    (None, "", "unavailable"),
    (200, "{}", "accepted"),
])
def test_reading_an_endpoints_answer_to_a_response_format(status: int | None, body: str,
                                                          verdict: str) -> None:
    assert judge_format_response(status, body) == FormatVerdict(verdict)


def test_error_message_shapes() -> None:
    assert error_message(openai("m", param="p")) == ("m", "p")
    assert error_message(json.dumps({"error": "plain"})) == ("plain", None)
    assert error_message(vllm_old("old")) == ("old", None)
    assert error_message("not json") == ("not json", None)
    assert error_message("[1]") == ("[1]", None)
