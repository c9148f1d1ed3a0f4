"""The response-format probe: before a run, find the structured-output mode the endpoint takes.

`probe` sends one request per candidate mode (answer_schema.candidate_formats: `auto` tries
json_schema, then json_object, then none; an explicit mode is tried alone, so a refused one
fails fast instead of turning every narrative into an error) and returns the first mode the
endpoint accepts, with what every try gave. The request is the run's own (model, prompt,
system role, temperature, seed, max_tokens, extra_body) around a short neutral text, sent
through the client, so its retries and error mapping apply and a fatal answer is recognised
exactly as in the run.

How each answer is read (answer_schema.judge_format_response, from the status AND message):
  * accepted (2xx)                        -> this mode is used;
  * 401/403/404                           -> ProbeError(fatal=True) at once: a bad key, an
                                             unknown model or path; no format can help;
  * an error naming the response format,
    another 4xx, 429/5xx/no answer        -> the next candidate;
  * nothing accepted                      -> ProbeError: fatal when the last refusal was a
                                             4xx (the plain request is refused too, so the
                                             request itself is wrong), not fatal when the
                                             endpoint was only busy or unreachable.
Whether the accepted answer parses is recorded (`ProbeTry.parsed`) but does not decide:
one answer of a small model says little, and the run's parse retries handle the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from asyncrunner.llm.answer_schema import FormatVerdict, candidate_formats, judge_format_response
from asyncrunner.llm.client import (
    ClientSettings,
    Completion,
    HttpSender,
    LLMClient,
    RequestFailure,
    describe_fatal,
)
from asyncrunner.llm.parsing import AnswerParseError, parse_answer
from asyncrunner.llm.throttle import AdaptiveLimiter

__all__ = ["PROBE_TEXT", "ProbeError", "ProbeResult", "ProbeTry", "probe"]

# Neutral, short, and free of the simulator's cue words.
PROBE_TEXT = "The decedent was found at home by a neighbour. No further details are known."


@dataclass(frozen=True, slots=True)
class ProbeTry:
    mode: str
    verdict: FormatVerdict
    status: int | None
    message: str                 # "" when accepted; the client's one-line error otherwise
    parsed: bool | None = None   # accepted only: did the answer parse?
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    mode: str                    # json_schema | json_object | none
    tries: tuple[ProbeTry, ...]

    def summary(self) -> str:
        """One line for the operator, e.g. "response_format: json_object (json_schema:
        unsupported, HTTP 400: JSON schema conversion failed ...)"."""
        refused = [f"{t.mode}: {t.verdict}, {t.message}" for t in self.tries
                   if t.verdict is not FormatVerdict.ACCEPTED]
        return f"response_format: {self.mode}" + (f" ({'; '.join(refused)})" if refused else "")


class ProbeError(Exception):
    """No candidate mode was accepted. `fatal`: the endpoint cannot serve this run (bad
    key, unknown model or path, a refused request field); otherwise it was busy or
    unreachable. The message is one line naming the cause."""

    def __init__(self, message: str, tries: tuple[ProbeTry, ...], *, fatal: bool) -> None:
        super().__init__(message)
        self.tries = tries
        self.fatal = fatal


async def probe(settings: ClientSettings, http: HttpSender, system_prompt: str,
                user_template: str, *, setting: str | None = "auto",
                text: str = PROBE_TEXT, placeholder: str = "<<TEXT>>",
                max_attempts: int | None = None) -> ProbeResult:
    """Try each candidate mode of `setting` with one request; see the module doc."""
    user_prompt = user_template.replace(placeholder, text)
    tries: list[ProbeTry] = []
    attempts = max_attempts if max_attempts is not None else settings.max_attempts
    for mode in candidate_formats(setting):
        client = LLMClient(replace(settings, response_format=None if mode == "none" else mode,
                                   max_attempts=attempts),
                           http, AdaptiveLimiter(1))
        outcome = await client.complete(system_prompt, user_prompt)
        attempt = _judge(mode, outcome, settings.max_tokens)
        tries.append(attempt)
        if attempt.verdict is FormatVerdict.ACCEPTED:
            return ProbeResult(mode, tuple(tries))
        if attempt.verdict is FormatVerdict.FATAL:
            assert isinstance(outcome, RequestFailure)
            raise ProbeError(describe_fatal(outcome), tuple(tries), fatal=True)
    last = tries[-1]
    if last.verdict is FormatVerdict.UNAVAILABLE:
        raise ProbeError(f"the endpoint did not answer the probe ({last.message})",
                         tuple(tries), fatal=False)
    if last.mode == "none":
        message = f"the endpoint refuses the request itself ({last.message})"
    else:
        message = (f"the endpoint refuses response_format {last.mode} ({last.message}); "
                   "set model.response_format to auto or another mode")
    raise ProbeError(message, tuple(tries), fatal=True)


def _judge(mode: str, outcome: Completion | RequestFailure, max_tokens: int) -> ProbeTry:
    if isinstance(outcome, Completion):
        try:
            parse_answer(outcome.content, outcome.finish_reason, max_tokens)
            parsed = True
        except AnswerParseError:
            parsed = False
        return ProbeTry(mode, FormatVerdict.ACCEPTED, 200, "", parsed, outcome.prompt_tokens,
                        outcome.completion_tokens)
    if outcome.status is None or outcome.status == 200:   # no answer, or not a completion
        verdict = FormatVerdict.UNAVAILABLE
    else:
        verdict = judge_format_response(outcome.status, outcome.raw or "")
    if outcome.status == 400 and outcome.category == "data_error":
        verdict = FormatVerdict.REJECTED     # the probe's prompt is too long for the context
    return ProbeTry(mode, verdict, outcome.status, outcome.message)
