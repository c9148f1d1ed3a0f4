"""parse_answer: finding the answer in what models really emit, coercing near-misses, and
rejecting the rest with a short message that never echoes the response."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from asyncrunner.llm.parsing import Answer, AnswerParseError, parse_answer

FULL = '{"detected": true, "confidence": 0.9, "indicators": ["a", "b"], "rationale": "r"}'
FULL_ANSWER = Answer(detected=True, confidence=0.9, indicators=("a", "b"), rationale="r")
SECRET = "NARRATIVE-SECRET-TEXT"


def answer_of(**fields: Any) -> Answer:
    return parse_answer(json.dumps(fields))


def parse_error(content: str | None, finish_reason: str | None = None) -> str:
    with pytest.raises(AnswerParseError) as info:
        parse_answer(content, finish_reason)
    message = str(info.value)
    assert len(message) < 200 and "\n" not in message
    return message


# --- locating the answer -------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    FULL,
    f"  \n{FULL}\n\n",
    f"```json\n{FULL}\n```",
    f"```\n{FULL}\n```",
    f"Here is my answer:\n```json\n{FULL}\n```\nHope this helps.",
    f"Sure! {FULL} Let me know if you need more.",
    # reasoning text with braces, sets and JSON-like fragments before the answer
    "Thinking: the set {a, b} matters; a {broken: json} and {\"x\": 1} too.\n"
    "The schema is {\"detected\": bool, ...}.\nFinal:\n" + FULL,
    # a draft answer in the reasoning loses to the final one
    '{"detected": false, "confidence": 0.1}\nOn reflection:\n' + FULL,
    # harmony (gpt-oss)
    "<|channel|>analysis<|message|>Draft: {\"detected\": false}. Hmm.<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{FULL}<|return|>",
    "<|channel|>analysis<|message|>thinking<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{FULL}",
    "<|channel|>analysis<|message|>x<|end|>"
    f"<|start|>assistant<|channel|>final <|constrain|>json<|message|>{FULL}<|end|>",
    # <think> blocks, including a stray closing tag whose opening was in the chat template
    '<think>maybe {"detected": false}? {{ }</think>\n' + FULL,
    '<THINK>\nstuff {"detected": false}\n</THINK>' + FULL,
    'the opening tag was in the template {"detected": false}</think>' + FULL,
    '<thinking>{"detected": false}</thinking>```json\n' + FULL + "\n```",
])
def test_answer_is_found(content: str) -> None:
    assert parse_answer(content) == FULL_ANSWER


def test_last_object_with_detected_wins_and_others_are_ignored() -> None:
    content = ('{"detected": false, "confidence": 0.2} then {"detected": true, "confidence": 0.7}'
               ' and finally {"other": 1}')
    assert parse_answer(content) == Answer(True, 0.7, (), None)


def test_nested_braces_and_escapes_inside_strings() -> None:
    rationale = 'saw "{"detected": false}" and {nested {braces}} \\ } {'
    content = "prefix { " + json.dumps({"detected": True, "rationale": rationale}) + " suffix }"
    assert parse_answer(content).rationale == rationale


def test_nested_object_is_not_a_top_level_candidate() -> None:
    content = '{"detected": true, "meta": {"detected": false}}'
    assert parse_answer(content).detected is True


def test_raw_newlines_inside_strings_are_accepted() -> None:
    content = '{"detected": true, "rationale": "line 1\nline 2"}'
    assert parse_answer(content).rationale == "line 1\nline 2"


def test_harmony_without_final_channel_ignores_the_analysis() -> None:
    content = '<|channel|>analysis<|message|>I think {"detected": true} fits'
    assert parse_error(content) == "no JSON object with 'detected' in response"


def test_unclosed_think_is_ignored() -> None:
    assert "no JSON object" in parse_error('<think>so {"detected": true} probably')


# --- coercions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (1, True), (0, False),
    ("yes", True), ("No", False), (" TRUE ", True), ("false", False), ("1", True), ("0", False),
])
def test_detected_coercions(value: Any, expected: bool) -> None:
    assert answer_of(detected=value).detected is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, -1, 1.0, None, [], {}])
def test_detected_ambiguous_values_are_errors(value: Any) -> None:
    assert "'detected'" in parse_error(json.dumps({"detected": value}))


@pytest.mark.parametrize(("value", "expected"), [
    (0.8, 0.8), (0, 0.0), (1, 1.0), (0.0, 0.0), (80, 0.8), (100, 1.0), (55.5, 0.555),
    ("0.8", 0.8), (" 0.25 ", 0.25), ("80", 0.8), ("80%", 0.8), ("80 %", 0.8), ("0.5%", 0.005),
    (None, None),
])
def test_confidence_coercions(value: Any, expected: float | None) -> None:
    assert answer_of(detected=True, confidence=value).confidence == pytest.approx(expected)


@pytest.mark.parametrize("value", [-0.1, 100.5, 101, 10**400, "high", "", "-5%", "150%", "nan",
                                   "inf", True, [0.5], {"v": 1}])
def test_confidence_out_of_range_or_non_numeric_is_error(value: Any) -> None:
    assert "'confidence'" in parse_error(json.dumps({"detected": True, "confidence": value}))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_confidence_non_finite_json_literal_is_error(literal: str) -> None:
    assert "'confidence'" in parse_error(f'{{"detected": true, "confidence": {literal}}}')


@pytest.mark.parametrize(("value", "expected"), [
    (["a", "b"], ("a", "b")),
    ([" a ", "", "  ", None, 3, True], ("a", "3", "True")),
    ("single", ("single",)),
    ("", ()),
    ([], ()),
    (None, ()),
])
def test_indicators_coercions(value: Any, expected: tuple[str, ...]) -> None:
    assert answer_of(detected=True, indicators=value).indicators == expected


@pytest.mark.parametrize("value", [{"a": 1}, 3, True])
def test_indicators_other_types_are_errors(value: Any) -> None:
    assert "'indicators'" in parse_error(json.dumps({"detected": True, "indicators": value}))


@pytest.mark.parametrize(("value", "expected"), [
    ("because", "because"), (None, None), (42, "42"), (["x"], "['x']"),
])
def test_rationale_coercions(value: Any, expected: str | None) -> None:
    assert answer_of(detected=False, rationale=value).rationale == expected


def test_missing_optional_fields_and_extra_fields() -> None:
    assert parse_answer('{"detected": "no", "severity": 3, "notes": {"x": [1]}}') == Answer(
        detected=False, confidence=None, indicators=(), rationale=None)


def test_case_insensitive_keys_are_a_fallback() -> None:
    content = '{"Detected": "yes", "CONFIDENCE": 70, "Indicators": "x", "Rationale": "r"}'
    assert parse_answer(content) == Answer(True, 0.7, ("x",), "r")
    # the exact key wins over a case variant
    assert parse_answer('{"Detected": false, "detected": true}').detected is True
    assert "ambiguous" in parse_error('{"Detected": false, "DETECTED": true}')


def test_answer_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL_ANSWER.detected = False  # type: ignore[misc]


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [None, "", "   \n\t "])
def test_empty_response(content: str | None) -> None:
    assert parse_error(content) == "empty response"


@pytest.mark.parametrize("content", [
    "I cannot classify this narrative.",
    '{"result": true, "confidence": 0.4}',
    "{not json at all}",
    '["detected", true]',
    '{"answer": {"detected": true}}',
])
def test_no_json_with_detected(content: str) -> None:
    assert parse_error(content) == "no JSON object with 'detected' in response"


@pytest.mark.parametrize("content", [
    '{"detected": true, "confidence": 0.9, "rationale": "the narrative says',
    '```json\n{"detected": true, "indic',
    '<think>long reasoning that never ends',
    "<|channel|>analysis<|message|>long reasoning that never ends",
])
def test_truncated_output_with_finish_reason_length(content: str) -> None:
    message = parse_error(content, "length")
    assert "finish_reason=length" in message
    assert "finish_reason" not in parse_error(content, "stop")


def test_complete_answer_is_accepted_despite_length() -> None:
    assert parse_answer(FULL + "\nAnd some trailing tex", "length") == FULL_ANSWER


def test_empty_with_length_says_both() -> None:
    message = parse_error("", "length")
    assert "empty response" in message and "finish_reason=length" in message


@pytest.mark.parametrize("content", [
    json.dumps({"detected": SECRET * 3, "rationale": SECRET}),
    json.dumps({"detected": True, "confidence": SECRET, "rationale": SECRET}),
    json.dumps({"detected": True, "indicators": {SECRET: SECRET}}),
    SECRET * 50,
    '{"detected": true, "rationale": "' + SECRET * 50,
])
@pytest.mark.parametrize("finish_reason", [None, "length"])
def test_error_messages_never_echo_the_content(content: str, finish_reason: str | None) -> None:
    assert SECRET not in parse_error(content, finish_reason)


def test_bad_value_is_described_briefly() -> None:
    assert parse_error('{"detected": "maybe"}').endswith("got 'maybe'")


def test_pathological_input_is_fast_and_safe() -> None:
    assert "no JSON" in parse_error("{" * 20_000 + '"x": ' + "[" * 5000)
    assert parse_answer("{ " * 5000 + FULL) == FULL_ANSWER


# --- issue #15: truncation named, indicators as JSON, parse-retry helpers ---------------------

from asyncrunner.llm.parsing import (  # noqa: E402
    indicators_json,
    normalize_stored_indicators,
    repair_messages,
    resample_seed,
)

CUT = '{"detected": true, "confidence": 0.9, "indicators": ["partner", "thre'


def parse_failure(content: str | None, finish_reason: str | None = None,
                  max_tokens: int | None = None) -> AnswerParseError:
    with pytest.raises(AnswerParseError) as info:
        parse_answer(content, finish_reason, max_tokens)
    return info.value


@pytest.mark.parametrize("content", [
    CUT, "```json\n" + CUT, '{"detected": true, "rationale": "the narr', '{"detected": tr',
    '{"detected": true, "indicators": ["a", "b", "c", "d", "e", "f", "g"',
    "no JSON at all, just prose that ran on and on",
])
def test_truncation_is_named_with_max_tokens(content: str) -> None:
    error = parse_failure(content, "length", 256)
    assert str(error) == "answer cut off at max_tokens=256 (finish_reason=length)"
    assert error.truncated
    assert str(parse_failure(content, "length")) == (
        "answer cut off at max_tokens (finish_reason=length)")


def test_other_reasons_keep_their_words_and_gain_the_cut() -> None:
    assert str(parse_failure("", "length", 64)) == (
        "empty response: answer cut off at max_tokens=64 (finish_reason=length)")
    bad = parse_failure('{"detected": "maybe"}', "length", 64)
    assert str(bad).startswith("'detected' must be") and bad.truncated
    assert str(bad).endswith("answer cut off at max_tokens=64 (finish_reason=length)")


@pytest.mark.parametrize("content", [CUT, '{"Detected": false, "rationale": "x'])
def test_unfinished_json_without_finish_reason_length_is_named_too(content: str) -> None:
    for finish_reason in (None, "stop"):
        error = parse_failure(content, finish_reason, 256)
        assert str(error) == "answer cut off: the JSON object is unfinished"
        assert error.truncated and "finish_reason" not in str(error)


@pytest.mark.parametrize("content", [
    "{not json at all}", '{"detected": true,, }', "I cannot classify this narrative.",
    '{"result": true, "confidence": 0.4', "{'detected': True, 'confidence': 0.9}",
])
def test_broken_but_finished_text_is_not_called_truncated(content: str) -> None:
    error = parse_failure(content, "stop", 256)
    assert not error.truncated and str(error) == "no JSON object with 'detected' in response"


@pytest.mark.parametrize(("value", "expected"), [
    ([{"indicator": "threats", "evidence": "he said he would kill her"}],
     ("threats: he said he would kill her",)),
    ([{"indicator": "threats", "severity": 3, "present": True}], ("threats",)),
    ([{"score": 0.9}, {}, []], ()),
    (["a", ["b", " c "]], ("a", "b, c")),
    ([{"type": "stalking", "details": {"quote": "followed  her\nhome", "n": 2}}],
     ("stalking: followed her home",)),
    ([{"cue": "jealousy", "quotes": ["q1", "q2"]}], ("jealousy: q1, q2",)),
])
def test_object_shaped_indicators_are_flattened_to_text(value: Any,
                                                        expected: tuple[str, ...]) -> None:
    answer = answer_of(detected=True, indicators=value)
    assert answer.indicators == expected
    stored = indicators_json(answer.indicators)
    assert json.loads(stored) == list(expected)
    assert "{" not in stored and "'" not in stored


def test_deeply_nested_indicator_objects_are_safe() -> None:
    deep: Any = "core"
    for _ in range(50):
        deep = {"x": deep}
    assert answer_of(detected=True, indicators=[deep, "b"]).indicators == ("b",)


@pytest.mark.parametrize(("stored", "expected"), [
    (None, None),
    ("", None),
    ("[]", "[]"),
    ('["a", "b"]', '["a", "b"]'),
    ('["caf\\u00e9"]', '["caf\\u00e9"]'),
    # object indicators stored by older versions as Python reprs inside a JSON array
    ("[\"{'indicator': 'threats', 'evidence': 'he said'}\", \"stalking\"]",
     '["threats: he said", "stalking"]'),
    # or as a whole Python literal
    ("['a', {'indicator': 'b', 'score': 2}]", '["a", "b"]'),
    ('[{"indicator": "x", "evidence": "y"}]', '["x: y"]'),
    ('"single"', '["single"]'),
    ("free text, not JSON", '["free text, not JSON"]'),
    ('["{not a literal}"]', '["{not a literal}"]'),
])
def test_normalize_stored_indicators_for_migrate(stored: str | None,
                                                 expected: str | None) -> None:
    result = normalize_stored_indicators(stored)
    assert result == expected
    if result is not None:
        assert all(isinstance(item, str) for item in json.loads(result))
        assert normalize_stored_indicators(result) == result      # idempotent


def test_repair_messages() -> None:
    turns = repair_messages("{'detected': True}", "no JSON object with 'detected' in response")
    assert [t["role"] for t in turns] == ["assistant", "user"]
    assert turns[0]["content"] == "{'detected': True}"
    instruction = turns[1]["content"]
    assert "no JSON object with 'detected' in response" in instruction
    assert "only the JSON object" in instruction and '"detected"' in instruction
    assert repair_messages(None, "empty response")[0]["content"] == "(no answer)"
    assert len(repair_messages("x" * 10_000, "r")[0]["content"]) == 4000


def test_resample_seed() -> None:
    assert resample_seed(1024, 1) == 1024
    seeds = [resample_seed(1024, attempt) for attempt in (2, 3, 4)]
    assert len(set(seeds)) == 3 and 1025 not in seeds and 1024 not in seeds
    assert seeds == [resample_seed(1024, attempt) for attempt in (2, 3, 4)]   # reproducible
    assert all(0 <= s < 2**31 for s in seeds)
    assert resample_seed(1025, 2) != seeds[0]
    assert isinstance(resample_seed(None, 2), int)
    with pytest.raises(ValueError):
        resample_seed(1024, 0)
