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
    indicators  a list; strings are trimmed, numbers and booleans converted with str(),
                nulls and empty strings dropped. An object item is flattened to its text:
                its string values in the object's order (numbers and booleans, which are
                scores or flags, left out; nested lists and objects flattened the same way)
                joined by ": ", so {"indicator": "threats", "evidence": "he said"} ->
                "threats: he said"; an object without text is dropped. A list item is
                flattened likewise, joined by ", ". A single string -> a one-item tuple.
                Missing or null -> (). Any other type is an error. Stored as a JSON array of
                strings (`indicators_json`); `normalize_stored_indicators` converts what
                older versions stored (Python reprs of objects) for `migrate`.
    rationale   a string as is; missing or null -> None; other types converted with str().

Errors
    "empty response" for None/blank content; "no JSON object with 'detected' in response"
    when nothing qualifies; a field-specific reason otherwise. A complete valid answer is
    accepted whatever the finish_reason. Truncation is named (`AnswerParseError.truncated`):
    with finish_reason "length" the error is "answer cut off at max_tokens=N
    (finish_reason=length)" (prefixed by the reason when it is not simply "no JSON": an empty
    response, a bad field); without it, an answer object that starts but runs out of text
    ("{"detected": true, "rationale": "the narr") is "answer cut off: the JSON object is
    unfinished".

Parse retries (the caller decides; this module only builds them)
    repair      `repair_messages(content, reason)`: the model's invalid answer as an assistant
                turn and one short user instruction to return only the JSON object, sent
                after the original prompt.
    resample    `resample_seed(run_seed, attempt)`: the seed of a fresh try, derived from the
                run seed and the attempt number (1 is the first request, which keeps the run
                seed).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Answer",
    "AnswerParseError",
    "indicators_json",
    "normalize_stored_indicators",
    "parse_answer",
    "repair_messages",
    "resample_seed",
    "truncation_message",
]


PARSER_VERSION = "1"  # bump when a change here can turn the same response into another answer

@dataclass(frozen=True, slots=True)
class Answer:
    detected: bool
    confidence: float | None  # 0..1
    indicators: tuple[str, ...]
    rationale: str | None


class AnswerParseError(ValueError):
    """message is a short one-line reason, never containing the narrative or the full response;
    `truncated`: the answer was cut off (finish_reason "length", or unfinished JSON)"""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


EMPTY = "empty response"
NO_JSON = "no JSON object with 'detected' in response"
UNFINISHED = "answer cut off: the JSON object is unfinished"

_DECODER = json.JSONDecoder(strict=False)
_encode_string = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str
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


def truncation_message(max_tokens: int | None) -> str:
    """"answer cut off at max_tokens=N (finish_reason=length)"."""
    limit = "max_tokens" if max_tokens is None else f"max_tokens={max_tokens}"
    return f"answer cut off at {limit} (finish_reason=length)"


def parse_answer(content: str | None, finish_reason: str | None = None,
                 max_tokens: int | None = None) -> Answer:
    """The answer in `content`, or AnswerParseError saying in one short line why not.
    `max_tokens` (the request's) only goes into the truncation message."""
    try:
        return _parse(content)
    except AnswerParseError as exc:
        if finish_reason == "length":
            cut = truncation_message(max_tokens)
            reason = str(exc)
            message = cut if reason in (NO_JSON, UNFINISHED) else f"{reason}: {cut}"
            raise AnswerParseError(message, truncated=True) from exc
        raise


def _parse(content: str | None) -> Answer:
    if content is not None and not isinstance(content, str):
        raise AnswerParseError(f"content must be text, got {type(content).__name__}")
    if content is None or not content.strip():
        raise AnswerParseError(EMPTY)
    # Every reasoning marker starts with "<": a plain answer (the common case) skips the
    # stripping, which could not change it.
    text = _strip_think(_strip_harmony(content)) if "<" in content else content
    obj = _last_answer_object(text)
    if obj is None:
        if _unfinished_answer(text):
            raise AnswerParseError(UNFINISHED, truncated=True)
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
        if "detected" in obj or any(key.lower() == "detected" for key in obj):
            found = obj
    return found


_DETECTED_KEY = re.compile(r'\{\s*"detected"\s*:', re.IGNORECASE)


def _unfinished_answer(text: str) -> bool:
    """An answer object starts (`{"detected":`) but the text ends inside it."""
    start = None
    for start_match in _DETECTED_KEY.finditer(text):
        start = start_match.start()
    if start is None:
        return False
    try:
        _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        return exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
    except RecursionError:
        return False
    return False


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
    if type(value) is float and 0.0 <= value <= 1.0:
        return value            # the common answer, without the checks below
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
    try:
        return tuple(filter(None, map(str.strip, items)))   # all strings: the common case
    except TypeError:
        pass
    texts = (_indicator_text(item) for item in items)
    return tuple(text for text in texts if text)


def _indicator_text(item: Any) -> str:
    if item is None:
        return ""
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict | list):
        return _flatten(item, 0)
    return str(item).strip()


def _flatten(value: Any, depth: int) -> str:
    """The text in an object or list (see the module doc); numbers and flags left out."""
    if isinstance(value, str):
        return " ".join(value.split())
    if depth > 8:
        return ""
    if isinstance(value, dict):
        parts, sep = [_flatten(v, depth + 1) for v in value.values()], ": "
    elif isinstance(value, list):
        parts, sep = [_flatten(v, depth + 1) for v in value], ", "
    else:
        return ""
    return sep.join(part for part in parts if part)


def indicators_json(indicators: tuple[str, ...] | list[str]) -> str:
    """How indicators are stored: a JSON array of strings, byte for byte
    `json.dumps(list(indicators))`, by json's C string encoder alone (once per answer)."""
    return "[" + ", ".join(map(_encode_string, indicators)) + "]"


def normalize_stored_indicators(stored: str | None) -> str | None:
    """A stored `indicators` value as a JSON array of strings (for `migrate`).

    Older versions stored object-shaped indicators as Python reprs, either as the items of a
    JSON array ('["{\'indicator\': \'x\'}"]') or as a whole Python literal ("['x', {...}]").
    Each item is flattened as in parsing. None and blank stay None; text that is neither
    JSON nor a Python literal becomes a one-item array of itself. Idempotent.
    """
    if stored is None or not stored.strip():
        return None
    value: Any
    try:
        value = json.loads(stored)
    except ValueError:
        value = _literal(stored)
        if value is None:
            return indicators_json([stored.strip()])
    if not isinstance(value, list):
        value = [value]
    items: list[str] = []
    for item in value:
        if isinstance(item, str):
            text = item.strip()
            if text[:1] in "{[" and text[-1:] in "}]":
                literal = _literal(text)
                if isinstance(literal, dict | list):
                    item = literal
        flat = _indicator_text(item)
        if flat:
            items.append(flat)
    return indicators_json(items)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


# --- parse retries -------------------------------------------------------------------------

REPAIR_INSTRUCTION = (
    "Your previous reply could not be used ({reason}). Reply again with only the JSON object "
    '{{"detected": true or false, "confidence": a number from 0 to 1, "indicators": '
    '[a few short phrases], "rationale": "one short sentence"}} and no other text.'
)
_REPAIR_ANSWER_CHARS = 4000


def repair_messages(content: str | None, reason: str) -> list[dict[str, str]]:
    """The turns a repair request adds after the original prompt: the model's invalid answer
    (at most 4,000 characters of it) as the assistant's, then the instruction. `reason` is
    the parse error's message (never the narrative)."""
    answer = (content or "").strip()[:_REPAIR_ANSWER_CHARS] or "(no answer)"
    return [{"role": "assistant", "content": answer},
            {"role": "user", "content": REPAIR_INSTRUCTION.format(reason=reason)}]


def resample_seed(run_seed: int | None, attempt: int) -> int:
    """The seed of parse attempt `attempt` (1 = the first request: the run seed itself).

    Later attempts take 31 bits of SHA-256("asyncrunner-resample:<run seed>:<attempt>"),
    so they are reproducible from the run seed, differ per attempt, and do not collide
    with the seed+1, seed+2 ... of a sweep's repeats.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if attempt == 1 and run_seed is not None:
        return run_seed
    digest = hashlib.sha256(f"asyncrunner-resample:{run_seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


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
