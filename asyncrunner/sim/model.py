"""The simulated model: a deterministic keyword rule that answers the research question.

This module owns what the simulator *thinks*: the IPV cue phrases (`IPV_CUES`), the rule that
turns a narrative into a `Classification`, the stable ~`NOISE_PERCENT` % "model error", and
the answer JSON the prompt asks for (`Classification.to_json`). It knows nothing about HTTP,
faults or the OpenAI envelope; the same text always gets the same answer, on any server.

Models and sampling: the reference model (`REFERENCE_MODEL`, "mock-classifier", also what a
request without a model name gets) answers exactly as above for every temperature and seed.
Any other model name answers slightly differently, deterministically: it gets its own
further ~`MODEL_NOISE_PERCENT` % of texts wrong and its own confidence wobble, and at a
temperature above 0 another `temperature` x `SAMPLING_NOISE_PERCENT` % (capped at 1.0) of
texts flip per request seed. So a sweep over mock "models", temperatures and seeds gives
distinguishable, repeatable results, and the tests that pin the reference answers stay put.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

# Canonical cue phrases the simulated model looks for (lower case). synth.py phrases its
# positive narratives with these, so the demo's metrics are meaningful.
IPV_CUES: tuple[str, ...] = (
    "partner",
    "boyfriend",
    "girlfriend",
    "husband",
    "wife",
    "spouse",
    "fiance",
    "ex-",
    "domestic",
    "restraining order",
    "protective order",
    "argument with",
    "jealous",
    "abuse",
    "strangle",
    "choke",
    "stalk",
)

# Share of texts whose answer is flipped: a stable "model error" so metrics are not perfect.
NOISE_PERCENT = 8

REFERENCE_MODEL = "mock-classifier"
MODEL_NOISE_PERCENT = 4
SAMPLING_NOISE_PERCENT = 5

# Any fixed salt gives a stable ~8% flip; this one keeps the short fixture narratives of the
# test suite (tests/conftest.py) out of the flipped share, so tests can reason by keyword.
_HASH_SALT = b"mock-noise-16:"


def _cue_pattern(cue: str) -> re.Pattern[str]:
    # Word-ish boundaries so "wife" does not fire inside "housewife"; a few inflections
    # ("abused", "strangled", "partners") count as the same cue.
    tail = r"(?:s|d|ed|es|er|ers|ing|ive|y)?(?![a-z])" if cue[-1].isalpha() else ""
    return re.compile(r"(?<![a-z])" + re.escape(cue) + tail)


_CUE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (cue, _cue_pattern(cue)) for cue in IPV_CUES)


@dataclass(frozen=True, slots=True)
class Classification:
    """The simulated model's answer for one text."""

    detected: bool
    confidence: float
    indicators: tuple[str, ...]
    rationale: str

    def to_json(self) -> str:
        """The answer object the prompt asks for, as the model would write it."""
        return json.dumps({
            "detected": self.detected,
            "confidence": self.confidence,
            "indicators": list(self.indicators),
            "rationale": self.rationale,
        })


def find_cues(text: str) -> tuple[str, ...]:
    """The `IPV_CUES` present in `text`, in `IPV_CUES` order."""
    lowered = text.lower()
    # The plain substring test first: it is far cheaper than the regex and usually fails.
    return tuple(cue for cue, pattern in _CUE_PATTERNS
                 if cue in lowered and pattern.search(lowered))


def text_hash(text: str) -> int:
    """A stable 64-bit hash of `text`: the source of every per-text "random" choice."""
    digest = hashlib.sha256(_HASH_SALT + text.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big")


def _variant_hash(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big")


def classify_text(text: str, model: str = REFERENCE_MODEL, temperature: float = 0.0,
                  seed: int | None = None) -> Classification:
    """Keyword rule plus a stable ~8% flip; the same text always gets the same answer from
    the reference model. Other models and sampling settings vary it (see the module doc)."""
    cues = find_cues(text)
    h = text_hash(text)
    flipped = h % 100 < NOISE_PERCENT
    wobble = ((h >> 8) % 1000) / 1000.0  # 0..1, independent of the flip decision
    if model and model != REFERENCE_MODEL:
        v = _variant_hash("model", model, text)
        flipped ^= v % 100 < MODEL_NOISE_PERCENT
        wobble = (wobble + ((v >> 8) % 1000) / 1000.0) % 1.0
        if temperature > 0:
            share = min(temperature, 1.0) * SAMPLING_NOISE_PERCENT * 100   # per 10,000
            sampled = _variant_hash("sample", model, str(seed), text)
            flipped ^= sampled % 10_000 < share
    detected = bool(cues) != flipped
    return Classification(detected, round(_confidence(cues, flipped, wobble), 2),
                          *_explanation(detected, cues))


def _confidence(cues: tuple[str, ...], flipped: bool, wobble: float) -> float:
    if flipped:
        # A wrong answer comes with a hesitant confidence, as real models tend to give.
        return 0.5 + 0.2 * wobble
    if cues:
        return min(0.99, 0.7 + 0.07 * len(cues) + 0.1 * wobble)
    return 0.75 + 0.2 * wobble


def _explanation(detected: bool, cues: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(indicators, rationale): never quotes the narrative beyond the cue words."""
    if detected and cues:
        return cues, "The narrative mentions " + ", ".join(repr(c) for c in cues) + "."
    if detected:
        return (("possible relationship conflict",),
                "The circumstances suggest possible relationship conflict.")
    if cues:
        return (), "Relationship terms appear but not in a context of partner violence."
    return (), "No intimate partner violence indicators are mentioned."
