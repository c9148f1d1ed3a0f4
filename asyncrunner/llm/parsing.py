"""Turning a chat-completion message into a validated classification `Answer`.

This module owns everything between the model's message text and a typed answer: finding
the answer object in the text, and the coercions that make a slightly off-format answer
usable or reject it. It is pure (no I/O, no logging). Every failure is an
`AnswerParseError` whose message is one short line that never echoes the response; the raw
response is stored beside the error by the caller.

Finding the answer
    1. Reasoning is dropped first, because drafts of the answer inside it must not win:
       - OpenAI "harmony" (gpt-oss): the body of the last `final` channel message is used;
         without one, analysis/commentary messages are dropped and the special tokens
         removed from what is left.
       - `<think>...</think>` / `<thinking>...</thinking>` blocks are removed; text up to a
         stray closing tag (the opening one was in the chat template) is dropped, and so is
         text after an unclosed opening tag (the model ran out of tokens while thinking).
    2. Every `{` is tried as the start of a JSON object (`json.JSONDecoder.raw_decode`, which
       respects strings and escapes). After an object decodes, the scan resumes at its end,
       so only top-level objects count; a `{` that does not start valid JSON (prose, a
       truncated object) is skipped. Literal control characters inside strings are
       accepted, because models often put raw newlines in the rationale.
    3. The LAST object with a "detected" key wins (a final answer after a reasoning draft).
       Code fences and surrounding prose need no special handling.

Keys
    Matched exactly; if absent, a case-insensitive match ("Detected") is used, and two
    case-variants of the same key with no exact one are an error. Other keys are ignored.

Coercions
    detected    true/false; strings yes/no/true/false/1/0 (trimmed, any case); ints 0/1.
                Anything else ("maybe", 2, 1.0, null, a list) is an error.
    confidence  a number in 0..1 as is; a number in (1, 100] is a percentage (80 -> 0.8);
                strings "0.8", "80" follow the same rule, and "80%" / "80 %" are always a
                percentage (so "0.5%" -> 0.005). Missing or null -> None. Booleans,
                negative, above 100, NaN/infinity or non-numeric (including "") are errors.
    indicators  a list; strings are trimmed, other items converted with str(), nulls and
                empty strings dropped. A single string -> a one-item tuple. Missing or
                null -> (). Any other type is an error.
    rationale   a string as is; missing or null -> None; other types converted with str().

Errors
    "empty response" for None/blank content; "no JSON object with 'detected' in response"
    when nothing qualifies; a field-specific reason otherwise. With finish_reason "length"
    every error gains "(output truncated: finish_reason=length)", while a complete valid
    answer found despite the truncation is accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "AnswerParseError", "parse_answer"]


@dataclass(frozen=True, slots=True)
class Answer:
    detected: bool
    confidence: float | None  # 0..1
    indicators: tuple[str, ...]
    rationale: str | None


class AnswerParseError(ValueError):
    """message is a short one-line reason, never containing the narrative or the full response"""


EMPTY = "empty response"
NO_JSON = "no JSON object with 'detected' in response"
TRUNCATED = " (output truncated: finish_reason=length)"

_DECODER = json.JSONDecoder(strict=False)
_TRUE_WORDS = frozenset({"yes", "true", "1"})
_FALSE_WORDS = frozenset({"no", "false", "0"})

# A harmony message: `<|channel|>NAME [to=...] [<|constrain|>json]<|message|>BODY`, the body
# ending at the next special token that closes or starts a message, or at the end (truncated).
_HARMONY_MESSAGE = re.compile(
    r"<\|channel\|>(?P<header>[^<]*)(?:<\|constrain\|>[^<]*)?<\|message\|>"
    r"(?P<body>.*?)(?=<\|(?:end|return|call|start|channel)\|>|\Z)",
    re.DOTALL,
)
_HARMONY_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_THINK_BLOCK = re.compile(r"<(think|thinking)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.IGNORECASE)


def parse_answer(content: str | None, finish_reason: str | None = None) -> Answer:
    """The answer in `content`, or AnswerParseError saying in one short line why not."""
    try:
        return _parse(content)
    except AnswerParseError as exc:
        if finish_reason == "length":
            raise AnswerParseError(f"{exc}{TRUNCATED}") from exc
        raise


def _parse(content: str | None) -> Answer:
    if content is not None and not isinstance(content, str):
        raise AnswerParseError(f"content must be text, got {type(content).__name__}")
    if content is None or not content.strip():
        raise AnswerParseError(EMPTY)
    obj = _last_answer_object(_strip_think(_strip_harmony(content)))
    if obj is None:
        raise AnswerParseError(NO_JSON)
    return Answer(
        detected=_detected(_field(obj, "detected")),
        confidence=_confidence(_field(obj, "confidence")),
        indicators=_indicators(_field(obj, "indicators")),
        rationale=_rationale(_field(obj, "rationale")),
    )


# --- locating the answer -------------------------------------------------------------------


def _strip_harmony(text: str) -> str:
    if "<|message|>" not in text:
        return text
    messages = list(_HARMONY_MESSAGE.finditer(text))
    finals = [m for m in messages if m["header"].split()[:1] == ["final"]]
    if finals:
        return finals[-1]["body"]
    # No final message means the model never got to answer; its analysis may hold drafts.
    return _HARMONY_TOKEN.sub(" ", _HARMONY_MESSAGE.sub(" ", text))


def _strip_think(text: str) -> str:
    text = _THINK_BLOCK.sub(" ", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _THINK_OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    return text


def _top_level_objects(text: str) -> Iterator[dict[str, Any]]:
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        pos = text.find("{", end)


def _last_answer_object(text: str) -> dict[str, Any] | None:
    found = None
    for obj in _top_level_objects(text):
        if any(key.lower() == "detected" for key in obj):
            found = obj
    return found


def _key_for(obj: dict[str, Any], name: str) -> str | None:
    if name in obj:
        return name
    variants = [key for key in obj if key.lower() == name]
    if len(variants) > 1:
        raise AnswerParseError(f"ambiguous keys for {name!r}: {len(variants)} case variants")
    return variants[0] if variants else None


def _field(obj: dict[str, Any], name: str) -> Any:
    key = _key_for(obj, name)
    return None if key is None else obj[key]


# --- coercions -----------------------------------------------------------------------------


def _detected(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # bool is an int subclass, handled above; only the exact ints 0/1 mean no/yes.
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise AnswerParseError(f"'detected' must be true/false, yes/no or 1/0, got {_describe(value)}")


def _confidence(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        number, percent = _number_text(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number, percent = _as_float(value), False
    else:
        raise _bad_confidence(value)
    if not math.isfinite(number) or not 0 <= number <= 100:
        raise _bad_confidence(value)
    return number / 100 if percent or number > 1 else number


def _number_text(value: str) -> tuple[float, bool]:
    text = value.strip()
    percent = text.endswith("%")
    if percent:
        text = text[:-1].rstrip()
    try:
        return float(text), percent
    except ValueError:
        raise _bad_confidence(value) from None


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float is out of range anyway
        raise _bad_confidence(value) from None


def _bad_confidence(value: Any) -> AnswerParseError:
    return AnswerParseError(
        f"'confidence' must be a number in 0..1 or a percentage up to 100, got {_describe(value)}"
    )


def _indicators(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise AnswerParseError(f"'indicators' must be a list of strings, got {_describe(value)}")
    texts = (_indicator_text(item) for item in items)
    return tuple(text for text in texts if text)


def _indicator_text(item: Any) -> str:
    if item is None:
        return ""
    return (item if isinstance(item, str) else str(item)).strip()


def _rationale(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _describe(value: Any) -> str:
    """A short, one-line picture of a bad value: long strings could carry the narrative."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else f"a string of {len(value)} chars"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 20 else f"a very long {type(value).__name__}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
