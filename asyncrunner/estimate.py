"""`asyncrunner plan`: what a run would send, its tokens, time and cost. Nothing is stored.

    load_config ─> count_workload()   the data file read exactly as `run` ingests it, but
                                       into an in-memory SQLite (never a file): the counts,
                                       max_narratives, data.sample, the prompt characters
                ─> probe_endpoint()   --probe K: the first K prompts sent for real, one at a
                                       time, through the run's client (the simulator in-process
                                       for provider mock); latency and usage kept in memory
                ─> estimate()          tokens, wall time and cost: arithmetic only
                ─> render_*()          one fact per line

The workload block is written before the probe starts, so an operator sees the counts while
it runs. Errors are one-line AsyncRunnerErrors: a bad config or data file (exit 2), a probe
the endpoint refuses outright (401/403/404, a refused request field: exit 4). No database,
log file or export is created; narrative text never leaves this module except in the probe's
requests.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass, replace
from typing import IO, Any

from asyncrunner.config import TEXT_PLACEHOLDER, Config, load_config, resolve_data_path
from asyncrunner.db import sample, schema, store
from asyncrunner.db.ingest import ingest, readable_checksum
from asyncrunner.errors import EndpointCannotServe, InputError, UsageError
from asyncrunner.llm.client import (
    Completion,
    RequestFailure,
    describe_fatal,
    normalize_api_url,
    redact_url,
)
from asyncrunner.llm.setup import client_settings, endpoints_from
from asyncrunner.pipeline.progress import format_duration
from asyncrunner.textsafe import for_terminal

__all__ = ["CHARS_PER_TOKEN", "SUGGESTED_PROBE", "Cost", "Estimate", "PlanReport",
           "ProbeStats", "Workload", "costs", "count_workload", "estimate",
           "make_plan", "nearest_rank", "plan_command", "probe_endpoint", "prompt_chars",
           "render", "render_workload"]

CHARS_PER_TOKEN = 4            # the usual rule of thumb for English text and BPE tokenizers
SUGGESTED_PROBE = 20
_LABEL_WIDTH = 28


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True, slots=True)
class Workload:
    """The narratives a new experiment on this config would send, and what they weigh."""

    data_file: str
    n_rows: int             # spreadsheet rows read (header and empty rows aside)
    n_in_file: int          # narratives ingest keeps
    n_blank: int            # blank or placeholder text (n_placeholder of them placeholders)
    n_placeholder: int
    n_duplicates: int
    n_no_id: int            # narrative slots of rows without an id
    n_after_limit: int      # after run.max_narratives
    n: int                  # to send (after data.sample)
    prompt_chars: int       # characters of the n requests' messages, summed exactly
    first_prompts: tuple[str, ...] = ()   # user turns of the first narratives (for --probe)


def prompt_chars(cfg: Config, text: str) -> int:
    """Characters of one request's messages, as the client builds them: the system prompt
    and the user template around the narrative (system_role user: joined by a blank line)."""
    return _message_chars(cfg, cfg.prompt.user_template.replace(TEXT_PLACEHOLDER, text))


def _message_chars(cfg: Config, user_prompt: str) -> int:
    p = cfg.prompt
    joiner = 2 if p.system_role == "user" and p.system_prompt else 0
    return len(p.system_prompt) + joiner + len(user_prompt)


def count_workload(cfg: Config, *, keep_prompts: int = 0) -> Workload:
    """Ingest the data file into an in-memory database exactly as `run` does, then select
    as a new experiment would (plan._plan_new): max_narratives' cutoff, then the sample.
    `keep_prompts`: keep the rendered user turns of the first this many narratives."""
    path = resolve_data_path(cfg)
    if not path.is_file():
        raise InputError(f"config key 'data.file': data file not found: {cfg.data.file}")
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        schema.migrate(conn)
        report = ingest(conn, cfg.data, path, checksum=readable_checksum(path))
        checksum = report.data_checksum
        cutoff = store.set_cutoff(conn, checksum, cfg.run.max_narratives)
        n_after_limit = store.count_set(conn, checksum, cutoff)
        rows = conn.execute(
            "SELECT incident_id, narrative_type, narrative_text FROM source_narratives "
            "WHERE data_checksum = ? AND (? IS NULL OR narrative_id <= ?) "
            "ORDER BY narrative_id", (checksum, cutoff, cutoff)).fetchall()
        texts: list[str] = [str(r[2]) for r in rows]
        if cfg.data.sample is not None:
            keys = sample.draw(conn, checksum, cutoff, cfg.data.sample)
            by_key = {(str(r[0]), str(r[1])): str(r[2]) for r in rows}
            texts = [by_key[key] for key in keys]
    template = cfg.prompt.user_template
    return Workload(
        data_file=str(path), n_rows=report.n_rows, n_in_file=report.n_narratives,
        n_blank=report.n_blank, n_placeholder=report.n_placeholder,
        n_duplicates=report.n_duplicates, n_no_id=report.n_no_id,
        n_after_limit=n_after_limit, n=len(texts),
        prompt_chars=sum(prompt_chars(cfg, t) for t in texts),
        first_prompts=tuple(template.replace(TEXT_PLACEHOLDER, t)
                            for t in texts[:keep_prompts]))


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True, slots=True)
class ProbeStats:
    """What K real requests showed. Holds no text: timings, token counts, error lines."""

    sent: int
    latencies_s: tuple[float, ...]               # answered requests, in order
    completion_tokens: tuple[int, ...]           # answered requests that reported usage
    prompt_usage: tuple[tuple[int, int], ...]    # (characters sent, prompt_tokens reported)
    failures: tuple[str, ...]                    # "category: message" of the others
    response_format: str                         # json_schema | json_object | none
    retried: int = 0                             # answers that needed more than one attempt

    @property
    def answered(self) -> int:
        return len(self.latencies_s)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.latencies_s) if self.latencies_s else None

    @property
    def p90_s(self) -> float | None:
        return nearest_rank(self.latencies_s, 0.9)

    @property
    def mean_completion_tokens(self) -> float | None:
        return statistics.fmean(self.completion_tokens) if self.completion_tokens else None

    @property
    def tokens_per_char(self) -> float | None:
        """Prompt tokens the server counted per character sent (chat template included)."""
        chars = sum(c for c, _ in self.prompt_usage)
        return sum(t for _, t in self.prompt_usage) / chars if chars else None


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The q-quantile by nearest rank (defined for one value too); None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def probe_endpoint(cfg: Config, prompts: Sequence[str],
                         env: Mapping[str, str]) -> ProbeStats:
    """Send `prompts` one at a time as the run would (after the same response-format probe)
    and keep only timings and usage. A fatal answer raises EndpointCannotServe."""
    from asyncrunner.llm.answer_schema import candidate_formats
    from asyncrunner.llm.client import LLMClient, make_http_client
    from asyncrunner.llm.probe import ProbeError, probe
    from asyncrunner.llm.throttle import AdaptiveLimiter

    settings = client_settings(cfg, env)
    system = cfg.prompt.system_prompt
    async with AsyncExitStack() as stack:
        if cfg.model.provider == "mock":
            from asyncrunner.sim import MockServer

            server = await stack.enter_async_context(
                MockServer(latency_ms=0.0, model=settings.model))
            settings = replace(settings, api_url=server.url)
        http = await stack.enter_async_context(make_http_client(
            1, settings.timeout_s, max_response_bytes=cfg.model.max_response_bytes))
        setting = cfg.model.response_format or "none"
        try:
            mode = (await probe(settings, http, system, cfg.prompt.user_template,
                                setting=setting)).mode
        except ProbeError as exc:
            if exc.fatal:
                raise EndpointCannotServe(f"the endpoint cannot serve this run: {exc}") from None
            mode = candidate_formats(setting)[0]     # busy or unreachable: as the run does
        client = LLMClient(replace(settings, response_format=None if mode == "none" else mode),
                           http, AdaptiveLimiter(1))
        outcomes = [(prompt, await client.complete(system, prompt)) for prompt in prompts]
    return _stats(cfg, outcomes, mode)


def _stats(cfg: Config, outcomes: Sequence[tuple[str, Completion | RequestFailure]],
           mode: str) -> ProbeStats:
    latencies: list[float] = []
    completion: list[int] = []
    usage: list[tuple[int, int]] = []
    failures: list[str] = []
    retried = 0
    for prompt, outcome in outcomes:
        if isinstance(outcome, RequestFailure):
            if outcome.fatal:
                raise EndpointCannotServe("the endpoint cannot serve this run: "
                                          + describe_fatal(outcome))
            failures.append(f"{outcome.category}: {outcome.message}")
            continue
        latencies.append(outcome.response_sec)
        retried += outcome.attempts > 1
        if outcome.completion_tokens is not None:
            completion.append(outcome.completion_tokens)
        if outcome.prompt_tokens is not None:
            usage.append((_message_chars(cfg, prompt), outcome.prompt_tokens))
    return ProbeStats(len(outcomes), tuple(latencies), tuple(completion), tuple(usage),
                      tuple(failures), mode, retried)


# --------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True, slots=True)
class Cost:
    source: str               # price_per_mtok | price_per_1k (model.price_per_1k_*)
    input_per_mtok: float
    output_per_mtok: float
    input_cost: float
    output_cost: float

    @property
    def total(self) -> float:
        return self.input_cost + self.output_cost


@dataclass(frozen=True, slots=True)
class Estimate:
    n: int
    input_tokens_estimate: int            # characters / CHARS_PER_TOKEN
    input_tokens_measured: int | None     # scaled by the probe's reported prompt tokens
    output_tokens_max: int                # max_tokens x n: an upper bound
    output_tokens_measured: int | None    # the probe's mean x n
    workers: int
    wall_s: float | None                  # n x median / workers
    sequential_s: float | None            # n x median
    costs: tuple[Cost, ...]

    @property
    def input_tokens(self) -> int:
        """The best figure: measured when the probe reported usage."""
        if self.input_tokens_measured is not None:
            return self.input_tokens_measured
        return self.input_tokens_estimate

    @property
    def output_tokens(self) -> int:
        if self.output_tokens_measured is not None:
            return self.output_tokens_measured
        return self.output_tokens_max


def costs(cfg: Config, input_tokens: int, output_tokens: int) -> tuple[Cost, ...]:
    """One cost per price setting given: model.price_per_mtok, and the older per-1k keys."""
    m = cfg.model
    out: list[Cost] = []
    if m.price_per_mtok is not None:
        pin, pout = float(m.price_per_mtok["input"]), float(m.price_per_mtok["output"])
        out.append(_cost("price_per_mtok", pin, pout, input_tokens, output_tokens))
    if m.price_per_1k_input is not None or m.price_per_1k_output is not None:
        pin = (m.price_per_1k_input or 0.0) * 1000
        pout = (m.price_per_1k_output or 0.0) * 1000
        out.append(_cost("price_per_1k", pin, pout, input_tokens,
                         output_tokens))
    return tuple(out)


def _cost(source: str, pin: float, pout: float, tokens_in: int, tokens_out: int) -> Cost:
    return Cost(source, pin, pout, tokens_in * pin / 1e6, tokens_out * pout / 1e6)


def estimate(cfg: Config, work: Workload, probed: ProbeStats | None = None) -> Estimate:
    n = work.n
    measured_in = measured_out = None
    median = None
    if probed is not None:
        if probed.tokens_per_char is not None:
            measured_in = round(work.prompt_chars * probed.tokens_per_char)
        if probed.mean_completion_tokens is not None:
            measured_out = round(probed.mean_completion_tokens * n)
        median = probed.median_s
    workers = cfg.run.workers
    est = Estimate(
        n=n, input_tokens_estimate=math.ceil(work.prompt_chars / CHARS_PER_TOKEN),
        input_tokens_measured=measured_in, output_tokens_max=cfg.model.max_tokens * n,
        output_tokens_measured=measured_out, workers=workers,
        wall_s=None if median is None else n * median / workers,
        sequential_s=None if median is None else n * median, costs=())
    return replace(est, costs=costs(cfg, est.input_tokens, est.output_tokens))


# --------------------------------------------------------------------------- output


def _line(label: str, value: str) -> str:
    return f"{label + ':':<{_LABEL_WIDTH - 1}} {value}"


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{format_duration(seconds)} ({seconds / 3600:,.1f} hours)"


def render_workload(cfg: Config, work: Workload) -> list[str]:
    lines = [_line("data file", work.data_file),
             _line("rows", f"{work.n_rows:,}"),
             _line("narratives in file", f"{work.n_in_file:,} (not sent: {work.n_blank:,} "
                   f"blank, {work.n_placeholder:,} of them placeholders; "
                   f"{work.n_duplicates:,} duplicates; {work.n_no_id:,} without an id)")]
    if cfg.run.max_narratives is not None:
        lines.append(_line("max_narratives", f"{cfg.run.max_narratives:,} -> "
                           f"{work.n_after_limit:,} narratives (the first in file order)"))
    if cfg.data.sample is not None:
        s = cfg.data.sample
        strata = ", ".join(s["stratify"]) or "none"
        lines.append(_line("sample", f"n={s['n']:,} of {work.n_after_limit:,} (stratified by "
                           f"{strata}, seed {s['seed']}) -> {work.n:,} narratives"))
    lines.append(_line("narratives to send", f"{work.n:,}"))
    return lines


def render(cfg: Config, work: Workload, est: Estimate, probed: ProbeStats | None) -> list[str]:
    """Tokens, time and cost, one fact per line (after render_workload)."""
    per_req = est.input_tokens_estimate / est.n if est.n else 0
    lines = [
        _line("model", _model_text(cfg)),
        _line("prompt characters", f"{work.prompt_chars:,} (system prompt + user template "
              "with each narrative, summed exactly)"),
        _line("prompt tokens (estimate)", f"~{est.input_tokens_estimate:,} at ~"
              f"{CHARS_PER_TOKEN} characters a token (mean {per_req:,.0f} per request); "
              "the model's tokenizer will differ"),
        _line("output tokens (at most)", f"{est.output_tokens_max:,} (max_tokens "
              f"{cfg.model.max_tokens:,} x {est.n:,}; an upper bound)"),
    ]
    if probed is not None:
        lines += _probe_lines(probed, est)
    lines += _time_lines(cfg, est, probed)
    lines += _cost_lines(est, measured_out=est.output_tokens_measured is not None)
    lines.append(_line("not included", "parse retries (repair/resample) and retried requests "
                       "add requests and tokens beyond these figures"))
    return lines


def _model_text(cfg: Config) -> str:
    m = cfg.model
    if m.provider == "mock":
        return f"{m.name} (provider mock: the built-in simulator, not a real model)"
    if m.endpoints:
        return (f"{m.name} via {len(m.endpoints)} endpoints (the probe uses the first, "
                f"{redact_url(m.endpoints[0]['api_url'])})")
    return f"{m.name} via {redact_url(normalize_api_url(m.api_url))} (provider {m.provider})"


def _probe_lines(probed: ProbeStats, est: Estimate) -> list[str]:
    sent = (f"{probed.sent} requests sent one at a time after a response-format check "
            f"(response_format {probed.response_format}): {probed.answered} answered, "
            f"{len(probed.failures)} failed; nothing stored")
    lines = [_line("probe", sent)]
    lines += [_line("probe failure", f) for f in dict.fromkeys(probed.failures)]
    if probed.median_s is None or probed.p90_s is None:
        return lines
    retried = f"; {probed.retried} needed a retry" if probed.retried else ""
    lines.append(_line("latency", f"median {_latency(probed.median_s)}, p90 "
                       f"{_latency(probed.p90_s)} (per request, one in flight, "
                       f"{probed.answered} answers{retried})"))
    if est.input_tokens_measured is not None and probed.tokens_per_char is not None:
        lines.append(_line("prompt tokens (measured)", f"~{est.input_tokens_measured:,} "
                           f"({1 / probed.tokens_per_char:.2f} characters a token as the "
                           "server counted the probe's prompts, scaled to all)"))
    if est.output_tokens_measured is not None and probed.mean_completion_tokens is not None:
        lines.append(_line("output tokens (measured)", f"~{est.output_tokens_measured:,} "
                           f"(mean {probed.mean_completion_tokens:,.1f} per answer of the "
                           f"probe x {est.n:,})"))
    else:
        lines.append(_line("output tokens (measured)", "unknown: the server reported no "
                           "usage; the cost below uses the upper bound"))
    return lines


def _time_lines(cfg: Config, est: Estimate, probed: ProbeStats | None) -> list[str]:
    r = cfg.run
    workers = (f"auto, at most {r.workers} (run.workers is the ceiling; the concurrency "
               "found depends on the server)" if r.auto_workers
               else f"{r.workers} (run.workers)")
    lines = [_line("workers", workers)]
    if cfg.model.provider == "openai-batch":
        return [*lines, _line("wall time", "provider openai-batch: each batch of up to "
                              f"{cfg.model.batch_max_requests:,} requests completes within "
                              f"{cfg.model.batch_window}; live latency does not apply")]
    if est.wall_s is None or est.sequential_s is None:
        why = ("the probe got no answer" if probed is not None
               else f"measure it with --probe {SUGGESTED_PROBE}")
        lines += [_line("latency", f"unknown ({why})"),
                  _line("wall time", f"unknown until the latency is measured (--probe "
                        f"{SUGGESTED_PROBE} sends {SUGGESTED_PROBE} real requests)")]
    else:
        ceiling = "; auto may settle lower" if r.auto_workers else ""
        lines += [
            _line("wall time", f"~{_duration(est.wall_s)} at {est.workers} workers "
                  f"(n x median latency / workers; assumes the server keeps this latency with "
                  f"{est.workers} requests in flight, a server that slows under load takes "
                  f"longer{ceiling})"),
            _line("wall time, sequential", f"~{_duration(est.sequential_s)} (n x median "
                  "latency, one request at a time)"),
        ]
    if r.requests_per_minute:
        floor = est.n / r.requests_per_minute * 60
        lines.append(_line("rate limit", f"run.requests_per_minute {r.requests_per_minute:g}: "
                           f"no faster than {_duration(floor)}"))
    if r.tokens_per_minute:
        floor = (est.input_tokens + est.output_tokens) / r.tokens_per_minute * 60
        lines.append(_line("token limit", f"run.tokens_per_minute {r.tokens_per_minute:g}: "
                           f"no faster than {_duration(floor)}"))
    return lines


def _cost_lines(est: Estimate, *, measured_out: bool) -> list[str]:
    if not est.costs:
        return [_line("cost", "no price set (model.price_per_mtok: {input: ..., output: ...}, "
                      "per million tokens)")]
    bound = "measured mean" if measured_out else "upper bound"
    return [_line(f"cost ({c.source})",
                  f"{c.total:,.4f} = input {c.input_cost:,.4f} ({est.input_tokens:,} tokens "
                  f"x {c.input_per_mtok:g} per million) + output {c.output_cost:,.4f} "
                  f"({est.output_tokens:,} tokens, {bound}, x {c.output_per_mtok:g} "
                  "per million)")
            for c in est.costs]


# --------------------------------------------------------------------------- command


@dataclass(frozen=True, slots=True)
class PlanReport:
    config: Config
    workload: Workload
    probe: ProbeStats | None
    estimate: Estimate


def make_plan(cfg: Config, *, probe: int | None, env: Mapping[str, str],
              out: IO[str] | None = None) -> PlanReport:
    """Count, probe, estimate; with `out`, the workload lines are written before the probe."""
    if probe is not None and cfg.model.provider == "openai-batch":
        raise UsageError("--probe sends live requests; provider openai-batch sends through "
                         "the Batch API (plan without --probe)")
    work = count_workload(cfg, keep_prompts=probe or 0)
    if out is not None:
        _write(out, [f"plan for '{cfg.experiment.name}' (nothing is stored; no database is "
                     "opened)", *render_workload(cfg, work)])
    if work.n == 0:
        raise InputError(f"data file {cfg.data.file} holds no narratives to classify")
    probed = None
    if probe:
        import anyio

        probed = anyio.run(probe_endpoint, cfg, work.first_prompts, env)
    return PlanReport(cfg, work, probed, estimate(cfg, work, probed))


def _write(out: IO[str], lines: Sequence[str]) -> None:
    out.write("".join(for_terminal(line) + "\n" for line in lines))
    out.flush()


def plan_command(config_path: str, *, probe: int | None, overrides: Mapping[str, Any],
                 env: Mapping[str, str], out: IO[str]) -> int:
    """`asyncrunner plan CONFIG.yaml [--probe K]`: the report to `out`; 0, or an error."""
    cfg = load_config(config_path, overrides=overrides, env=env)
    endpoints_from(cfg, env)              # what run would refuse, plan refuses too
    report = make_plan(cfg, probe=probe, env=env, out=out)
    _write(out, render(cfg, report.workload, report.estimate, report.probe))
    probed = report.probe
    if probed is not None and probed.answered == 0:
        raise EndpointCannotServe(f"none of the probe's {probed.sent} requests was answered "
                                  f"({probed.failures[0]}); check the endpoint")
    return 0
